"""Load a LLaVA-Phi checkpoint of any supported layout into canonical tensor names (spec/llava-phi.md section 4).

Canonical names (what phi_fast.model reads; C hidden, H heads, D head_dim, I mlp, V vocab, Cv/Cp vision/projector):
    text.embed [V, C]; text.final_ln.{weight,bias} [C]; text.lm_head.weight [V, C], .bias [V] (zeros if none stored)
    text.layers.{i}.ln.{weight,bias} [C]
    text.layers.{i}.qkv.weight [3*H*D, C], .bias [3*H*D]      rows ordered (3, H, D): q heads, k heads, v heads
    text.layers.{i}.dense.{weight [C, C], bias}; .fc1.{weight [I, C], bias}; .fc2.{weight [C, I], bias}
    vision.patch.weight [Cv, 3*p*p] (conv weight flattened in (c, ky, kx) order); vision.class_embedding [Cv]
    vision.position_embedding [N+1, Cv]; vision.pre_ln.{weight,bias}
    vision.layers.{i}.{ln1, qkv [3*Cv, Cv] (q, k, v rows), out, ln2, fc1, fc2}.{weight,bias}  for i < layers_used
    projector.fc1.{weight [Cp, Cv], bias}; projector.fc2.{weight [Cp, Cp], bias}
Checkpoint tensors nothing reads (post_layernorm, CLIP layers past the selected one, text_model.*, rotary buffers)
are skipped. Every needed tensor is checked (present, shape, dtype) from the safetensors headers before any data
is read, and tensors are then streamed one at a time.
"""

from __future__ import annotations

import json
import logging
import stat
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Callable, Iterable

import torch
from tqdm import tqdm

if TYPE_CHECKING:
    from phi_fast.config import ModelConfig, TextConfig, VisionConfig

logger = logging.getLogger(__name__)

SUPPORTED_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DISK_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}  # safetensors codes we read
_ITEMSIZE = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
             "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_PATCH_SUFFIX = "embeddings.patch_embedding.weight"
MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit on the JSON header


class CheckpointError(ValueError):
    """A checkpoint problem: unreadable or truncated file, missing or misshaped tensor, unknown layout."""


@dataclass(frozen=True)
class TensorInfo:
    """One tensor as its safetensors header describes it."""

    file: Path
    name: str
    dtype: str  # safetensors code: "F32", "BF16", ...
    shape: tuple[int, ...]
    offset: int  # of the first data byte in the file
    nbytes: int


# ---------------------------------------------------------------------------------------------------------------
# Files and headers


def checkpoint_files(model_dir: str | Path) -> list[Path]:
    """The safetensors files of a checkpoint: model.safetensors, else the shards model.safetensors.index.json
    names, else every *.safetensors in the folder (sorted). Each must be a regular file (a FIFO or device would
    hang the reader) and a shard must lie inside the folder."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise FileNotFoundError(f"checkpoint folder {model_dir} not found")
    single = model_dir / SINGLE_FILE
    if single.exists():
        return [_regular_file(single)]
    index = model_dir / INDEX_FILE
    if index.exists():
        _regular_file(index)
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            shards = sorted(set(weight_map.values()), key=str)
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{index}: invalid index (expected JSON with a 'weight_map' object): {e}") from e
        return [_shard_path(model_dir, index, shard) for shard in shards]
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no safetensors checkpoint in {model_dir} (looked for {SINGLE_FILE}, {INDEX_FILE}, "
                                f"*.safetensors)")
    return [_regular_file(f) for f in files]


def _regular_file(path: Path) -> Path:
    """path, if it is a regular file (following links); else CheckpointError / FileNotFoundError."""
    try:
        mode = path.stat().st_mode
    except OSError as e:
        raise FileNotFoundError(f"{path}: cannot be read ({e.strerror})") from e
    if not stat.S_ISREG(mode):
        raise CheckpointError(f"{path}: not a regular file (a FIFO, device or folder); checkpoint files must be "
                              f"plain files")
    return path


def _shard_path(model_dir: Path, index: Path, shard: object) -> Path:
    """An index entry -> its file, which must be named by a relative path inside model_dir (no '..')."""
    if not isinstance(shard, str) or not shard:
        raise CheckpointError(f"{index}: shard names must be non-empty strings, got {shard!r:.100}")
    relative = Path(shard)
    if relative.is_absolute() or ".." in relative.parts:
        raise CheckpointError(f"{index} names shard {shard!r}, outside the checkpoint folder {model_dir} "
                              f"(shards must be relative paths inside it)")
    path = model_dir / relative  # a symlink may lead elsewhere (the Hugging Face cache links into its blobs)
    if not path.exists():
        raise FileNotFoundError(f"{index} names shard {shard!r}, which is not in {model_dir}")
    return _regular_file(path)


def read_safetensors_header(path: Path) -> dict[str, TensorInfo]:
    """Parse one file's header and check every tensor's bytes: inside the file's data section (truncation,
    corruption), sized for its dtype and shape, and overlapping no other tensor (aliased weights)."""
    size = _regular_file(path).stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: truncated or not a safetensors file ({size} bytes)")
        n = int.from_bytes(head, "little")
        if n > size - 8:
            raise CheckpointError(f"{path}: truncated or not a safetensors file (header of {n} bytes, file of {size})")
        if n > MAX_HEADER_BYTES:
            raise CheckpointError(f"{path}: safetensors header of {n} bytes is above the {MAX_HEADER_BYTES} limit")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path}: corrupt safetensors header: {e}") from e
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
    data_bytes = size - 8 - n
    infos = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (start, end) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{path}: corrupt safetensors header entry for {name!r}: {entry!r:.200}") from e
        if not (isinstance(dtype, str) and all(map(_is_count, shape)) and _is_count(start) and _is_count(end)):
            raise CheckpointError(f"{path}: corrupt safetensors header entry for {name!r} (dtype must be a string; "
                                  f"shape and data_offsets non-negative integers): {entry!r:.200}")
        if start > end:
            raise CheckpointError(f"{path}: corrupt header: tensor {name!r} has data_offsets [{start}, {end}] "
                                  f"(start after end)")
        if end > data_bytes:
            raise CheckpointError(f"{path}: file is truncated: tensor {name!r} needs data bytes {start}..{end}, "
                                  f"the file holds {data_bytes}")
        numel = 1
        for d in shape:
            numel *= d
        if dtype in _ITEMSIZE and end - start != numel * _ITEMSIZE[dtype]:
            raise CheckpointError(f"{path}: corrupt header: tensor {name!r} {dtype}{list(shape)} spans "
                                  f"{end - start} bytes, expected {numel * _ITEMSIZE[dtype]}")
        infos[name] = TensorInfo(path, name, dtype, shape, 8 + n + start, end - start)
    _check_no_overlap(path, infos, data_start=8 + n)
    return infos


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _check_no_overlap(path: Path, infos: dict[str, TensorInfo], data_start: int) -> None:
    """No two tensors share a data byte (empty tensors hold none)."""
    spans = sorted((i.offset, i.offset + i.nbytes, i.name) for i in infos.values() if i.nbytes)
    for (_, end_a, a), (start_b, _, b) in zip(spans, spans[1:]):
        if start_b < end_a:
            raise CheckpointError(f"{path}: corrupt header: tensors {a!r} and {b!r} overlap (data bytes "
                                  f"{start_b - data_start}..{end_a - data_start} belong to both)")


def read_checkpoint(model_dir: str | Path) -> dict[str, TensorInfo]:
    """Every tensor of a checkpoint folder, by name, from its safetensors headers (no tensor data is read)."""
    table: dict[str, TensorInfo] = {}
    for path in checkpoint_files(model_dir):
        for name, info in read_safetensors_header(path).items():
            if name in table:
                raise CheckpointError(f"tensor {name!r} is in both {table[name].file} and {path}")
            table[name] = info
    return table


def checkpoint_tensor_names(model_dir: str | Path) -> list[str]:
    """Sorted tensor names of a checkpoint folder."""
    return sorted(read_checkpoint(model_dir))


# ---------------------------------------------------------------------------------------------------------------
# Layout detection (names only)


def _prefixes(names: Iterable[str], suffix: str) -> list[str]:
    """Prefixes p (empty or ending in ".") such that p + suffix is a name."""
    return sorted(n[: -len(suffix)] for n in names
                  if n.endswith(suffix) and (n == suffix or n[-len(suffix) - 1] == "."))


def detect_layout(names: Iterable[str], model_type: str | None, source: str | Path) -> str:
    """"llava_phi" | "hf_phi" | "llava_hf" | "mixformer" from the checkpoint's tensor names.

    source (the folder or config file) and model_type only make the error clearer.
    """
    names = set(names)
    if _prefixes(names, "embd.wte.weight"):
        return "mixformer"
    embeds = _prefixes(names, "embed_tokens.weight")
    if len(embeds) == 1:
        p = embeds[0]
        if p + "layers.0.self_attn.query_key_value.weight" in names:
            return "llava_phi"
        if p + "layers.0.self_attn.q_proj.weight" in names:
            return "llava_hf" if "language_model." in p else "hf_phi"
    sample = sorted(names)[:12]
    raise CheckpointError(
        f"{source}: unknown checkpoint layout (model_type {model_type!r}, {len(names)} tensors). Expected one of: "
        f"llava_phi (*embed_tokens + layers.N.self_attn.query_key_value), hf_phi (model.layers.N.self_attn.q_proj), "
        f"llava_hf (language_model.*), mixformer (transformer.embd.wte). Tensor names seen (first {len(sample)}): "
        f"{sample}")


def has_vision_tower(names: Iterable[str]) -> bool:
    """Whether a checkpoint holds CLIP vision weights (a patch embedding)."""
    return bool(_prefixes(names, _PATCH_SUFFIX))


def _one_prefix(names: Iterable[str], suffixes: tuple[str, ...], what: str, source: Path,
                default: tuple[str, str]) -> tuple[str, str]:
    """The unique (prefix, suffix) such that prefix + suffix is a tensor name; `default` when there is none (the
    plan then reports that tensor as missing)."""
    found = [(p, s) for s in suffixes for p in _prefixes(names, s)]
    if not found:
        return default
    if len(found) > 1:
        seen = [p + s for p, s in found]
        raise CheckpointError(f"{source}: expected one {what} tensor (a name ending in {' or '.join(suffixes)}), "
                              f"found {len(found)}: {seen}")
    return found[0]


# ---------------------------------------------------------------------------------------------------------------
# Load plan: canonical tensor <- checkpoint tensors + how to combine them


@dataclass(frozen=True)
class _Entry:
    name: str  # canonical
    keys: tuple[str, ...]  # checkpoint tensor names
    shapes: tuple[tuple[int, ...], ...]  # their expected shapes
    combine: Callable[[list[torch.Tensor]], torch.Tensor]


def _single(ts: list[torch.Tensor]) -> torch.Tensor:
    return ts[0]


def _concat(ts: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat(ts, dim=0)


def _flatten(ts: list[torch.Tensor]) -> torch.Tensor:
    return ts[0].reshape(ts[0].shape[0], -1)


def _per_head_to_qkv(heads: int, head_dim: int) -> Callable[[list[torch.Tensor]], torch.Tensor]:
    """Rows (H, 3, D) -> (3, H, D), for a weight [3*H*D, C] or a bias [3*H*D]."""

    def combine(ts: list[torch.Tensor]) -> torch.Tensor:
        t = ts[0]
        return t.view(heads, 3, head_dim, -1).transpose(0, 1).reshape(t.shape)

    return combine


def _linear(name: str, key: str, out_f: int, in_f: int) -> list[_Entry]:
    return [_Entry(f"{name}.weight", (f"{key}.weight",), ((out_f, in_f),), _single),
            _Entry(f"{name}.bias", (f"{key}.bias",), ((out_f,),), _single)]


def _norm(name: str, key: str, size: int) -> list[_Entry]:
    return [_Entry(f"{name}.{p}", (f"{key}.{p}",), ((size,),), _single) for p in ("weight", "bias")]


def _fused_qkv(name: str, keys: tuple[str, ...], rows: int, cols: int,
               combine: Callable[[list[torch.Tensor]], torch.Tensor]) -> list[_Entry]:
    """qkv from one fused tensor (rows = 3C) or from q, k, v tensors (rows = C each, concatenated)."""
    return [_Entry(f"{name}.weight", tuple(f"{k}.weight" for k in keys), ((rows, cols),) * len(keys), combine),
            _Entry(f"{name}.bias", tuple(f"{k}.bias" for k in keys), ((rows,),) * len(keys), combine)]


def _text_plan(layout: str, names: set[str], t: TextConfig, lm_head_bias: bool, source: Path) -> list[_Entry]:
    c, v, i = t.hidden_size, t.vocab_size, t.intermediate_size
    if layout == "mixformer":
        p, _ = _one_prefix(names, ("embd.wte.weight",), "token embedding", source, ("transformer.", ""))
        head, _ = _one_prefix(names, ("lm_head.linear.weight",), "lm_head", source, ("", ""))
        embed, layer_fmt, final_ln, lm_head = f"{p}embd.wte", p + "h.{}.", f"{head}lm_head.ln", f"{head}lm_head.linear"
        ln, dense, fc1, fc2 = "ln", "mixer.out_proj", "mlp.fc1", "mlp.fc2"
        qkv_keys, qkv_rows, qkv_combine = ("mixer.Wqkv",), 3 * c, _single
    else:
        default = "language_model.model." if layout == "llava_hf" else "model."
        p, _ = _one_prefix(names, ("embed_tokens.weight",), "token embedding", source, (default, ""))
        head_default = "language_model." if p.startswith("language_model.") else ""
        head, _ = _one_prefix(names, ("lm_head.weight",), "lm_head", source, (head_default, ""))
        embed, layer_fmt, final_ln, lm_head = f"{p}embed_tokens", p + "layers.{}.", f"{p}final_layernorm", \
            f"{head}lm_head"
        ln, dense, fc1, fc2 = "input_layernorm", "self_attn.dense", "mlp.fc1", "mlp.fc2"
        if layout == "llava_phi":
            qkv_keys, qkv_rows = ("self_attn.query_key_value",), 3 * c
            qkv_combine = _per_head_to_qkv(t.num_heads, t.head_dim)
        else:
            qkv_keys, qkv_rows, qkv_combine = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), c, _concat
    plan = [_Entry("text.embed", (f"{embed}.weight",), ((v, c),), _single)]
    for n in range(t.num_layers):
        src, dst = layer_fmt.format(n), f"text.layers.{n}"
        plan += _norm(f"{dst}.ln", src + ln, c)
        plan += _fused_qkv(f"{dst}.qkv", tuple(src + k for k in qkv_keys), qkv_rows, c, qkv_combine)
        plan += _linear(f"{dst}.dense", src + dense, c, c)
        plan += _linear(f"{dst}.fc1", src + fc1, i, c)
        plan += _linear(f"{dst}.fc2", src + fc2, c, i)
    plan += _norm("text.final_ln", final_ln, c)
    plan += _linear("text.lm_head", lm_head, v, c) if lm_head_bias else \
        [_Entry("text.lm_head.weight", (f"{lm_head}.weight",), ((v, c),), _single)]
    return plan


def _vision_plan(names: set[str], vc: VisionConfig, source: Path) -> list[_Entry]:
    p, _ = _one_prefix(names, (_PATCH_SUFFIX,), "vision patch embedding", source, ("vision_model.", ""))
    cv, k = vc.hidden_size, vc.patch_size
    plan = [
        _Entry("vision.patch.weight", (f"{p}{_PATCH_SUFFIX}",), ((cv, 3, k, k),), _flatten),
        _Entry("vision.class_embedding", (f"{p}embeddings.class_embedding",), ((cv,),), _single),
        _Entry("vision.position_embedding", (f"{p}embeddings.position_embedding.weight",),
               ((vc.num_patches + 1, cv),), _single),
    ]
    plan += _norm("vision.pre_ln", f"{p}pre_layrnorm", cv)
    for n in range(vc.layers_used):
        src, dst = f"{p}encoder.layers.{n}.", f"vision.layers.{n}"
        plan += _norm(f"{dst}.ln1", src + "layer_norm1", cv)
        plan += _fused_qkv(f"{dst}.qkv", tuple(f"{src}self_attn.{x}_proj" for x in "qkv"), cv, cv, _concat)
        plan += _linear(f"{dst}.out", src + "self_attn.out_proj", cv, cv)
        plan += _norm(f"{dst}.ln2", src + "layer_norm2", cv)
        plan += _linear(f"{dst}.fc1", src + "mlp.fc1", vc.intermediate_size, cv)
        plan += _linear(f"{dst}.fc2", src + "mlp.fc2", cv, vc.intermediate_size)
    return plan


def _projector_plan(names: set[str], cfg: ModelConfig, source: Path) -> list[_Entry]:
    suffixes = ("mm_projector.0.weight", "multi_modal_projector.linear_1.weight")
    default = ("", suffixes[1]) if cfg.layout == "llava_hf" else ("model.", suffixes[0])
    p, suffix = _one_prefix(names, suffixes, "projector", source, default)
    first, second = ("mm_projector.0", "mm_projector.2") if suffix.startswith("mm_") else \
        ("multi_modal_projector.linear_1", "multi_modal_projector.linear_2")
    cp, cv = cfg.projector.out_features, cfg.projector.in_features
    return _linear("projector.fc1", p + first, cp, cv) + _linear("projector.fc2", p + second, cp, cp)


def _resolve(plan: list[_Entry], table: dict[str, TensorInfo], source: Path) -> list[tuple[_Entry, list[TensorInfo]]]:
    """Look up every checkpoint tensor of the plan; raise listing every missing, misshaped or mistyped one."""
    problems, resolved = [], []
    for entry in plan:
        infos = []
        for key, shape in zip(entry.keys, entry.shapes):
            info = table.get(key)
            if info is None:
                problems.append(f"missing tensor {key!r} (for {entry.name})")
            elif info.shape != shape:
                problems.append(f"{info.file}: tensor {key!r} has shape {list(info.shape)}, expected {list(shape)}")
            elif info.dtype not in DISK_DTYPES:
                problems.append(f"{info.file}: tensor {key!r} has dtype {info.dtype} (supported: "
                                f"{', '.join(DISK_DTYPES)})")
            infos.append(info)
        resolved.append((entry, infos))
    if problems:
        shown = "\n  ".join(problems[:20]) + (f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else "")
        raise CheckpointError(f"checkpoint {source} does not match its config ({len(problems)} problems):\n  {shown}")
    return resolved


def _check_no_extra_layers(plan: list[_Entry], first_layer: str, names: set[str], expected: int, field: str,
                           source: Path) -> None:
    """The checkpoint stores no layer at or past `expected` (a config that says fewer layers than the checkpoint
    holds would silently drop the rest). first_layer: canonical prefix of layer 0's entries in `plan`."""
    entry = next((e for e in plan if e.name.startswith(first_layer)), None)
    if entry is None:
        return
    prefix = entry.keys[0][: entry.keys[0].index(".0.") + 1]  # e.g. "model.layers."
    stored = {int(n[len(prefix):].split(".", 1)[0]) for n in names
              if n.startswith(prefix) and n[len(prefix):].split(".", 1)[0].isdigit()}
    if stored and max(stored) >= expected:
        raise CheckpointError(f"{source}: the checkpoint stores {max(stored) + 1} layers ({prefix}N) but the config's "
                              f"{field} is {expected}: fix config.json (the extra layers would be ignored)")


def resolve_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """torch.float32 / bfloat16 / float16, given as a torch dtype or its name."""
    found = SUPPORTED_DTYPES.get(dtype) if isinstance(dtype, str) else dtype
    if found not in SUPPORTED_DTYPES.values():
        raise ValueError(f"unsupported dtype {dtype!r} (supported: {', '.join(SUPPORTED_DTYPES)})")
    return found


# ---------------------------------------------------------------------------------------------------------------
# Loading


def _read_tensor(handle: BinaryIO, info: TensorInfo) -> torch.Tensor:
    """One tensor's bytes read into fresh (owned, aligned) CPU memory: no mapping of the file stays behind."""
    buf = torch.empty(info.nbytes, dtype=torch.uint8)
    handle.seek(info.offset)
    if handle.readinto(buf.numpy()) != info.nbytes:
        raise CheckpointError(f"{info.file}: file is truncated: tensor {info.name!r} could not be read in full")
    return buf.view(DISK_DTYPES[info.dtype]).view(info.shape)


def load_weights(model_dir: str | Path, config: ModelConfig, *, dtype: torch.dtype | str = torch.float32,
                 device: torch.device | str = "cpu", progress: bool = True,
                 transform: Callable[[str, torch.Tensor], object | None] | None = None) -> dict[str, torch.Tensor]:
    """Every tensor the model needs, under canonical names, in `dtype` on `device`.

    transform(name, tensor) sees each canonical tensor as read (CPU, checkpoint dtype) before the conversion to
    dtype/device; what it returns (unless None) is stored instead (load-time quantization: phi_fast.quant), so no
    full-precision copy of the model is ever held.

    The CLIP weights come from the checkpoint if it holds them, else from config.vision_tower_path.
    Raises FileNotFoundError / CheckpointError (a ValueError) naming the file, tensor and shapes; never returns
    a partial result.
    """
    dtype, device, model_dir = resolve_dtype(dtype), torch.device(device), Path(model_dir)
    table = read_checkpoint(model_dir)
    names = set(table)
    text_plan = _text_plan(config.layout, names, config.text, config.lm_head_bias, model_dir)
    _check_no_extra_layers(text_plan, "text.layers.0.", names, config.text.num_layers, "num_hidden_layers", model_dir)
    resolved = _resolve(text_plan + _projector_plan(names, config, model_dir), table, model_dir)
    if has_vision_tower(names):
        vision_table, vision_dir = table, model_dir
    elif config.vision_tower_path is not None:
        vision_dir = Path(config.vision_tower_path)
        vision_table = read_checkpoint(vision_dir)
    else:
        raise CheckpointError(f"{model_dir}: no vision tower tensors (*{_PATCH_SUFFIX}) in the checkpoint and no "
                              f"vision tower folder in the config")
    vision_plan = _vision_plan(set(vision_table), config.vision, vision_dir)
    _check_no_extra_layers(vision_plan, "vision.layers.0.", set(vision_table), config.vision.num_layers,
                           "vision num_hidden_layers", vision_dir)
    resolved += _resolve(vision_plan, vision_table, vision_dir)

    files = sorted({info.file for _, infos in resolved for info in infos})
    logger.info("loading %d tensors (%s layout) from %d file(s) as %s on %s", len(resolved), config.layout,
                len(files), dtype, device)
    out: dict[str, torch.Tensor] = {}
    with ExitStack() as stack:
        handles: dict[Path, BinaryIO] = {}
        for entry, infos in tqdm(resolved, desc="loading weights", unit="tensor", disable=None if progress else True):
            parts = []
            for info in infos:
                if info.file not in handles:
                    handles[info.file] = stack.enter_context(open(info.file, "rb"))
                parts.append(_read_tensor(handles[info.file], info))
            replaced = transform(entry.name, entry.combine(parts)) if transform is not None else None
            if replaced is not None:
                out[entry.name] = replaced
                continue
            out[entry.name] = entry.combine([part.to(device=device, dtype=dtype) for part in parts]).contiguous()
    if not config.lm_head_bias:
        out["text.lm_head.bias"] = torch.zeros(config.text.vocab_size, dtype=dtype, device=device)
    return out
