"""Save a loaded model as a LLaVA-Phi checkpoint (quantized or not) and load a quantized one back.

The saved folder is LLaVA-Phi's own layout (spec/llava-phi.md section 4: transformers-4.36 Phi names, fused
per-head qkv), so config.py and weights.py read it like any other; a quantized linear `KEY.weight` holds the packed
weight (int8 [N, K], or uint8 [N, Kp / 2] for int4: phi_fast.quant) and `KEY.weight_scale` its scales (fp32 per
channel for int8, fp16 per group for int4), and config.json says how under `quantization_config`. Loading such a
folder reads the packed tensors as they are: no re-quantization and no original checkpoint needed. Tokenizer files
are copied alongside.
"""

from __future__ import annotations

import json
import logging
import shutil
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Iterator

import torch
from tqdm import tqdm

from . import weights as W
from .checkpoint_writer import llava_phi_config_dict, save_safetensors
from .quant import QuantConfig, QuantizedWeight, is_quantized_name

if TYPE_CHECKING:
    from .config import ModelConfig

logger = logging.getLogger(__name__)

SCALE_SUFFIX = "_scale"
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "merges.txt", "added_tokens.json", "special_tokens_map.json",
                   "tokenizer_config.json")
_PACKED_DTYPES = {"I8": torch.int8, "U8": torch.uint8}


def read_quant_config(model_dir: str | Path) -> QuantConfig | None:
    """The quantization of a checkpoint folder from its config.json, or None for a full-precision one."""
    path = Path(model_dir) / "config.json"
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None  # config.py reports unreadable configs with the details
    entry = raw.get("quantization_config") if isinstance(raw, dict) else None
    return None if entry is None else QuantConfig.from_json(entry, str(path))


def _plan(config: ModelConfig, names: set[str], source: Path) -> list:
    """weights.py's load plan (canonical name <- checkpoint keys + how they combine) for `names`."""
    return (W._text_plan(config.layout, names, config.text, config.lm_head_bias, source)
            + W._projector_plan(names, config, source) + W._vision_plan(names, config.vision, source))


def _disk_parts(entry, tensor: torch.Tensor, config: ModelConfig) -> list[torch.Tensor]:
    """Undo entry.combine: the checkpoint tensors that load back into `tensor` (rows only, so packed weights and
    their scales split like full-precision ones)."""
    if entry.combine is W._single:
        return [tensor]
    if entry.combine is W._concat:
        return list(tensor.chunk(len(entry.keys)))
    if entry.combine is W._flatten:
        return [tensor.reshape(entry.shapes[0])]
    t = config.text  # the per-head fused qkv: rows (3, H, D) back to (H, 3, D)
    return [tensor.view(3, t.num_heads, t.head_dim, -1).transpose(0, 1).reshape(tensor.shape)]


def save_model(model_dir: str | Path, config: ModelConfig, weights: dict[str, object], quant: QuantConfig | None,
               tokenizer_dir: str | Path, *, max_shard_bytes: int | None = 2 << 30) -> Path:
    """Write `weights` (canonical names, QuantizedWeight values for packed linears) as a LLaVA-Phi checkpoint."""
    model_dir = Path(model_dir)
    layout_config = _as_llava_phi(config)
    plan = _plan(layout_config, set(), model_dir)
    missing = [e.name for e in plan if e.name not in weights]
    if missing:
        raise ValueError(f"save: the model has no tensors {missing[:5]} (of {len(missing)} missing)")

    def tensors() -> Iterator[tuple[str, torch.Tensor]]:
        for entry in plan:
            value = weights[entry.name]
            if isinstance(value, QuantizedWeight):
                (key,) = entry.keys
                yield key, _disk_parts(entry, value.qweight, config)[0].cpu().contiguous()
                yield key + SCALE_SUFFIX, _disk_parts(entry, value.scales, config)[0].cpu().contiguous()
                continue
            for key, part in zip(entry.keys, _disk_parts(entry, value, config)):
                yield key, part.cpu().contiguous()

    model_dir.mkdir(parents=True, exist_ok=True)
    dtype = weights["text.embed"].dtype
    raw = llava_phi_config_dict(config.text, config.vision, torch_dtype=str(dtype).removeprefix("torch."),
                                image_aspect_ratio="pad" if config.pad_to_square else "square")
    if quant is not None:
        raw["quantization_config"] = quant.to_json()
    (model_dir / "config.json").write_text(json.dumps(raw, indent=2))
    files = save_safetensors(model_dir, tensors(), max_shard_bytes=max_shard_bytes)
    for name in TOKENIZER_FILES:
        if (Path(tokenizer_dir) / name).is_file():
            shutil.copyfile(Path(tokenizer_dir) / name, model_dir / name)
    logger.info("saved %s checkpoint to %s (%d file(s))", quant.format if quant else dtype, model_dir, len(files))
    return model_dir


def _as_llava_phi(config: ModelConfig) -> ModelConfig:
    from dataclasses import replace

    return replace(config, layout="llava_phi", lm_head_bias=True)


def _read(handle: BinaryIO, info: W.TensorInfo) -> torch.Tensor:
    buf = torch.empty(info.nbytes, dtype=torch.uint8)
    handle.seek(info.offset)
    if handle.readinto(buf.numpy()) != info.nbytes:
        raise W.CheckpointError(f"{info.file}: file is truncated: tensor {info.name!r} could not be read in full")
    return buf.view(_PACKED_DTYPES[info.dtype]).view(info.shape)


def _check_packed(entry, table: dict[str, W.TensorInfo], quant: QuantConfig) -> list[str]:
    """Problems with the packed weight and scales of one quantized entry (empty when they are right)."""
    (key,) = entry.keys
    n, k = entry.shapes[0]
    if quant.format == "int8":
        want = {key: ("I8", (n, k)), key + SCALE_SUFFIX: ("F32", (n,))}
    else:
        kp = -(-k // quant.group_size) * quant.group_size
        want = {key: ("U8", (n, kp // 2)), key + SCALE_SUFFIX: ("F16", (n, kp // quant.group_size))}
    problems = []
    for name, (dtype, shape) in want.items():
        info = table.get(name)
        if info is None:
            problems.append(f"missing tensor {name!r} (for {entry.name}, {quant.format})")
        elif (info.dtype, info.shape) != (dtype, shape):
            hint = (" (fp32 int4 scales: written by an older phi_fast; quantize the full-precision checkpoint "
                    "again)" if quant.format == "int4" and info.dtype == "F32" and dtype == "F16" else "")
            problems.append(f"{info.file}: tensor {name!r} is {info.dtype}{list(info.shape)}, expected "
                            f"{dtype}{list(shape)} for {quant.format}{hint}")
    return problems


def load_quantized_weights(model_dir: str | Path, config: ModelConfig, quant: QuantConfig, *,
                           dtype: torch.dtype, device: torch.device, progress: bool = True) -> dict[str, object]:
    """A quantized checkpoint written by save_model: packed linears as QuantizedWeight, the rest in dtype."""
    model_dir = Path(model_dir)
    table = W.read_checkpoint(model_dir)
    plan = _plan(config, set(table), model_dir)
    packed = [e for e in plan if is_quantized_name(e.name)]
    problems = [p for e in packed for p in _check_packed(e, table, quant)]
    if problems:
        raise W.CheckpointError(f"quantized checkpoint {model_dir} is inconsistent ({len(problems)} problems):\n  "
                                + "\n  ".join(problems[:20]))
    resolved = W._resolve([e for e in plan if not is_quantized_name(e.name)], table, model_dir)
    out: dict[str, object] = {}
    with ExitStack() as stack:
        handles: dict[Path, BinaryIO] = {}

        def read(info: W.TensorInfo) -> torch.Tensor:
            if info.file not in handles:
                handles[info.file] = stack.enter_context(open(info.file, "rb"))
            return _read(handles[info.file], info) if info.dtype in ("I8", "U8") else \
                W._read_tensor(handles[info.file], info)

        for entry in tqdm(packed, desc="loading packed weights", unit="tensor", disable=None if progress else True):
            (key,) = entry.keys
            q = entry.combine([read(table[key])]).to(device).contiguous()
            s = entry.combine([read(table[key + SCALE_SUFFIX])]).to(device).contiguous()
            out[entry.name] = QuantizedWeight(q, s, entry.shapes[0][1])
        for entry, infos in tqdm(resolved, desc="loading weights", unit="tensor", disable=None if progress else True):
            out[entry.name] = entry.combine([read(i).to(device=device, dtype=dtype) for i in infos]).contiguous()
    return out

