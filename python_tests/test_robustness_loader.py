"""The loader rejects malformed checkpoints and configs before allocating anything, and everything that would
fail at the first generate() fails at load() (issue 10, classes 6 and 7)."""

from __future__ import annotations

import json
import os
import shutil
import struct
import threading
from pathlib import Path

import pytest

import phi_fast
from phi_fast.config import ConfigError, load_config
from phi_fast.weights import CheckpointError, read_safetensors_header

from checkpoints import make_tiny_checkpoints
from tokenizer_fixture import write_tokenizer

WAIT = 120


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    tiny = make_tiny_checkpoints(tmp_path_factory.mktemp("robust_loader"), variants=("llava_phi", "llava_phi_sharded"))
    for path in tiny.paths.values():
        write_tokenizer(path)
    return tiny.paths["llava_phi"].parent


@pytest.fixture
def folder(tiny_dir, tmp_path) -> Path:
    """A fresh copy of the single-file llava_phi checkpoint."""
    return Path(shutil.copytree(tiny_dir / "llava_phi", tmp_path / "llava_phi"))


def _read(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def _write(path: Path, header: dict, data: bytes) -> None:
    blob = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)


def _edit_header(path: Path, edit) -> None:
    header, data = _read(path)
    edit(header)
    _write(path, header, data)


def _edit_config(folder: Path, edit) -> None:
    path = folder / "config.json"
    config = json.loads(path.read_text())
    edit(config)
    path.write_text(json.dumps(config))


def _load(folder: Path, **kwargs) -> phi_fast.Model:
    """phi_fast.load in a daemon thread, bounded: a loader that hangs fails the test instead of the run."""
    out: dict = {}

    def run() -> None:
        try:
            out["model"] = phi_fast.load(folder, progress=False, **kwargs)
        except BaseException as e:  # noqa: BLE001 - re-raised below
            out["error"] = e

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(WAIT)
    assert not thread.is_alive(), f"load({folder}) hangs"
    if "error" in out:
        raise out["error"]
    return out["model"]


# --- safetensors headers --------------------------------------------------------------------------------------


def _alias(header: dict) -> None:
    """Point one LayerNorm weight at another's bytes (same size)."""
    a, b = "model.layers.0.input_layernorm.weight", "model.layers.1.input_layernorm.weight"
    header[b]["data_offsets"] = list(header[a]["data_offsets"])


def _partial_overlap(header: dict) -> None:
    name = "model.layers.0.input_layernorm.bias"
    start, end = header[name]["data_offsets"]
    header[name]["data_offsets"] = [start - 4, end - 4]  # slides 4 bytes into its neighbour


def _negative(header: dict) -> None:
    name = "model.final_layernorm.weight"
    start, end = header[name]["data_offsets"]
    header[name]["data_offsets"] = [-8, end - start - 8]


def _reversed(header: dict) -> None:
    name = "model.final_layernorm.weight"
    start, end = header[name]["data_offsets"]
    header[name]["data_offsets"] = [end, start]


def _float_offsets(header: dict) -> None:
    name = "model.final_layernorm.weight"
    start, end = header[name]["data_offsets"]
    header[name]["data_offsets"] = [float(start), float(end)]


@pytest.mark.parametrize("edit, message", [
    (_alias, "overlap"),
    (_partial_overlap, "overlap"),
    (_negative, "non-negative integers"),
    (_reversed, "start after end"),
    (_float_offsets, "non-negative integers"),
])
def test_bad_tensor_offsets_are_rejected(folder, edit, message):
    _edit_header(folder / "model.safetensors", edit)
    with pytest.raises(CheckpointError, match=message) as info:
        _load(folder)
    assert str(folder / "model.safetensors") in str(info.value)


def test_empty_tensors_may_share_an_offset(tmp_path):
    path = tmp_path / "x.safetensors"
    _write(path, {"a": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]},
                  "b": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]},
                  "c": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4)
    assert sorted(read_safetensors_header(path)) == ["a", "b", "c"]


@pytest.mark.parametrize("name", ["model.safetensors", "extra.safetensors"])
def test_a_fifo_checkpoint_file_is_rejected_not_read(folder, name):
    if name == "model.safetensors":
        (folder / name).unlink()
    else:  # the folder is read by glob: no single file, no index
        os.rename(folder / "model.safetensors", folder / "a.safetensors")
    os.mkfifo(folder / name)
    with pytest.raises(CheckpointError, match="not a regular file"):
        _load(folder)


def test_a_fifo_config_is_rejected_not_read(folder):
    (folder / "config.json").unlink()
    os.mkfifo(folder / "config.json")
    with pytest.raises(ConfigError, match="config.json: not a regular file"):
        _load(folder)


@pytest.mark.parametrize("shard", ["../outside.safetensors", "/etc/passwd", "sub/../../x.safetensors", 7])
def test_index_entries_outside_the_folder_are_rejected(tiny_dir, tmp_path, shard):
    folder = Path(shutil.copytree(tiny_dir / "llava_phi_sharded", tmp_path / "sharded"))
    shutil.copy(next(folder.glob("*.safetensors")), tmp_path / "outside.safetensors")
    index = folder / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    data["weight_map"][next(iter(data["weight_map"]))] = shard
    index.write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match="outside the checkpoint folder|non-empty strings"):
        _load(folder)


def test_config_with_fewer_layers_than_stored_is_rejected(folder):
    _edit_config(folder, lambda c: c.update(num_hidden_layers=1))
    with pytest.raises(CheckpointError, match="stores 2 layers .* num_hidden_layers is 1"):
        _load(folder)


def test_vision_config_with_fewer_layers_than_stored_is_rejected(folder):
    # 2 layers, select_layer -2: layer 0 is all that is used, yet the checkpoint holds 3
    _edit_config(folder, lambda c: c["vision_config"]["vision_tower"].update(num_hidden_layers=2))
    with pytest.raises(CheckpointError, match="stores 3 layers .* vision num_hidden_layers is 2"):
        _load(folder)


# --- config.json --------------------------------------------------------------------------------------------

TOWER = ("vision_config", "vision_tower")


def _set(*keys_and_value):
    *keys, last, value = keys_and_value

    def edit(config: dict) -> None:
        for k in keys:
            config = config[k]
        config[last] = value

    return edit


@pytest.mark.parametrize("edit, message", [
    (_set("num_hidden_layers", 10**6), r"'num_hidden_layers' 1000000 is outside the supported range \[1, 256\]"),
    (_set("max_position_embeddings", 10**9), r"'max_position_embeddings' 1000000000 is outside .*131072"),
    (_set("vocab_size", 10**9), "'vocab_size' 1000000000 is outside"),
    (_set(*TOWER, "image_size", 10**6), "'vision_config.vision_tower.image_size' 1000000 is outside"),
    (_set("num_attention_heads", 0), "'num_attention_heads' 0 is outside"),
    (_set("hidden_size", "160"), "'hidden_size' must be an integer, got str"),
    (_set("num_attention_heads", 2.0), "'num_attention_heads' must be an integer, got float"),
    (_set("num_hidden_layers", True), "'num_hidden_layers' must be an integer, got bool"),
    (_set("layer_norm_eps", float("nan")), "'layer_norm_eps' nan is outside"),
    (_set("rope_theta", float("nan")), "'rope_theta' nan is outside"),
    (_set("rope_theta", "big"), "'rope_theta' must be a number, got str"),
    (_set("partial_rotary_factor", float("inf")), "'partial_rotary_factor' inf is outside"),
    (_set("rope_parameters", "default"), "'rope_parameters' must be a JSON object, got str"),
    (_set("rope_parameters", {"rope_theta": float("nan")}), "'rope_parameters.rope_theta' nan"),
    (_set("hidden_act", 3), "'hidden_act' must be a string, got int"),
    (_set("vision_config", "vision_tower", []), "'vision_config.vision_tower' must be a JSON object, got list"),
    (_set("vision_config", "mm_projector", 5), "'vision_config.mm_projector' must be a JSON object, got int"),
    (_set(*TOWER, "mm_vision_select_layer", "-2"), "'vision_config.vision_tower.mm_vision_select_layer' must be"),
    (_set(*TOWER, "layer_norm_eps", 0), "'vision_config.vision_tower.layer_norm_eps' 0 is outside"),
    (_set(*TOWER, "patch_size", [14]), "'vision_config.vision_tower.patch_size' must be an integer, got list"),
])
def test_bad_config_values_are_config_errors_naming_the_field(folder, edit, message):
    _edit_config(folder, edit)
    with pytest.raises(ConfigError, match=message) as info:
        load_config(folder)
    assert str(folder / "config.json") in str(info.value)


# --- late errors, now at load() -------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, message", [
    (dict(page_size=8), r"unsupported page_size 8 \(supported: 16, 32\)"),
    (dict(page_size="16"), "unsupported page_size '16'"),
    (dict(prefix_cache=-1), "prefix_cache must be an int >= 0"),
    (dict(max_num_seqs=0), "max_num_seqs must be an int >= 1"),
    (dict(cache_memory="1GB"), "cache_memory must be"),
    (dict(cache_memory=1.5), "cache_memory must be"),
    (dict(cache_memory=True), "cache_memory must be"),
    (dict(cache_memory=1), "holds no KV page"),
    (dict(cuda_graphs="yes"), "cuda_graphs must be"),
])
def test_bad_engine_settings_fail_at_load(folder, kwargs, message):
    with pytest.raises(ValueError, match=message):
        _load(folder, **kwargs)


def test_unsupported_head_dim_fails_at_load(folder):
    _edit_config(folder, lambda c: c.update(num_attention_heads=5, num_key_value_heads=5))  # 160 / 5 = 32
    with pytest.raises(ValueError, match=r"unsupported text head_dim 32 \(supported: 64, 80\)"):
        _load(folder)


def test_tokenizer_larger_than_the_vocabulary_fails_at_load(folder):
    write_tokenizer(folder, vocab_size=600)
    message = r"tokenizer has \d+ tokens but the model's vocabulary \(vocab_size\) only 512"
    with pytest.raises(ValueError, match=message):
        _load(folder)


def test_the_good_checkpoint_still_loads_and_answers(folder):
    model = _load(folder, page_size=32, prefix_cache=0, max_num_seqs=2)
    assert isinstance(model.generate(None, "hello", max_new_tokens=4, timeout=WAIT), str)
    model.close()


def test_a_kv_cache_too_large_to_allocate_is_a_clear_error(folder):
    with pytest.raises(MemoryError, match="cannot allocate the KV cache: .* pass a smaller cache_memory"):
        _load(folder, cache_memory=2**50)  # a pebibyte
