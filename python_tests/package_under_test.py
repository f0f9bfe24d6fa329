"""Child Python processes that import the same phi_fast as the test process, wherever pytest was started.

`python -m ...` and `python -c ...` put the current folder first on sys.path, so from the repository root a child
would import the source tree's phi_fast even when the tests run an installed copy (whose compiled _C the source
tree may lack). Children therefore start in an empty folder with the package under test first on PYTHONPATH.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import phi_fast

PACKAGE_ROOT = Path(phi_fast.__file__).resolve().parents[1]  # the folder holding the phi_fast under test
_NEUTRAL_CWD = tempfile.TemporaryDirectory(prefix="phi_fast_tests_cwd_")


def child_env(**extra: str) -> dict[str, str]:
    """os.environ with PACKAGE_ROOT first on PYTHONPATH, plus `extra`."""
    paths = [str(PACKAGE_ROOT), os.environ.get("PYTHONPATH")]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, paths)), **extra}


def run_python(args: list[str | bytes], *, timeout: float = 600, env: dict[str, str] | None = None,
               **kwargs) -> subprocess.CompletedProcess:
    """`python ARGS` importing the phi_fast under test; output captured as text unless told otherwise."""
    kwargs.setdefault("capture_output", True)
    kwargs.setdefault("text", True)
    return subprocess.run([sys.executable, *args], env=env or child_env(), cwd=_NEUTRAL_CWD.name,
                          timeout=timeout, **kwargs)
