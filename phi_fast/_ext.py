"""Loads phi_fast._C (the compiled CPU/CUDA kernels) and refuses a missing or stale build with a clear error.

_C records the torch (and CUDA) version it was compiled against; a different torch at run time would crash or
misbehave, so it is an ImportError that says how to rebuild.
"""

from __future__ import annotations

import functools
from types import ModuleType

import torch

REBUILD_HINT = ("rebuild it against the installed torch from the phi_fast source folder: "
                "pip install --no-build-isolation .  (or -e . for development)")


@functools.cache
def extension() -> ModuleType:
    """phi_fast._C, checked against the running torch. Raises ImportError (with how to rebuild) otherwise."""
    try:
        from phi_fast import _C
    except ImportError as error:
        raise ImportError(f"phi_fast._C, the compiled kernels, could not be imported ({error}); "
                          f"{REBUILD_HINT}") from error
    built_torch = _C.torch_version()
    if built_torch != torch.__version__:
        raise ImportError(f"phi_fast._C was built against torch {built_torch} but torch {torch.__version__} is "
                          f"installed; {REBUILD_HINT}")
    built_cuda, runtime_cuda = _C.cuda_version(), torch.version.cuda
    if built_cuda and runtime_cuda and built_cuda.split(".")[0] != runtime_cuda.split(".")[0]:
        raise ImportError(f"phi_fast._C was built for CUDA {built_cuda} but torch runs CUDA {runtime_cuda}; "
                          f"{REBUILD_HINT}")
    return _C


def load_error() -> str | None:
    """Why phi_fast._C cannot be used here, or None when it loads."""
    try:
        extension()
    except ImportError as error:
        return str(error)
    return None
