"""The public API: `load(path) -> Model`, `Model.generate`, `Model.chat`, and the one-line `generate`."""

from __future__ import annotations

import logging
import math
import os
import threading
import time
import weakref
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterator, Sequence, Union

import torch

from . import ops
from .config import ModelConfig, load_config
from .engine import Engine, Request
from .engine_loop import EngineLoop, RequestHandle
from .image import ImageInput, load_image, preprocess, preprocess_uint8
from .kv_cache import PagePool
from .model import LlavaPhi
from .prompt import build_prompt, chat_prompt, tokenize_prompt
from .quant import DEFAULT_GROUP_SIZE, QuantConfig, QuantizedWeight, is_quantized_name
from .quant import quantize as quantize_weight
from .quant_checkpoint import load_quantized_weights, read_quant_config, save_model
from .sampling import SamplingParams, check_stop
from .tokenizer import Tokenizer
from .weights import load_weights

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


SUPPORTED_HEAD_DIMS = (64, 80)  # the attention kernels' closed list (design.md section 2)
SUPPORTED_PAGE_SIZES = (16, 32)


class BatchError(RuntimeError):
    """Some requests of a `Model.generate([...])` batch failed; the others' answers are kept.

    answers[i]: prompt i's answer, or None where it failed; errors[i]: the exception of prompt i, or None.
    """

    def __init__(self, answers: list[str | None], errors: list[BaseException | None]):
        self.answers = answers
        self.errors = errors
        failed = [i for i, e in enumerate(errors) if e is not None]
        first = errors[failed[0]]
        super().__init__(f"{len(failed)} of {len(errors)} requests failed (prompts {failed}); first: prompt "
                         f"{failed[0]}: {type(first).__name__}: {first}")


class Model:
    """A loaded LLaVA-Phi: tokenizer, image preprocessing, weights, paged KV cache and engine.

    Safe to share between threads: every call submits its requests to one engine loop (phi_fast.engine_loop),
    which batches concurrent calls together; each call gets exactly the answer it would get alone.
    """

    def __init__(self, config: ModelConfig, llava: LlavaPhi, tokenizer: Tokenizer, engine: Engine, path: Path):
        self.config = config
        self.llava = llava
        self.tokenizer = tokenizer
        self.engine = engine  # owned by self.loop's thread once a request was made through the API
        self.path = path
        self.quant: QuantConfig | None = None  # how the linears are packed (None: full precision)
        self.loop = EngineLoop(engine)
        weakref.finalize(self, self.loop.close, 30.0)  # a dropped Model (or the exit) stops its engine thread

    @property
    def device(self) -> torch.device:
        return self.llava.device

    @property
    def dtype(self) -> torch.dtype:
        return self.llava.dtype

    @classmethod
    def load(cls, path: str | os.PathLike, device: str | torch.device = "cpu",
             dtype: str | torch.dtype | None = None, *, progress: bool = True,
             cache_memory: int | float | None = None, page_size: int = 16, max_num_seqs: int = 64,
             cuda_graphs: bool | None = None, prefix_cache: int = 16, quantize: str | None = None,
             group_size: int = DEFAULT_GROUP_SIZE, token_budget: int | None = None) -> "Model":
        """Load a checkpoint folder (config.json, safetensors, tokenizer) in any supported layout.

        device: "cpu" or "cuda[:N]". dtype: float32/bfloat16/float16 (default float32 on CPU, bfloat16 on CUDA).
        cache_memory: KV cache size in bytes (int) or as a fraction of free device memory after the weights
        (float); default: room for two full contexts on CPU, 0.9 of the free memory on CUDA.
        page_size: tokens per KV page (16 or 32). max_num_seqs: requests decoded together at most.
        cuda_graphs: replay decode steps as CUDA graphs (default: on CUDA devices).
        prefix_cache: finished requests whose KV pages stay cached for later prompts with the same prefix (the
        same image); their pages are the first to go when the cache runs short. 0 turns it off.
        token_budget: tokens one engine step computes at most (default 512 on CPU, 4096 on CUDA): the running
        streams' next tokens first, then chunks of new prompts, so a long prompt never stalls them for long.
        Everything that would fail at the first generate() (unsupported sizes, a tokenizer larger than the
        model's vocabulary, bad engine settings) raises ValueError here, before the weights are read.
        quantize: "int8" or "int4" packs the Phi-2 linears and the projector at load time, tensor by tensor
        (phi_fast.quant; int4 in groups of group_size inputs); a checkpoint written by `save` from a quantized
        model loads quantized without it. On CUDA too (W8A16 / W4A16 kernels); the packing runs on the CPU
        as each tensor is read, so the checkpoint's bits are the same wherever it is loaded or saved.
        """
        path = Path(path)
        device = _check_device(device)
        dtype = _check_dtype(dtype, device)
        _check_settings(cache_memory, page_size, max_num_seqs, cuda_graphs, prefix_cache, token_budget)
        config = load_config(path)
        tokenizer = Tokenizer.from_dir(path)
        _check_supported(config, tokenizer, path)
        quant = _quant_config(path, quantize, group_size)
        if quant is not None and read_quant_config(path) is not None:
            weights = load_quantized_weights(path, config, quant, dtype=dtype, device=device, progress=progress)
        elif quant is not None:
            def pack(name: str, tensor: torch.Tensor) -> QuantizedWeight | None:
                return _quantize_to(tensor, quant, device) if is_quantized_name(name) else None

            weights = load_weights(path, config, dtype=dtype, device=device, progress=progress, transform=pack)
        else:
            weights = load_weights(path, config, dtype=dtype, device=device, progress=progress)
        llava = LlavaPhi(config, weights)
        t = config.text
        page_bytes = PagePool.page_bytes(t.num_layers, t.num_heads, t.head_dim, page_size, dtype)
        if cache_memory is None:
            cache_memory = 0.9 if device.type == "cuda" else 2 * t.max_position_embeddings // page_size * page_bytes
        num_pages = PagePool.pages_for_budget(cache_memory, page_bytes, device)
        if num_pages < 1:
            raise ValueError(f"cache_memory {cache_memory!r} holds no KV page ({page_bytes} bytes each)")
        try:
            pool = PagePool(num_layers=t.num_layers, num_heads=t.num_heads, head_dim=t.head_dim,
                            num_pages=num_pages, page_size=page_size, dtype=dtype, device=device)
        except (RuntimeError, MemoryError) as e:  # the allocator's own error says nothing about what to change
            raise MemoryError(f"cannot allocate the KV cache: {num_pages} pages of {page_size} tokens = "
                              f"{num_pages * page_bytes / 2**30:.2f} GiB on {device}; pass a smaller cache_memory "
                              f"({type(e).__name__}: {e})") from e
        log.info("KV cache: %d pages of %d tokens (%.1f MiB)", num_pages, page_size, num_pages * page_bytes / 2**20)
        engine = Engine(llava, tokenizer, pool, max_num_seqs=max_num_seqs, use_cuda_graphs=cuda_graphs,
                        prefix_cache=prefix_cache, token_budget=token_budget)
        model = cls(config, llava, tokenizer, engine, path)
        model.quant = quant
        return model

    def save(self, path: str | os.PathLike) -> Path:
        """Write this model as a LLaVA-Phi checkpoint folder (config.json, safetensors, tokenizer files): packed
        weights and scales when it was loaded with quantize=, so that `load(path)` reads them back as they are."""
        path = Path(path)
        if path.resolve() == self.path.resolve():
            raise ValueError(f"save: {path} is the folder this model was loaded from; choose another folder")
        return save_model(path, self.config, self.llava.decoder.w, self.quant, self.path)

    def generate(self, image: ImageInput | None | Sequence[ImageInput | None], prompt: str | Sequence[str], *,
                 max_new_tokens: int = 128, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
                 seed: int | None = None, stop: str | Sequence[str] | None = None, stream: bool = False,
                 timeout: float | None = None) -> Union[str, list[str], Iterator[str]]:
        """Answer `prompt` about `image` (None for a text-only turn) with the phi-2_v0 template.

        Returns the answer, or an iterator of text pieces with stream=True: its request is queued when the
        iterator is first advanced, and aborted (pages freed) when it is closed or garbage-collected.
        Lists of prompts (and images, or None) run together as one batch and return a list of answers in the
        same order; if some of them fail (e.g. one can never fit the KV cache), BatchError carries every
        answer that was computed and each failed prompt's exception. Greedy at temperature 0; sampling is
        reproducible with `seed`. Stops at EOS, a stop string or max_new_tokens, and never runs past the
        context. Every argument is checked here (ValueError naming it); timeout: seconds to wait for the whole
        answer (TimeoutError, and the request is aborted).
        """
        params = SamplingParams(max_new_tokens, temperature, top_p, top_k, seed, check_stop(stop))
        timeout = _check_timeout(timeout)
        if not isinstance(stream, bool):
            raise ValueError(f"stream must be a bool, got {stream!r}")
        if isinstance(prompt, str):
            req = self._submit([(image, prompt)], params)[0]
            return self._stream(req, timeout) if stream else self._answers([req], timeout, single=True)[0]
        if stream:
            raise ValueError("stream=True takes one prompt, not a list")
        if not isinstance(prompt, (list, tuple)):
            raise ValueError(f"prompt must be a str or a list of str, got {type(prompt).__name__}")
        images = list(image) if isinstance(image, (list, tuple)) else [image] * len(prompt)
        if len(images) != len(prompt):
            raise ValueError(f"got {len(images)} images for {len(prompt)} prompts")
        return self._answers(self._submit(list(zip(images, prompt)), params), timeout, single=False)

    def submit(self, prompt: str | Sequence[Mapping[str, str]], images: Sequence[ImageInput] = (),
               params: SamplingParams | None = None, *, n: int = 1,
               on_update: Callable[[RequestHandle], Any] | None = None) -> list[RequestHandle]:
        """Queue `n` answers to one prompt and return their handles at once (stream, result, abort: see
        phi_fast.engine_loop), for callers that need more than `generate` gives (finish reasons, token counts,
        logprobs, a callback per update: the CLI and the HTTP server).

        prompt: text used as it is (no template), or OpenAI-style messages [{"role", "content": str}] put in the
        phi-2_v0 template (prompt.chat_prompt); either way one "<image>" marker per entry of `images`, in order.
        n > 1: the answers use seeds params.seed, params.seed + 1, ... (random ones without a seed) and share
        the prompt's cached pages. Everything is checked and the images preprocessed in the caller's thread:
        ValueError for a bad prompt, image or parameter; nothing is queued then.
        """
        params = SamplingParams() if params is None else params
        if not isinstance(params, SamplingParams):
            raise ValueError(f"params must be SamplingParams, got {type(params).__name__}")
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be an int >= 1, got {n!r}")
        text = prompt if isinstance(prompt, str) else chat_prompt(prompt)
        ids = tokenize_prompt(self.tokenizer, text, num_images=len(images))
        pixels = [self._pixels(image) for image in images]
        reqs = [self.engine.new_request(ids, pixels, params if params.seed is None or n == 1
                                        else replace(params, seed=params.seed + i)) for i in range(n)]
        return self.loop.submit_many(reqs, on_update)

    def chat(self, image: ImageInput | None = None) -> "Chat":
        """A multi-turn conversation about `image` whose earlier turns stay in the KV cache."""
        return Chat(self, image)

    def close(self, timeout: float | None = 60.0) -> None:
        """Stop the engine thread (requests still running fail with EngineLoopClosed)."""
        self.loop.close(timeout)

    # --- internals ----------------------------------------------------------------------------------------

    def _pixels(self, image: ImageInput) -> torch.Tensor:
        """[3, S, S]: uint8 for the GPU (patch_embed rescales and normalizes in its kernel), else normalized fp32."""
        prep = preprocess_uint8 if self.device.type == "cuda" else preprocess
        return prep(load_image(image), image_size=self.config.vision.image_size,
                    pad_to_square=self.config.pad_to_square)

    def _submit(self, items: list[tuple[ImageInput | None, str]], params: SamplingParams,
                keep_cache: bool = False) -> list[Request]:
        """Requests for (image, prompt) pairs, built and checked in the caller's thread; nothing is queued yet
        (`_answers` or `_stream` hand them to the engine loop; the CLI reads a finished one's finish_reason and
        token counts)."""
        reqs = []
        for i, (image, prompt) in enumerate(items):
            if not isinstance(prompt, str):
                raise ValueError(f"prompt {i} must be a str, got {type(prompt).__name__} {prompt!r:.80}")
            text = build_prompt([(prompt, None)], with_image=image is not None)
            pixels = [] if image is None else [self._pixels(image)]
            reqs.append(self.engine.new_request(tokenize_prompt(self.tokenizer, text), pixels, params, keep_cache))
        return reqs

    def _answers(self, reqs: list[Request], timeout: float | None, single: bool) -> list[str]:
        """Submit reqs together and wait for each; see generate() for how failures are reported."""
        handles = self.loop.submit_many(reqs)
        deadline = None if timeout is None else time.monotonic() + timeout
        answers: list[str | None] = []
        errors: list[BaseException | None] = []
        try:
            for h in handles:
                try:
                    answers.append(h.result(None if deadline is None else max(0.0, deadline - time.monotonic())))
                    errors.append(None)
                except Exception as error:  # noqa: BLE001 - reported per request below
                    if not h.done():
                        raise  # our own timeout, not the request's failure
                    answers.append(None)
                    errors.append(error)
        except BaseException:
            for h in handles:
                h.abort()
            raise
        if single and errors[0] is not None:
            raise errors[0]
        if any(e is not None for e in errors):
            raise BatchError(answers, errors)
        return answers

    def _stream(self, req: Request, timeout: float | None = None) -> Iterator[str]:
        yield from self.loop.submit(req).stream(timeout)  # runs at the first next(): the request queues then


class Chat:
    """A conversation: each `ask` re-templates the whole history; the cached prefix is reused, not recomputed."""

    def __init__(self, model: Model, image: ImageInput | None):
        self.model = model
        self.pixels = None if image is None else model._pixels(image)
        self.turns: list[tuple[str, str | None]] = []
        self._last: Request | None = None

    def ask(self, message: str, *, max_new_tokens: int = 128, temperature: float = 0.0, top_p: float = 1.0,
            top_k: int = 0, seed: int | None = None, stop: str | Sequence[str] | None = None, stream: bool = False,
            timeout: float | None = None) -> Union[str, Iterator[str]]:
        """Add a user turn and return the assistant's answer.

        With stream=True, an iterator of the answer's text pieces instead (queued at the first next()): the turn
        joins the conversation, as the same stripped answer ask() returns, once the iterator is exhausted; one
        closed early, timed out or failed aborts its request and leaves the conversation as it was. One ask at a
        time: finish (or close) a stream before the next ask.
        """
        params = SamplingParams(max_new_tokens, temperature, top_p, top_k, seed, check_stop(stop))
        if not isinstance(message, str):
            raise ValueError(f"message must be a str, got {type(message).__name__}")
        if not isinstance(stream, bool):
            raise ValueError(f"stream must be a bool, got {stream!r}")
        timeout = _check_timeout(timeout)
        turns = self.turns + [(message, None)]
        text = build_prompt(turns, with_image=self.pixels is not None)
        ids = tokenize_prompt(self.model.tokenizer, text)
        pixels = [] if self.pixels is None else [self.pixels]
        req = self.model.engine.new_request(ids, pixels, params, keep_cache=True)
        if stream:
            return self._stream(message, req, timeout)
        answer = self.model._answers([req], timeout, single=True)[0]
        self._add_turn(message, answer, req)
        return answer

    def _stream(self, message: str, req: Request, timeout: float | None) -> Iterator[str]:
        handle = self.model.loop.submit(req)
        yield from handle.stream(timeout)
        self._add_turn(message, handle.result(0), req)

    def _add_turn(self, message: str, answer: str, req: Request) -> None:
        self.turns = self.turns + [(message, answer)]
        self.close()  # the new turn holds (shares) whatever of the old one it reused
        self._last = req

    def reset(self) -> None:
        """Start over about the same image: the turns are forgotten, and so is their cache."""
        self.close()
        self.turns = []

    def close(self) -> None:
        """Let the cache forget this conversation."""
        last, self._last = self._last, None
        if last is not None and not self.model.loop.closed:
            self.model.loop.call(lambda engine: engine.release(last))


def load(path: str | os.PathLike, device: str | torch.device = "cpu", dtype: str | torch.dtype | None = None,
         **kwargs) -> Model:
    """Load a LLaVA-Phi checkpoint folder; see `Model.load`."""
    return Model.load(path, device, dtype, **kwargs)


_MODELS: dict[tuple[str, str, str], Model] = {}
_MODELS_LOCK = threading.Lock()  # threads asking for the same model load it once


def generate(image: ImageInput | None, prompt: str, *, model: str | os.PathLike | Model | None = None,
             device: str | None = None, dtype: str | torch.dtype | None = None, **kwargs):
    """One-line entry: load `model` (a path, default $PHI_FAST_MODEL; cached per process) and answer."""
    if not isinstance(model, Model):
        path = model if model is not None else os.environ.get("PHI_FAST_MODEL")
        if path is None:
            raise ValueError("no model given: pass model=PATH or set PHI_FAST_MODEL to a checkpoint folder")
        device = device or ("cuda" if torch.cuda.is_available() and "cuda" in ops.available_backends() else "cpu")
        key = (str(Path(path).resolve()), device, str(dtype))
        with _MODELS_LOCK:
            if key not in _MODELS:
                _MODELS[key] = load(path, device, dtype)
            model = _MODELS[key]
    return model.generate(image, prompt, **kwargs)


def _check_timeout(timeout: float | None) -> float | None:
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not math.isfinite(timeout) \
            or timeout <= 0:
        raise ValueError(f"timeout must be a positive number of seconds or None, got {timeout!r}")
    return float(timeout)


def _check_settings(cache_memory: object, page_size: object, max_num_seqs: object, cuda_graphs: object,
                    prefix_cache: object, token_budget: object = None) -> None:
    """Engine settings of Model.load, checked before anything is read."""
    def is_int(v: object) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    if cache_memory is not None and not (is_int(cache_memory) and cache_memory > 0) and not (
            isinstance(cache_memory, float) and 0.0 < cache_memory <= 1.0):
        raise ValueError(f"cache_memory must be a number of bytes (int > 0) or a fraction of free memory "
                         f"(float in (0, 1]), got {cache_memory!r}")
    if not is_int(page_size) or page_size not in SUPPORTED_PAGE_SIZES:
        supported = ", ".join(map(str, SUPPORTED_PAGE_SIZES))
        raise ValueError(f"unsupported page_size {page_size!r} (supported: {supported})")
    if not is_int(max_num_seqs) or max_num_seqs < 1:
        raise ValueError(f"max_num_seqs must be an int >= 1, got {max_num_seqs!r}")
    if not is_int(prefix_cache) or prefix_cache < 0:
        raise ValueError(f"prefix_cache must be an int >= 0 (0 = off), got {prefix_cache!r}")
    if token_budget is not None and (not is_int(token_budget) or token_budget < 1):
        raise ValueError(f"token_budget must be an int >= 1 (tokens per step) or None (the device's default), "
                         f"got {token_budget!r}")
    if cuda_graphs is not None and not isinstance(cuda_graphs, bool):
        raise ValueError(f"cuda_graphs must be True, False or None, got {cuda_graphs!r}")


def _check_supported(config: ModelConfig, tokenizer: Tokenizer, path: Path) -> None:
    """What the kernels and the engine need of the model, checked before the weights are read."""
    for tower, dim in (("text", config.text.head_dim), ("vision", config.vision.head_dim)):
        if dim not in SUPPORTED_HEAD_DIMS:
            raise ValueError(f"{path}: unsupported {tower} head_dim {dim} (supported: "
                             f"{', '.join(map(str, SUPPORTED_HEAD_DIMS))})")
    if tokenizer.vocab_size > config.text.vocab_size:
        raise ValueError(f"{path}: the tokenizer has {tokenizer.vocab_size} tokens but the model's vocabulary "
                         f"(vocab_size) only {config.text.vocab_size}")


def _check_device(device: str | torch.device) -> torch.device:
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise ValueError(f"unknown device {device!r} (supported: 'cpu', 'cuda')") from e
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {str(device)!r} requested but torch sees no CUDA GPU")
        if "cuda" not in ops.available_backends():
            raise ValueError("phi_fast was built without its CUDA kernels: rebuild on a machine with nvcc and a "
                             "CUDA torch (pip install --no-build-isolation .)")
    elif dev.type != "cpu":
        raise ValueError(f"unsupported device {str(device)!r} (supported: 'cpu', 'cuda')")
    return dev


def _check_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"unsupported dtype {dtype!r} (supported: float32, bfloat16, float16)")
        return DTYPES[dtype]
    if dtype not in DTYPES.values():
        raise ValueError(f"unsupported dtype {dtype} (supported: float32, bfloat16, float16)")
    return dtype


def _quant_config(path: Path, quantize: str | None, group_size: int) -> QuantConfig | None:
    """The quantization to load with: the checkpoint's own (a saved quantized model), else quantize=."""
    saved = read_quant_config(path)
    if saved is not None and quantize is not None and quantize != saved.format:
        raise ValueError(f"{path} holds {saved.format} weights; load it with quantize=None or {saved.format!r}, "
                         f"not {quantize!r}")
    return saved if saved is not None else (None if quantize is None else QuantConfig(quantize, group_size))


def _quantize_to(tensor: torch.Tensor, quant: QuantConfig, device: torch.device) -> QuantizedWeight:
    packed = quantize_weight(tensor, quant)
    return QuantizedWeight(packed.qweight.to(device), packed.scales.to(device), packed.in_features)

