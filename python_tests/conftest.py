"""Shared pytest setup: the `cuda` marker (tests that need a CUDA GPU) and skipping them without one; the
`cuda_sim` marker (the CUDA kernels on the CPU under the SIMT emulator, any machine) and its fixtures."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

# The sim backend builds this checkout's csrc/, also when the phi_fast under test is an installed copy.
os.environ.setdefault("PHI_FAST_SOURCE_DIR", str(Path(__file__).resolve().parents[1]))

import pytest  # noqa: E402 - after the environment the imports below read
import torch  # noqa: E402

from package_under_test import PACKAGE_ROOT, child_env, run_python  # noqa: E402
from phi_fast.tokenizer import Tokenizer  # noqa: E402
from tokenizer_fixture import write_tokenizer  # noqa: E402


def pytest_report_header(config: pytest.Config) -> str:
    """Which phi_fast the tests import (a source tree or an installed copy), and whether its _C loads."""
    from phi_fast import _ext

    error = _ext.load_error()
    return f"phi_fast under test: {PACKAGE_ROOT / 'phi_fast'} ({'_C loads' if error is None else error})"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU (skipped when torch sees none)")
    config.addinivalue_line("markers", "cuda_sim: runs the CUDA kernels on the CPU under the SIMT emulator "
                                       "(the sim backend, built from csrc/ into build/sim on first use)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; torch sees none")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@contextlib.contextmanager
def _nan_fill():
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    was_filling = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(was_deterministic)
        torch.utils.deterministic.fill_uninitialized_memory = was_filling


@pytest.fixture
def nan_filled_outputs():
    """torch.empty (and the extension's at::empty) return NaN-filled memory during the test: unwritten outputs fail."""
    with _nan_fill():
        yield


@pytest.fixture
def nan_filled_outputs_cpu():
    """The context manager behind nan_filled_outputs, for fixtures that poison only some of their cases."""
    return _nan_fill


@pytest.fixture
def sim_order():
    """Context manager factory: `with sim_order("reverse"):` runs the sim backend's launches with the block's threads
    (and the grid's blocks) in that order ("forward", "reverse", "random" with `seed`); yields the sim extension."""
    from phi_fast import _sim

    @contextlib.contextmanager
    def use(order: str, seed: int = 0):
        ext = _sim.extension()
        before = ext.sim_order()
        ext.sim_set_order(order, seed)
        try:
            yield ext
        finally:
            ext.sim_set_order(before, 0)

    return use


@pytest.fixture(scope="module", params=["json", "files"])
def tokenizer_dir(request, tmp_path_factory):
    """A small trained byte-level BPE tokenizer, as tokenizer.json and as vocab.json + merges.txt."""
    return write_tokenizer(tmp_path_factory.mktemp(f"tok_{request.param}"), request.param)


@pytest.fixture(scope="module")
def tok(tokenizer_dir) -> Tokenizer:
    return Tokenizer.from_dir(tokenizer_dir)


@pytest.fixture
def torch_threads(threads):
    """The test runs with torch's thread count (which the C++ ops hand to their kernels) set to `threads`."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    yield threads
    torch.set_num_threads(before)


@pytest.fixture
def run_portable():
    """Run Python code in a child process whose C++ kernels take their portable (non-AVX2) paths."""

    def run(code: str) -> None:
        result = run_python(["-c", code], env=child_env(PHI_FAST_CPU_PORTABLE="1"), timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]

    return run
