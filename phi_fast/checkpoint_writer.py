"""Write random-weight checkpoints in LLaVA-Phi's own format (demos, benchmarks and tests at any size).

The output is what zxmonent/llava-phi publishes (spec/llava-phi.md section 4): config.json with model_type
"llava_phi" and model.safetensors (or shards + model.safetensors.index.json) with transformers-4.36 Phi names,
fused per-head qkv, an lm_head bias and the full CLIP tower including its last layer and post_layernorm.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Iterable, Iterator

import torch
from safetensors.torch import save_file

from phi_fast.config import TextConfig, VisionConfig
from phi_fast.weights import INDEX_FILE, SINGLE_FILE, resolve_dtype

logger = logging.getLogger(__name__)


def llava_phi_config_dict(text: TextConfig, vision: VisionConfig, *, image_aspect_ratio: str = "pad",
                          torch_dtype: str = "float32") -> dict:
    """LLaVA-Phi's config.json: Phi fields at the top, CLIP + projector under vision_config."""
    factor = text.rotary_dim / text.head_dim
    if int(factor * text.head_dim) != text.rotary_dim:
        raise ValueError(f"rotary_dim {text.rotary_dim} is not representable as int(partial_rotary_factor * "
                         f"{text.head_dim})")
    return {
        "architectures": ["LlavaPhiForCausalLM"],
        "model_type": "llava_phi",
        "vocab_size": text.vocab_size,
        "hidden_size": text.hidden_size,
        "intermediate_size": text.intermediate_size,
        "num_hidden_layers": text.num_layers,
        "num_attention_heads": text.num_heads,
        "num_key_value_heads": text.num_heads,
        "max_position_embeddings": text.max_position_embeddings,
        "partial_rotary_factor": factor,
        "rope_theta": text.rope_theta,
        "rope_scaling": None,
        "layer_norm_eps": text.layer_norm_eps,
        "hidden_act": "gelu_new",
        "qk_layernorm": False,
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": torch_dtype,
        "use_cache": True,
        "image_aspect_ratio": image_aspect_ratio,
        "vision_config": {
            "vision_tower": {
                "model_type": "llava_phi_clip_vision_model",
                "hidden_size": vision.hidden_size,
                "intermediate_size": vision.intermediate_size,
                "num_hidden_layers": vision.num_layers,
                "num_attention_heads": vision.num_heads,
                "num_channels": 3,
                "image_size": vision.image_size,
                "patch_size": vision.patch_size,
                "hidden_act": vision.hidden_act,
                "layer_norm_eps": vision.layer_norm_eps,
                "mm_vision_select_layer": vision.select_layer,
                "mm_vision_select_feature": vision.select_feature,
            },
            "mm_projector": {
                "model_type": "llava_phi_projector",
                "mm_projector_type": "mlp2x_gelu",
                "mm_hidden_size": vision.hidden_size,
                "hidden_size": text.hidden_size,
            },
        },
    }


def llava_phi_tensor_shapes(text: TextConfig, vision: VisionConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor of a LLaVA-Phi checkpoint (720 at the real sizes), in file order, with its shape."""
    c, i, v = text.hidden_size, text.intermediate_size, text.vocab_size
    cv, iv, p = vision.hidden_size, vision.intermediate_size, vision.patch_size
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (v, c)}

    def linear(key: str, out_f: int, in_f: int) -> None:
        shapes[f"{key}.weight"], shapes[f"{key}.bias"] = (out_f, in_f), (out_f,)

    def norm(key: str, size: int) -> None:
        shapes[f"{key}.weight"], shapes[f"{key}.bias"] = (size,), (size,)

    for n in range(text.num_layers):
        layer = f"model.layers.{n}"
        norm(f"{layer}.input_layernorm", c)
        linear(f"{layer}.self_attn.query_key_value", 3 * c, c)
        linear(f"{layer}.self_attn.dense", c, c)
        linear(f"{layer}.mlp.fc1", i, c)
        linear(f"{layer}.mlp.fc2", c, i)
    norm("model.final_layernorm", c)
    linear("lm_head", v, c)
    tower = "model.vision_tower.vision_model"
    shapes[f"{tower}.embeddings.class_embedding"] = (cv,)
    shapes[f"{tower}.embeddings.patch_embedding.weight"] = (cv, 3, p, p)
    shapes[f"{tower}.embeddings.position_embedding.weight"] = (vision.num_patches + 1, cv)
    norm(f"{tower}.pre_layrnorm", cv)
    for n in range(vision.num_layers):
        layer = f"{tower}.encoder.layers.{n}"
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            linear(f"{layer}.self_attn.{proj}", cv, cv)
        norm(f"{layer}.layer_norm1", cv)
        linear(f"{layer}.mlp.fc1", iv, cv)
        linear(f"{layer}.mlp.fc2", cv, iv)
        norm(f"{layer}.layer_norm2", cv)
    norm(f"{tower}.post_layernorm", cv)
    linear("model.mm_projector.0", c, cv)
    linear("model.mm_projector.2", c, c)
    return shapes


def random_tensor(name: str, shape: tuple[int, ...], generator: torch.Generator, *, weight_gain: float = 1.0,
                  logit_std: float = 8.0) -> torch.Tensor:
    """fp32 random values that keep a random network lively (not near-flat logits), chosen by tensor name.

    LayerNorm weights 1 + N(0, 0.1^2); 1-D biases N(0, 0.1^2); token/class/position embeddings N(0, 1);
    lm_head weight N(0, (logit_std / sqrt(fan_in))^2), so logits spread ~logit_std; other weights
    N(0, weight_gain^2 / fan_in), so every branch adds O(1) to the residual stream at any width.
    """
    x = torch.randn(shape, generator=generator, dtype=torch.float32)
    fan_in = math.prod(shape[1:]) if len(shape) > 1 else 1
    if "norm" in name and name.endswith(".weight"):
        return 1.0 + 0.1 * x
    if any(k in name for k in ("embed_tokens", "wte", "class_embedding", "position_embedding")):
        return x
    if len(shape) == 1:
        return 0.1 * x
    if "lm_head" in name:
        return x * (logit_std / math.sqrt(fan_in))
    return x * (weight_gain / math.sqrt(fan_in))


def save_safetensors(model_dir: str | Path, tensors: Iterable[tuple[str, torch.Tensor]], *,
                     max_shard_bytes: int | None = None) -> list[Path]:
    """Write (name, tensor) pairs as model.safetensors, or as shards of at most max_shard_bytes (a tensor larger
    than that gets a shard of its own) + model.safetensors.index.json. Holds one shard in memory at a time."""
    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    if max_shard_bytes is None:
        path = model_dir / SINGLE_FILE
        save_file(dict(tensors), str(path), metadata={"format": "pt"})
        return [path]
    shards: list[list[str]] = []
    current: dict[str, torch.Tensor] = {}
    size, total = 0, 0
    for name, t in tensors:
        nbytes = t.numel() * t.element_size()
        if current and size + nbytes > max_shard_bytes:
            shards.append(_write_shard(model_dir, len(shards), current))
            current, size = {}, 0
        current[name] = t
        size, total = size + nbytes, total + nbytes
    if current:
        shards.append(_write_shard(model_dir, len(shards), current))
    final, weight_map = [], {}
    for n, names in enumerate(shards):
        path = model_dir / f"model-{n + 1:05d}-of-{len(shards):05d}.safetensors"
        (model_dir / f"shard-{n}.tmp").rename(path)
        final.append(path)
        weight_map.update({name: path.name for name in names})
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (model_dir / INDEX_FILE).write_text(json.dumps(index, indent=2))
    return final


def _write_shard(model_dir: Path, n: int, tensors: dict[str, torch.Tensor]) -> list[str]:
    save_file(tensors, str(model_dir / f"shard-{n}.tmp"), metadata={"format": "pt"})
    return list(tensors)


def write_random_llava_phi(model_dir: str | Path, *, text: TextConfig, vision: VisionConfig,
                           dtype: torch.dtype | str = torch.float32, seed: int = 0, weight_gain: float = 1.0,
                           logit_std: float = 8.0, image_aspect_ratio: str = "pad",
                           max_shard_bytes: int | None = None) -> Path:
    """Write a LLaVA-Phi-format checkpoint (config.json + safetensors) with random weights; returns model_dir.

    Weights follow `random_tensor` (seeded, so the same arguments give the same files); the mlp2x_gelu projector
    maps vision.hidden_size -> text.hidden_size. Use max_shard_bytes to bound memory at the real sizes.
    """
    model_dir = Path(model_dir)
    dtype = resolve_dtype(dtype)
    config = llava_phi_config_dict(text, vision, image_aspect_ratio=image_aspect_ratio,
                                   torch_dtype=str(dtype).removeprefix("torch."))
    shapes = llava_phi_tensor_shapes(text, vision)
    generator = torch.Generator().manual_seed(seed)

    def tensors() -> Iterator[tuple[str, torch.Tensor]]:
        for name, shape in shapes.items():
            yield name, random_tensor(name, shape, generator, weight_gain=weight_gain, logit_std=logit_std).to(dtype)

    model_dir.mkdir(parents=True, exist_ok=True)
    (model_dir / "config.json").write_text(json.dumps(config, indent=2))
    files = save_safetensors(model_dir, tensors(), max_shard_bytes=max_shard_bytes)
    logger.info("wrote random LLaVA-Phi checkpoint (%d tensors, %s) to %s in %d file(s)", len(shapes), dtype,
                model_dir, len(files))
    return model_dir
