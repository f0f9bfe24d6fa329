"""Environment report for bug reports: `python -m phi_fast.env`.

Prints the phi_fast, torch, Python and CUDA versions, whether the compiled kernels (phi_fast._C) load and
what they were built against, their CUDA architectures, and the backends available here.
"""

from __future__ import annotations

import platform
import sys
from pathlib import Path

import torch

import phi_fast

from . import _ext, ops


def report() -> dict[str, str]:
    """The environment as ordered name -> value lines."""
    info = {
        "phi_fast": f"{getattr(phi_fast, '__version__', 'unknown')} ({Path(phi_fast.__file__).parent})",
        "python": f"{platform.python_version()} ({sys.executable})",
        "torch": torch.__version__,
        "torch CUDA": torch.version.cuda or "none (CPU build)",
        "GPU": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none visible",
    }
    error = _ext.load_error()
    if error is None:
        ext = _ext.extension()
        info["phi_fast._C"] = f"loaded ({ext.__file__})"
        info["_C built with torch"] = ext.torch_version()
        info["_C CUDA kernels"] = f"yes, CUDA {ext.cuda_version()}" if ext.has_cuda() else "no (CPU-only build)"
        info["_C CUDA archs"] = ext.cuda_archs() or "none"
    else:
        info["phi_fast._C"] = f"NOT loaded: {error}"
    info["available backends"] = ", ".join(ops.available_backends())
    return info


def main() -> None:
    """Prints report() as aligned lines."""
    info = report()
    width = max(map(len, info))
    sys.stdout.write("".join(f"{name:<{width}}  {value}\n" for name, value in info.items()))


if __name__ == "__main__":
    main()
