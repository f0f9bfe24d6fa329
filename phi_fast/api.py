"""The public API: `load(path) -> Model`, `Model.generate`, `Model.chat`, and the one-line `generate`."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Iterator, Sequence, Union

import torch

from . import ops
from .config import ModelConfig, load_config
from .engine import Engine, Request
from .image import ImageInput, load_image, preprocess, preprocess_uint8
from .kv_cache import PagePool
from .model import LlavaPhi
from .prompt import build_prompt, tokenize_prompt
from .quant import DEFAULT_GROUP_SIZE, QuantConfig, QuantizedWeight, is_quantized_name
from .quant import quantize as quantize_weight
from .quant_checkpoint import load_quantized_weights, read_quant_config, save_model
from .sampling import SamplingParams
from .tokenizer import Tokenizer
from .weights import load_weights

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


class Model:
    """A loaded LLaVA-Phi: tokenizer, image preprocessing, weights, paged KV cache and engine."""

    def __init__(self, config: ModelConfig, llava: LlavaPhi, tokenizer: Tokenizer, engine: Engine, path: Path):
        self.config = config
        self.llava = llava
        self.tokenizer = tokenizer
        self.engine = engine
        self.path = path
        self.quant: QuantConfig | None = None  # how the linears are packed (None: full precision)

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
             group_size: int = DEFAULT_GROUP_SIZE) -> "Model":
        """Load a checkpoint folder (config.json, safetensors, tokenizer) in any supported layout.

        device: "cpu" or "cuda[:N]". dtype: float32/bfloat16/float16 (default float32 on CPU, bfloat16 on CUDA).
        cache_memory: KV cache size in bytes (int) or as a fraction of free device memory after the weights
        (float); default: room for two full contexts on CPU, 0.9 of the free memory on CUDA.
        cuda_graphs: replay decode steps as CUDA graphs (default: on CUDA devices).
        prefix_cache: finished requests whose KV pages stay cached for later prompts with the same prefix (the
        same image); their pages are the first to go when the cache runs short. 0 turns it off.
        quantize: "int8" or "int4" packs the Phi-2 linears and the projector at load time, tensor by tensor
        (phi_fast.quant; int4 in groups of group_size inputs); a checkpoint written by `save` from a quantized
        model loads quantized without it. CPU only for now: CUDA raises NotImplementedError.
        """
        path = Path(path)
        device = _check_device(device)
        dtype = _check_dtype(dtype, device)
        config = load_config(path)
        tokenizer = Tokenizer.from_dir(path)
        quant = _quant_config(path, quantize, group_size, device)
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
        pool = PagePool(num_layers=t.num_layers, num_heads=t.num_heads, head_dim=t.head_dim, num_pages=num_pages,
                        page_size=page_size, dtype=dtype, device=device)
        log.info("KV cache: %d pages of %d tokens (%.1f MiB)", num_pages, page_size, num_pages * page_bytes / 2**20)
        engine = Engine(llava, tokenizer, pool, max_num_seqs=max_num_seqs, use_cuda_graphs=cuda_graphs,
                        prefix_cache=prefix_cache)
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
                 seed: int | None = None, stop: str | Sequence[str] | None = None,
                 stream: bool = False) -> Union[str, list[str], Iterator[str]]:
        """Answer `prompt` about `image` (None for a text-only turn) with the phi-2_v0 template.

        Returns the answer, or an iterator of text pieces with stream=True. Lists of prompts (and images, or
        None) run together as one batch and return a list of answers in the same order. Greedy at
        temperature 0; sampling is reproducible with `seed`. Stops at EOS, a stop string or max_new_tokens,
        and never runs past the context.
        """
        params = SamplingParams(max_new_tokens, temperature, top_p, top_k, seed, _stops(stop))
        if isinstance(prompt, str):
            req = self._submit([(image, prompt)], params)[0]
            return self._stream(req) if stream else self._finish([req])[0]
        if stream:
            raise ValueError("stream=True takes one prompt, not a list")
        images = list(image) if isinstance(image, (list, tuple)) else [image] * len(prompt)
        if len(images) != len(prompt):
            raise ValueError(f"got {len(images)} images for {len(prompt)} prompts")
        return self._finish(self._submit(list(zip(images, prompt)), params))

    def chat(self, image: ImageInput | None = None) -> "Chat":
        """A multi-turn conversation about `image` whose earlier turns stay in the KV cache."""
        return Chat(self, image)

    # --- internals ----------------------------------------------------------------------------------------

    def _pixels(self, image: ImageInput) -> torch.Tensor:
        """[3, S, S]: uint8 for the GPU (patch_embed rescales and normalizes in its kernel), else normalized fp32."""
        prep = preprocess_uint8 if self.device.type == "cuda" else preprocess
        return prep(load_image(image), image_size=self.config.vision.image_size,
                    pad_to_square=self.config.pad_to_square)

    def _submit(self, items: list[tuple[ImageInput | None, str]], params: SamplingParams,
                keep_cache: bool = False) -> list[Request]:
        prepared = []
        for image, prompt in items:  # everything is checked before anything is queued
            text = build_prompt([(prompt, None)], with_image=image is not None)
            prepared.append((tokenize_prompt(self.tokenizer, text), [] if image is None else [self._pixels(image)]))
        return [self.engine.add(ids, pixels, params, keep_cache) for ids, pixels in prepared]

    def _finish(self, reqs: list[Request]) -> list[str]:
        try:
            while not all(r.finished for r in reqs):
                self.engine.step()
        finally:
            for r in reqs:
                self.engine.abort(r)
        for r in reqs:
            if r.error is not None:
                raise r.error
        return [r.visible_text() for r in reqs]

    def _stream(self, req: Request) -> Iterator[str]:
        try:
            while not req.finished:
                self.engine.step()
                piece = req.take_new_text()
                if piece:
                    yield piece
            if req.error is not None:
                raise req.error
            piece = req.take_new_text()
            if piece:
                yield piece
        finally:
            self.engine.abort(req)


class Chat:
    """A conversation: each `ask` re-templates the whole history; the cached prefix is reused, not recomputed."""

    def __init__(self, model: Model, image: ImageInput | None):
        self.model = model
        self.pixels = None if image is None else model._pixels(image)
        self.turns: list[tuple[str, str | None]] = []
        self._last: Request | None = None

    def ask(self, message: str, *, max_new_tokens: int = 128, temperature: float = 0.0, top_p: float = 1.0,
            top_k: int = 0, seed: int | None = None, stop: str | Sequence[str] | None = None) -> str:
        """Add a user turn and return the assistant's answer."""
        params = SamplingParams(max_new_tokens, temperature, top_p, top_k, seed, _stops(stop))
        turns = self.turns + [(message, None)]
        text = build_prompt(turns, with_image=self.pixels is not None)
        ids = tokenize_prompt(self.model.tokenizer, text)
        req = self.model.engine.add(ids, [] if self.pixels is None else [self.pixels], params, keep_cache=True)
        try:
            while not req.finished:
                self.model.engine.step()
        except BaseException:
            self.model.engine.abort(req)
            raise
        if req.error is not None:
            self.model.engine.abort(req)
            raise req.error
        answer = req.visible_text()
        self.turns = turns[:-1] + [(message, answer)]
        self.close()  # the new turn holds (shares) whatever of the old one it reused
        self._last = req
        return answer

    def close(self) -> None:
        """Let the cache forget this conversation."""
        if self._last is not None:
            self.model.engine.release(self._last)
            self._last = None


def load(path: str | os.PathLike, device: str | torch.device = "cpu", dtype: str | torch.dtype | None = None,
         **kwargs) -> Model:
    """Load a LLaVA-Phi checkpoint folder; see `Model.load`."""
    return Model.load(path, device, dtype, **kwargs)


_MODELS: dict[tuple[str, str, str], Model] = {}


def generate(image: ImageInput | None, prompt: str, *, model: str | os.PathLike | Model | None = None,
             device: str | None = None, dtype: str | torch.dtype | None = None, **kwargs):
    """One-line entry: load `model` (a path, default $PHI_FAST_MODEL; cached per process) and answer."""
    if not isinstance(model, Model):
        path = model if model is not None else os.environ.get("PHI_FAST_MODEL")
        if path is None:
            raise ValueError("no model given: pass model=PATH or set PHI_FAST_MODEL to a checkpoint folder")
        device = device or ("cuda" if torch.cuda.is_available() and "cuda" in ops.available_backends() else "cpu")
        key = (str(Path(path).resolve()), device, str(dtype))
        if key not in _MODELS:
            _MODELS[key] = load(path, device, dtype)
        model = _MODELS[key]
    return model.generate(image, prompt, **kwargs)


def _stops(stop: str | Sequence[str] | None) -> tuple[str, ...]:
    if stop is None:
        return ()
    return (stop,) if isinstance(stop, str) else tuple(stop)


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


def _quant_config(path: Path, quantize: str | None, group_size: int, device: torch.device) -> QuantConfig | None:
    """The quantization to load with: the checkpoint's own (a saved quantized model), else quantize=."""
    saved = read_quant_config(path)
    if saved is not None and quantize is not None and quantize != saved.format:
        raise ValueError(f"{path} holds {saved.format} weights; load it with quantize=None or {saved.format!r}, "
                         f"not {quantize!r}")
    quant = saved if saved is not None else (None if quantize is None else QuantConfig(quantize, group_size))
    if quant is not None and device.type == "cuda":
        raise NotImplementedError(f"quantize={quant.format!r}: int8/int4 weights have no CUDA kernels yet (issue 14, "
                                  f"CUDA part); load on device='cpu' or without quantize=")
    return quant


def _quantize_to(tensor: torch.Tensor, quant: QuantConfig, device: torch.device) -> QuantizedWeight:
    packed = quantize_weight(tensor, quant)
    return QuantizedWeight(packed.qweight.to(device), packed.scales.to(device), packed.in_features)


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
