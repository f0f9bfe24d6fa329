"""The scheduler: which tokens each engine step computes, over which KV pages (pure Python data, no tensors).

Every step has a token budget (`token_budget`). The running requests that need one more token (decodes) come
first, oldest first, one token each; the rest of the budget goes to prompt chunks: first of the running requests
whose prompt is only partly computed (oldest first), then of waiting requests in arrival order (first come,
first served: a request that cannot start blocks those behind it). A long prompt therefore takes several steps,
and a decode never waits for a whole prompt. A chunk that is not its prompt's last ends on a page edge when that
keeps at least half of it, so the pages it fills are whole (and a preempted request's surviving pages with
them). Only a prompt's last chunk is sampled (`Chunk.sample`).

The scheduler also owns the pages' fate:
- admission: at most `max_num_seqs` requests run; a prompt longer than the whole cache fails at once;
- prefix sharing: a request starts with the longest prefix (same tokens, same image rows) that a running, retained
  or cached sequence has computed, or fills with whole pages in this very step (two prompts with the same system
  prompt start together); if a prompt still incomplete after this step would give it a page more, it waits for
  that prompt instead;
- eviction: pages are taken back page by page from the tail of finished requests kept as a prefix cache (oldest
  first), then of preempted requests, then of retained chat turns;
- preemption: when the decodes need more pages than that frees, the newest running request is preempted. It keeps
  its pages (evictable, tail first) and goes back to the front of the queue; when it runs again it resumes from
  what survived, so only its evicted tail is recomputed. A prompt chunk preempts only requests newer than its own.
  With a decode launch in flight nothing is preempted and no chunk is planned: the plan asks the engine to read
  the launch first (`StepPlan.drain_first`) and plans again.

The engine executes the plan (engine.py) and reports finished requests (`finish`). Requests are the engine's
(anything with the attributes of `SchedRequest`), the pool anything with PagePool's allocator methods.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Hashable
from dataclasses import dataclass, field
from typing import Any, Protocol

from .kv_cache import CacheFullError, SequencePages

log = logging.getLogger(__name__)

DEFAULT_TOKEN_BUDGET = {"cpu": 512, "cuda": 4096}


class SchedRequest(Protocol):
    """What the scheduler reads of a request (engine.Request has it)."""

    id: int  # increasing in arrival order
    keys: list[Hashable]  # identity of each prompt position
    output_ids: list[int]
    seq: SequencePages
    params: Any  # .max_new_tokens
    keep_cache: bool

    @property
    def num_tokens(self) -> int: ...

    def all_keys(self) -> list[Hashable]: ...


@dataclass
class Chunk:
    """Positions [start, end) of req computed this step; their cache slots; whether end's token is drawn."""

    req: Any
    start: int
    end: int
    slots: list[int]
    sample: bool
    admitted: bool = False  # req joined the running requests with this chunk

    @property
    def num_tokens(self) -> int:
        return self.end - self.start


@dataclass
class StepPlan:
    """One step's work: decode rows (one token each, sampled) first, then prompt chunks."""

    decodes: list[Chunk] = field(default_factory=list)
    chunks: list[Chunk] = field(default_factory=list)
    failed: list[tuple[Any, Exception]] = field(default_factory=list)  # to finish with an error (taken off the lists)
    preempted: list[Any] = field(default_factory=list)
    drain_first: bool = False  # read the decode launch in flight, then plan again (nothing was planned)

    @property
    def rows(self) -> list[Chunk]:
        return self.decodes + self.chunks

    @property
    def num_tokens(self) -> int:
        return sum(c.num_tokens for c in self.rows)

    @property
    def kind(self) -> str:
        """"decode" (decode rows only), "prefill" (chunks only), "mixed" (both) or "idle"."""
        if self.chunks:
            return "mixed" if self.decodes else "prefill"
        return "decode" if self.decodes else "idle"


class Scheduler:
    """Queues, page ownership and the step plans of one engine (see the module docstring)."""

    def __init__(self, pool: Any, *, max_num_seqs: int, token_budget: int, context: int, prefix_cache: int):
        if token_budget < 1:
            raise ValueError(f"token_budget must be >= 1, got {token_budget}")
        self.pool = pool
        self.max_num_seqs = max_num_seqs
        self.token_budget = token_budget
        self.context = context
        self.prefix_cache = prefix_cache
        self.waiting: list[Any] = []
        self.running: list[Any] = []  # admitted: decoding, or with a prompt partly computed
        self.retained: list[Any] = []  # finished chat turns whose pages stay cached
        self.cached: list[Any] = []  # finished requests kept as a prefix cache, oldest first
        self.prefix_hits = 0  # requests that started from another sequence's pages
        self.prefix_hit_tokens = 0  # tokens they did not compute
        self.preemptions = 0
        self._reserved: dict[int, int] = {}  # request id -> slots reserved by the plan being made

    # --- the plan -----------------------------------------------------------------------------------------

    def schedule(self, inflight: Collection[int] = ()) -> StepPlan:
        """The next step's plan. inflight: ids of requests whose token from the last decode launch is unread."""
        self._reserved = {}
        plan = StepPlan()
        wanting = [r for r in self.running if self._decoding(r, inflight) and self._wants_token(r, inflight)]
        wanting = wanting[: self.token_budget]
        if inflight and self._may_chunk(len(wanting)):
            return StepPlan(drain_first=True)  # chunks run eagerly with every input on the host
        if not self._reserve_decodes(wanting, inflight, plan):
            return StepPlan(drain_first=True)
        left = self.token_budget - len(plan.decodes)
        for req in [r for r in self.running if _prefilling(r)]:
            if left <= 0:
                break
            if req not in self.running:  # preempted by an older prompt's chunk just now
                continue
            chunk = self._take_chunk(req, left, plan, preempt_newer=True)
            if chunk is None:
                break  # an older prompt waits for pages: newer ones do not overtake it
            plan.chunks.append(chunk)
            left -= chunk.num_tokens
        while left > 0 and self.waiting and len(self.running) < self.max_num_seqs:
            req = self.waiting[0]
            if req in plan.preempted:
                break
            whole = -(-req.num_tokens // self.pool.page_size)
            if whole > self.pool.num_pages:
                self.waiting.pop(0)
                req.seq.free(self.pool)
                plan.failed.append((req, CacheFullError(
                    f"request {req.id} needs {whole} KV pages of {self.pool.page_size} tokens for its "
                    f"{req.num_tokens}-token prompt, more than the whole cache ({self.pool.num_pages} pages) can "
                    f"give")))
                continue
            chunk = self._admit(req, left, plan)
            if chunk is None:
                break
            plan.chunks.append(chunk)
            left -= chunk.num_tokens
        self._reserved = {}
        return plan

    def _decoding(self, req: Any, inflight: Collection[int]) -> bool:
        """Whether req's only work is its last sampled token (or the one in flight)."""
        return _decoding(req) or (req.num_tokens == req.seq.length and req.id in inflight)

    def _wants_token(self, req: Any, inflight: Collection[int]) -> bool:
        """Whether req needs a token beyond those already generated or in flight."""
        launched = len(req.output_ids) + (req.id in inflight)
        return launched < req.params.max_new_tokens and len(req.keys) + launched < self.context

    def _may_chunk(self, n_decodes: int) -> bool:
        """Whether this step could plan a chunk (conservative: pages are not looked at)."""
        if n_decodes >= self.token_budget:
            return False
        return any(_prefilling(r) for r in self.running) or (
            bool(self.waiting) and len(self.running) < self.max_num_seqs)

    def _reserve_decodes(self, wanting: list[Any], inflight: Collection[int], plan: StepPlan) -> bool:
        """One slot for each wanting request, evicting and preempting as needed; False: drain first."""
        while True:
            need = sum(r.seq.pages_needed(self.pool, 1) for r in wanting)
            if self._make_room(need, keep=wanting):
                break
            if inflight:
                return False
            victim = max(self.running, key=lambda r: r.id)
            if len(self.running) == 1:  # alone and still no page: the cache is too small for it
                self.running.remove(victim)
                wanting.remove(victim)
                plan.failed.append((victim, CacheFullError(
                    f"request {victim.id} at {victim.seq.length} tokens needs another KV page and the cache "
                    f"({self.pool.num_pages} pages of {self.pool.page_size}) has none left")))
                continue
            self._preempt(victim, plan)
            if victim in wanting:
                wanting.remove(victim)
        for r in wanting:
            start = r.seq.length
            plan.decodes.append(Chunk(r, start, start + 1, r.seq.reserve(self.pool, 1), sample=True))
            self._reserved[r.id] = 1
        return True

    def _admit(self, req: Any, left: int, plan: StepPlan) -> Chunk | None:
        """The first chunk of the waiting request at the queue's front (then running), or None: it waits."""
        ps = self.pool.page_size
        shared = False
        if not req.seq.pages:
            other, n = self._best_prefix(req)
            if self._better_prefix_coming(req, n):
                return None
            if other is not None and n >= ps:
                req.seq.share_from(self.pool, other.seq, n)
                shared = True
        chunk = self._take_chunk(req, left, plan, preempt_newer=False)
        if chunk is None:
            if shared:
                req.seq.free(self.pool)
            return None
        if shared:
            self.prefix_hits += 1
            self.prefix_hit_tokens += chunk.start
        chunk.admitted = True
        self.waiting.pop(0)
        self.running.append(req)
        return chunk

    def _take_chunk(self, req: Any, left: int, plan: StepPlan, preempt_newer: bool) -> Chunk | None:
        """The next chunk of req within `left` tokens and the pages that can be had; None if not even one token."""
        ps, start, total = self.pool.page_size, req.seq.length, req.num_tokens
        end = min(total, start + left)
        if end < total and end // ps * ps - start >= (end - start) / 2:
            end = end // ps * ps  # a non-final chunk ends on a page edge if that costs at most half of it
        keep = [req] + [c.req for c in plan.rows]
        while not self._make_room(req.seq.pages_needed(self.pool, end - start), keep):
            newer = [r for r in self.running if r.id > req.id and r not in keep] if preempt_newer else []
            if newer:
                self._preempt(max(newer, key=lambda r: r.id), plan)
                continue
            while end > start and req.seq.pages_needed(self.pool, end - start) > self.pool.num_free:
                end = (end - 1) // ps * ps  # shrink to the pages there are
            break
        if end <= start:
            return None
        self._reserved[req.id] = end - start
        return Chunk(req, start, end, req.seq.reserve(self.pool, end - start), sample=end == total)

    def _preempt(self, victim: Any, plan: StepPlan) -> None:
        log.info("KV cache full: preempting request %d (%d tokens computed); its pages stay until needed",
                 victim.id, victim.seq.length)
        self.running.remove(victim)
        self.waiting.insert(0, victim)
        plan.preempted.append(victim)
        self.preemptions += 1

    # --- prefixes and pages ---------------------------------------------------------------------------------

    def _sharable(self, other: Any, n: int) -> int:
        """How many of other's first n tokens another sequence may share now: those computed before this step,
        and the whole pages this step fills (attention reads them after the step's K/V are written, in the same
        forward); never a page this step only partly writes (a copy on write now would copy unwritten rows)."""
        before = other.seq.length - self._reserved.get(other.id, 0)
        return n if n <= before else max(before, n // self.pool.page_size * self.pool.page_size)

    def _best_prefix(self, req: Any) -> tuple[Any, int]:
        """The sequence holding the longest sharable prefix of req's tokens, and its length."""
        keys = req.all_keys()
        best, best_len = None, 0
        for other in self.running + self.retained + self.cached:
            # the last token is always computed: its logits are needed
            n = min(_common_prefix(keys, other.all_keys()[: other.seq.length]), len(keys) - 1)
            n = self._sharable(other, n)
            if n > best_len:
                best, best_len = other, n
        return best, best_len

    def _better_prefix_coming(self, req: Any, have: int) -> bool:
        """Whether a prompt still incomplete after this step will hold at least a page more of req's prefix."""
        ps, keys = self.pool.page_size, req.all_keys()
        for other in self.running:
            if other.seq.length < len(other.keys):
                n = min(_common_prefix(keys, other.all_keys()), len(keys) - 1)
                if n >= max(have, other.seq.length) + ps:
                    return True
        return False

    def requeue(self, req: Any) -> None:
        """Undo the admission of req, planned this step with pages shared from a chunk that then failed: its
        pages go back and it waits at the queue's front again."""
        if req in self.running:
            self.running.remove(req)
        req.seq.free(self.pool)
        self.waiting.insert(0, req)

    def _make_room(self, need: int, keep: list[Any]) -> bool:
        """Evict until `need` pages are free: tails of cached requests (oldest first), of preempted requests
        (newest first, never those in `keep`), then of retained chat turns. False if that is not enough."""
        holders = [self.cached, [r for r in reversed(self.waiting) if r.seq.pages and r not in keep], self.retained]
        for group in holders:
            for entry in list(group):
                while self.pool.num_free < need and entry.seq.pages:
                    entry.seq.truncate(self.pool, len(entry.seq.pages) - 1)
                if not entry.seq.pages and (group is self.cached or group is self.retained):
                    group.remove(entry)
                if self.pool.num_free >= need:
                    return True
        return self.pool.num_free >= need

    def clear_prefix_cache(self) -> None:
        """Return the pages of every cached finished request to the pool (chat turns stay)."""
        for r in self.cached:
            r.seq.free(self.pool)
        self.cached.clear()

    def release(self, req: Any) -> None:
        """Forget a retained request's cached pages."""
        if req in self.retained:
            self.retained.remove(req)
            req.seq.free(self.pool)

    def finish(self, req: Any, keep: bool) -> None:
        """req is done: off the queues; its pages go back, or stay as a retained turn / the prefix cache (keep)."""
        if req in self.running:
            self.running.remove(req)
        if req in self.waiting:
            self.waiting.remove(req)
        if not keep or not (req.keep_cache or self.prefix_cache):
            req.seq.free(self.pool)
            return
        req.seq.length = min(req.seq.length, req.num_tokens)  # a token in flight after EOS is not kept
        if req.keep_cache:
            self.retained.append(req)
            return
        self.cached.append(req)
        while len(self.cached) > self.prefix_cache:
            self.cached.pop(0).seq.free(self.pool)


def _decoding(req: Any) -> bool:
    """Whether req's only token left to compute is its last generated one (the input of a decode row)."""
    return req.num_tokens - req.seq.length == 1 and req.seq.length >= len(req.keys)


def _prefilling(req: Any) -> bool:
    """Whether req has prompt tokens left to compute, or several tokens (a recompute after preemption)."""
    return req.num_tokens > req.seq.length and not _decoding(req)


def _common_prefix(a: list[Hashable], b: list[Hashable]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n
