"""The scheduler on its own, over a fake page pool: budgets, chunk boundaries, FCFS, admission, preemption in a
mixed step, prefix sharing and eviction."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from types import SimpleNamespace

import pytest

from phi_fast.kv_cache import CacheFullError, SequencePages
from phi_fast.scheduler import Scheduler, StepPlan

PS = 16


class FakePool:
    """PagePool's allocator without tensors (copy_page records the copies)."""

    def __init__(self, num_pages: int, page_size: int = PS):
        self.page_size, self.num_pages = page_size, num_pages
        self._free = list(range(num_pages - 1, -1, -1))
        self._refs = [0] * num_pages
        self.copies: list[tuple[int, int]] = []

    @property
    def num_free(self) -> int:
        return len(self._free)

    def refcount(self, page: int) -> int:
        return self._refs[page]

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise CacheFullError(f"need {n}")
        pages = [self._free.pop() for _ in range(n)]
        for p in pages:
            self._refs[p] = 1
        return pages

    def share(self, pages: list[int]) -> None:
        for p in pages:
            self._refs[p] += 1

    def release(self, pages: list[int]) -> None:
        for p in pages:
            assert self._refs[p] > 0, f"page {p} released more often than held"
            self._refs[p] -= 1
            if self._refs[p] == 0:
                self._free.append(p)

    def copy_page(self, src: int, dst: int) -> None:
        self.copies.append((src, dst))


_ids = itertools.count()


@dataclass(eq=False)
class FakeRequest:
    keys: list
    max_new_tokens: int = 4
    keep_cache: bool = False
    id: int = field(default_factory=lambda: next(_ids))
    output_ids: list = field(default_factory=list)
    seq: SequencePages = field(default_factory=SequencePages)

    @property
    def params(self):
        return SimpleNamespace(max_new_tokens=self.max_new_tokens)

    @property
    def num_tokens(self) -> int:
        return len(self.keys) + len(self.output_ids)

    def all_keys(self) -> list:
        return self.keys + self.output_ids


def prompt(n: int, tag: str = "p") -> list:
    """n keys: a 20-token shared head (a system prompt), then keys unique to `tag`."""
    return [("sys", i) for i in range(min(n, 20))] + [(tag, i) for i in range(max(n - 20, 0))]


def make(num_pages: int = 64, budget: int = 64, max_num_seqs: int = 8, prefix_cache: int = 4):
    pool = FakePool(num_pages)
    return pool, Scheduler(pool, max_num_seqs=max_num_seqs, token_budget=budget, context=10_000,
                           prefix_cache=prefix_cache)


def execute(sched: Scheduler, plan: StepPlan) -> None:
    """What the engine does with a plan: a token for every sampled row; finished requests go to the cache."""
    for req, _ in plan.failed:
        sched.finish(req, keep=False)
    for c in plan.rows:
        assert c.req.seq.length == c.end and len(c.slots) == c.num_tokens
        if c.sample:
            c.req.output_ids.append(1000 + len(c.req.output_ids))
            if len(c.req.output_ids) >= c.req.max_new_tokens:
                sched.finish(c.req, keep=True)


def spans(plan: StepPlan) -> list[tuple[int, int, int, bool]]:
    return [(c.req.id, c.start, c.end, c.sample) for c in plan.chunks]


def run(sched: Scheduler, limit: int = 1000) -> list[StepPlan]:
    plans = []
    while sched.waiting or sched.running:
        plans.append(sched.schedule())
        execute(sched, plans[-1])
        assert len(plans) < limit, "the scheduler made no progress"
    return plans


def test_non_final_chunks_end_on_page_edges_and_only_the_last_is_sampled():
    _, sched = make(budget=40)
    req = FakeRequest(prompt(100))
    sched.waiting.append(req)
    plans = run(sched)
    assert [spans(p) for p in plans[:3]] == [[(req.id, 0, 32, False)], [(req.id, 32, 64, False)],
                                              [(req.id, 64, 100, True)]]  # the last one fits whole: no edge
    assert [p.kind for p in plans] == ["prefill"] * 3 + ["decode"] * 3
    assert req.output_ids == [1000, 1001, 1002, 1003]


def test_budget_one_computes_one_token_per_step():
    _, sched = make(budget=1)
    a, b = FakeRequest(prompt(5, "a"), max_new_tokens=2), FakeRequest(prompt(3, "b"), max_new_tokens=2)
    sched.waiting += [a, b]
    plans = run(sched)
    assert all(p.num_tokens == 1 for p in plans)
    assert [c.sample for p in plans for c in p.chunks if c.req is a] == [False] * 4 + [True]
    assert len(plans) == 5 + 1 + 3 + 1  # every token of both, one at a time
    assert a.output_ids == b.output_ids == [1000, 1001]


def test_decodes_come_first_and_chunks_fill_the_rest_of_the_budget():
    _, sched = make(budget=40)
    old = [FakeRequest(prompt(10, f"o{i}"), max_new_tokens=50) for i in range(3)]
    sched.waiting += old
    execute(sched, sched.schedule())  # three short prompts in one step
    assert all(len(r.output_ids) == 1 for r in old)
    new = FakeRequest(prompt(200, "n"))
    sched.waiting.append(new)
    plan = sched.schedule()
    assert [c.req for c in plan.decodes] == old and plan.kind == "mixed"
    assert spans(plan) == [(new.id, 0, 32, False)]  # 37 tokens left: the page edge below
    execute(sched, plan)
    while not new.output_ids:  # the running streams get a token every step while the prompt is chunked
        plan = sched.schedule()
        assert [c.req for c in plan.decodes] == old and plan.num_tokens <= 40
        assert [c.end % PS for c in plan.chunks if not c.sample] == [0] * (not plan.chunks[0].sample)
        execute(sched, plan)
    assert sched.schedule().decodes[-1].req is new


def test_first_come_first_served_within_the_budget():
    _, sched = make(budget=50)
    a, b, c = (FakeRequest([(t, i) for i in range(30)]) for t in "abc")  # nothing shared
    sched.waiting += [a, b, c]
    plan = sched.schedule()
    # b's chunk ends on a page edge; 4 tokens are left, too few to reach one: c's chunk ends where they do
    assert spans(plan) == [(a.id, 0, 30, True), (b.id, 0, 16, False), (c.id, 0, 4, False)]
    execute(sched, plan)
    plan = sched.schedule()
    assert [d.req for d in plan.decodes] == [a]
    assert spans(plan) == [(b.id, 16, 30, True), (c.id, 4, 30, True)]  # older prompts' chunks first


def test_admission_stops_at_max_num_seqs():
    _, sched = make(budget=500, max_num_seqs=2)
    reqs = [FakeRequest(prompt(10, f"r{i}"), max_new_tokens=3) for i in range(3)]
    sched.waiting += reqs
    plan = sched.schedule()
    assert [c.req for c in plan.chunks] == reqs[:2] and sched.waiting == [reqs[2]]
    plans = [plan] + (execute(sched, plan) or run(sched))
    assert all(len(r.output_ids) == 3 for r in reqs)
    assert max(len(p.rows) for p in plans) == 2


def test_prompt_larger_than_the_cache_fails_and_the_next_one_runs():
    _, sched = make(num_pages=4)
    huge, ok = FakeRequest(prompt(5 * PS, "h")), FakeRequest(prompt(10, "ok"))
    sched.waiting += [huge, ok]
    plan = sched.schedule()
    assert [r for r, _ in plan.failed] == [huge]
    assert "needs 5 KV pages" in str(plan.failed[0][1]) and "more than the whole cache (4 pages)" in str(plan.failed[0][1])
    assert spans(plan) == [(ok.id, 0, 10, True)]


def test_prefix_shared_from_a_cached_request_and_counted():
    pool, sched = make()
    first = FakeRequest(prompt(40, "img") + [("q", 1)], max_new_tokens=1)
    sched.waiting.append(first)
    run(sched)
    assert sched.cached == [first]
    second = FakeRequest(prompt(40, "img") + [("q", 2)], max_new_tokens=1)
    sched.waiting.append(second)
    plan = sched.schedule()
    assert spans(plan) == [(second.id, 40, 41, True)]  # the 40 shared tokens are not computed again
    assert second.seq.pages[:2] == first.seq.pages[:2] and pool.refcount(first.seq.pages[0]) == 2
    assert pool.copies == [(first.seq.pages[2], second.seq.pages[2])]  # its partial third page: copied first
    assert (sched.prefix_hits, sched.prefix_hit_tokens) == (1, 40)


def test_prefix_being_computed_is_waited_for_not_recomputed():
    _, sched = make(budget=32)
    a = FakeRequest(prompt(80, "img") + [("q", 1)])
    b = FakeRequest(prompt(80, "img") + [("q", 2)])
    sched.waiting += [a, b]
    plan = sched.schedule()
    assert spans(plan) == [(a.id, 0, 32, False)]  # b would recompute what a is computing: it waits
    execute(sched, plan)
    plan = sched.schedule()
    assert spans(plan) == [(a.id, 32, 64, False)] and sched.waiting == [b]
    execute(sched, plan)
    plan = sched.schedule()  # a's last chunk fills pages 4 and 5: b shares them in the same step
    assert spans(plan) == [(a.id, 64, 81, True), (b.id, 80, 81, True)] and sched.prefix_hit_tokens == 80
    assert b.seq.pages[:5] == a.seq.pages[:5]


def test_two_prompts_with_one_system_prompt_start_in_the_same_step():
    pool, sched = make(budget=500)
    a, b = FakeRequest(prompt(40, "a")), FakeRequest(prompt(40, "b"))  # 20 tokens in common: one whole page
    sched.waiting += [a, b]
    plan = sched.schedule()
    assert spans(plan) == [(a.id, 0, 40, True), (b.id, 16, 40, True)]
    assert b.seq.pages[0] == a.seq.pages[0] and pool.refcount(a.seq.pages[0]) == 2 and not pool.copies


def test_eviction_takes_the_oldest_cached_tails_first():
    pool, sched = make(num_pages=8, budget=500, prefix_cache=4)
    done = []
    for t in "xy":  # two finished requests, 3 pages each (the second shares nothing: other text)
        r = FakeRequest([(t, i) for i in range(40)], max_new_tokens=1)
        sched.waiting.append(r)
        run(sched)
        done.append(r)
    assert pool.num_free == 2 and sched.cached == done
    big = FakeRequest([("z", i) for i in range(60)], max_new_tokens=1)  # 4 pages: 2 must be evicted
    sched.waiting.append(big)
    plan = sched.schedule()
    assert spans(plan) == [(big.id, 0, 60, True)]
    assert len(done[0].seq.pages) == 1 and done[0].seq.length == PS  # x lost its tail pages ...
    assert len(done[1].seq.pages) == 3  # ... y, the newer, kept everything


def test_prefix_cache_keeps_the_newest_n():
    pool, sched = make(prefix_cache=2)
    reqs = [FakeRequest([(t, i) for i in range(20)], max_new_tokens=1) for t in "abc"]
    for r in reqs:
        sched.waiting.append(r)
        run(sched)
    assert sched.cached == reqs[1:] and not reqs[0].seq.pages
    sched.clear_prefix_cache()
    assert pool.num_free == pool.num_pages


def test_preempted_request_resumes_from_its_surviving_pages():
    pool, sched = make(num_pages=5, budget=500, prefix_cache=0)
    a = FakeRequest([("a", i) for i in range(32)], max_new_tokens=3)  # 2 pages, its first decode needs a third
    b = FakeRequest([("b", i) for i in range(40)], max_new_tokens=5)  # 3 pages
    sched.waiting += [a, b]
    execute(sched, sched.schedule())
    assert pool.num_free == 0
    plan = sched.schedule()
    assert plan.preempted == [b] and [c.req for c in plan.decodes] == [a] and sched.waiting == [b]
    assert (len(b.seq.pages), b.seq.length) == (2, 32)  # it lost only the tail page a needed
    execute(sched, plan)
    plans = run(sched)
    resumed = next(c for p in plans for c in p.chunks if c.req is b)
    assert (resumed.start, resumed.end) == (32, 41)  # its own 32 cached tokens were not recomputed
    assert len(a.output_ids) == 3 and len(b.output_ids) == 5 and sched.preemptions == 1
    assert pool.num_free == pool.num_pages


def test_preemption_in_a_mixed_step_finishes_everything():
    pool, sched = make(num_pages=14, budget=40, prefix_cache=0)
    a = FakeRequest([("a", i) for i in range(16)], max_new_tokens=50)  # decodes, grows a page every 16 tokens
    p = FakeRequest([("p", i) for i in range(200)], max_new_tokens=3)  # chunked over many steps
    n = FakeRequest([("n", i) for i in range(8)], max_new_tokens=50)  # newest: the victim
    sched.waiting += [a, p, n]
    kinds = []
    while sched.waiting or sched.running:
        before = {id(r): r.seq.length for r in sched.waiting}
        plan = sched.schedule()
        kinds.append((plan.kind, [r.id for r in plan.preempted]))
        for ch in plan.chunks:  # a request coming back from the queue starts from what it still holds
            if before.get(id(ch.req)):
                assert ch.start == before[id(ch.req)]
        execute(sched, plan)
        assert len(kinds) < 500
    assert ("mixed", [n.id]) in kinds, "a mixed step was meant to preempt the newest request"
    assert len(a.output_ids) == len(n.output_ids) == 50 and len(p.output_ids) == 3
    assert pool.num_free == pool.num_pages


def test_lone_request_that_outgrows_the_cache_fails():
    _, sched = make(num_pages=2, prefix_cache=0)
    r = FakeRequest(prompt(30), max_new_tokens=10)
    sched.waiting.append(r)
    for _ in range(3):  # the prompt, then positions 30 and 31
        execute(sched, sched.schedule())
    plan = sched.schedule()  # position 32 needs a third page
    assert [x for x, _ in plan.failed] == [r] and "needs another KV page" in str(plan.failed[0][1])
    assert not sched.running


def test_launch_in_flight_drains_before_a_chunk_or_a_preemption():
    _, sched = make(budget=64)
    a = FakeRequest(prompt(10, "a"), max_new_tokens=20)
    sched.waiting.append(a)
    execute(sched, sched.schedule())
    plan = sched.schedule()  # a pure decode step ...
    assert plan.kind == "decode"
    inflight = {a.id}  # ... launched, its token not read yet
    assert sched.schedule(inflight).kind == "decode"  # pipelined: the next decode goes out before the read
    b = FakeRequest(prompt(10, "b"))
    sched.waiting.append(b)
    drain = sched.schedule(inflight)
    assert drain.drain_first and not drain.rows and sched.waiting == [b]  # nothing changed


@pytest.mark.parametrize("budget", [0, -3])
def test_budget_must_be_positive(budget):
    with pytest.raises(ValueError, match=f"token_budget must be >= 1, got {budget}"):
        make(budget=budget)


def test_decodes_beyond_the_budget_wait_oldest_first():
    _, sched = make(budget=2)
    reqs = [FakeRequest([(t, 0)], max_new_tokens=3) for t in "abc"]  # one-token prompts
    sched.waiting += reqs
    plans = run(sched)
    assert all(p.num_tokens <= 2 for p in plans)
    first_tokens = [[c.req for c in p.rows] for p in plans[:4]]
    assert first_tokens[0] == reqs[:2] and first_tokens[1] == reqs[:2]  # c waits while a, b run
    assert all(len(r.output_ids) == 3 for r in reqs)
