"""Prompt-sized quantized linears on the CPU at Phi-2's shapes (M = 620 rows of x, an image prompt): phi_fast's
integer GEMM (int8 / int4 groups of 32) next to the 16-bit paths measured in the same process, with an optional
second build of the extension (e.g. the previous commit's) timed side by side.

    python -m bench.kernels.quant_gemm_cpu [--old path/to/_C.so] [--reps 5] [--m 620] [--threads 2]

Variants, per shape (K -> N): "int8 new" / "int4 new" (ops.quant_linear of this build), "... old" (the other
build's), "bf16 ops.linear" (phi_fast's bf16 weights: torch's bf16 GEMM with native bf16, else fp32 tiles) and
"fp32 torch.mm" (fp32 weights; the GEMM a dequantizing path feeds). x is bf16 (fp32 for torch.mm). These GEMMs
are compute-bound (each weight is used M times), so the figure is GOPS = 2 M N K / time, and the ratio to fp32
torch.mm in the same run; the CPU's peak is in bench/NOTES.md. Calls are interleaved round-robin over the variants
(load from other processes hits them alike); each figure is the best and the median of --reps calls. CPU only;
prints a markdown table. Environment switches (PHI_FAST_CPU_NO_AVX512=1, ...) apply to both builds.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import time
from collections.abc import Callable

import torch

from bench.common import require_current_build
from bench.kernels.quant_gemv_cpu import load_extension
from phi_fast import ops

SHAPES = {"qkv": (2560, 7680), "dense": (2560, 2560), "fc1": (2560, 10240), "fc2": (10240, 2560)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--old", help="another build of phi_fast/_C*.so to time next to this one")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--m", type=int, default=620)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--shapes", default="qkv,dense,fc1,fc2")
    args = p.parse_args()
    require_current_build()
    torch.set_num_threads(args.threads)
    old = load_extension(args.old) if args.old else None
    uptime = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    print(f"uptime: {uptime}\nM = {args.m}, {args.threads} threads, cpu_features {ops.cpu_features()}\n")
    print("| shape | variant | best ms | median ms | best GOPS | x fp32 torch.mm |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    g = torch.Generator().manual_seed(0)
    for name in args.shapes.split(","):
        k, n = SHAPES[name]
        x = torch.randn(args.m, k, generator=g).to(torch.bfloat16)
        xf = x.float()
        q8 = (torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g), torch.rand(n, generator=g) * 1e-3)
        q4 = (torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, generator=g),
              (torch.rand(n, k // 32, generator=g) * 1e-2).half())
        wb = torch.randn(n, k, generator=g).to(torch.bfloat16)
        wf = wb.float()
        variants: dict[str, Callable[[], object]] = {
            "int8 new": lambda: ops.quant_linear(x, *q8), "int4 new": lambda: ops.quant_linear(x, *q4)}
        if old is not None:
            variants["int8 old"] = lambda: old.quant_linear(x, q8[0], q8[1], None)
            variants["int4 old"] = lambda: old.quant_linear(x, q4[0], q4[1], None)
        variants["bf16 ops.linear"] = lambda: ops.linear(x, wb)
        variants["fp32 torch.mm"] = lambda: torch.mm(xf, wf.t())
        times: dict[str, list[float]] = {v: [] for v in variants}
        for rep in range(args.reps + 1):  # one warm-up round
            for v, fn in variants.items():
                t = time.perf_counter()
                fn()
                if rep >= 1:
                    times[v].append(time.perf_counter() - t)
        ops_count = 2.0 * args.m * n * k
        ref = min(times["fp32 torch.mm"])
        for v, ts in times.items():
            best = min(ts)
            print(f"| {name} {k}->{n} | {v} | {best * 1e3:.1f} | {statistics.median(ts) * 1e3:.1f} | "
                  f"{ops_count / best / 1e9:.0f} | {ref / best:.2f}x |")
    print(f"\nuptime after: {subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip()}")


if __name__ == "__main__":
    main()
