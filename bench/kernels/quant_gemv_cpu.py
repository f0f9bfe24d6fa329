"""Decode GEMVs on the CPU at Phi-2's shapes: int8, int4 (groups of 32) and bf16, M = 1, cold weights, with an
optional second build of the extension (e.g. the previous commit's) timed side by side in the same process.

    python -m bench.kernels.quant_gemv_cpu [--old path/to/_C.so] [--reps 30] [--m 1] [--threads 2]

Shapes (K -> N): qkv 2560 -> 7680, fc1 2560 -> 10240, fc2 10240 -> 2560, lm_head 2560 -> 51200. Weights are
random packed bytes (the kernels' speed does not depend on the values), cycled through enough copies (>= 256 MiB
per case) that every call reads them from memory, as decode does (the new and the old build take different copies:
the same copy would come from L3 the second time); --hot keeps one copy (the caches' speed, i.e.
the kernel's compute cost: use the *_slice shapes, 1/10 of fc1 and fc2, which fit in L2 / L3). Calls are interleaved round-robin over the
variants (new / old build, format), so load from other processes hits them alike; each figure is the best and
the median of --reps calls, in wall time and in the process's CPU time (all threads: on a machine shared with
other work, CPU time is what a call costs, wall time also holds the waits for a core). The floor is the case's weight bytes (packed data + scales) over the read bandwidth
measured in the same process (a sum over 256 MiB of fp32, the best of 10). CPU only; prints a markdown table.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "passive")

import argparse  # noqa: E402
import importlib.machinery  # noqa: E402
import importlib.util  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402

import torch  # noqa: E402

from bench.common import require_current_build  # noqa: E402
from phi_fast import ops  # noqa: E402

SHAPES = {"qkv": (2560, 7680), "fc1": (2560, 10240), "fc2": (10240, 2560), "lm_head": (2560, 51200),
          "fc1_slice": (2560, 1024), "fc2_slice": (10240, 256)}
POOL_BYTES = 256 << 20


def load_extension(path: str):
    """Another build of phi_fast._C, loaded under its own module name next to the current one."""
    loader = importlib.machinery.ExtensionFileLoader("phi_fast_old._C", path)
    spec = importlib.util.spec_from_file_location("phi_fast_old._C", path, loader=loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def read_gbps() -> float:
    """Best of 10 sums over 256 MiB of fp32: the read bandwidth the weights stream at."""
    x = torch.ones(POOL_BYTES // 4)
    best = float("inf")
    for _ in range(10):
        t = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t)
    return POOL_BYTES / best / 1e9


def weights(fmt: str, k: int, n: int, copies: int) -> list[tuple[torch.Tensor, ...]]:
    """copies random weights [n, k] in fmt: (qweight, scales) for int8 / int4 g32, (weight,) for bf16."""
    g = torch.Generator().manual_seed(k * n)
    out = []
    for _ in range(copies):
        if fmt == "int8":
            out.append((torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g),
                        torch.rand(n, generator=g) * 1e-3))
        elif fmt == "int4":  # fp16 group scales (builds before 8585c9d took fp32 ones: --old cannot time those)
            out.append((torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, generator=g),
                        (torch.rand(n, k // 32, generator=g) * 1e-2).half()))
        else:
            out.append((torch.randn(n, k, generator=g).to(torch.bfloat16),))
    return out


def nbytes(ts: tuple[torch.Tensor, ...]) -> int:
    """What a call reads: packed weights and scales."""
    return sum(t.numel() * t.element_size() for t in ts)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--old", help="another build of phi_fast/_C*.so to time next to this one")
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--m", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--shapes", default="qkv,fc1,fc2,lm_head")
    p.add_argument("--hot", action="store_true", help="one copy of each weight: calls read it from the caches")
    args = p.parse_args()
    require_current_build()
    torch.set_num_threads(args.threads)
    old = load_extension(args.old) if args.old else None
    uptime = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    bw = read_gbps()
    print(f"uptime: {uptime}\nread bandwidth {bw:.1f} GB/s, M = {args.m}, {args.threads} threads, "
          f"{'hot (cached)' if args.hot else 'cold'} weights\n")
    print("| shape | variant | MB read | floor ms | best ms | median ms | best GB/s | best CPU ms | median CPU ms |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name in args.shapes.split(","):
        k, n = SHAPES[name]
        x = torch.randn(args.m, k).to(torch.bfloat16)
        variants: dict[str, tuple[list, Callable]] = {}
        for fmt in ("int8", "int4", "bf16"):
            one = nbytes(weights(fmt, 64, 64, 1)[0]) * (k * n) / (64 * 64)
            pool = weights(fmt, k, n, 1 if args.hot else max(2, int(POOL_BYTES // one) + 1))
            if fmt == "bf16":
                variants["bf16 new"] = (pool, lambda w: ops.linear(x, w[0]))
                if old is not None:
                    variants["bf16 old"] = (pool, lambda w: old.linear(x, w[0], None))
                continue
            variants[f"{fmt} new"] = (pool, lambda w: ops.quant_linear(x, w[0], w[1]))
            if old is not None:
                variants[f"{fmt} old"] = (pool, lambda w: old.quant_linear(x, w[0], w[1], None))
        times: dict[str, list[float]] = {v: [] for v in variants}
        cpu: dict[str, list[float]] = {v: [] for v in variants}
        used: dict[int, int] = {}  # per pool, how many of its copies were taken: variants sharing a pool (new and
        # old build) never read the copy another just read (it would come from the L3 cache)
        for rep in range(args.reps + 2):  # two warm-up rounds
            for v, (pool, fn) in variants.items():
                taken = used.get(id(pool), 0)
                used[id(pool)] = taken + 1
                w = pool[taken % len(pool)]
                t, c = time.perf_counter(), time.process_time()
                fn(w)
                dt, dc = time.perf_counter() - t, time.process_time() - c
                if rep >= 2:
                    times[v].append(dt)
                    cpu[v].append(dc)
        for v, ts in times.items():
            mb = nbytes(variants[v][0][0]) / 1e6
            best = min(ts)
            print(f"| {name} {k}->{n} | {v} | {mb:.1f} | {mb / 1e3 / bw * 1e3:.3f} | {best * 1e3:.3f} | "
                  f"{statistics.median(ts) * 1e3:.3f} | {mb / 1e3 / best:.1f} | {min(cpu[v]) * 1e3:.3f} | "
                  f"{statistics.median(cpu[v]) * 1e3:.3f} |")
        del variants
    print(f"\nuptime after: {subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip()}")


if __name__ == "__main__":
    main()
