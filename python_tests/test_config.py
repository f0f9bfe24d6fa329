"""phi_fast.config: config.json of every layout -> ModelConfig; validation and error messages."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from checkpoints import IMAGE_TOKEN_ID, VARIANTS, make_tiny_checkpoints
from phi_fast.checkpoint_writer import write_random_llava_phi
from phi_fast.config import ConfigError, ModelConfig, ProjectorConfig, TextConfig, VisionConfig, load_config
from phi_fast.weights import CheckpointError


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_checkpoints(tmp_path_factory.mktemp("config"))


@pytest.fixture(scope="module")
def tiny64(tmp_path_factory):
    return make_tiny_checkpoints(tmp_path_factory.mktemp("config64"), head_dim=64,
                                 variants=("llava_phi", "llava_hf", "hf_phi", "mixformer"))


def _copy(tiny, variant: str, dst: Path) -> Path:
    """A private copy of one written variant (and the CLIP folders beside it) to damage."""
    root = tiny.paths[variant].parent
    for folder in root.iterdir():
        if folder.name.startswith(variant):
            shutil.copytree(folder, dst / folder.name)
    return dst / variant


def _edit_config(folder: Path, edit) -> None:
    path = folder / "config.json"
    cfg = json.loads(path.read_text())
    edit(cfg)
    path.write_text(json.dumps(cfg))


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_variant_reads_the_same_model(tiny, variant):
    cfg = load_config(tiny.paths[variant])
    assert cfg.layout == VARIANTS[variant]
    assert cfg.text == TextConfig(vocab_size=512, hidden_size=160, intermediate_size=640, num_layers=2, num_heads=2,
                                  rotary_dim=32, rope_theta=10000.0, layer_norm_eps=1e-5, max_position_embeddings=256)
    assert cfg.text.head_dim == 80
    assert cfg.vision == VisionConfig(hidden_size=128, intermediate_size=256, num_layers=3, num_heads=2,
                                      image_size=56, patch_size=14, layer_norm_eps=1e-5, select_layer=-2,
                                      select_feature="patch", hidden_act="quick_gelu")
    assert cfg.projector == ProjectorConfig("mlp2x_gelu", 128, 160)
    hf = cfg.layout == "llava_hf"
    assert cfg.image_token_id == (IMAGE_TOKEN_ID if hf else -200)
    assert cfg.lm_head_bias is not hf
    assert cfg.pad_to_square is not hf  # LLaVA configs say image_aspect_ratio "pad"; Llava-HF has no such field


@pytest.mark.parametrize("variant", ["llava_phi", "llava_hf", "hf_phi", "mixformer"])
def test_head_dim_64_variant(tiny64, variant):
    text = load_config(tiny64.paths[variant]).text
    assert (text.hidden_size, text.num_heads, text.head_dim, text.rotary_dim) == (128, 2, 64, 32)


def test_vision_tower_folder(tiny):
    separate = load_config(tiny.paths["hf_phi"])
    assert separate.vision_tower_path == (tiny.paths["hf_phi"].parent / "hf_phi_clip").resolve()
    relative = load_config(tiny.paths["mixformer"])  # mm_vision_tower "../mixformer_clip"
    assert relative.vision_tower_path == (tiny.paths["mixformer"].parent / "mixformer_clip").resolve()
    inside = load_config(tiny.paths["hf_phi_inside"])  # CLIP weights in the checkpoint: the folder gives config only
    assert inside.vision_tower_path is None


def test_vision_properties():
    big = VisionConfig(hidden_size=1024, intermediate_size=4096, num_layers=24, num_heads=16, image_size=336,
                       patch_size=14, layer_norm_eps=1e-5)
    assert (big.head_dim, big.num_patches, big.layers_used) == (64, 576, 23)
    for select_layer, used in ((-1, 24), (-25, 0), (0, 0), (5, 5), (24, 24)):
        v = VisionConfig(1024, 4096, 24, 16, 336, 14, 1e-5, select_layer=select_layer)
        assert v.layers_used == used


@pytest.mark.parametrize("kwargs, message", [
    (dict(hidden_size=100, num_heads=3), "not divisible by num_heads"),
    (dict(rotary_dim=31), "rotary_dim 31 must be even"),
    (dict(rotary_dim=96), "<= head_dim 80"),
    (dict(num_layers=0), "num_layers must be a positive integer"),
])
def test_text_config_validation(kwargs, message):
    base = dict(vocab_size=512, hidden_size=160, intermediate_size=640, num_layers=2, num_heads=2, rotary_dim=32,
                rope_theta=10000.0, layer_norm_eps=1e-5, max_position_embeddings=256)
    with pytest.raises(ValueError, match=message):
        TextConfig(**(base | kwargs))


@pytest.mark.parametrize("kwargs, message", [
    (dict(select_layer=-5), "select_layer -5 out of range"),
    (dict(select_layer=4), "select_layer 4 out of range"),
    (dict(select_feature="cls"), "unsupported select_feature 'cls'"),
    (dict(hidden_act="relu"), "unsupported vision hidden_act 'relu'"),
    (dict(image_size=50), "image_size 50 is not divisible by patch_size 14"),
])
def test_vision_config_validation(kwargs, message):
    base = dict(hidden_size=128, intermediate_size=256, num_layers=3, num_heads=2, image_size=56, patch_size=14,
                layer_norm_eps=1e-5)
    with pytest.raises(ValueError, match=message):
        VisionConfig(**(base | kwargs))


def test_model_config_validation(tiny):
    cfg = load_config(tiny.paths["llava_phi"])
    with pytest.raises(ValueError, match="unsupported projector type 'linear'"):
        ProjectorConfig("linear", 128, 160)
    with pytest.raises(ValueError, match="projector in_features 64 != vision hidden_size 128"):
        ModelConfig(cfg.text, cfg.vision, ProjectorConfig("mlp2x_gelu", 64, 160), "llava_phi")
    with pytest.raises(ValueError, match="unknown layout 'gguf'"):
        ModelConfig(cfg.text, cfg.vision, cfg.projector, "gguf")
    with pytest.raises(ValueError, match="image_token_id 600 >= vocab_size 512"):
        ModelConfig(cfg.text, cfg.vision, cfg.projector, "llava_hf", image_token_id=600)


def test_missing_config_json(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "config.json")):
        load_config(tmp_path)


def test_bad_json(tiny, tmp_path):
    folder = _copy(tiny, "llava_phi", tmp_path)
    (folder / "config.json").write_text('{"model_type": "llava_phi",')
    with pytest.raises(ConfigError, match=r"config\.json: invalid JSON"):
        load_config(folder)


@pytest.mark.parametrize("variant, edit, message", [
    ("llava_phi", lambda c: c.pop("hidden_size"), "missing field 'hidden_size'"),
    ("llava_phi", lambda c: c["vision_config"]["vision_tower"].pop("patch_size"),
     "missing field 'vision_config.vision_tower.patch_size'"),
    ("llava_phi", lambda c: c["vision_config"]["mm_projector"].update(mm_projector_type="linear"),
     "unsupported projector type 'linear'"),
    ("llava_hf", lambda c: c["text_config"].pop("num_attention_heads"),
     "missing field 'text_config.num_attention_heads'"),
    ("llava_hf", lambda c: c["text_config"].update(num_key_value_heads=1), "grouped-query attention is not supported"),
    ("llava_hf", lambda c: c["text_config"]["rope_parameters"].update(rope_type="linear"), "unsupported rope scaling"),
    ("llava_hf", lambda c: c.update(vision_feature_layer=[-2, -5]), "only a single layer is supported"),
    ("llava_hf", lambda c: c.update(projector_hidden_act="relu"), "unsupported projector"),
    ("llava_hf", lambda c: c.pop("image_token_index"), "missing field 'image_token_index'"),
    ("hf_phi", lambda c: c.update(num_attention_heads=3, num_key_value_heads=3),
     "hidden_size 160 is not divisible by num_attention_heads 3"),
    ("hf_phi", lambda c: c.update(hidden_act="relu"), "unsupported 'hidden_act' 'relu'"),
    ("hf_phi", lambda c: c.pop("mm_vision_select_layer"), "missing field 'mm_vision_select_layer'"),
    ("mixformer", lambda c: c.pop("rotary_dim"), "missing field 'rotary_dim'"),
    ("mixformer", lambda c: c.update(rotary_dim=33), "rotary_dim 33 must be even"),
])
def test_bad_fields_name_file_and_field(tiny, tmp_path, variant, edit, message):
    folder = _copy(tiny, variant, tmp_path)
    _edit_config(folder, edit)
    with pytest.raises(ConfigError, match=message) as info:
        load_config(folder)
    assert str(folder / "config.json") in str(info.value)


def test_bad_clip_config_names_the_clip_file(tiny, tmp_path):
    folder = _copy(tiny, "hf_phi", tmp_path)
    _edit_config(folder, lambda c: c.update(mm_vision_tower=str(tmp_path / "hf_phi_clip")))
    _edit_config(tmp_path / "hf_phi_clip", lambda c: c["vision_config"].pop("num_attention_heads"))
    message = r"hf_phi_clip/config\.json: missing field 'vision_config\.num_attention_heads'"
    with pytest.raises(ConfigError, match=message):
        load_config(folder)


def test_vision_tower_folder_missing(tiny, tmp_path):
    folder = _copy(tiny, "mixformer", tmp_path)
    _edit_config(folder, lambda c: c.update(mm_vision_tower="openai/clip-vit-large-patch14-336"))
    with pytest.raises(FileNotFoundError, match="mm_vision_tower 'openai/clip-vit-large-patch14-336' is not a local"):
        load_config(folder)


def test_llava_hf_variants(tiny, tmp_path):
    folder = _copy(tiny, "llava_hf", tmp_path)

    def edit(c):
        c["image_token_id"] = c.pop("image_token_index") - 1
        c["vision_feature_select_strategy"] = "full"
    _edit_config(folder, edit)
    cfg = load_config(folder)
    assert cfg.image_token_id == IMAGE_TOKEN_ID - 1
    assert cfg.vision.select_feature == "cls_patch"


def test_mixformer_vocab_padding_and_default_inner(tiny, tmp_path):
    folder = _copy(tiny, "mixformer", tmp_path)
    _edit_config(folder, lambda c: c.update(vocab_size=500, n_inner=None))  # padded up to a multiple of 64
    text = load_config(folder).text
    assert (text.vocab_size, text.intermediate_size) == (512, 4 * 160)


def test_unknown_layout_lists_what_was_seen(tiny, tmp_path):
    folder = _copy(tiny, "llava_phi", tmp_path)
    for f in folder.glob("*.safetensors"):
        f.unlink()
    save_file({"encoder.block.0.weight": torch.zeros(2), "decoder.block.0.weight": torch.zeros(2)},
              str(folder / "model.safetensors"))
    with pytest.raises(CheckpointError, match="unknown checkpoint layout") as info:
        load_config(folder)
    assert "'llava_phi'" in str(info.value) and "encoder.block.0.weight" in str(info.value)


def test_unrecognised_schema_lists_keys(tiny, tmp_path):
    folder = _copy(tiny, "hf_phi", tmp_path)
    _edit_config(folder, lambda c: c.pop("mm_vision_tower"))
    with pytest.raises(ConfigError, match="unrecognised config schema .*keys seen: .*'hidden_size'"):
        load_config(folder)


def test_random_writer_config_round_trip(tmp_path):
    text = TextConfig(vocab_size=256, hidden_size=160, intermediate_size=640, num_layers=2, num_heads=2,
                      rotary_dim=32, rope_theta=10000.0, layer_norm_eps=1e-5, max_position_embeddings=128)
    vision = VisionConfig(hidden_size=128, intermediate_size=256, num_layers=3, num_heads=2, image_size=56,
                          patch_size=14, layer_norm_eps=1e-5)
    write_random_llava_phi(tmp_path, text=text, vision=vision)
    cfg = load_config(tmp_path)
    assert (cfg.text, cfg.vision, cfg.layout, cfg.pad_to_square) == (text, vision, "llava_phi", True)
    raw = json.loads((tmp_path / "config.json").read_text())
    assert raw["model_type"] == "llava_phi" and raw["partial_rotary_factor"] == 0.4
    assert raw["vision_config"]["mm_projector"] == {"model_type": "llava_phi_projector",
                                                    "mm_projector_type": "mlp2x_gelu", "mm_hidden_size": 128,
                                                    "hidden_size": 160}
