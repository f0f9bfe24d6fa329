"""The targets every CUDA kernel test runs on: the compiled kernels on a GPU (marker `cuda`), and the same kernel
sources under the SIMT emulator on the CPU in two thread orders (marker `cuda_sim`). A test module builds its
autouse `target` fixture from TARGETS and on_target."""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import pytest

from phi_fast import ops

HAS_CUDA = "cuda" in ops.available_backends()

TARGETS = [
    pytest.param("cuda", marks=[pytest.mark.cuda,
                                pytest.mark.skipif(not HAS_CUDA, reason="needs a GPU and phi_fast._C built with CUDA")]),
    pytest.param("sim_forward", marks=pytest.mark.cuda_sim),
    pytest.param("sim_reverse", marks=pytest.mark.cuda_sim),
]


@contextlib.contextmanager
def on_target(name: str, sim_order: Callable, nan_filled_outputs_cpu: Callable) -> Iterator[tuple[str, str]]:
    """(tensor device, ops backend) of target `name`; for the emulator, with its thread order set and the CPU
    outputs NaN-poisoned (conftest's sim_order and nan_filled_outputs_cpu fixtures)."""
    if name == "cuda":
        yield "cuda", "cpp"
        return
    with sim_order(name.removeprefix("sim_")), nan_filled_outputs_cpu():
        yield "cpu", "sim"
