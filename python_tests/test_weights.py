"""phi_fast.weights: every layout loads to the same canonical tensors as the transformers model; errors are clear."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from checkpoints import VARIANTS, expected_canonical, make_tiny_checkpoints
from phi_fast.checkpoint_writer import llava_phi_tensor_shapes, write_random_llava_phi
from phi_fast.config import TextConfig, VisionConfig, load_config
from phi_fast.weights import CheckpointError, load_weights

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_checkpoints(tmp_path_factory.mktemp("fp32"))


@pytest.fixture(scope="module", params=["bf16", "fp16"])
def tiny_half(request, tmp_path_factory):
    variants = ("llava_hf", "llava_phi", "hf_phi", "mixformer")
    return make_tiny_checkpoints(tmp_path_factory.mktemp(request.param), dtype=DTYPES[request.param],
                                 variants=variants)


@pytest.fixture(scope="module")
def tiny64(tmp_path_factory):
    return make_tiny_checkpoints(tmp_path_factory.mktemp("d64"), head_dim=64,
                                 variants=("llava_hf", "llava_phi", "hf_phi", "mixformer"))


def _load(folder: Path, **kwargs) -> dict[str, torch.Tensor]:
    return load_weights(folder, load_config(folder), progress=False, **kwargs)


def _assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(want)
    for name, t in want.items():
        assert got[name].dtype == t.dtype, name
        assert got[name].is_contiguous(), name
        assert torch.equal(got[name], t), name


def _copy(tiny, variant: str, dst: Path) -> Path:
    for folder in tiny.paths[variant].parent.iterdir():
        if folder.name.startswith(variant):
            shutil.copytree(folder, dst / folder.name)
    return dst / variant


def _rewrite(file: Path, edit) -> None:
    """Rewrite a safetensors file after edit(dict of tensors) -> dict of tensors."""
    with safe_open(str(file), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    save_file(edit(tensors), str(file))


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_variant_loads_the_transformers_weights(tiny, variant):
    cfg = load_config(tiny.paths[variant])
    _assert_same(_load(tiny.paths[variant]), expected_canonical(tiny, bias=cfg.lm_head_bias))


@pytest.mark.parametrize("variant", ["llava_hf", "llava_phi", "hf_phi", "mixformer"])
def test_head_dim_64(tiny64, variant):
    cfg = load_config(tiny64.paths[variant])
    _assert_same(_load(tiny64.paths[variant]), expected_canonical(tiny64, bias=cfg.lm_head_bias))


def test_canonical_names_and_shapes(tiny):
    w = _load(tiny.paths["llava_phi"])
    c, v, i, cv, iv = 160, 512, 640, 128, 256
    assert w["text.embed"].shape == (v, c)
    assert w["text.layers.1.qkv.weight"].shape == (3 * c, c) and w["text.layers.1.qkv.bias"].shape == (3 * c,)
    assert w["text.layers.1.fc1.weight"].shape == (i, c) and w["text.layers.1.fc2.weight"].shape == (c, i)
    assert w["text.lm_head.weight"].shape == (v, c) and w["text.lm_head.bias"].shape == (v,)
    assert w["vision.patch.weight"].shape == (cv, 3 * 14 * 14)
    assert w["vision.position_embedding"].shape == (17, cv)
    assert w["vision.layers.1.qkv.weight"].shape == (3 * cv, cv)
    assert w["vision.layers.1.fc1.weight"].shape == (iv, cv)
    assert w["projector.fc1.weight"].shape == (c, cv) and w["projector.fc2.weight"].shape == (c, c)
    assert "vision.layers.2.ln1.weight" not in w  # hidden_states[-2]: the last layer is never loaded
    assert not any("post" in name for name in w)


def test_fused_per_head_qkv_is_reordered(tiny):
    """LLaVA-Phi's rows (H, 3, D) come out as (3, H, D): q of head 1 is rows 80..159 of the canonical qkv."""
    w = _load(tiny.paths["llava_phi"])
    q_proj = tiny.llava.model.language_model.layers[0].self_attn.q_proj.weight.detach()
    k_proj = tiny.llava.model.language_model.layers[0].self_attn.k_proj.weight.detach()
    assert torch.equal(w["text.layers.0.qkv.weight"][80:160], q_proj[80:160])
    assert torch.equal(w["text.layers.0.qkv.weight"][160:240], k_proj[:80])
    with safe_open(str(tiny.paths["llava_phi"] / "model.safetensors"), framework="pt") as f:
        fused = f.get_tensor("model.layers.0.self_attn.query_key_value.weight")
    assert torch.equal(fused[80:160], k_proj[:80])  # on disk: head 0's q, k, v first


@pytest.mark.parametrize("sharded, single", [("llava_hf_sharded", "llava_hf"), ("llava_phi_sharded", "llava_phi"),
                                             ("llava_phi_unindexed", "llava_phi")])
def test_sharded_equals_single(tiny, sharded, single):
    assert len(list(tiny.paths[sharded].glob("*.safetensors"))) > 1
    _assert_same(_load(tiny.paths[sharded]), _load(tiny.paths[single]))


def test_separate_vision_tower_is_used_and_inside_copy_wins(tiny):
    separate = _load(tiny.paths["hf_phi"])
    with safe_open(str(tiny.paths["hf_phi"] / "model.safetensors"), framework="pt") as f:
        assert not any("vision" in k for k in f.keys())
    want = expected_canonical(tiny, bias=True)
    assert torch.equal(separate["vision.layers.0.qkv.weight"], want["vision.layers.0.qkv.weight"])
    inside = _load(tiny.paths["hf_phi_inside"])  # its CLIP folder holds different (decoy) weights
    assert torch.equal(inside["vision.patch.weight"], want["vision.patch.weight"])


def test_half_precision_on_disk(tiny_half):
    for variant in tiny_half.paths:
        folder = tiny_half.paths[variant]
        cfg = load_config(folder)
        want = expected_canonical(tiny_half, bias=cfg.lm_head_bias)  # fp32 values rounded through the disk dtype
        _assert_same(_load(folder), want)
        _assert_same(_load(folder, dtype=tiny_half.dtype), {k: t.to(tiny_half.dtype) for k, t in want.items()})


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_dtype_cast(tiny, dtype):
    want = {k: t.to(DTYPES[dtype]) for k, t in expected_canonical(tiny, bias=True).items()}
    _assert_same(_load(tiny.paths["llava_phi"], dtype=DTYPES[dtype]), want)
    name = str(DTYPES[dtype]).removeprefix("torch.")
    _assert_same(_load(tiny.paths["llava_phi"], dtype=name), want)


@pytest.mark.parametrize("dtype", [torch.int8, torch.float64, "half-ish"])
def test_unsupported_dtype(tiny, dtype):
    with pytest.raises(ValueError, match="unsupported dtype .* \\(supported: float32, bfloat16, float16\\)"):
        _load(tiny.paths["llava_phi"], dtype=dtype)


@pytest.mark.cuda
def test_load_to_cuda(tiny):
    w = _load(tiny.paths["llava_phi"], dtype=torch.bfloat16, device="cuda")
    assert all(t.is_cuda and t.dtype == torch.bfloat16 for t in w.values())
    want = expected_canonical(tiny, bias=True)
    assert all(torch.equal(w[k].cpu(), t.to(torch.bfloat16)) for k, t in want.items())


@pytest.mark.parametrize("variant, drop", [
    ("llava_phi", ("lm_head.weight", "model.layers.1.self_attn.dense.bias")),
    ("llava_hf", ("multi_modal_projector.linear_1.weight", "multi_modal_projector.linear_1.bias",
                  "multi_modal_projector.linear_2.weight", "multi_modal_projector.linear_2.bias")),
    ("mixformer", ("transformer.h.0.mixer.Wqkv.bias",)),
])
def test_missing_tensor(tiny, tmp_path, variant, drop):
    folder = _copy(tiny, variant, tmp_path)
    _rewrite(folder / "model.safetensors", lambda t: {k: v for k, v in t.items() if k not in drop})
    cfg = load_config(folder)
    with pytest.raises(CheckpointError) as info:
        load_weights(folder, cfg, progress=False)
    message = str(info.value)
    assert str(folder) in message and f"({len(drop)} problems)" in message
    for key in drop:
        assert f"missing tensor {key!r}" in message


def test_misshaped_tensor(tiny, tmp_path):
    folder = _copy(tiny, "hf_phi", tmp_path)
    key = "model.layers.1.mlp.fc1.weight"
    _rewrite(folder / "model.safetensors", lambda t: t | {key: t[key][:600]})
    with pytest.raises(CheckpointError, match=f"model.safetensors: tensor '{key}' has shape \\[600, 160\\], "
                                              f"expected \\[640, 160\\]"):
        _load(folder)


def test_misshaped_tensor_in_vision_folder(tiny, tmp_path):
    folder = _copy(tiny, "mixformer", tmp_path)
    key = "vision_model.embeddings.position_embedding.weight"
    _rewrite(tmp_path / "mixformer_clip" / "model.safetensors", lambda t: t | {key: t[key][:10]})
    with pytest.raises(CheckpointError, match=f"mixformer_clip/model.safetensors: tensor '{key}' has shape "
                                              f"\\[10, 128\\], expected \\[17, 128\\]"):
        _load(folder)


def test_unsupported_disk_dtype(tiny, tmp_path):
    folder = _copy(tiny, "llava_phi", tmp_path)
    key = "model.final_layernorm.bias"
    _rewrite(folder / "model.safetensors", lambda t: t | {key: t[key].double()})
    with pytest.raises(CheckpointError, match="'model.final_layernorm.bias' has dtype F64"):
        _load(folder)


def test_truncated_file(tiny, tmp_path):
    folder = _copy(tiny, "llava_phi_sharded", tmp_path)
    shard = sorted(folder.glob("*.safetensors"))[1]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 1000])
    with pytest.raises(CheckpointError, match=f"{shard}: file is truncated"):
        _load(folder)
    shard.write_bytes(data[:100])  # the header itself cut short
    with pytest.raises(CheckpointError, match=f"{shard}: truncated or not a safetensors file"):
        _load(folder)


def test_corrupt_header(tiny, tmp_path):
    folder = _copy(tiny, "llava_phi", tmp_path)
    path = folder / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[8] = ord("#")  # the header's opening brace
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=f"{path}: corrupt safetensors header"):
        _load(folder)


def test_index_names_missing_shard(tiny, tmp_path):
    folder = _copy(tiny, "llava_phi_sharded", tmp_path)
    cfg = load_config(folder)
    sorted(folder.glob("model-*.safetensors"))[0].unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors.index.json names shard 'model-00001-of-"):
        load_weights(folder, cfg, progress=False)


def test_no_vision_tower_anywhere(tiny, tmp_path):
    folder = _copy(tiny, "hf_phi", tmp_path)
    cfg = load_config(tiny.paths["hf_phi"])
    no_folder = type(cfg)(**{**cfg.__dict__, "vision_tower_path": None})
    with pytest.raises(CheckpointError, match="no vision tower tensors"):
        load_weights(folder, no_folder, progress=False)


def test_real_size_tensor_list():
    """The writer's LLaVA-Phi tensor list matches the published checkpoint: 720 tensors, 3,092,371,456 params."""
    text = TextConfig(vocab_size=51200, hidden_size=2560, intermediate_size=10240, num_layers=32, num_heads=32,
                      rotary_dim=32, rope_theta=10000.0, layer_norm_eps=1e-5, max_position_embeddings=2048)
    vision = VisionConfig(hidden_size=1024, intermediate_size=4096, num_layers=24, num_heads=16, image_size=336,
                          patch_size=14, layer_norm_eps=1e-5)
    shapes = llava_phi_tensor_shapes(text, vision)
    assert len(shapes) == 720
    assert sum(math.prod(s) for s in shapes.values()) == 3_092_371_456
    assert sum(math.prod(s) for k, s in shapes.items() if "vision_tower" in k) == 303_507_456


@pytest.mark.parametrize("shard", [None, 200_000])
def test_random_writer(tmp_path, shard):
    text = TextConfig(vocab_size=256, hidden_size=160, intermediate_size=640, num_layers=2, num_heads=2,
                      rotary_dim=32, rope_theta=10000.0, layer_norm_eps=1e-5, max_position_embeddings=128)
    vision = VisionConfig(hidden_size=128, intermediate_size=256, num_layers=3, num_heads=2, image_size=56,
                          patch_size=14, layer_norm_eps=1e-5)
    a = write_random_llava_phi(tmp_path / "a", text=text, vision=vision, seed=3, max_shard_bytes=shard)
    b = write_random_llava_phi(tmp_path / "b", text=text, vision=vision, seed=3, dtype=torch.bfloat16)
    c = write_random_llava_phi(tmp_path / "c", text=text, vision=vision, seed=4)
    assert (len(list(a.glob("*.safetensors"))) > 1) == (shard is not None)
    if shard is not None:
        index = json.loads((a / "model.safetensors.index.json").read_text())
        assert len(index["weight_map"]) == len(llava_phi_tensor_shapes(text, vision))
    wa, wb, wc = _load(a), _load(b), _load(c)
    _assert_same(wb, {k: t.to(torch.bfloat16).float() for k, t in wa.items()})
    assert not torch.equal(wa["text.embed"], wc["text.embed"])
    assert wa["text.lm_head.bias"].abs().sum() > 0
    # decisive logits: lm_head rows spread a unit-variance hidden state to std ~8
    h = torch.nn.functional.layer_norm(torch.randn(64, 160), (160,))
    assert (h @ wa["text.lm_head.weight"].T).std() > 4
