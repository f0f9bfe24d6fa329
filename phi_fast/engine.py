"""The engine: requests, continuous batching over the paged KV cache, executing the scheduler's step plans.

What each step computes is phi_fast.scheduler's decision: under a token budget, one token for every running
request first, then chunks of prompts (FCFS), so a long prompt takes several steps and never stalls the running
streams for long; it also decides admission, prefix sharing (a prompt that starts like a cached sequence - same
image, same tokens - starts from its pages), preemption (the newest running request gives its pages back from the
tail and resumes later from what survived, its output neither lost nor repeated) and the prefix cache (finished
requests keep their pages, the last `prefix_cache` of them, evicted page by page from the tail of the oldest when
pages run short). The engine only executes the plan. Only a prompt's last chunk reaches lm_head and is sampled.

A plan of decode rows only runs through a DecodeGraphRunner (CUDA graphs on a GPU, the same step eagerly on CPU)
and is pipelined: step n is launched with the tokens of step n - 1 fed back on the device, then the host reads
step n - 1's tokens (stop checks, detokenizing) while step n runs. A request that stops (EOS, stop string) has one
token too many in flight; it is discarded. A plan with prompt chunks (decode rows too, if any: a mixed step) runs
eagerly through one model.forward over one StepBatch, after the launch in flight has been read (the scheduler asks
for that: every input is then on the host); its attention takes the no-prefix path only when every sequence's new
tokens are all its tokens. Tokens are drawn by gpu_sampling from (the request's seed, the token's position), so a
request's output does not depend on what it is batched with, nor on how its prompt was chunked.

Failures stay local: a request is checked when it is made (`new_request`, callable from any thread); inside a
step, an exception in one request's own work (its images, its detokenizing and stop strings) fails that request
alone (a request that shared pages this failed chunk was to fill goes back to the queue untouched), and any
other exception (a kernel error) fails the requests of that step; either way their pages are freed and the engine
goes on. The engine itself is single-threaded: phi_fast.engine_loop runs it on one thread.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import random
from dataclasses import dataclass, field
from typing import Hashable

import torch

from .cuda_graphs import DecodeGraphRunner, PendingTokens
from .gpu_sampling import sample_tokens, sampler_kind, token_logprobs
from .kv_cache import PagePool, SequencePages
from .model import LlavaPhi, StepBatch
from .prompt import IMAGE_TOKEN_INDEX
from .scheduler import DEFAULT_TOKEN_BUDGET, Chunk, Scheduler, StepPlan
from .sampling import SamplingParams
from .tokenizer import StreamDecoder

log = logging.getLogger(__name__)


TokenLogprob = tuple[float, list[tuple[int, float]]]  # (sampled token's logprob, top alternatives, descending)


@dataclass(eq=False)
class Request:
    """One prompt being answered; its state as the engine advances it."""

    id: int
    keys: list[Hashable]  # identity of each prompt position: a token id or (image digest, row)
    prompt_ids: list[int]  # with IMAGE_TOKEN_INDEX markers
    pixels: torch.Tensor | None  # [n_images, 3, S, S], encoded only if some image row is not in a cached prefix
    params: SamplingParams
    seed: int  # params.seed (or a random one) in [0, 2^63): with a token's position, it fixes the token drawn
    seq: SequencePages = field(default_factory=SequencePages)
    embeds: torch.Tensor | None = None  # [T_prompt, C] prompt embeddings with the images spliced in, once needed
    decoder: StreamDecoder | None = None  # output ids -> text, incrementally
    output_ids: list[int] = field(default_factory=list)
    # with params.logprobs: per output id, (its logprob, [(id, logprob)] of the params.logprobs most likely)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    text: str = ""
    emitted: int = 0  # characters of `visible_text` already streamed
    finish_reason: str | None = None  # "eos" | "stop" | "length" | "error" | "aborted"
    error: Exception | None = None
    keep_cache: bool = False  # keep the pages after finishing (a chat turn to continue)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def num_tokens(self) -> int:
        """Prompt plus generated tokens."""
        return len(self.keys) + len(self.output_ids)

    def all_keys(self) -> list[Hashable]:
        return self.keys + self.output_ids

    def visible_text(self) -> str:
        """The answer as far as it is final: stripped, without a tail that may still become a stop string."""
        text = self.text.strip() if self.finished else self.text.lstrip()
        if self.finished:
            return text
        end = len(text.rstrip())
        for s in self.params.stop:
            for k in range(min(len(s) - 1, end), 0, -1):
                if text[:end].endswith(s[:k]):
                    end -= k
                    break
        return text[:end]

    def take_new_text(self) -> str:
        """Text produced since the last call (for streaming)."""
        text = self.visible_text()
        piece, self.emitted = text[self.emitted:], max(self.emitted, len(text))
        return piece


def _scheduler_counter(name: str, doc: str) -> property:
    """An Engine attribute that is the scheduler's counter `name`."""
    return property(lambda self: getattr(self.scheduler, name),
                    lambda self, value: setattr(self.scheduler, name, value), doc=doc)


class Engine:
    """Continuous batching over one model, one tokenizer and one page pool."""

    def __init__(self, model: LlavaPhi, tokenizer, pool: PagePool, *, max_num_seqs: int = 64,
                 token_budget: int | None = None, use_cuda_graphs: bool | None = None, prefix_cache: int = 16):
        """token_budget: tokens one step computes at most (default DEFAULT_TOKEN_BUDGET of the device)."""
        self.model = model
        self.tokenizer = tokenizer
        self.pool = pool
        self.max_num_seqs = max_num_seqs
        self.context = model.cfg.text.max_position_embeddings
        if token_budget is None:
            token_budget = DEFAULT_TOKEN_BUDGET.get(model.device.type, DEFAULT_TOKEN_BUDGET["cpu"])
        self.scheduler = Scheduler(pool, max_num_seqs=max_num_seqs, token_budget=token_budget,
                                   context=self.context, prefix_cache=prefix_cache)
        self.steps = {"decode": 0, "prefill": 0, "mixed": 0}  # steps taken, by StepPlan.kind
        self.last_plan: StepPlan | None = None
        self._ids = itertools.count()
        self.graphs = DecodeGraphRunner(model, pool, max_num_seqs=max_num_seqs, use_graphs=use_cuda_graphs)
        self._inflight: tuple[list[Request], PendingTokens] | None = None  # the last decode launch, not yet read
        self._inflight_rows: dict[int, int] = {}  # request id -> its row in that launch
        self._in_step: list[Request] = []  # requests the current step touches: failed if it raises
        self.peak_batch = 0  # the most requests one step has produced tokens for

    # the scheduler's queues, settings and counters, as the engine's
    waiting = property(lambda self: self.scheduler.waiting)
    running = property(lambda self: self.scheduler.running)
    retained = property(lambda self: self.scheduler.retained)
    cached = property(lambda self: self.scheduler.cached)
    token_budget = property(lambda self: self.scheduler.token_budget)
    prefix_hits = _scheduler_counter("prefix_hits", "requests that started from another sequence's pages")
    prefix_hit_tokens = _scheduler_counter("prefix_hit_tokens", "prompt tokens those did not compute")
    preemptions = _scheduler_counter("preemptions", "running requests preempted for pages")

    # --- requests -----------------------------------------------------------------------------------------
    def new_request(self, prompt_ids: list[int], pixels: list[torch.Tensor], params: SamplingParams,
                    keep_cache: bool = False) -> Request:
        """Check and build a request (token ids with IMAGE_TOKEN_INDEX markers, one preprocessed image [3, S, S]
        each) without queueing it: safe from any thread, raises ValueError for anything that would fail later."""
        if not isinstance(params, SamplingParams):
            raise TypeError(f"params must be SamplingParams, got {type(params).__name__}")
        vocab = self.model.cfg.text.vocab_size
        bad = [t for t in prompt_ids if t != IMAGE_TOKEN_INDEX and not (isinstance(t, int) and 0 <= t < vocab)]
        if bad:
            raise ValueError(f"prompt token ids must be ints in [0, {vocab}) or the image marker "
                             f"{IMAGE_TOKEN_INDEX}, got {bad[0]!r}")
        n_markers = sum(1 for t in prompt_ids if t == IMAGE_TOKEN_INDEX)
        if n_markers != len(pixels):
            raise ValueError(f"prompt has {n_markers} <image> markers but {len(pixels)} images were given")
        size = self.model.cfg.vision.image_size
        for i, p in enumerate(pixels):
            if not isinstance(p, torch.Tensor) or tuple(p.shape) != (3, size, size):
                shape = tuple(p.shape) if isinstance(p, torch.Tensor) else type(p).__name__
                raise ValueError(f"image {i}: expected preprocessed pixels [3, {size}, {size}], got {shape}")
        n_img = self.model.image_tokens
        length = len(prompt_ids) + n_markers * (n_img - 1)
        if length >= self.context:
            raise ValueError(f"prompt is {length} tokens ({n_markers} images x {n_img} rows included); "
                             f"the context is {self.context} and at least one token must be generated")
        digests = iter(hashlib.sha1(p.cpu().contiguous().numpy().tobytes()).hexdigest() for p in pixels)
        keys: list[Hashable] = []
        for t in prompt_ids:
            if t == IMAGE_TOKEN_INDEX:
                d = next(digests)
                keys.extend((d, r) for r in range(n_img))
            else:
                keys.append(t)
        seed = params.seed % 2**63 if params.seed is not None else random.getrandbits(63)
        return Request(next(self._ids), keys, list(prompt_ids), torch.stack(pixels) if pixels else None, params,
                       seed, decoder=self.tokenizer.stream_decoder(), keep_cache=keep_cache)

    def enqueue(self, req: Request) -> None:
        """Queue a request made by new_request (engine thread only)."""
        if req.finished or req in self.waiting or req in self.running:
            raise ValueError(f"request {req.id} is already queued or finished")
        self.waiting.append(req)

    def add(self, prompt_ids: list[int], pixels: list[torch.Tensor], params: SamplingParams,
            keep_cache: bool = False) -> Request:
        """new_request + enqueue."""
        req = self.new_request(prompt_ids, pixels, params, keep_cache)
        self.enqueue(req)
        return req

    def release(self, req: Request) -> None:
        """Forget a retained request's cached pages."""
        self.scheduler.release(req)

    def abort(self, req: Request) -> None:
        """Stop an unfinished request and free its pages (no-op once finished)."""
        if req.finished:
            return
        req.keep_cache = False
        self._finish(req, "aborted")

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def stats(self) -> dict[str, int]:
        """Counts for monitoring (engine thread: read it through EngineLoop.call)."""
        return {"running": len(self.running), "waiting": len(self.waiting),
                "kv_pages_used": self.pool.num_pages - self.pool.num_free, "kv_pages_total": self.pool.num_pages,
                "prefix_cache_hits": self.prefix_hits, "prefix_cache_hit_tokens": self.prefix_hit_tokens,
                "preemptions": self.preemptions, "peak_batch": self.peak_batch}

    def run(self) -> None:
        """Step until every request has finished."""
        while self.has_work:
            self.step()

    # --- steps --------------------------------------------------------------------------------------------

    def step(self) -> None:
        """One forward pass of what the scheduler plans: decode rows only (pipelined, graphs), else decode rows
        and prompt chunks together (eager).

        Never raises for a request's sake. A failure that belongs to one request (its images, its tokens) fails
        that request alone; any other exception (a kernel error) fails the requests of this step, which leave
        the engine with their pages freed, and the engine stays usable for the rest.
        """
        self._in_step = []
        try:
            plan = self.scheduler.schedule(self._inflight_rows.keys())
            if plan.drain_first:
                self._drain()
                plan = self.scheduler.schedule()
            self.last_plan = plan
            for req, error in plan.failed:
                self._fail(req, error)
            if plan.kind != "idle":
                self.steps[plan.kind] += 1
            if plan.chunks:
                self._forward_eager(plan.rows)
            elif plan.decodes:
                self._decode(plan.decodes)
            else:
                self._drain()
        except Exception as error:  # noqa: BLE001 - the engine survives every exception
            log.exception("engine step failed; failing the %d requests of the step", len(self._in_step))
            self._fail_step(error)
        finally:
            self._in_step = []

    def fail(self, req: Request, error: Exception) -> None:
        """Finish an unfinished request with finish_reason "error" (pages freed); no-op once finished."""
        if req.finished:
            return
        req.keep_cache = False
        self._fail(req, error)

    def _fail_step(self, error: Exception) -> None:
        """After an exception inside a step: fail its requests and forget the decode launch in flight."""
        victims = list(self._in_step)
        if self._inflight is not None:
            victims += self._inflight[0]
            self._inflight, self._inflight_rows = None, {}
        for req in victims:
            self.fail(req, error)

    def clear_prefix_cache(self) -> None:
        """Return the pages of every cached finished request to the pool (chat turns stay)."""
        self.scheduler.clear_prefix_cache()

    def _forward_eager(self, rows: list[Chunk]) -> None:
        """Decode rows and prompt chunks in one model.forward (no launch in flight: the plan drained it); only
        the rows that end a prompt (or decode) get logits and a token."""
        self._in_step += [c.req for c in rows]
        embeds: dict[int, torch.Tensor] = {}
        unwritten: set[int] = set()  # pages a failed chunk was to fill
        ps = self.pool.page_size
        for c in rows:
            try:  # a request's own images and tokens: its failure is its own
                embeds[id(c)] = self._embeds(c.req, c.start, c.end)
            except Exception as error:  # noqa: BLE001
                unwritten.update(c.req.seq.pages[c.start // ps: -(-c.end // ps)])
                self._fail(c.req, error)
        kept = [c for c in rows if id(c) in embeds]
        for c in [c for c in kept if c.admitted and unwritten & set(c.req.seq.pages)]:  # shared them this step
            kept.remove(c)
            self.scheduler.requeue(c.req)
        if not kept:
            return
        positions = [p for c in kept for p in range(c.start, c.end)]
        batch = self._batch([c.req for c in kept], positions, [s for c in kept for s in c.slots],
                            [c.num_tokens for c in kept], no_prefix=all(c.start == 0 for c in kept))
        sampled = [i for i, c in enumerate(kept) if c.sample]
        rows_out = batch.last_token_index[torch.tensor(sampled, dtype=torch.int64, device=self.model.device)]
        logits = self.model.forward(torch.cat([embeds[id(c)] for c in kept]), batch, self.pool, rows=rows_out)
        reqs = [kept[i].req for i in sampled]
        if reqs:
            self._append_tokens(reqs, *self._sample(reqs, logits))

    def _decode(self, rows: list[Chunk]) -> None:
        """Launch one decode step of the planned rows, then read the previous launch's tokens."""
        reqs = [c.req for c in rows]
        self._in_step += reqs
        step = self.graphs.new_step(len(rows))
        for i, c in enumerate(rows):
            r = c.req
            p, row = r.params, self._inflight_rows.get(r.id)
            source = {"prev_row": row} if row is not None else {"token": r.output_ids[-1]}
            step.set_row(i, position=c.start, slot=c.slots[0], pages=r.seq.pages,
                         temperature=p.temperature, top_k=p.top_k, top_p=p.top_p, seed=r.seed, **source)
        pending = self.graphs.launch(step, logprobs=any(r.params.logprobs is not None for r in reqs))
        self._drain()  # the previous launch's tokens, while this one runs
        self._inflight, self._inflight_rows = (reqs, pending), {r.id: i for i, r in enumerate(reqs)}

    def _drain(self) -> None:
        """Read the tokens of the decode launch in flight, if any (waits for it) and append them."""
        if self._inflight is None:
            return
        (reqs, pending) = self._inflight
        tokens = pending.result()  # an exception here leaves the launch in flight: _fail_step fails its requests
        self._inflight, self._inflight_rows = None, {}
        self._append_tokens(reqs, tokens, pending.logprobs())

    def _sample(self, reqs: list[Request], logits: torch.Tensor) -> tuple[list[int], list[TokenLogprob] | None]:
        """logits: [S, V] fp32 of reqs' last tokens -> the token each draws (at position req.num_tokens), and
        each row's logprobs when some request wants them (else None)."""
        dev = logits.device
        temperature = [r.params.temperature for r in reqs]
        top_k, top_p = [r.params.top_k for r in reqs], [r.params.top_p for r in reqs]
        tokens = sample_tokens(logits, torch.tensor(temperature, dtype=torch.float32, device=dev),
                               torch.tensor(top_k, dtype=torch.int64, device=dev),
                               torch.tensor(top_p, dtype=torch.float32, device=dev),
                               torch.tensor([r.seed for r in reqs], dtype=torch.int64, device=dev),
                               torch.tensor([r.num_tokens for r in reqs], dtype=torch.int64, device=dev),
                               sampler_kind(temperature, top_k, top_p))
        k = max((r.params.logprobs for r in reqs if r.params.logprobs is not None), default=None)
        if k is None:
            return tokens.tolist(), None
        values, ids = (t.tolist() for t in token_logprobs(logits, tokens, k))
        return tokens.tolist(), [(v[0], list(zip(i, v[1:]))) for v, i in zip(values, ids)]

    # --- step inputs and outputs --------------------------------------------------------------------------

    def _embeds(self, req: Request, start: int, end: int) -> torch.Tensor:
        """Embeddings of req's positions [start, end): prompt rows, then generated tokens. [end - start, C]

        The images go through CLIP only when one of their rows lies in [start, end) (not in a shared prefix or
        an earlier chunk); the result is kept for the later chunks and a recompute after preemption.
        """
        n_prompt, dev = len(req.keys), self.model.device
        parts = []
        if start < n_prompt:
            stop = min(end, n_prompt)
            if req.embeds is None and any(isinstance(k, tuple) for k in req.keys[start:stop]):
                req.embeds = self.model.embed_prompt(req.prompt_ids, req.pixels)
            if req.embeds is not None:
                parts.append(req.embeds[start:stop])
            else:  # only text in this range
                parts.append(self.model.decoder.embed(torch.tensor(req.keys[start:stop], device=dev)))
        gen = req.output_ids[max(start - n_prompt, 0):max(end - n_prompt, 0)]
        if gen:
            parts.append(self.model.decoder.embed(torch.tensor(gen, device=dev)))
        return torch.cat(parts)

    def _batch(self, reqs: list[Request], positions: list[int], slots: list[int], q_lens: list[int],
               no_prefix: bool) -> StepBatch:
        dev = self.model.device
        max_pages = max(len(r.seq.pages) for r in reqs)
        table = torch.zeros(len(reqs), max_pages, dtype=torch.int32)
        for i, r in enumerate(reqs):
            table[i, : len(r.seq.pages)] = torch.tensor(r.seq.pages, dtype=torch.int32)
        cu = torch.zeros(len(reqs) + 1, dtype=torch.int32)
        cu[1:] = torch.cumsum(torch.tensor(q_lens), 0)
        return StepBatch(
            positions=torch.tensor(positions, dtype=torch.int64, device=dev),
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=dev),
            block_table=table.to(dev),
            seq_lens=torch.tensor([r.seq.length for r in reqs], dtype=torch.int32, device=dev),
            cu_seqlens_q=cu.to(dev),
            no_prefix=no_prefix,
        )

    def _append_tokens(self, reqs: list[Request], tokens: list[int],
                       logprobs: list[TokenLogprob] | None = None) -> None:
        eos = self.tokenizer.eos_token_id
        self.peak_batch = max(self.peak_batch, len(reqs))
        for i, (req, token) in enumerate(zip(reqs, tokens)):
            if req.finished:  # stopped while this token was in flight
                continue
            try:  # detokenizing and stop strings are the request's own: a failure there fails it alone
                self._append_token(req, token, eos, None if logprobs is None else logprobs[i])
            except Exception as error:  # noqa: BLE001
                self.fail(req, error)

    def _append_token(self, req: Request, token: int, eos: int, logprob: TokenLogprob | None = None) -> None:
        if token == eos and not req.params.ignore_eos:
            self._finish(req, "eos")
            return
        if req.params.logprobs is not None:  # before the token: a reader who sees the token sees its logprob
            if logprob is None:
                raise RuntimeError(f"request {req.id} asked for logprobs but the step computed none")
            req.logprobs.append((logprob[0], logprob[1][: req.params.logprobs]))
        req.output_ids.append(token)
        searched = len(req.text)
        req.text += req.decoder.push(token)
        if self._cut_at_stop(req, searched):
            self._finish(req, "stop")
        elif len(req.output_ids) >= req.params.max_new_tokens or req.num_tokens >= self.context:
            self._finish(req, "length")

    @staticmethod
    def _cut_at_stop(req: Request, searched: int) -> bool:
        """Cut req.text at the first stop string (text before `searched` was already searched); True if found."""
        start = max(0, searched - max((len(s) for s in req.params.stop), default=0) + 1)
        cut = min((i for i in (req.text.find(s, start) for s in req.params.stop) if i >= 0), default=-1)
        if cut >= 0:
            req.text = req.text[:cut]
        return cut >= 0

    def _finish(self, req: Request, reason: str) -> None:
        if reason in ("eos", "length"):  # release the text the decoder held back, which may hold a stop string
            searched = len(req.text)
            req.text += req.decoder.finish()
            if self._cut_at_stop(req, searched):
                reason = "stop"
        req.finish_reason = reason
        req.embeds = req.pixels = None  # a finished request is only ever a cached prefix: keys and pages
        self.scheduler.finish(req, keep=reason not in ("error", "aborted"))

    def _fail(self, req: Request, error: Exception) -> None:
        log.error("request %d failed: %s", req.id, error)
        req.error = error
        self._finish(req, "error")

