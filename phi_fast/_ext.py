"""Loads phi_fast._C (the compiled CPU/CUDA kernels) and refuses a missing or stale build with a clear error.

_C records the torch (and CUDA) version it was compiled against; a different torch at run time would crash or
misbehave, so it is an ImportError that says how to rebuild. Run from a source tree (an in-place or editable
build), a _C older than a file under csrc/ still loads but runs the kernels as they were built: that is logged
as a warning, and the benchmarks refuse it (bench.common.require_current_build).
"""

from __future__ import annotations

import functools
import logging
import sys
from importlib.machinery import EXTENSION_SUFFIXES
from pathlib import Path
from types import ModuleType

import torch

log = logging.getLogger("phi_fast")

REBUILD_HINT = ("rebuild it against the installed torch from the phi_fast source folder: "
                "pip install --no-build-isolation .  (or -e . for development)")


@functools.cache
def extension() -> ModuleType:
    """phi_fast._C, checked against the running torch. Raises ImportError (with how to rebuild) otherwise."""
    try:
        from phi_fast import _C
    except ImportError as error:
        raise ImportError(missing_extension_message(str(error))) from error
    built_torch = _C.torch_version()
    if built_torch != torch.__version__:
        raise ImportError(f"phi_fast._C was built against torch {built_torch} but torch {torch.__version__} is "
                          f"installed; {REBUILD_HINT}")
    built_cuda, runtime_cuda = _C.cuda_version(), torch.version.cuda
    if built_cuda and runtime_cuda and built_cuda.split(".")[0] != runtime_cuda.split(".")[0]:
        raise ImportError(f"phi_fast._C was built for CUDA {built_cuda} but torch runs CUDA {runtime_cuda}; "
                          f"{REBUILD_HINT}")
    newer = stale_sources(Path(_C.__file__), Path(__file__).resolve().parent.parent / "csrc", _C.has_cuda())
    if newer:
        log.warning("%s", stale_build_message(Path(_C.__file__), newer))
    return _C


def stale_sources(built: Path, csrc: Path, with_cuda: bool) -> list[Path]:
    """The files of csrc (the kernel sources beside a phi_fast source tree; none for an installed copy) that went
    into `built`, the compiled extension, and changed after it was written: oldest change first. csrc/sim (the
    emulator's own build) never goes into _C, csrc/cuda only into a CUDA build."""
    if not csrc.is_dir():
        return []
    skipped = {csrc / "sim"} | (set() if with_cuda else {csrc / "cuda"})
    built_at = built.stat().st_mtime
    changed = [(path.stat().st_mtime, path) for path in csrc.rglob("*")
               if path.is_file() and not skipped.intersection(path.parents)]
    return [path for mtime, path in sorted(changed) if mtime > built_at]


def stale_build_message(built: Path, newer: list[Path]) -> str:
    more = f" and {len(newer) - 1} more" if len(newer) > 1 else ""
    return (f"phi_fast._C ({built}) is older than {newer[0]}{more}: it runs the kernels as they were when it was "
            f"built. Rebuild: python setup.py build_ext --inplace (or pip install --no-build-isolation -e .)")


def missing_extension_message(error: str) -> str:
    """Why `from phi_fast import _C` failed, naming the real cause: no build in the imported folder (often a
    source tree in the current folder shadowing an installed copy) or a build that does not load."""
    here = Path(__file__).resolve().parent
    if _compiled_module(here) is not None:
        return f"phi_fast._C, the compiled kernels in {here}, could not be imported ({error}); {REBUILD_HINT}"
    others = [folder for folder in _phi_fast_folders() if folder != here and _compiled_module(folder) is not None]
    if others:
        return (f"phi_fast was imported from {here}, which has no compiled phi_fast._C, instead of the built copy "
                f"in {others[0]} (e.g. the installed package): that folder is a source tree on Python's path "
                f"ahead of it, usually the current folder, which Python searches first. Run from another folder, "
                f"or build in place in the source tree: pip install --no-build-isolation -e .")
    return (f"phi_fast._C, the compiled kernels, is not built in {here}; build it from the phi_fast source "
            f"folder: pip install --no-build-isolation .  (or -e . for development)")


def _compiled_module(folder: Path) -> Path | None:
    """The built _C extension file in a phi_fast package folder, if any."""
    return next((folder / f"_C{suffix}" for suffix in EXTENSION_SUFFIXES if (folder / f"_C{suffix}").is_file()),
                None)


def _phi_fast_folders() -> list[Path]:
    """Every phi_fast package folder on sys.path, in search order."""
    folders = []
    for entry in sys.path:
        candidate = Path(entry or ".") / "phi_fast"
        if (candidate / "__init__.py").is_file() and candidate.resolve() not in folders:
            folders.append(candidate.resolve())
    return folders


def load_error() -> str | None:
    """Why phi_fast._C cannot be used here, or None when it loads."""
    try:
        extension()
    except ImportError as error:
        return str(error)
    return None
