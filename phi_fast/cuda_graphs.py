"""Decode steps as CUDA graphs, and the host side of running them without waiting on the GPU.

A decode step (one new token per sequence, paged attention over the cache) is a few hundred kernel launches; at
small batches the launches, not HBM, would set the pace. `DecodeGraphRunner` captures the whole step - take the
input tokens (from the host, or the previous step's output on the device), embed, `LlavaPhi.forward`,
`gpu_sampling.sample_tokens` - once per batch-size bucket and sampler kind, and replays it:

    runner = DecodeGraphRunner(model, pool, max_num_seqs=64)
    step = runner.new_step(n)                 # host staging for n sequences (numpy views of pinned memory)
    for i, req in enumerate(reqs):
        step.set_row(i, position=..., slot=..., pages=..., token=... or prev_row=..., temperature=..., seed=...)
    pending = runner.launch(step)             # copy the inputs, replay, start copying the tokens back
    ...                                       # the host prepares the next step while the GPU works
    tokens = pending.result()                 # list[int]; waits for this launch only
    pending.logprobs()                        # with launch(step, logprobs=True): each row's logprobs (see there)

Buckets: 1, 2, 4, ..., 128, up to the first one >= max_num_seqs. n sequences run in the smallest bucket >= n;
rows n..B-1 are padding: token 0, position 0, slot -1 (nothing written to the cache), seq_len 1 over page 0 (the
kernels read one valid cache row), greedy; their outputs are ignored. Above the largest bucket, on CPU, or with
use_graphs=False the same step runs eagerly on rows [:n] of the same buffers (`graphed(n)` says which); the
tokens are the same either way.

Static buffers: every input lives in a device buffer of `capacity` rows (max(max_num_seqs, largest bucket));
bucket B's graph reads rows [:B]. block_table has max_pages = ceil(max_context / page_size) columns, so one graph
serves every context length. Inputs reach the device in three copies from pinned memory (int64 fields, fp32
fields, then seq_lens + the used block_table rows); two staging buffers alternate, so the host fills one while the
other's copy may still be queued.

Token feedback: a row whose prev_row is r >= 0 takes as its input the token the previous launch sampled in row r,
read on the device. The engine can therefore launch step n + 1 before it has read step n's tokens, and read them
(pinned buffer + event, two alternating) while step n + 1 runs.

Logprobs: `launch(step, logprobs=True)` runs a variant of the step (its own graph) that also computes, on the
device right after sampling, every row's sampled-token log-probability and its MAX_LOGPROBS most likely
alternatives (gpu_sampling.token_logprobs), copied back with the tokens; launches without it do none of that work.

Graphs are captured lazily at a bucket's first use (or all at once: `capture_all`, eager_capture=True) into one
private memory pool shared by all of them; each capture logs the memory it took. Capturing needs the compiled CUDA
ops (the "cpp" backend): the reference ops read seq_lens on the host.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch

from .gpu_sampling import SAMPLER_KINDS, sample_tokens, sampler_kind, token_logprobs
from .kv_cache import PagePool
from .model import LlavaPhi, StepBatch
from .sampling import MAX_LOGPROBS

log = logging.getLogger(__name__)

BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
WARMUP_RUNS = 2  # eager runs of a step before its capture (lazy initialisations, cuBLAS workspaces)

_I64_FIELDS = ("token_ids", "prev_row", "positions", "slot_mapping", "seed", "step", "top_k")
_F32_FIELDS = ("temperature", "top_p")
# What a padding row holds (and every row until the engine fills it); block_table[row, 0] = 0 besides.
PADDING = {"token_ids": 0, "prev_row": -1, "positions": 0, "slot_mapping": -1, "seed": 0, "step": 0, "top_k": 0,
           "temperature": 0.0, "top_p": 1.0, "seq_lens": 1}


def decode_buckets(max_num_seqs: int) -> tuple[int, ...]:
    """Batch sizes that get a graph: BUCKETS up to the first one >= max_num_seqs (all of them if none is)."""
    if max_num_seqs < 1:
        raise ValueError(f"max_num_seqs must be >= 1, got {max_num_seqs}")
    return tuple(b for i, b in enumerate(BUCKETS) if i == 0 or BUCKETS[i - 1] < max_num_seqs)


def bucket_for(buckets: Sequence[int], n: int) -> int | None:
    """The smallest bucket holding n rows, or None when n is above the largest (run eagerly)."""
    return next((b for b in buckets if b >= n), None)


class _Buffers:
    """Every per-row input in three flat tensors, so one copy moves each: int64 [7, capacity], fp32 [2, capacity]
    and int32 [capacity + capacity * max_pages] = seq_lens, then block_table rows."""

    def __init__(self, capacity: int, max_pages: int, device: torch.device, pin: bool):
        self.capacity, self.max_pages = capacity, max_pages
        self.i64 = torch.zeros((len(_I64_FIELDS), capacity), dtype=torch.int64, device=device, pin_memory=pin)
        self.f32 = torch.zeros((len(_F32_FIELDS), capacity), dtype=torch.float32, device=device, pin_memory=pin)
        self.i32 = torch.zeros(capacity * (1 + max_pages), dtype=torch.int32, device=device, pin_memory=pin)

    def views(self) -> dict[str, torch.Tensor]:
        """Field name -> tensor view: [capacity] each, block_table [capacity, max_pages]."""
        out = {name: self.i64[i] for i, name in enumerate(_I64_FIELDS)}
        out.update({name: self.f32[i] for i, name in enumerate(_F32_FIELDS)})
        out["seq_lens"] = self.i32[: self.capacity]
        out["block_table"] = self.i32[self.capacity:].view(self.capacity, self.max_pages)
        return out

    def copy_from(self, src: "_Buffers", rows: int) -> None:
        """Queue the copy of src's rows [:rows] (all of the small fields, the block_table rows needed)."""
        self.i64.copy_(src.i64, non_blocking=True)
        self.f32.copy_(src.f32, non_blocking=True)
        used = self.capacity + rows * self.max_pages
        self.i32[:used].copy_(src.i32[:used], non_blocking=True)


def _pad_rows(fields: dict[str, Any], lo: int, hi: int) -> None:
    """Rows lo..hi-1 of the field views (numpy arrays or tensors) become padding rows."""
    for name, value in PADDING.items():
        fields[name][lo:hi] = value
    fields["block_table"][lo:hi, 0] = 0


class DecodeInputs:
    """The host inputs of one decode launch over n sequences: numpy views (rows [:n]) of a staging buffer.

    Arrays, [n] each: token_ids (input token; ignored where prev_row >= 0), prev_row (-1, or the row of the
    previous launch whose sampled token is this row's input), positions (of the input token), slot_mapping
    (cache slot of the input token's k, v), seq_lens (cached tokens including it), seed, step (position of the
    token being sampled), top_k, temperature, top_p; block_table [n, max_pages]. Rows start as padding rows.
    """

    def __init__(self, fields: dict[str, np.ndarray], n: int, staging: int):
        self.n = n
        self.staging = staging  # which of the runner's staging buffers these views belong to
        self.token_ids, self.prev_row = fields["token_ids"][:n], fields["prev_row"][:n]
        self.positions, self.slot_mapping = fields["positions"][:n], fields["slot_mapping"][:n]
        self.seq_lens, self.block_table = fields["seq_lens"][:n], fields["block_table"][:n]
        self.seed, self.step, self.top_k = fields["seed"][:n], fields["step"][:n], fields["top_k"][:n]
        self.temperature, self.top_p = fields["temperature"][:n], fields["top_p"][:n]

    def set_row(self, row: int, *, position: int, slot: int, pages: Sequence[int], token: int | None = None,
                prev_row: int = -1, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                seed: int = 0) -> None:
        """One sequence's decode step: its input token (`token`, or `prev_row` of the previous launch) sits at
        `position` and goes to cache `slot`; `pages` are its cache pages in order. seq_len = position + 1 and
        step = position + 1 (the sampled token's position) follow."""
        if (token is None) == (prev_row < 0):
            raise ValueError(f"decode row {row}: give exactly one of token ({token}) and prev_row ({prev_row})")
        if len(pages) > self.block_table.shape[1]:
            raise ValueError(f"decode row {row}: {len(pages)} pages, more than max_pages {self.block_table.shape[1]} "
                             f"(the runner's max_context)")
        self.token_ids[row] = 0 if token is None else token
        self.prev_row[row] = prev_row
        self.positions[row] = position
        self.slot_mapping[row] = slot
        self.seq_lens[row] = position + 1
        self.block_table[row, : len(pages)] = pages
        self.temperature[row], self.top_k[row], self.top_p[row] = temperature, top_k, top_p
        self.seed[row], self.step[row] = seed, position + 1


class PendingTokens:
    """The tokens of one launch, on their way to the host."""

    def __init__(self, tokens: torch.Tensor, logits: torch.Tensor | None, host: torch.Tensor,
                 event: torch.cuda.Event | None, host_logprobs: tuple[torch.Tensor, torch.Tensor] | None = None):
        self.tokens = tokens  # [n] int64 on the device; with graphs a static output: valid until the next launch
        self.logits = logits  # [n, V] fp32 (keep_logits=True), valid as long; else None
        self._host = host  # [n] int64 (pinned) being filled by the copy `event` follows
        self._host_logprobs = host_logprobs  # fp32 [n, 1 + K] and int64 [n, K], filled by the same copy
        self._event = event
        self._values: list[int] | None = None
        self._logprobs: list[tuple[float, list[tuple[int, float]]]] | None = None

    def ready(self) -> bool:
        """Whether result() would return without waiting."""
        return self._values is not None or self._event is None or self._event.query()

    def result(self) -> list[int]:
        """The sampled token of each row; waits for this launch (and nothing queued after it)."""
        if self._values is None:
            if self._event is not None:
                self._event.synchronize()
            self._values = self._host.tolist()
            if self._host_logprobs is not None:
                values, ids = (t.tolist() for t in self._host_logprobs)
                self._logprobs = [(v[0], list(zip(i, v[1:]))) for v, i in zip(values, ids)]
        return self._values

    def logprobs(self) -> list[tuple[float, list[tuple[int, float]]]] | None:
        """Per row (sampled token's logprob, [(id, logprob)] of the K most likely, descending), for a launch
        with logprobs=True (else None); waits like result()."""
        self.result()
        return self._logprobs


class DecodeGraphRunner:
    """Decode steps of `model` over `pool`, replayed from CUDA graphs per batch-size bucket (see module docs)."""

    def __init__(self, model: LlavaPhi, pool: PagePool, *, max_num_seqs: int, max_context: int | None = None,
                 use_graphs: bool | None = None, eager_capture: bool = False, keep_logits: bool = False):
        """max_context: longest sequence to serve (default: the model's max_position_embeddings).
        use_graphs: default True on CUDA; False runs every step eagerly (CPU always does).
        eager_capture: capture every bucket and sampler kind now instead of at first use.
        keep_logits: also return each step's logits (PendingTokens.logits)."""
        self.model, self.pool = model, pool
        self.device = model.device
        on_cuda = self.device.type == "cuda"
        if use_graphs and not on_cuda:
            raise ValueError(f"CUDA graphs need a CUDA model; this one is on {self.device}")
        self.use_graphs = on_cuda if use_graphs is None else use_graphs
        self.keep_logits = keep_logits
        self.buckets = decode_buckets(max_num_seqs)
        self.capacity = max(max_num_seqs, self.buckets[-1])
        self.max_context = max_context or model.cfg.text.max_position_embeddings
        self.max_pages = math.ceil(self.max_context / pool.page_size)
        self._staging = [_Buffers(self.capacity, self.max_pages, torch.device("cpu"), pin=on_cuda) for _ in range(2)]
        self._staging_fields = [{k: v.numpy() for k, v in s.views().items()} for s in self._staging]
        self._staged = [torch.cuda.Event() if on_cuda else None for _ in range(2)]  # after each staging's copy
        self._inputs = _Buffers(self.capacity, self.max_pages, self.device, pin=False)
        self._fields = self._inputs.views()
        self._cu_seqlens = torch.arange(self.capacity + 1, dtype=torch.int32, device=self.device)
        self._last_tokens = torch.zeros(self.capacity, dtype=torch.int64, device=self.device)  # previous launch's
        self._host_tokens = [torch.zeros(self.capacity, dtype=torch.int64, pin_memory=on_cuda) for _ in range(2)]
        self.logprob_k = min(MAX_LOGPROBS, model.cfg.text.vocab_size)  # alternatives a logprobs launch returns
        self._host_logprobs: list[tuple[torch.Tensor, torch.Tensor] | None] = [None, None]  # made at first use
        self._copied = [torch.cuda.Event() if on_cuda else None for _ in range(2)]  # after each D2H token copy
        self._readers: list[PendingTokens | None] = [None, None]
        # (bucket, kind, logprobs) -> (graph, tokens, logits if kept, (logprob values, ids) if logprobs)
        self._graphs: dict[tuple[int, str, bool], tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor | None,
                                                        tuple[torch.Tensor, torch.Tensor] | None]] = {}
        self._mempool = None
        self.graph_memory = 0  # bytes the captures took (memory_reserved growth)
        self._launches = 0
        self._last_n = 0  # rows of the previous launch (prev_row must be below it)
        with torch.inference_mode():
            _pad_rows(self._fields, 0, self.capacity)
        if eager_capture and self.use_graphs:
            self.capture_all()

    # --- public -------------------------------------------------------------------------------------------

    def bucket_for(self, n: int) -> int | None:
        """The bucket n sequences run in, or None above the largest."""
        return bucket_for(self.buckets, n)

    @property
    def captured(self) -> list[tuple[int, str]]:
        """(bucket, sampler kind) of every graph captured so far, sorted; kind "<kind>+logprobs" for the
        variants with logprobs."""
        return sorted((b, f"{k}+logprobs" if lp else k) for b, k, lp in self._graphs)

    def graphed(self, n: int) -> bool:
        """Whether a launch of n sequences replays a graph (else it runs eagerly)."""
        return self.use_graphs and self.bucket_for(n) is not None

    def new_step(self, n: int) -> DecodeInputs:
        """Host staging for the next launch over n sequences, every row a padding row until set_row."""
        if not 1 <= n <= self.capacity:
            raise ValueError(f"a decode step takes 1..{self.capacity} sequences (max_num_seqs), got {n}")
        which = self._launches % 2
        if self._staged[which] is not None:
            self._staged[which].synchronize()  # its last copy to the device has run (long ago, normally)
        fields = self._staging_fields[which]
        _pad_rows(fields, 0, n)
        return DecodeInputs(fields, n, which)

    def launch(self, inputs: DecodeInputs, logprobs: bool = False) -> PendingTokens:
        """Run one decode step: n tokens in, n sampled tokens out (see PendingTokens), and with `logprobs` each
        row's log-probabilities. Raises ValueError for inputs that would read or write outside the cache or the
        previous launch's rows."""
        n = inputs.n
        self._check(inputs)
        kind = sampler_kind(inputs.temperature, inputs.top_k, inputs.top_p)
        bucket = self.bucket_for(n) if self.use_graphs else None
        rows = bucket or n
        with torch.inference_mode():
            _pad_rows(self._staging_fields[inputs.staging], n, rows)
            key = (bucket, kind, logprobs)
            if bucket is not None and key not in self._graphs:
                self._capture(*key)
            self._inputs.copy_from(self._staging[inputs.staging], rows)
            if self._staged[inputs.staging] is not None:
                self._staged[inputs.staging].record()
            if bucket is not None:
                graph, tokens, logits, lp = self._graphs[key]
                graph.replay()
            else:
                tokens, logits, lp = self._step(rows, kind, logprobs)
            pending = self._read_back(tokens[:n], logits[:n] if self.keep_logits else None,
                                      None if lp is None else (lp[0][:n], lp[1][:n]))
        self._last_n = n
        self._launches += 1
        return pending

    def capture_all(self, kinds: Iterable[str] = SAMPLER_KINDS) -> None:
        """Capture every bucket for each sampler kind not captured yet."""
        with torch.inference_mode():
            for kind in kinds:
                for bucket in self.buckets:
                    if (bucket, kind, False) not in self._graphs:
                        self._capture(bucket, kind, False)

    # --- internals ----------------------------------------------------------------------------------------

    def _step(self, rows: int, kind: str, logprobs: bool = False
              ) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
        """The decode step over rows [:rows] of the device buffers (what a graph captures) -> (tokens, logits,
        token_logprobs' (values, ids) if logprobs else None)."""
        f = self._fields
        prev = f["prev_row"][:rows]
        fed_back = self._last_tokens.gather(0, prev.clamp(min=0))
        ids = torch.where(prev >= 0, fed_back, f["token_ids"][:rows])  # [rows]
        batch = StepBatch(positions=f["positions"][:rows], slot_mapping=f["slot_mapping"][:rows],
                          block_table=f["block_table"][:rows], seq_lens=f["seq_lens"][:rows],
                          cu_seqlens_q=self._cu_seqlens[: rows + 1], no_prefix=False)
        logits = self.model.forward(self.model.decoder.embed(ids), batch, self.pool)  # [rows, V] fp32
        tokens = sample_tokens(logits, f["temperature"][:rows], f["top_k"][:rows], f["top_p"][:rows],
                               f["seed"][:rows], f["step"][:rows], kind)
        self._last_tokens[:rows].copy_(tokens)
        return tokens, logits, token_logprobs(logits, tokens, self.logprob_k) if logprobs else None

    def _capture(self, bucket: int, kind: str, logprobs: bool) -> None:
        """Warm up, then capture the step over `bucket` padding rows; the fed-back tokens survive it."""
        dev = self.device
        saved = self._last_tokens.clone()  # the warm-up runs overwrite the fed-back tokens
        _pad_rows(self._fields, 0, bucket)  # padding rows write nothing to the cache
        side = torch.cuda.Stream(dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):
            for _ in range(WARMUP_RUNS):
                self._step(bucket, kind, logprobs)
        torch.cuda.current_stream(dev).wait_stream(side)
        torch.cuda.synchronize(dev)
        torch.cuda.empty_cache()  # what the warm-up cached is not the graph's (torch.cuda.graph empties it too)
        reserved, allocated = torch.cuda.memory_reserved(dev), torch.cuda.memory_allocated(dev)
        if self._mempool is None:
            self._mempool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._mempool):
            tokens, logits, lp = self._step(bucket, kind, logprobs)
        self._graphs[(bucket, kind, logprobs)] = (graph, tokens, logits if self.keep_logits else None, lp)
        del logits  # unless kept, its memory returns to the pool, for later captures' temporaries
        torch.cuda.synchronize(dev)
        grown = torch.cuda.memory_reserved(dev) - reserved
        self.graph_memory += grown
        log.info("captured the decode graph for batch %d (%s sampling%s): memory allocated %+.1f MiB, reserved "
                 "%+.1f MiB (all graphs: %.1f MiB)", bucket, kind, ", logprobs" if logprobs else "",
                 (torch.cuda.memory_allocated(dev) - allocated) / 2**20, grown / 2**20, self.graph_memory / 2**20)
        self._last_tokens.copy_(saved)

    def _read_back(self, tokens: torch.Tensor, logits: torch.Tensor | None,
                   logprobs: tuple[torch.Tensor, torch.Tensor] | None) -> PendingTokens:
        if self._copied[0] is None:  # CPU: the tokens are on the host already
            return PendingTokens(tokens, logits, tokens, None, logprobs)
        which = self._launches % 2
        reader = self._readers[which]
        if reader is not None:
            reader.result()  # keep its values before its pinned buffer is reused
        n = tokens.shape[0]
        host = self._host_tokens[which][:n]
        host.copy_(tokens, non_blocking=True)
        host_lp = None
        if logprobs is not None:
            if self._host_logprobs[which] is None:
                k = self.logprob_k
                self._host_logprobs[which] = (
                    torch.zeros(self.capacity, 1 + k, dtype=torch.float32, pin_memory=True),
                    torch.zeros(self.capacity, k, dtype=torch.int64, pin_memory=True))
            host_lp = tuple(h[:n] for h in self._host_logprobs[which])
            for h, d in zip(host_lp, logprobs):
                h.copy_(d, non_blocking=True)
        self._copied[which].record()
        self._readers[which] = PendingTokens(tokens, logits, host, self._copied[which], host_lp)
        return self._readers[which]

    def _check(self, inputs: DecodeInputs) -> None:
        """Host-side bounds checks (the CUDA kernels trust their inputs)."""
        ps = self.pool.page_size
        bad = np.flatnonzero(inputs.prev_row >= self._last_n)
        if bad.size:
            raise ValueError(f"decode row {bad[0]}: prev_row {inputs.prev_row[bad[0]]} but the previous launch had "
                             f"{self._last_n} rows")
        max_positions = self.model.cfg.text.max_position_embeddings
        bad = np.flatnonzero((inputs.positions < 0) | (inputs.positions >= min(max_positions, self.max_context)))
        if bad.size:
            raise ValueError(f"decode row {bad[0]}: position {inputs.positions[bad[0]]} outside [0, "
                             f"{min(max_positions, self.max_context)})")
        bad = np.flatnonzero(inputs.slot_mapping >= self.pool.num_pages * ps)
        if bad.size:
            raise ValueError(f"decode row {bad[0]}: slot {inputs.slot_mapping[bad[0]]} outside the cache "
                             f"({self.pool.num_pages * ps} slots)")
        used = np.arange(self.max_pages) < -(-inputs.seq_lens[:, None] // ps)  # [n, max_pages]
        bad = np.flatnonzero((used & ((inputs.block_table < 0) | (inputs.block_table >= self.pool.num_pages))).any(1))
        if bad.size:
            raise ValueError(f"decode row {bad[0]}: block_table row {inputs.block_table[bad[0]].tolist()} has pages "
                             f"outside the cache ({self.pool.num_pages} pages) among its first "
                             f"{-(-int(inputs.seq_lens[bad[0]]) // ps)}")
