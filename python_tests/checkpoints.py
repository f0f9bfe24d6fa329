"""Test helper: a tiny random LLaVA(-Phi) built with transformers, written to disk in every supported layout.

    tiny = make_tiny_checkpoints(tmp_path, head_dim=80)
    tiny.llava        # transformers LlavaForConditionalGeneration (fp32, eval): the oracle without lm_head bias
    tiny.phi          # PhiForCausalLM sharing tiny.llava's text weights, with a random lm_head bias: the oracle for
                      # the layouts that store one (llava_phi, hf_phi, mixformer)
    tiny.paths        # variant name -> checkpoint folder (see VARIANTS)
    tiny.layout[v]    # the layout each variant must load as
    expected_canonical(tiny, bias=True)   # canonical tensors (phi_fast.weights names) the loader must return

The language model is Phi (head_dim 80: hidden 160, 2 heads, partial_rotary_factor 0.4 -> rotary 32; or head_dim 64:
hidden 128, 2 heads, factor 0.5 -> rotary 32); the vision tower is CLIP (hidden 128, 2 heads of 64, 3 layers, 56px,
patch 14 -> 16 patches) read at hidden_states[-2]; the projector is mlp2x_gelu. Weights are redrawn by
phi_fast.checkpoint_writer.random_tensor so logits are decisive. Checkpoints are written from the fp32 model, cast
to `dtype` on disk.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import (CLIPConfig, CLIPTextConfig, CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration,
                          PhiConfig, PhiForCausalLM)

from phi_fast.checkpoint_writer import random_tensor, save_safetensors

VOCAB_SIZE = 512
IMAGE_TOKEN_ID = VOCAB_SIZE - 1  # llava_hf's image token (a real vocabulary id)
TEXT_SIZES = {80: dict(hidden_size=160, num_attention_heads=2, partial_rotary_factor=0.4),
              64: dict(hidden_size=128, num_attention_heads=2, partial_rotary_factor=0.5)}

# variant -> layout it must load as
VARIANTS = {
    "llava_hf": "llava_hf",                # LlavaForConditionalGeneration.save_pretrained
    "llava_hf_sharded": "llava_hf",        # same, max_shard_size -> shards + index
    "llava_hf_model_names": "llava_hf",    # in-memory names (model.language_model.*, lm_head.weight), 4.x config
    "llava_phi": "llava_phi",              # LLaVA-Phi's own format, fused per-head qkv, random lm_head bias
    "llava_phi_sharded": "llava_phi",      # same in shards + index
    "llava_phi_unindexed": "llava_phi",    # same in shards, no index file
    "hf_phi": "hf_phi",                    # q/k/v_proj; CLIP in a separate folder (CLIPConfig + text_model.*)
    "hf_phi_inside": "hf_phi",             # CLIP inside (LLaVA's model.vision_tower.vision_tower.vision_model.*)
    "mixformer": "mixformer",              # phi-msft names, Wqkv rows (3, H, D); CLIP folder by relative path
}


@dataclass
class TinyCheckpoints:
    llava: LlavaForConditionalGeneration
    phi: PhiForCausalLM
    lm_head_bias: torch.Tensor  # [V], == phi.lm_head.bias
    dtype: torch.dtype  # dtype on disk
    paths: dict[str, Path] = field(default_factory=dict)
    layout: dict[str, str] = field(default_factory=lambda: dict(VARIANTS))


def build_tiny_llava(head_dim: int = 80, seed: int = 0) -> tuple[LlavaForConditionalGeneration, PhiForCausalLM]:
    """A tiny fp32 LLaVA + a PhiForCausalLM sharing its language model, lm_head weight and a random lm_head bias."""
    vision = CLIPVisionConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=3, num_attention_heads=2,
                              image_size=56, patch_size=14, projection_dim=64)
    sizes = TEXT_SIZES[head_dim]
    text = PhiConfig(vocab_size=VOCAB_SIZE, intermediate_size=4 * sizes["hidden_size"], num_hidden_layers=2,
                     max_position_embeddings=256, **sizes)
    config = LlavaConfig(vision_config=vision, text_config=text, vision_feature_layer=-2,
                         vision_feature_select_strategy="default", projector_hidden_act="gelu",
                         image_token_index=IMAGE_TOKEN_ID)
    llava = LlavaForConditionalGeneration(config).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in llava.named_parameters():
            p.copy_(random_tensor(name, tuple(p.shape), generator))
        llava.lm_head.weight[IMAGE_TOKEN_ID] = 0.0  # never predict the image token (Llava's forward rejects it)
        phi = PhiForCausalLM(llava.config.text_config).eval()
        phi.model = llava.model.language_model
        phi.lm_head.weight = llava.lm_head.weight
        phi.lm_head.bias.copy_(random_tensor("lm_head.bias", (VOCAB_SIZE,), generator))
    return llava, phi


def _parts(llava: LlavaForConditionalGeneration) -> dict[str, dict[str, torch.Tensor]]:
    """The model's tensors grouped: text (PhiModel names), vision (CLIP vision_model names), projector, lm_head."""
    groups: dict[str, dict[str, torch.Tensor]] = {"text": {}, "vision": {}, "projector": {}, "lm_head": {}}
    for name, t in llava.state_dict().items():
        t = t.detach().clone()
        if name.startswith("model.language_model."):
            groups["text"][name.removeprefix("model.language_model.")] = t
        elif name.startswith("model.vision_tower."):
            groups["vision"][name.removeprefix("model.vision_tower.").removeprefix("vision_model.")] = t
        elif name.startswith("model.multi_modal_projector."):
            groups["projector"][name.removeprefix("model.multi_modal_projector.")] = t
        elif name.startswith("lm_head."):
            groups["lm_head"][name.removeprefix("lm_head.")] = t
        else:
            raise AssertionError(f"unexpected tensor {name} in the transformers model")
    return groups


def _json(config) -> dict:
    return json.loads(config.to_json_string(use_diff=False))


def _phi_fields_v4(text_config: PhiConfig) -> dict:
    """PhiConfig as transformers 4.36-4.4x wrote it: rotary settings at the top level."""
    d = _json(text_config)
    rope = d.pop("rope_parameters")
    d.update(partial_rotary_factor=rope["partial_rotary_factor"], rope_theta=rope["rope_theta"], rope_scaling=None)
    return d


def _mm_fields(vision_hidden: int, tower: str) -> dict:
    return {"mm_vision_tower": tower, "mm_hidden_size": vision_hidden, "mm_projector_type": "mlp2x_gelu",
            "mm_vision_select_layer": -2, "mm_vision_select_feature": "patch", "image_aspect_ratio": "pad"}


def _write(folder: Path, config: dict, tensors: dict[str, torch.Tensor], dtype: torch.dtype,
           max_shard_bytes: int | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    save_safetensors(folder, ((k, v.to(dtype).contiguous()) for k, v in tensors.items()),
                     max_shard_bytes=max_shard_bytes)
    return folder


def _fused_per_head(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """q, k, v: [H*D, ...] -> LLaVA-Phi's query_key_value [3*H*D, ...] with rows (H, 3, D)."""
    stacked = torch.stack((q, k, v))  # [3, H*D, ...]
    return stacked.view(3, heads, -1, *q.shape[1:]).transpose(0, 1).reshape(3 * q.shape[0], *q.shape[1:])


def _llava_phi_tensors(parts: dict, heads: int, bias: torch.Tensor) -> dict[str, torch.Tensor]:
    out = {}
    text = parts["text"]
    for name, t in text.items():
        if ".self_attn.q_proj." in name:
            pre, kind = name.split(".self_attn.q_proj.")
            q, k, v = (text[f"{pre}.self_attn.{x}_proj.{kind}"] for x in "qkv")
            out[f"model.{pre}.self_attn.query_key_value.{kind}"] = _fused_per_head(q, k, v, heads)
        elif not any(f".self_attn.{x}_proj." in name for x in "kv"):
            out[f"model.{name}"] = t
    out["lm_head.weight"], out["lm_head.bias"] = parts["lm_head"]["weight"], bias
    out.update({f"model.vision_tower.vision_model.{k}": t for k, t in parts["vision"].items()})
    out.update(_projector(parts, "model.mm_projector."))
    return out


def _projector(parts: dict, prefix: str) -> dict[str, torch.Tensor]:
    names = {"linear_1": "0", "linear_2": "2"}
    return {prefix + names[k.split(".")[0]] + "." + k.split(".")[1]: t for k, t in parts["projector"].items()}


def _clip_folder(folder: Path, parts: dict, vision_config: CLIPVisionConfig, dtype: torch.dtype, *,
                 full_clip: bool, weights: bool = True, seed: int = 1) -> Path:
    """A CLIP checkpoint folder: vision_model.* (+ text_model.* and projections when full_clip)."""
    if full_clip:
        text_cfg = CLIPTextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                  vocab_size=100, bos_token_id=0, eos_token_id=1, pad_token_id=1)
        config = _json(CLIPConfig(text_config=text_cfg.to_dict(), vision_config=vision_config.to_dict()))
    else:
        config = _json(vision_config)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    if weights:
        generator = torch.Generator().manual_seed(seed)
        tensors = {f"vision_model.{k}": t for k, t in parts["vision"].items()}
        if full_clip:
            for name, shape in {"text_model.embeddings.token_embedding.weight": (100, 32),
                                "text_model.encoder.layers.0.self_attn.q_proj.weight": (32, 32),
                                "text_model.final_layer_norm.weight": (32,), "visual_projection.weight": (64, 128),
                                "text_projection.weight": (64, 32), "logit_scale": ()}.items():
                tensors[name] = torch.randn(shape, generator=generator)
        save_file({k: v.to(dtype).contiguous() for k, v in tensors.items()}, str(folder / "model.safetensors"))
    return folder


def _mixformer_tensors(parts: dict, bias: torch.Tensor) -> dict[str, torch.Tensor]:
    text, out = parts["text"], {}
    out["transformer.embd.wte.weight"] = text["embed_tokens.weight"]
    names = {"input_layernorm": "ln", "self_attn.dense": "mixer.out_proj", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}
    for name, t in text.items():
        if not name.startswith("layers."):
            continue
        _, n, rest = name.split(".", 2)
        module, kind = rest.rsplit(".", 1)
        if module == "self_attn.q_proj":
            qkv = torch.cat([text[f"layers.{n}.self_attn.{x}_proj.{kind}"] for x in "qkv"])
            out[f"transformer.h.{n}.mixer.Wqkv.{kind}"] = qkv
        elif module in names:
            out[f"transformer.h.{n}.{names[module]}.{kind}"] = t
    for n in {name.split(".")[1] for name in text if name.startswith("layers.")}:
        out[f"transformer.h.{n}.mixer.rotary_emb.inv_freq"] = torch.ones(8)  # a buffer the loader must skip
    out["lm_head.ln.weight"], out["lm_head.ln.bias"] = text["final_layernorm.weight"], text["final_layernorm.bias"]
    out["lm_head.linear.weight"], out["lm_head.linear.bias"] = parts["lm_head"]["weight"], bias
    out.update(_projector(parts, "model.mm_projector."))
    return out


def _mixformer_config(text_config: PhiConfig, vision_hidden: int, tower: str) -> dict:
    t = text_config
    return {"model_type": "phi-msft", "architectures": ["PhiForCausalLM"], "vocab_size": t.vocab_size,
            "pad_vocab_size_multiple": 64, "n_embd": t.hidden_size, "n_head": t.num_attention_heads,
            "n_head_kv": None, "n_inner": None, "n_layer": t.num_hidden_layers,
            "n_positions": t.max_position_embeddings,
            "rotary_dim": int(t.rope_parameters["partial_rotary_factor"] * t.hidden_size // t.num_attention_heads),
            "layer_norm_epsilon": t.layer_norm_eps, "activation_function": "gelu_new",
            "tie_word_embeddings": False, **_mm_fields(vision_hidden, tower)}


def make_tiny_checkpoints(root: str | Path, *, head_dim: int = 80, dtype: torch.dtype = torch.float32, seed: int = 0,
                          variants: tuple[str, ...] = tuple(VARIANTS)) -> TinyCheckpoints:
    """Build the tiny model and write the requested variants under root/<variant>/ (CLIP folders beside them)."""
    root = Path(root)
    llava, phi = build_tiny_llava(head_dim, seed)
    tiny = TinyCheckpoints(llava=llava, phi=phi, lm_head_bias=phi.lm_head.bias.detach().clone(), dtype=dtype)
    parts = _parts(llava)
    cfg = llava.config
    text_cfg, vision_cfg = cfg.text_config, cfg.vision_config
    heads, vision_hidden = text_cfg.num_attention_heads, vision_cfg.hidden_size
    small_shards = 1 << 20  # bytes: a few shards for the tiny model (~3.5 MB in fp32)
    for variant in variants:
        folder = root / variant
        if variant in ("llava_hf", "llava_hf_sharded"):
            kwargs = {"max_shard_size": "1MB"} if variant == "llava_hf_sharded" else {}
            copy.deepcopy(llava).to(dtype).save_pretrained(folder, **kwargs)
        elif variant == "llava_hf_model_names":
            config = _json(cfg)
            config["text_config"] = _phi_fields_v4(text_cfg)
            _write(folder, config, {k: t.detach() for k, t in llava.state_dict().items()}, dtype)
        elif variant.startswith("llava_phi"):
            config = _phi_fields_v4(text_cfg)
            tower = _json(vision_cfg) | {"mm_vision_select_layer": -2, "mm_vision_select_feature": "patch"}
            projector = {"mm_projector_type": "mlp2x_gelu", "mm_hidden_size": vision_hidden,
                         "hidden_size": text_cfg.hidden_size}
            config.update(model_type="llava_phi", architectures=["LlavaPhiForCausalLM"], image_aspect_ratio="pad",
                          vision_config={"vision_tower": tower, "mm_projector": projector})
            shard = None if variant == "llava_phi" else small_shards
            _write(folder, config, _llava_phi_tensors(parts, heads, tiny.lm_head_bias), dtype, shard)
            if variant == "llava_phi_unindexed":
                (folder / "model.safetensors.index.json").unlink()
        elif variant == "hf_phi":
            clip = _clip_folder(root / "hf_phi_clip", parts, vision_cfg, dtype, full_clip=True)
            tensors = {f"model.{k}": t for k, t in parts["text"].items()}
            tensors |= {"lm_head.weight": parts["lm_head"]["weight"], "lm_head.bias": tiny.lm_head_bias}
            tensors |= _projector(parts, "model.mm_projector.")
            _write(folder, _json(text_cfg) | _mm_fields(vision_hidden, str(clip.resolve())), tensors, dtype)
        elif variant == "hf_phi_inside":
            # the folder's own CLIP weights differ: the checkpoint's fine-tuned copy must win
            decoy = {"vision": {k: torch.randn_like(t) for k, t in parts["vision"].items()}}
            _clip_folder(root / "hf_phi_inside_clip", decoy, vision_cfg, dtype, full_clip=False)
            tensors = {f"model.{k}": t for k, t in parts["text"].items()}
            tensors |= {"lm_head.weight": parts["lm_head"]["weight"], "lm_head.bias": tiny.lm_head_bias}
            tensors |= {f"model.vision_tower.vision_tower.vision_model.{k}": t for k, t in parts["vision"].items()}
            tensors |= _projector(parts, "model.mm_projector.")
            _write(folder, _phi_fields_v4(text_cfg) | _mm_fields(vision_hidden, "../hf_phi_inside_clip"), tensors,
                   dtype)
        elif variant == "mixformer":
            _clip_folder(root / "mixformer_clip", parts, vision_cfg, dtype, full_clip=False)
            _write(folder, _mixformer_config(text_cfg, vision_hidden, "../mixformer_clip"),
                   _mixformer_tensors(parts, tiny.lm_head_bias), dtype)
        else:
            raise ValueError(f"unknown variant {variant!r} (known: {sorted(VARIANTS)})")
        tiny.paths[variant] = folder
    return tiny


def expected_canonical(tiny: TinyCheckpoints, *, bias: bool) -> dict[str, torch.Tensor]:
    """The canonical tensors (fp32, values rounded through the on-disk dtype) a loader must return.

    bias: whether the layout stores an lm_head bias (else zeros are expected).
    """
    parts = _parts(tiny.llava)
    cfg = tiny.llava.config
    text, vision = parts["text"], parts["vision"]
    out = {"text.embed": text["embed_tokens.weight"], "text.lm_head.weight": parts["lm_head"]["weight"],
           "text.lm_head.bias": tiny.lm_head_bias if bias else torch.zeros_like(tiny.lm_head_bias),
           "text.final_ln.weight": text["final_layernorm.weight"], "text.final_ln.bias": text["final_layernorm.bias"]}
    for n in range(cfg.text_config.num_hidden_layers):
        src, dst = f"layers.{n}.", f"text.layers.{n}."
        for kind in ("weight", "bias"):
            out[f"{dst}ln.{kind}"] = text[f"{src}input_layernorm.{kind}"]
            out[f"{dst}qkv.{kind}"] = torch.cat([text[f"{src}self_attn.{x}_proj.{kind}"] for x in "qkv"])
            out[f"{dst}dense.{kind}"] = text[f"{src}self_attn.dense.{kind}"]
            out[f"{dst}fc1.{kind}"] = text[f"{src}mlp.fc1.{kind}"]
            out[f"{dst}fc2.{kind}"] = text[f"{src}mlp.fc2.{kind}"]
    patch = vision["embeddings.patch_embedding.weight"]
    out["vision.patch.weight"] = patch.reshape(patch.shape[0], -1)
    out["vision.class_embedding"] = vision["embeddings.class_embedding"]
    out["vision.position_embedding"] = vision["embeddings.position_embedding.weight"]
    out["vision.pre_ln.weight"], out["vision.pre_ln.bias"] = vision["pre_layrnorm.weight"], vision["pre_layrnorm.bias"]
    layers_used = cfg.vision_config.num_hidden_layers - 1  # hidden_states[-2]
    for n in range(layers_used):
        src, dst = f"encoder.layers.{n}.", f"vision.layers.{n}."
        for kind in ("weight", "bias"):
            out[f"{dst}ln1.{kind}"] = vision[f"{src}layer_norm1.{kind}"]
            out[f"{dst}qkv.{kind}"] = torch.cat([vision[f"{src}self_attn.{x}_proj.{kind}"] for x in "qkv"])
            out[f"{dst}out.{kind}"] = vision[f"{src}self_attn.out_proj.{kind}"]
            out[f"{dst}ln2.{kind}"] = vision[f"{src}layer_norm2.{kind}"]
            out[f"{dst}fc1.{kind}"] = vision[f"{src}mlp.fc1.{kind}"]
            out[f"{dst}fc2.{kind}"] = vision[f"{src}mlp.fc2.{kind}"]
    for kind in ("weight", "bias"):
        out[f"projector.fc1.{kind}"] = parts["projector"][f"linear_1.{kind}"]
        out[f"projector.fc2.{kind}"] = parts["projector"][f"linear_2.{kind}"]
    return {k: v.to(tiny.dtype).float() for k, v in out.items()}
