"""The `sim` backend: phi_fast's tensor-facing ops (csrc/ops) whose CUDA launchers and kernels (csrc/cuda) run on
CPU tensors under the SIMT emulator (csrc/sim). For tests and kernel development on machines without a GPU.

It is built on first use from this source checkout's csrc/ with torch's cpp_extension into build/sim (ninja keeps
it between runs and recompiles only what changed), never installed. The kernel sources compile unchanged with the
host C++ compiler except for their `__shared__` declarations, which the build rewrites (in staged copies under
build/sim/src, line numbers kept and mapped back with #line) into calls of the emulator's shared-memory arena:

    __shared__ alignas(16) T q_s[64 * 88];   ->   auto& q_s = ::phi_fast::sim::shared_array<T[64 * 88], 16>(...);
    extern __shared__ float smem[];          ->   float* const smem = ::phi_fast::sim::dynamic_shared<float>(...);

PHI_FAST_SIM_ASAN=1 builds (into build/sim-asan) and loads an AddressSanitizer build instead; the process must then
run with libasan preloaded (LD_PRELOAD=$(g++ -print-file-name=libasan.so), ASAN_OPTIONS=detect_leaks=0).
PHI_FAST_SIM_ORDER=forward|reverse|random[:seed] sets the initial thread order (see csrc/sim/state.h).
PHI_FAST_SOURCE_DIR names the checkout to build from (default: the folder above this package).
"""

from __future__ import annotations

import functools
import logging
import os
import re
from pathlib import Path
from types import ModuleType

import torch

# The checkout whose csrc/ is built: $PHI_FAST_SOURCE_DIR (the tests set it to their own checkout, which matters
# after a plain install, when this file lives in site-packages), else the folder above this package.
ROOT = Path(os.environ.get("PHI_FAST_SOURCE_DIR") or Path(__file__).resolve().parents[1])
CSRC = ROOT / "csrc"
log = logging.getLogger("phi_fast.sim")

_SHARED = re.compile(
    r"^(?P<indent>\s*)(?P<pre>(?:(?:extern|alignas\(\s*\w+\s*\))\s+)*)__shared__\s+"
    r"(?P<post>(?:alignas\(\s*\w+\s*\)\s+)?)(?P<type>[\w:<>, ]+?)\s+(?P<name>\w+)\s*(?P<dims>(?:\[[^\]]*\])+)\s*;"
    r"(?P<rest>.*)$")
_ALIGN = re.compile(r"alignas\(\s*(\w+)\s*\)")


def rewrite_shared(text: str, path: str) -> str:
    """`text` with each one-line `__shared__` declaration replaced by the emulator's arena call (same line count).

    Raises ValueError naming file:line for a `__shared__` it cannot rewrite (write those on one line as
    `__shared__ [alignas(N)] T name[dims];`)."""
    lines = text.split("\n")
    for i, line in enumerate(lines):
        if "__shared__" not in line.split("//")[0]:
            continue
        m = _SHARED.match(line)
        if m is None:
            raise ValueError(f"{path}:{i + 1}: the sim build cannot rewrite this __shared__ declaration; write it "
                             f"on one line as `__shared__ [alignas(N)] T name[dims];`")
        aligns = _ALIGN.findall(m["pre"] + m["post"])
        align = aligns[0] if aligns else "16"
        name, ty, dims = m["name"], m["type"].strip(), m["dims"].replace(" ", "")
        if "extern" in m["pre"]:
            if dims != "[]":
                raise ValueError(f"{path}:{i + 1}: extern __shared__ arrays have no size: `extern __shared__ T {name}[];`")
            lines[i] = (f'{m["indent"]}{ty}* const {name} = ::phi_fast::sim::dynamic_shared<{ty}>("{name}", __FILE__, '
                        f'__LINE__);{m["rest"]}')
        else:
            lines[i] = (f'{m["indent"]}auto& {name} = ::phi_fast::sim::shared_array<{ty}{m["dims"]}, {align}>('
                        f'"{name}", __FILE__, __LINE__);{m["rest"]}')
    return "\n".join(lines)


def _write_if_changed(path: Path, text: str) -> None:
    """Writes only on change, so ninja's timestamps keep the build incremental."""
    if not path.exists() or path.read_text() != text:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def _stage_sources(build: Path) -> list[Path]:
    """Rewritten copies of csrc/cuda/* and csrc/sim/*.cu under build/src, and one `<folder>_<name>.cpp` unit per
    source of the extension (the host compiler builds them; distinct names keep torch's object files apart)."""
    units = []
    for folder in ("cuda", "sim"):
        for src in sorted((CSRC / folder).iterdir()):
            if src.suffix not in ((".cu",) if folder == "sim" else (".cu", ".cuh", ".h")):
                continue  # the emulator's own headers are used in place
            _write_if_changed(build / "src" / folder / src.name,
                              f'#line 1 "{src}"\n' + rewrite_shared(src.read_text(), str(src)))
            if src.suffix == ".cu":
                units.append(f"{folder}/{src.name}")
    units += [f"ops/{src.name}" for src in sorted((CSRC / "ops").glob("*.cpp"))]  # (csrc/cpu is never called)
    units.append("bindings.cpp")
    paths = []
    for unit in units:
        path = build / "units" / (unit.replace("/", "_").replace(".", "_") + ".cpp")
        _write_if_changed(path, f'#include "{unit}"\n')
        paths.append(path)
    return paths


def _build_info(build: Path) -> Path:
    folder = build / "generated"
    _write_if_changed(folder / "phi_fast_build_info.h",
                      "// Generated by phi_fast/_sim.py for the sim backend.\n#pragma once\n"
                      f'#define PHI_FAST_TORCH_VERSION "{torch.__version__}"\n'
                      '#define PHI_FAST_CUDA_VERSION ""\n#define PHI_FAST_CUDA_ARCHS "sim"\n')
    return folder


def asan_enabled() -> bool:
    """Whether the AddressSanitizer build is selected (PHI_FAST_SIM_ASAN=1)."""
    return os.environ.get("PHI_FAST_SIM_ASAN") == "1"


@functools.cache
def extension() -> ModuleType:
    """The sim extension (same functions as phi_fast._C plus sim_* controls), built on first use. Raises
    ImportError when this phi_fast is not a source checkout or the build fails."""
    if not (CSRC / "sim" / "runtime.h").exists():
        raise ImportError(f"the sim backend is built from a phi_fast source checkout's csrc/; {CSRC} has none "
                          "(it is for tests and is never installed)")
    from torch.utils import cpp_extension

    asan = asan_enabled()
    name = "phi_fast_sim_asan" if asan else "phi_fast_sim"
    build = ROOT / "build" / ("sim-asan" if asan else "sim")
    build.mkdir(parents=True, exist_ok=True)
    units = _stage_sources(build)
    flags = ["-DPHI_FAST_SIM", "-fopenmp", "-fno-math-errno", "-fno-trapping-math", "-Wno-unused-function"]
    ldflags = ["-fopenmp"]
    if asan:
        flags += ["-O1", "-g", "-fsanitize=address", "-fno-omit-frame-pointer"]
        ldflags += ["-fsanitize=address"]
    else:
        flags += ["-O2"]
    log.info("phi_fast sim: building %s in %s (the first build takes a few minutes)", name, build)
    try:
        return cpp_extension.load(
            name=name, sources=[str(p) for p in units], build_directory=str(build),
            extra_include_paths=[str(build / "src"), str(CSRC / "sim"), str(CSRC), str(_build_info(build))],
            extra_cflags=flags, extra_ldflags=ldflags, verbose=False)
    except (RuntimeError, OSError) as error:
        raise ImportError(f"building the sim backend in {build} failed: {error}") from error
