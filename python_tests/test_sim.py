"""The SIMT emulator's own tests (csrc/sim, kernels in csrc/sim/selftest.cu): mma and ldmatrix against the PTX
ISA's fragment maps and a plain matrix product, and the bugs it must catch -- a missing __syncthreads (under some
thread order), a missing cp.async wait, an out-of-bounds shared write, divergent barriers and broken warp
collectives -- plus sm_90's launch limits."""

from __future__ import annotations

import pytest
import torch

from package_under_test import run_python
from phi_fast import _sim

pytestmark = pytest.mark.cuda_sim

ORDERS = ["forward", "reverse", "random"]


@pytest.fixture(scope="module")
def sim():
    return _sim.extension()


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_mma_m16n8k16_is_a_matrix_product(sim, sim_order, dtype, order):
    g = torch.Generator().manual_seed(1)
    a = torch.randn(16, 16, generator=g).to(dtype)
    b = torch.randn(16, 8, generator=g).to(dtype)
    c = torch.randn(16, 8, generator=g)
    d = c.clone()
    with sim_order(order, seed=3):
        sim.sim_selftest("mma", [d.data_ptr(), a.data_ptr(), b.data_ptr(), int(dtype == torch.bfloat16)])
    torch.testing.assert_close(d, a.double().matmul(b.double()).float() + c, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("trans", [False, True])
def test_ldmatrix_x4_follows_the_fragment_map(sim, trans):
    m = torch.randperm(1 << 14, generator=torch.Generator().manual_seed(2))[:256].to(torch.int16).view(4, 8, 8)
    out = torch.empty(32, 4, dtype=torch.int32)
    sim.sim_selftest("ldmatrix", [out.data_ptr(), m.data_ptr(), int(trans)])
    for lane in range(32):
        g, t = lane // 4, lane % 4
        for i in range(4):
            lo, hi = (m[i, 2 * t, g], m[i, 2 * t + 1, g]) if trans else (m[i, g, 2 * t], m[i, g, 2 * t + 1])
            assert out[lane, i].item() == lo.item() | (hi.item() << 16), f"lane {lane}, matrix {i}"


def test_missing_syncthreads_is_caught_under_some_order(sim, sim_order):
    n = 256
    x = torch.randn(n, generator=torch.Generator().manual_seed(4))
    expected = torch.cat([torch.zeros(1), x[:-1]])
    right = {}
    for order in ORDERS:
        for sync in (True, False):
            out = torch.zeros(n)
            with sim_order(order, seed=5):
                sim.sim_selftest("neighbor", [out.data_ptr(), x.data_ptr(), n, int(sync)])
            right[order, sync] = torch.equal(out, expected)
    assert all(right[order, True] for order in ORDERS)
    # each thread reads what its lower neighbour wrote: in forward order that neighbour always ran first
    assert right["forward", False]
    assert not right["reverse", False] and not right["random", False]


def test_missing_cp_async_wait_reads_poison(sim):
    x = torch.randn(128, generator=torch.Generator().manual_seed(6))
    for wait in (True, False):
        out = torch.zeros(128)
        sim.sim_selftest("cp_async", [out.data_ptr(), x.data_ptr(), int(wait)])
        assert torch.equal(out, x) == wait


@pytest.mark.skipif(_sim.asan_enabled(), reason="the ASan build reports it itself: test_asan_catches_...")
def test_out_of_bounds_shared_write_is_caught(sim):
    out = torch.zeros(64)
    with pytest.raises(RuntimeError, match=r"out-of-bounds write to __shared__ s \(.*selftest.cu:\d+\): byte 256"):
        sim.sim_selftest("oob_shared", [out.data_ptr()])


@pytest.mark.skipif(not _sim.asan_enabled(), reason="needs the AddressSanitizer build (PHI_FAST_SIM_ASAN=1)")
def test_asan_catches_an_out_of_bounds_shared_write():
    code = ("import torch; from phi_fast import _sim; out = torch.zeros(64); "
            "_sim.extension().sim_selftest('oob_shared', [out.data_ptr()])")
    result = run_python(["-c", code], timeout=300)
    assert result.returncode != 0 and "heap-buffer-overflow" in result.stderr, result.stderr[-2000:]


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("kind,match", [
    (0, r"divergent __syncthreads: thread .* waits at csrc/sim/selftest.cu:\d+, thread .* at csrc/sim/selftest.cu"),
    (1, r"exits while lane \d+ waits for it at __shfl_xor_sync|__shfl_xor_sync.* names lanes [-, 0-9]+ that have exited"),
    (2, r"__shfl_xor_sync at csrc/sim/selftest.cu:\d+ \(mask 0xffffffff\) never completes; lane 0 is at "
        r"__syncthreads"),
])
def test_broken_synchronization_raises(sim, sim_order, kind, match, order):
    with sim_order(order, seed=7), pytest.raises(RuntimeError, match=match):
        sim.sim_selftest("divergent", [kind])


def test_sm90_launch_limits(sim):
    n = 256
    expected = (torch.arange(n) + 1) % n - 1.0
    out = torch.zeros(n)
    assert sim.sim_selftest("dynamic", [out.data_ptr(), n, 4 * n, 0]) == 0
    assert torch.equal(out, expected)
    assert sim.sim_selftest("dynamic", [out.data_ptr(), 1025, 4 * 1025, 0]) == 9  # cudaErrorInvalidConfiguration
    big = 64 * 1024  # above 48 KB only after cudaFuncSetAttribute
    assert sim.sim_selftest("dynamic", [out.data_ptr(), n, big, 0]) == 1  # cudaErrorInvalidValue
    out.zero_()
    assert sim.sim_selftest("dynamic", [out.data_ptr(), n, big, 1]) == 0
    assert torch.equal(out, expected)


def test_unknown_thread_order_is_a_clear_error(sim):
    with pytest.raises(ValueError, match="unknown thread order 'sideways'"):
        sim.sim_set_order("sideways")
