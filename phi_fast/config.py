"""Model configuration: frozen dataclasses and `load_config`, which reads config.json of every supported layout.

Layouts (spec/llava-phi.md section 4), told apart by the checkpoint's tensor names:
    llava_phi  LLaVA-Phi's own checkpoint: transformers-4.36 Phi names, fused per-head qkv, CLIP inside.
    hf_phi     transformers >= 4.37 Phi names (q/k/v_proj) + LLaVA mm_* fields; CLIP inside or in its own folder.
    llava_hf   transformers' LlavaForConditionalGeneration with a Phi text_config (no lm_head bias).
    mixformer  Microsoft's original phi-msft names (transformer.h.N.mixer.Wqkv, lm_head.ln/linear) + mm_* fields.
The config.json schema is read by its own shape (llava_phi's vision_config, LlavaConfig's text_config, phi-msft's
n_embd, or plain Phi fields with mm_*), independently of the tensor naming.
"""

from __future__ import annotations

import json
import math
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from phi_fast.weights import checkpoint_tensor_names, detect_layout, has_vision_tower

LAYOUTS = ("llava_phi", "hf_phi", "llava_hf", "mixformer")
IMAGE_TOKEN_INDEX = -200  # LLaVA's image marker in the prompt's token ids
SELECT_FEATURES = ("patch", "cls_patch")
VISION_ACTS = ("quick_gelu", "gelu")
PROJECTOR_KINDS = ("mlp2x_gelu",)

# transformers' defaults for the fields a config.json may leave out; every size must be given.
_PHI_DEFAULTS = {"partial_rotary_factor": 0.5, "rope_theta": 10000.0, "layer_norm_eps": 1e-5,
                 "max_position_embeddings": 2048}
_CLIP_DEFAULTS = {"layer_norm_eps": 1e-5, "hidden_act": "quick_gelu"}

# What each config.json field must be, checked when it is read (before anything is allocated): ints in [lo, hi],
# finite reals in (lo, hi], strings, objects. The bounds are far above any Phi-2 / CLIP model and far below sizes
# that would only end in an allocator error.
_INT_FIELDS = {
    **dict.fromkeys(("vocab_size",), (1, 2**20)),
    **dict.fromkeys(("hidden_size", "n_embd", "mm_hidden_size"), (1, 2**16)),
    **dict.fromkeys(("intermediate_size", "n_inner"), (1, 2**18)),
    **dict.fromkeys(("num_hidden_layers", "n_layer"), (1, 256)),
    **dict.fromkeys(("num_attention_heads", "n_head", "num_key_value_heads", "n_head_kv"), (1, 1024)),
    **dict.fromkeys(("max_position_embeddings", "n_positions"), (1, 2**17)),
    "image_size": (1, 4096), "patch_size": (1, 4096), "rotary_dim": (1, 4096),
    "pad_vocab_size_multiple": (1, 2**16), "mm_vision_select_layer": (-257, 257),
    "image_token_index": (-(2**31), 2**31 - 1), "image_token_id": (-(2**31), 2**31 - 1),
}
_REAL_FIELDS = {"layer_norm_eps": (0.0, 1.0), "layer_norm_epsilon": (0.0, 1.0), "rope_theta": (0.0, 1e12),
                "partial_rotary_factor": (0.0, 1.0)}
_STR_FIELDS = {"hidden_act", "activation_function", "mm_projector_type", "mm_vision_select_feature", "mm_vision_tower",
               "projector_hidden_act", "vision_feature_select_strategy", "model_type", "image_aspect_ratio"}
_DICT_FIELDS = {"text_config", "vision_config", "vision_tower", "mm_projector", "rope_parameters", "rope_scaling"}


class ConfigError(ValueError):
    """A problem with a config file; the message starts with the file's path."""


@dataclass(frozen=True)
class TextConfig:
    """Phi decoder sizes. rotary_dim: leading dims of each head rotated (NeoX rotate-half)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    rotary_dim: int
    rope_theta: float
    layer_norm_eps: float
    max_position_embeddings: int

    def __post_init__(self) -> None:
        _check_positive(self, ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                               "rotary_dim", "max_position_embeddings"))
        _check_divisible("hidden_size", self.hidden_size, "num_heads", self.num_heads)
        if self.rotary_dim % 2 or self.rotary_dim > self.head_dim:
            raise ValueError(f"rotary_dim {self.rotary_dim} must be even and <= head_dim {self.head_dim}")
        for name in ("rope_theta", "layer_norm_eps"):
            _check_positive_real(self, name)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


@dataclass(frozen=True)
class VisionConfig:
    """CLIP vision tower sizes and LLaVA's feature selection (hidden_states[select_layer], CLS dropped for "patch")."""

    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    image_size: int
    patch_size: int
    layer_norm_eps: float
    select_layer: int = -2
    select_feature: str = "patch"
    hidden_act: str = "quick_gelu"

    def __post_init__(self) -> None:
        _check_positive(self, ("hidden_size", "intermediate_size", "num_layers", "num_heads", "image_size",
                               "patch_size"))
        _check_divisible("hidden_size", self.hidden_size, "num_heads", self.num_heads)
        _check_divisible("image_size", self.image_size, "patch_size", self.patch_size)
        if not -self.num_layers - 1 <= self.select_layer <= self.num_layers:
            raise ValueError(f"select_layer {self.select_layer} out of range for {self.num_layers} layers "
                             f"(hidden_states has {self.num_layers + 1} entries)")
        if self.select_feature not in SELECT_FEATURES:
            raise ValueError(f"unsupported select_feature {self.select_feature!r} (supported: {SELECT_FEATURES})")
        if self.hidden_act not in VISION_ACTS:
            raise ValueError(f"unsupported vision hidden_act {self.hidden_act!r} (supported: {VISION_ACTS})")
        _check_positive_real(self, "layer_norm_eps")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def layers_used(self) -> int:
        """Encoder layers that affect hidden_states[select_layer] (hidden_states[0] is the embeddings)."""
        s = self.select_layer
        return self.num_layers + 1 + s if s < 0 else s


@dataclass(frozen=True)
class ProjectorConfig:
    """Vision features [Cv] -> text embeddings [C]."""

    kind: str
    in_features: int
    out_features: int

    def __post_init__(self) -> None:
        if self.kind not in PROJECTOR_KINDS:
            raise ValueError(f"unsupported projector type {self.kind!r} (supported: {PROJECTOR_KINDS})")
        _check_positive(self, ("in_features", "out_features"))


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to build and load the model.

    image_token_id: the prompt's image marker (-200, or llava_hf's real vocabulary id).
    pad_to_square: image_aspect_ratio == "pad". vision_tower_path: folder to load CLIP weights from when the
    checkpoint itself has none. lm_head_bias: whether the checkpoint stores one (llava_hf does not).
    """

    text: TextConfig
    vision: VisionConfig
    projector: ProjectorConfig
    layout: str
    image_token_id: int = IMAGE_TOKEN_INDEX
    pad_to_square: bool = False
    vision_tower_path: Path | None = None
    lm_head_bias: bool = True

    def __post_init__(self) -> None:
        if self.layout not in LAYOUTS:
            raise ValueError(f"unknown layout {self.layout!r} (supported: {LAYOUTS})")
        if self.projector.in_features != self.vision.hidden_size:
            raise ValueError(f"projector in_features {self.projector.in_features} != vision hidden_size "
                             f"{self.vision.hidden_size}")
        if self.projector.out_features != self.text.hidden_size:
            raise ValueError(f"projector out_features {self.projector.out_features} != text hidden_size "
                             f"{self.text.hidden_size}")
        if self.image_token_id >= self.text.vocab_size:
            raise ValueError(f"image_token_id {self.image_token_id} >= vocab_size {self.text.vocab_size}")


def _check_positive(obj: object, names: tuple[str, ...]) -> None:
    for name in names:
        value = getattr(obj, name)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"{type(obj).__name__}.{name} must be a positive integer, got {value!r}")


def _check_positive_real(obj: object, name: str) -> None:
    value = getattr(obj, name)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{type(obj).__name__}.{name} must be a finite number > 0, got {value!r}")


def _check_divisible(name: str, value: int, by_name: str, by: int) -> None:
    if value % by:
        raise ValueError(f"{name} {value} is not divisible by {by_name} {by}")


def load_config(model_dir: str | Path) -> ModelConfig:
    """Read `model_dir/config.json` (and the checkpoint's tensor names, and a separate CLIP folder if named).

    Raises FileNotFoundError for a missing config.json / checkpoint / vision tower folder, and ConfigError (a
    ValueError) naming the file and field for bad JSON, missing or invalid fields, an unknown layout or unsupported
    settings.
    """
    model_dir = Path(model_dir)
    path = model_dir / "config.json"
    raw = _read_json(path)
    names = checkpoint_tensor_names(model_dir)
    layout = detect_layout(names, raw.get("model_type"), path)
    with _errors_in(path):
        if "text_config" in raw:
            return _from_llava_hf(raw, path, layout)
        if isinstance(raw.get("vision_config"), dict) and "vision_tower" in raw["vision_config"]:
            return _from_llava_phi(raw, path, layout)
        if "n_embd" in raw:
            return _from_mm_fields(raw, path, layout, _mixformer_text(raw, path), model_dir, names)
        if "mm_vision_tower" in raw:
            return _from_mm_fields(raw, path, layout, _phi_text(raw, path), model_dir, names)
    raise ConfigError(f"{path}: unrecognised config schema (model_type {raw.get('model_type')!r}; expected LLaVA-Phi's "
                      f"'vision_config.vision_tower', Llava's 'text_config', phi-msft's 'n_embd' or Phi fields with "
                      f"'mm_vision_tower'); keys seen: {sorted(raw)}")


@contextmanager
def _errors_in(path: Path) -> Iterator[None]:
    """Re-raise a ValueError that does not name its file as a ConfigError naming `path`; so too any type error
    a field check missed (a last line of defence: the checks in _get name the field)."""
    try:
        yield
    except ConfigError:
        raise
    except ValueError as e:
        raise ConfigError(f"{path}: {e}") from e
    except (TypeError, AttributeError, KeyError, ZeroDivisionError, OverflowError) as e:
        raise ConfigError(f"{path}: invalid config value ({type(e).__name__}: {e})") from e


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        if path.exists():  # a FIFO or device would block the read
            raise ConfigError(f"{path}: not a regular file")
        raise FileNotFoundError(f"{path} not found")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: invalid JSON: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _get(cfg: dict[str, Any], key: str, path: Path, where: str = "", default: Any = ...) -> Any:
    """cfg[key], or default; a missing required field, or a value of the wrong type or outside the field's bounds
    (_INT_FIELDS, ...), raises ConfigError naming the file, field and value."""
    if not isinstance(cfg, dict):
        raise ConfigError(f"{path}: '{where.rstrip('.')}' must be a JSON object, got {type(cfg).__name__}")
    if key in cfg and cfg[key] is not None:
        return _check_field(cfg[key], key, path, where)
    if default is ...:
        raise ConfigError(f"{path}: missing field '{where}{key}'")
    return default


def _check_field(value: Any, key: str, path: Path, where: str) -> Any:
    field = f"'{where}{key}'"
    if key in _INT_FIELDS:
        lo, hi = _INT_FIELDS[key]
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: {field} must be an integer, got {type(value).__name__} {value!r:.60}")
        if not lo <= value <= hi:
            raise ConfigError(f"{path}: {field} {value} is outside the supported range [{lo}, {hi}]")
    elif key in _REAL_FIELDS:
        lo, hi = _REAL_FIELDS[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: {field} must be a number, got {type(value).__name__} {value!r:.60}")
        if not (math.isfinite(value) and lo < value <= hi):
            raise ConfigError(f"{path}: {field} {value} is outside the supported range ({lo}, {hi:g}]")
        value = float(value)
    elif key in _STR_FIELDS and not isinstance(value, str):
        raise ConfigError(f"{path}: {field} must be a string, got {type(value).__name__} {value!r:.60}")
    elif key in _DICT_FIELDS and not isinstance(value, dict):
        raise ConfigError(f"{path}: {field} must be a JSON object, got {type(value).__name__} {value!r:.60}")
    return value


def _rotary(cfg: dict[str, Any], path: Path, where: str, head_dim: int) -> tuple[int, float]:
    """(rotary_dim, rope_theta) from `rope_parameters` (transformers 5) or top-level fields (4.x)."""
    params = _get(cfg, "rope_parameters", path, where, {})
    rope_type = params.get("rope_type", params.get("type", "default"))
    scaling = _get(cfg, "rope_scaling", path, where, {})
    if rope_type != "default" or (scaling and scaling.get("rope_type", scaling.get("type")) != "default"):
        raise ConfigError(f"{path}: unsupported rope scaling in '{where}rope_parameters'/'rope_scaling' "
                          f"(only the default rotary embedding is supported)")
    inner = f"{where}rope_parameters."
    factor = _get(params, "partial_rotary_factor", path, inner, _get(cfg, "partial_rotary_factor", path, where,
                                                                    _PHI_DEFAULTS["partial_rotary_factor"]))
    theta = _get(params, "rope_theta", path, inner, _get(cfg, "rope_theta", path, where, _PHI_DEFAULTS["rope_theta"]))
    return int(factor * head_dim), float(theta)


def _phi_text(cfg: dict[str, Any], path: Path, where: str = "") -> TextConfig:
    """TextConfig from transformers PhiConfig fields (4.36 or later)."""
    hidden = _get(cfg, "hidden_size", path, where)
    heads = _get(cfg, "num_attention_heads", path, where)
    if _get(cfg, "num_key_value_heads", path, where, heads) != heads:
        raise ConfigError(f"{path}: '{where}num_key_value_heads' {cfg['num_key_value_heads']} != num_attention_heads "
                          f"{heads} (grouped-query attention is not supported)")
    if cfg.get("qk_layernorm"):
        raise ConfigError(f"{path}: '{where}qk_layernorm' true is not supported")
    act = _get(cfg, "hidden_act", path, where, "gelu_new")
    if act != "gelu_new":
        raise ConfigError(f"{path}: unsupported '{where}hidden_act' {act!r} (supported: 'gelu_new')")
    _check_divisible(f"{where}hidden_size", hidden, "num_attention_heads", heads)
    rotary_dim, theta = _rotary(cfg, path, where, hidden // heads)
    return TextConfig(
        vocab_size=_get(cfg, "vocab_size", path, where),
        hidden_size=hidden,
        intermediate_size=_get(cfg, "intermediate_size", path, where),
        num_layers=_get(cfg, "num_hidden_layers", path, where),
        num_heads=heads,
        rotary_dim=rotary_dim,
        rope_theta=theta,
        layer_norm_eps=float(_get(cfg, "layer_norm_eps", path, where, _PHI_DEFAULTS["layer_norm_eps"])),
        max_position_embeddings=_get(cfg, "max_position_embeddings", path, where,
                                     _PHI_DEFAULTS["max_position_embeddings"]),
    )


def _mixformer_text(cfg: dict[str, Any], path: Path) -> TextConfig:
    """TextConfig from Microsoft's phi-msft (MixFormer) fields; vocab rounds up to pad_vocab_size_multiple."""
    hidden = _get(cfg, "n_embd", path)
    heads = _get(cfg, "n_head", path)
    if _get(cfg, "n_head_kv", path, default=heads) != heads:
        raise ConfigError(f"{path}: 'n_head_kv' {cfg['n_head_kv']} != n_head {heads} (not supported)")
    act = _get(cfg, "activation_function", path, default="gelu_new")
    if act != "gelu_new":
        raise ConfigError(f"{path}: unsupported 'activation_function' {act!r} (supported: 'gelu_new')")
    multiple = _get(cfg, "pad_vocab_size_multiple", path, default=64)
    return TextConfig(
        vocab_size=int(math.ceil(_get(cfg, "vocab_size", path) / multiple) * multiple),
        hidden_size=hidden,
        intermediate_size=_get(cfg, "n_inner", path, default=4 * hidden),
        num_layers=_get(cfg, "n_layer", path),
        num_heads=heads,
        rotary_dim=_get(cfg, "rotary_dim", path),
        rope_theta=10000.0,
        layer_norm_eps=float(_get(cfg, "layer_norm_epsilon", path, default=1e-5)),
        max_position_embeddings=_get(cfg, "n_positions", path, default=2048),
    )


def _clip_vision(cfg: dict[str, Any], path: Path, where: str, select_layer: int, select_feature: str) -> VisionConfig:
    """VisionConfig from CLIPVisionConfig fields."""
    return VisionConfig(
        hidden_size=_get(cfg, "hidden_size", path, where),
        intermediate_size=_get(cfg, "intermediate_size", path, where),
        num_layers=_get(cfg, "num_hidden_layers", path, where),
        num_heads=_get(cfg, "num_attention_heads", path, where),
        image_size=_get(cfg, "image_size", path, where),
        patch_size=_get(cfg, "patch_size", path, where),
        layer_norm_eps=float(_get(cfg, "layer_norm_eps", path, where, _CLIP_DEFAULTS["layer_norm_eps"])),
        select_layer=select_layer,
        select_feature=select_feature,
        hidden_act=_get(cfg, "hidden_act", path, where, _CLIP_DEFAULTS["hidden_act"]),
    )


def _from_llava_phi(raw: dict[str, Any], path: Path, layout: str) -> ModelConfig:
    """LLaVA-Phi: Phi fields at the top, vision_config = {vision_tower: CLIP + mm_vision_*, mm_projector: {...}}."""
    tower = _get(raw["vision_config"], "vision_tower", path, "vision_config.")
    proj = _get(raw["vision_config"], "mm_projector", path, "vision_config.")
    where = "vision_config.vision_tower."
    vision = _clip_vision(tower, path, where, _get(tower, "mm_vision_select_layer", path, where, -2),
                          _get(tower, "mm_vision_select_feature", path, where, "patch"))
    text = _phi_text(raw, path)
    pwhere = "vision_config.mm_projector."
    projector = ProjectorConfig(kind=_get(proj, "mm_projector_type", path, pwhere),
                                in_features=_get(proj, "mm_hidden_size", path, pwhere),
                                out_features=_get(proj, "hidden_size", path, pwhere))
    return ModelConfig(text=text, vision=vision, projector=projector, layout=layout,
                       pad_to_square=raw.get("image_aspect_ratio") == "pad", lm_head_bias=layout != "llava_hf")


def _from_mm_fields(raw: dict[str, Any], path: Path, layout: str, text: TextConfig, model_dir: Path,
                    names: list[str]) -> ModelConfig:
    """Phi (hf or phi-msft) fields + LLaVA's mm_*; CLIP's config.json lives in the folder mm_vision_tower names."""
    tower_name = _get(raw, "mm_vision_tower", path)
    tower_dir = (model_dir / Path(tower_name).expanduser()).resolve()  # relative paths start at model_dir
    if not tower_dir.is_dir():
        raise FileNotFoundError(f"{path}: mm_vision_tower {tower_name!r} is not a local folder ({tower_dir}); point "
                                f"it to a folder holding the CLIP vision config.json (and weights)")
    tower_path = tower_dir / "config.json"
    clip = _read_json(tower_path)
    where = ""
    if "vision_config" in clip:  # a full CLIPConfig
        clip, where = clip["vision_config"], "vision_config."
    select_layer = _get(raw, "mm_vision_select_layer", path)
    select_feature = _get(raw, "mm_vision_select_feature", path, default="patch")
    with _errors_in(tower_path):
        vision = _clip_vision(clip, tower_path, where, select_layer, select_feature)
    projector = ProjectorConfig(kind=_get(raw, "mm_projector_type", path, default="linear"),
                                in_features=_get(raw, "mm_hidden_size", path), out_features=text.hidden_size)
    return ModelConfig(text=text, vision=vision, projector=projector, layout=layout,
                       pad_to_square=raw.get("image_aspect_ratio") == "pad",
                       vision_tower_path=None if has_vision_tower(names) else tower_dir,
                       lm_head_bias=layout != "llava_hf")


def _from_llava_hf(raw: dict[str, Any], path: Path, layout: str) -> ModelConfig:
    """transformers' LlavaConfig with a Phi text_config and a CLIP vision_config."""
    text_cfg = _get(raw, "text_config", path)
    vision_cfg = _get(raw, "vision_config", path)
    if text_cfg.get("model_type", "phi") != "phi":
        raise ConfigError(f"{path}: unsupported text_config.model_type {text_cfg['model_type']!r} (supported: 'phi')")
    if vision_cfg.get("model_type", "clip_vision_model") != "clip_vision_model":
        raise ConfigError(f"{path}: unsupported vision_config.model_type {vision_cfg['model_type']!r} "
                          f"(supported: 'clip_vision_model')")
    text = _phi_text(text_cfg, path, "text_config.")
    layer = _get(raw, "vision_feature_layer", path, default=-2)
    if not isinstance(layer, int):
        raise ConfigError(f"{path}: 'vision_feature_layer' {layer!r}: only a single layer is supported")
    strategy = _get(raw, "vision_feature_select_strategy", path, default="default")
    features = {"default": "patch", "full": "cls_patch"}
    if strategy not in features:
        raise ConfigError(f"{path}: unsupported 'vision_feature_select_strategy' {strategy!r} "
                          f"(supported: {sorted(features)})")
    vision = _clip_vision(vision_cfg, path, "vision_config.", layer, features[strategy])
    act = _get(raw, "projector_hidden_act", path, default="gelu")
    if act != "gelu" or not raw.get("multimodal_projector_bias", True):
        raise ConfigError(f"{path}: unsupported projector (projector_hidden_act {act!r}, multimodal_projector_bias "
                          f"{raw.get('multimodal_projector_bias', True)}); supported: 'gelu' with bias")
    image_token = _get(raw, "image_token_index", path, default=_get(raw, "image_token_id", path, default=None))
    if image_token is None:
        raise ConfigError(f"{path}: missing field 'image_token_index' (or 'image_token_id')")
    projector = ProjectorConfig(kind="mlp2x_gelu", in_features=vision.hidden_size, out_features=text.hidden_size)
    return ModelConfig(text=text, vision=vision, projector=projector, layout=layout, image_token_id=image_token,
                       pad_to_square=raw.get("image_aspect_ratio") == "pad", lm_head_bias=layout != "llava_hf")
