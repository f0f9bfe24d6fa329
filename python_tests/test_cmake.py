"""The CMake build configures with the installed torch (CPU or CUDA build) and compiles the same sources as
setup.py: csrc/bindings.cpp, csrc/cpu/*.cpp, csrc/ops/*.cpp (plus csrc/cuda/*.cu with the CUDA kernels)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
CPP_GLOBS = ("csrc/bindings.cpp", "csrc/cpu/*.cpp", "csrc/ops/*.cpp")  # setup.py's CPP_SOURCES

pytestmark = pytest.mark.skipif(shutil.which("cmake") is None or not (ROOT / "CMakeLists.txt").is_file(),
                                reason="needs cmake and the source tree's CMakeLists.txt")


def test_cmake_configures_the_cpu_build_with_setup_pys_sources(tmp_path):
    out = subprocess.run(["cmake", "-S", str(ROOT), "-B", str(tmp_path), f"-DPython3_EXECUTABLE={sys.executable}",
                          "-DPHI_FAST_WITH_CUDA=OFF"], capture_output=True, text=True, timeout=300)
    if torch.version.cuda is not None and shutil.which("nvcc") is None:  # torch's CMake config needs the toolkit
        assert out.returncode != 0 and "nvcc is not on PATH" in out.stdout + out.stderr
        return
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    compiled = {Path(entry["file"]).resolve() for entry in json.loads((tmp_path / "compile_commands.json").read_text())}
    expected = {path.resolve() for pattern in CPP_GLOBS for path in ROOT.glob(pattern)}
    assert compiled == expected
    header = (tmp_path / "generated" / "phi_fast_build_info.h").read_text()
    assert f'#define PHI_FAST_TORCH_VERSION "{torch.__version__}"' in header
    assert '#define PHI_FAST_CUDA_VERSION ""' in header
