"""Benchmark helpers shared by bench/kernels/*: CUDA-event timing, measured ceilings, result files.

A suite is a list of `Case`s, each timed next to its PyTorch equivalent in the same run:

    python -m bench.kernels.norm [--iters 200] [--out bench/results]

writes bench/results/<suite>-<gpu>-<date>.json (fields of design.md section 6) and a .md table of the same.
Timing: warm-up calls, then `iters` launches each bracketed by CUDA events, median in microseconds; for
decode-sized work (`flush_l2`) the L2 cache is overwritten before every launch, outside the timed region.
Ceilings: a large device-to-device copy (GB/s, read + write) and a large bf16 matmul (TFLOP/s).
A suite whose make_cases takes a device may also run on the CPU (`--device cpu`, the default without a GPU):
wall-clock medians with ours and the baseline interleaved call by call (a shared machine's load hits both),
ceilings a 256 MiB memcpy and an fp32 2048^3 matmul (fp32_tflops), file <suite>-cpu-<date>.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import logging
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

log = logging.getLogger("phi_fast.bench")

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"


@dataclasses.dataclass
class Case:
    """One measurement: `fn` (ours) and `baseline_fn` (the PyTorch equivalent) on the same inputs.

    Throughput is reported as GB/s when `bytes_moved` is given (the op's compulsory traffic), else TFLOP/s
    from `flops`.
    """

    name: str
    shape: str
    dtype: str
    fn: Callable[[], object]
    baseline: str
    baseline_fn: Callable[[], object]
    bytes_moved: float = 0.0
    flops: float = 0.0
    flush_l2: bool = False


def time_us(fn: Callable[[], object], iters: int, warmup: int = 10, flush_l2: bool = False) -> float:
    """Median GPU time of one call of fn, in microseconds (CUDA events around each call)."""
    flush = None
    if flush_l2:
        l2_bytes = torch.cuda.get_device_properties(torch.cuda.current_device()).L2_cache_size
        flush = torch.empty(2 * max(l2_bytes, 1 << 20), dtype=torch.uint8, device="cuda")
    for _ in range(warmup):
        fn()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    for start, end in zip(starts, ends):
        if flush is not None:
            flush.zero_()
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) * 1000.0 for s, e in zip(starts, ends))


def measure_ceilings(iters: int = 20) -> dict[str, float]:
    """copy_gbps: a 1 GiB device copy (bytes read + written per second); bf16_tflops: an 8192^3 bf16 matmul."""
    n = 1 << 30
    src = torch.empty(n, dtype=torch.uint8, device="cuda").fill_(1)
    dst = torch.empty_like(src)
    copy_us = time_us(lambda: dst.copy_(src), iters)
    src = dst = None  # free the 2 GiB before the matmul (not del: the timed lambda names them)
    m = 8192
    a = torch.randn(m, m, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(m, m, device="cuda", dtype=torch.bfloat16)
    mm_us = time_us(lambda: a @ b, iters)
    return {"copy_gbps": round(2 * n / copy_us / 1e3, 1), "bf16_tflops": round(2 * m**3 / mm_us / 1e6, 1)}


def gpu_slug() -> str:
    """'NVIDIA H200' -> 'h200' (for file names)."""
    name = torch.cuda.get_device_name().lower().replace("nvidia", "").strip()
    return "-".join(name.split()) or "gpu"


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             check=True)
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def require_current_build() -> None:
    """Exits with the reason when phi_fast._C is older than a file under csrc/: the numbers would be another build's."""
    from phi_fast import _ext
    extension = _ext.extension()
    built = Path(extension.__file__)
    newer = _ext.stale_sources(built, ROOT / "csrc", extension.has_cuda())
    if newer:
        raise SystemExit(f"bench: {_ext.stale_build_message(built, newer)}")


def time_us_cpu(fns: list[Callable[[], object]], iters: int, warmup: int = 2) -> list[float]:
    """Median wall-clock microseconds of each of fns on the CPU, called in turn `iters` times (interleaved)."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(iters):
        for fn, out in zip(fns, times):
            start = time.perf_counter()
            fn()
            out.append((time.perf_counter() - start) * 1e6)
    return [statistics.median(t) for t in times]


def measure_ceilings_cpu(iters: int = 10) -> dict[str, float]:
    """copy_gbps: a 256 MiB memcpy (read + write); fp32_tflops: a 2048^3 fp32 matmul."""
    n, m = 1 << 28, 2048
    src, dst = torch.ones(n, dtype=torch.uint8), torch.empty(n, dtype=torch.uint8)
    a, b = torch.randn(m, m), torch.randn(m, m)
    copy_us, mm_us = time_us_cpu([lambda: dst.copy_(src), lambda: a @ b], iters)
    return {"copy_gbps": round(2 * n / copy_us / 1e3, 1), "fp32_tflops": round(2 * m**3 / mm_us / 1e6, 3)}


def measure(case: Case, iters: int, device: str = "cuda") -> dict[str, object]:
    """Times a case and its baseline; returns the result record of design.md section 6."""
    if device == "cpu":
        us, baseline_us = time_us_cpu([case.fn, case.baseline_fn], iters)
    else:
        us = time_us(case.fn, iters, flush_l2=case.flush_l2)
        baseline_us = time_us(case.baseline_fn, iters, flush_l2=case.flush_l2)
    record: dict[str, object] = {"name": case.name, "shape": case.shape, "dtype": case.dtype, "us": round(us, 2)}
    if case.bytes_moved:
        record["gbps"] = round(case.bytes_moved / us / 1e3, 1)
    else:
        record["tflops"] = round(case.flops / us / 1e6, 4)
    record.update(baseline=case.baseline, baseline_us=round(baseline_us, 2), speedup=round(baseline_us / us, 2))
    return record


def markdown(report: dict[str, object]) -> str:
    """The report as a markdown table, throughput also as a percentage of the measured ceiling."""
    ceilings = report["ceilings"]
    lines = [f"# {report['suite']} on {report['gpu']} ({report['date']}, commit {report['commit']}, "
             f"torch {report['torch']}, CUDA {report['cuda']})", "",
             "Ceilings: " + ", ".join(f"{k} {v}" for k, v in ceilings.items()) + ".", "",
             "| name | shape | dtype | us | throughput | % ceiling | baseline | baseline us | speedup |",
             "| --- | --- | --- | ---: | ---: | ---: | --- | ---: | ---: |"]
    for r in report["results"]:
        if "gbps" in r:
            rate, pct = f"{r['gbps']} GB/s", 100 * r["gbps"] / ceilings["copy_gbps"]
        else:
            peak = ceilings.get("bf16_tflops") or ceilings["fp32_tflops"]
            rate, pct = f"{r['tflops']} TFLOP/s", 100 * r["tflops"] / peak
        lines.append(f"| {r['name']} | {r['shape']} | {r['dtype']} | {r['us']} | {rate} | {pct:.0f}% | "
                     f"{r['baseline']} | {r['baseline_us']} | {r['speedup']}x |")
    return "\n".join(lines) + "\n"


def run_suite(suite: str, make_cases: Callable[..., list[Case]], argv: list[str] | None = None,
              cpu: bool = False) -> dict[str, object]:
    """Command-line entry of a suite: measures ceilings and cases, writes <out>/<suite>-<gpu>-<date>.{json,md}.
    With cpu=True, make_cases(device) is called with "cuda" or "cpu" (--device)."""
    parser = argparse.ArgumentParser(prog=f"python -m bench.kernels.{suite.removeprefix('kernels-')}",
                                     description=f"phi_fast kernel benchmark: {suite}")
    parser.add_argument("--iters", type=int, default=None, help="timed launches per measurement (median; "
                        "default 100 on a GPU, 10 on the CPU)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder of the result files")
    if cpu:
        parser.add_argument("--device", choices=("cuda", "cpu"),
                            default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    require_current_build()
    device = args.device if cpu else "cuda"
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if device == "cuda" and not torch.cuda.is_available():
        sys.exit(f"{suite}: needs a CUDA GPU (torch {torch.__version__} sees none)")
    iters = args.iters or (100 if device == "cuda" else 10)
    torch.backends.cuda.matmul.allow_tf32 = False
    ceilings = measure_ceilings() if device == "cuda" else measure_ceilings_cpu()
    log.info("ceilings: %s", ceilings)
    results = []
    for case in (make_cases(device) if cpu else make_cases()):
        record = measure(case, iters, device)
        log.info("%s", record)
        results.append(record)
        if device == "cuda":
            torch.cuda.empty_cache()
    date = datetime.date.today().isoformat()
    machine = torch.cuda.get_device_name() if device == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    report = {"suite": suite, "gpu": machine, "torch": torch.__version__,
              "cuda": torch.version.cuda, "commit": git_commit(), "date": date, "ceilings": ceilings,
              "results": results}
    slug = gpu_slug() if device == "cuda" else "cpu"
    write_report(args.out / f"{suite}-{slug}-{date}", report, markdown(report))
    return report


def write_report(stem: Path, report: dict[str, object], table: str) -> None:
    """stem.json (the report) and stem.md (its markdown table)."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
    stem.with_suffix(".md").write_text(table)
    log.info("wrote %s.json and .md", stem)
