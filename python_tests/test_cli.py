"""The command line: `python -m phi_fast generate` answers like the API; `demo` runs the whole pipeline."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import phi_fast

from checkpoints import make_tiny_checkpoints
from tokenizer_fixture import write_tokenizer


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    tiny = make_tiny_checkpoints(tmp_path_factory.mktemp("cli"), variants=("llava_phi",))
    write_tokenizer(tiny.paths["llava_phi"])
    return tiny.paths["llava_phi"]


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "phi_fast", *args], capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("stream", [False, True])
def test_generate_prints_the_api_answer(ckpt, tmp_path, stream):
    image = tmp_path / "img.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (30, 50, 3), dtype=np.uint8)).save(image)
    expected = phi_fast.load(ckpt, progress=False).generate(str(image), "What is it?", max_new_tokens=12)
    args = ["generate", "--model", str(ckpt), "--image", str(image), "--prompt", "What is it?",
            "--max-new-tokens", "12"]
    out = _cli(*args, *(["--stream"] if stream else []))
    assert out.returncode == 0, out.stderr
    assert out.stdout == expected + "\n"


def test_generate_reports_a_bad_model_folder(tmp_path):
    out = _cli("generate", "--model", str(tmp_path / "nowhere"), "--prompt", "hi")
    assert out.returncode == 1
    assert "error:" in out.stderr and "nowhere" in out.stderr


def test_demo_runs_the_whole_pipeline():
    out = _cli("demo", "--max-new-tokens", "8")
    assert out.returncode == 0, out.stderr
    assert "answer:" in out.stdout and "first token" in out.stdout and " tokens, " in out.stdout
