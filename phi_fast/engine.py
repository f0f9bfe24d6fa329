"""The engine: requests, a continuous-batching scheduler over the paged KV cache, prefill and decode steps.

Each step either prefills newly admitted requests (one varlen batch) or decodes one token for every running
request. A request whose prompt shares a prefix with a cached sequence (same image, same tokens) starts from
that sequence's pages. When a decode step runs out of pages, the newest running request is preempted: its
pages are freed and it is recomputed later from its prompt and the tokens it already produced, so its output
is neither lost nor repeated. Finished requests keep their pages as a prefix cache (the last `prefix_cache` of
them, dropped first when pages run short), so a later question about the same image starts from the image's
cached K/V. The engine is the only place that knows about requests and pages.

Decode steps run through a DecodeGraphRunner (CUDA graphs on a GPU, the same step eagerly on CPU) and are
pipelined: step n is launched with the tokens of step n - 1 fed back on the device, then the host reads step
n - 1's tokens (stop checks, detokenizing) while step n runs. A request that stops (EOS, stop string) has one
token too many in flight; it is discarded. Tokens are drawn by gpu_sampling from (the request's seed, the
token's position), so a request's output does not depend on what it is batched with.

Failures stay local: a request is checked when it is made (`new_request`, callable from any thread); inside a
step, an exception in one request's own work (its images, its detokenizing and stop strings) fails that request
alone, and any other exception (a kernel error) fails the requests of that step; either way their pages are freed
and the engine goes on. The engine itself is single-threaded: phi_fast.engine_loop runs it on one thread.
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
from .kv_cache import CacheFullError, PagePool, SequencePages
from .model import LlavaPhi, StepBatch
from .prompt import IMAGE_TOKEN_INDEX
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


class Engine:
    """Continuous batching over one model, one tokenizer and one page pool."""

    def __init__(self, model: LlavaPhi, tokenizer, pool: PagePool, *, max_num_seqs: int = 64,
                 max_prefill_tokens: int = 8192, use_cuda_graphs: bool | None = None, prefix_cache: int = 16):
        self.model = model
        self.tokenizer = tokenizer
        self.pool = pool
        self.max_num_seqs = max_num_seqs
        self.max_prefill_tokens = max_prefill_tokens
        self.context = model.cfg.text.max_position_embeddings
        self.waiting: list[Request] = []
        self.running: list[Request] = []
        self.retained: list[Request] = []  # finished chat turns whose pages stay cached
        self.cached: list[Request] = []  # finished requests kept as a prefix cache, oldest first
        self.prefix_cache = prefix_cache
        self._ids = itertools.count()
        self.graphs = DecodeGraphRunner(model, pool, max_num_seqs=max_num_seqs, use_graphs=use_cuda_graphs)
        self._inflight: tuple[list[Request], PendingTokens] | None = None  # the last decode launch, not yet read
        self._inflight_rows: dict[int, int] = {}  # request id -> its row in that launch
        self._in_step: list[Request] = []  # requests the current step touches: failed if it raises
        self.prefix_hits = 0  # requests that started from a cached prefix, and the tokens they did not recompute
        self.prefix_hit_tokens = 0
        self.preemptions = 0
        self.peak_batch = 0  # the most requests one step has produced tokens for

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
        if req in self.retained:
            self.retained.remove(req)
            req.seq.free(self.pool)

    def abort(self, req: Request) -> None:
        """Stop an unfinished request and free its pages (no-op once finished)."""
        if req.finished:
            return
        if req in self.waiting:
            self.waiting.remove(req)
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

    # --- scheduling ---------------------------------------------------------------------------------------

    def step(self) -> None:
        """One forward pass: prefill what can be admitted, else decode every running request.

        Never raises for a request's sake. A failure that belongs to one request (its images, its tokens) fails
        that request alone; any other exception (a kernel error) fails the requests of this step, which leave
        the engine with their pages freed, and the engine stays usable for the rest.
        """
        self._in_step = []
        try:
            admitted = self._admit()
            if admitted:
                self._drain()
                self._prefill(admitted)
            elif self.running:
                self._decode()
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
        if req in self.waiting:
            self.waiting.remove(req)
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

    def _admit(self) -> list[tuple[Request, int, list[int]]]:
        """Requests to prefill now, each with its first uncached position and the slots reserved for the rest."""
        admitted: list[tuple[Request, int, list[int]]] = []
        budget = self.max_prefill_tokens
        while self.waiting and len(self.running) + len(admitted) < self.max_num_seqs:
            req = self.waiting[0]
            self._in_step.append(req)
            n = req.num_tokens
            if admitted and n > budget:
                self._in_step.pop()
                break
            if any(_common_prefix(req.all_keys(), a.all_keys()) >= self.pool.page_size for a, _, _ in admitted):
                self._in_step.pop()
                break  # it will share the pages that one is about to fill: admit it next step
            self._share_prefix(req)
            need = req.seq.pages_needed(self.pool, n - req.seq.length)
            if need > self.pool.num_free:
                req.seq.free(self.pool)
                if not self.running and not admitted and not (self.cached or self.retained):
                    self.waiting.pop(0)
                    self._fail(req, CacheFullError(
                        f"request {req.id} needs {need} KV pages of {self.pool.page_size} tokens for its "
                        f"{n}-token prompt, more than the whole cache ({self.pool.num_pages} pages) can give"))
                    continue
                if not self.running and not admitted:
                    self._evict()
                    continue
                self._in_step.pop()
                break
            self.waiting.pop(0)
            start = req.seq.length
            admitted.append((req, start, req.seq.reserve(self.pool, n - start)))
            budget -= n
        return admitted

    def _share_prefix(self, req: Request) -> None:
        """Start req's cache with the longest prefix some cached sequence already holds (whole pages kept)."""
        keys = req.all_keys()
        best, best_len = None, 0
        for other in self.running + self.retained + self.cached:
            # the last token is always computed: its logits are needed
            n = min(_common_prefix(keys, other.all_keys()[: other.seq.length]), len(keys) - 1)
            if n > best_len:
                best, best_len = other, n
        if best is not None and best_len >= self.pool.page_size:
            req.seq.share_from(self.pool, best.seq, best_len)
            self.prefix_hits += 1
            self.prefix_hit_tokens += req.seq.length

    def _evict(self) -> None:
        """Free the prefix cache, else the retained chat turns."""
        victims = self.cached or self.retained
        for r in victims:
            r.seq.free(self.pool)
        victims.clear()

    def clear_prefix_cache(self) -> None:
        """Return the pages of every cached finished request to the pool (chat turns stay)."""
        for r in self.cached:
            r.seq.free(self.pool)
        self.cached.clear()

    def _prefill(self, admitted: list[tuple[Request, int, list[int]]]) -> None:
        embeds = []
        for req, start, _ in list(admitted):
            try:  # a request's own images and tokens: its failure is its own
                embeds.append(self._embeds(req, start))
            except Exception as error:  # noqa: BLE001
                admitted.remove((req, start, _))
                self._fail(req, error)
        if not admitted:
            return
        reqs = [req for req, _, _ in admitted]
        positions = [p for req, start, _ in admitted for p in range(start, req.num_tokens)]
        slots = [s for _, _, req_slots in admitted for s in req_slots]
        batch = self._batch(reqs, positions, slots, [req.num_tokens - start for req, start, _ in admitted],
                            no_prefix=all(start == 0 for _, start, _ in admitted))
        logits = self.model.forward(torch.cat(embeds), batch, self.pool)
        self.running += reqs
        self._append_tokens(reqs, *self._sample(reqs, logits))

    def _decode(self) -> None:
        """Launch one decode step for every running request that needs a token, then read the previous one."""
        slots: dict[int, int] = {}
        wanting = [r for r in self.running if self._wants_token(r)]
        self._in_step += wanting
        for req in wanting:
            while req in self.running:
                try:
                    slots[req.id] = req.seq.reserve(self.pool, 1)[0]
                    break
                except CacheFullError:
                    if self._inflight is not None:
                        self._drain()  # finished requests free pages; nobody is preempted with a token in flight
                    elif not self._preempt(exclude=req):
                        self._fail(req, CacheFullError(
                            f"request {req.id} at {req.seq.length} tokens needs another KV page and the cache "
                            f"({self.pool.num_pages} pages of {self.pool.page_size}) has none left"))
        reqs = [r for r in self.running if r.id in slots]  # draining or preemption may have removed some
        if not reqs:
            self._drain()
            return
        step = self.graphs.new_step(len(reqs))
        for i, r in enumerate(reqs):
            p, row = r.params, self._inflight_rows.get(r.id)
            source = {"prev_row": row} if row is not None else {"token": r.output_ids[-1]}
            step.set_row(i, position=r.seq.length - 1, slot=slots[r.id], pages=r.seq.pages,
                         temperature=p.temperature, top_k=p.top_k, top_p=p.top_p, seed=r.seed, **source)
        pending = self.graphs.launch(step, logprobs=any(r.params.logprobs is not None for r in reqs))
        self._drain()  # the previous launch's tokens, while this one runs
        self._inflight, self._inflight_rows = (reqs, pending), {r.id: i for i, r in enumerate(reqs)}

    def _wants_token(self, req: Request) -> bool:
        """Whether req needs a token beyond those already generated or in flight."""
        launched = len(req.output_ids) + (req.id in self._inflight_rows)
        return launched < req.params.max_new_tokens and len(req.keys) + launched < self.context

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

    def _preempt(self, exclude: Request) -> bool:
        """Free cached pages, else the newest running request other than `exclude`; False if neither."""
        if self.cached or self.retained:
            self._evict()
            return True
        victims = [r for r in self.running if r is not exclude]
        if not victims:
            return False
        victim = max(victims, key=lambda r: r.id)
        log.info("KV cache full: preempting request %d (%d tokens), it will be recomputed", victim.id,
                 victim.num_tokens)
        victim.seq.free(self.pool)
        self.running.remove(victim)
        self.preemptions += 1
        self.waiting.insert(0, victim)
        return True

    # --- step inputs and outputs --------------------------------------------------------------------------

    def _embeds(self, req: Request, start: int) -> torch.Tensor:
        """Embeddings of req's tokens from position start on: prompt rows, then generated tokens. [n, C]

        The images go through CLIP only when one of their rows lies at or after start (not in a shared prefix);
        the result is kept for a recompute after preemption.
        """
        n_prompt, dev = len(req.keys), self.model.device
        parts = []
        if start < n_prompt:
            if req.embeds is None and any(isinstance(k, tuple) for k in req.keys[start:]):
                req.embeds = self.model.embed_prompt(req.prompt_ids, req.pixels)
            if req.embeds is not None:
                parts.append(req.embeds[start:])
            else:  # only text after the cached prefix
                parts.append(self.model.decoder.embed(torch.tensor(req.keys[start:], device=dev)))
        gen = req.output_ids[max(start - n_prompt, 0):]
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
        if req in self.running:
            self.running.remove(req)
        if reason in ("error", "aborted") or not (req.keep_cache or self.prefix_cache):
            req.seq.free(self.pool)
            return
        req.seq.length = min(req.seq.length, req.num_tokens)  # a token in flight after EOS is not kept
        if req.keep_cache:
            self.retained.append(req)
            return
        self.cached.append(req)
        while len(self.cached) > self.prefix_cache:
            self.cached.pop(0).seq.free(self.pool)

    def _fail(self, req: Request, error: Exception) -> None:
        log.error("request %d failed: %s", req.id, error)
        req.error = error
        self._finish(req, "error")


def _common_prefix(a: list[Hashable], b: list[Hashable]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n
