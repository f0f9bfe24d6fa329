"""The tests and their child processes import one phi_fast, and a phi_fast without its compiled _C says why:
no build in that folder, or a source tree (usually the current folder) shadowing the installed copy."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import phi_fast
from phi_fast import _ext

from package_under_test import PACKAGE_ROOT, child_env, run_python

LOAD = "import phi_fast._ext as e, sys; sys.exit(e.load_error())"  # prints the error, exit status 1

# After `pip install -e .`, setuptools' editable finder (on sys.meta_path, consulted after the source tree) serves
# phi_fast._C to any phi_fast folder that lacks it, so an unbuilt tree cannot shadow the build: nothing to report.
editable_install = any("__editable__" in (getattr(finder, "__module__", None) or "") for finder in sys.meta_path)
shadowing = pytest.mark.skipif(editable_install, reason="an editable install's finder supplies _C to any source tree")


def _source_tree_without_build(root: Path) -> Path:
    """A copy of the package's Python files in root/phi_fast, as a fresh clone has them before any build."""
    shutil.copytree(PACKAGE_ROOT / "phi_fast", root / "phi_fast",
                    ignore=shutil.ignore_patterns("_C.*", "__pycache__"))
    return root


def test_children_import_the_package_under_test():
    out = run_python(["-c", "import phi_fast; print(phi_fast.__file__)"])
    assert out.returncode == 0, out.stderr
    assert Path(out.stdout.strip()) == Path(phi_fast.__file__).resolve()


@shadowing
def test_a_source_tree_shadowing_the_built_package_is_named(tmp_path):
    assert _ext.load_error() is None, "the package under test should have a working _C"
    tree = _source_tree_without_build(tmp_path / "clone")
    # as `python -c/-m` from a clone's root after `pip install .`: the clone comes first, the built copy later
    out = subprocess.run([sys.executable, "-c", LOAD], cwd=tree, env=child_env(), capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 1
    message = out.stderr.strip()
    assert f"imported from {tree.resolve() / 'phi_fast'}, which has no compiled phi_fast._C" in message
    assert f"instead of the built copy in {PACKAGE_ROOT / 'phi_fast'}" in message
    assert "Run from another folder" in message and "rebuild" not in message


def test_a_package_that_was_never_built_says_so(tmp_path, monkeypatch):
    tree = _source_tree_without_build(tmp_path / "clone")
    monkeypatch.setattr(_ext, "__file__", str(tree / "phi_fast" / "_ext.py"))  # as if imported from the clone
    monkeypatch.setattr(sys, "path", [str(tree)])  # and no other phi_fast anywhere
    message = _ext.missing_extension_message("No module named 'phi_fast._C'")
    assert f"is not built in {tree.resolve() / 'phi_fast'}" in message
    assert "pip install --no-build-isolation" in message


@shadowing
def test_the_cli_reports_a_missing_build_in_one_line_before_any_output(tmp_path):
    tree = _source_tree_without_build(tmp_path / "clone")
    out = subprocess.run([sys.executable, "-m", "phi_fast", "demo", "--dir", str(tmp_path / "demo")], cwd=tree,
                         env=child_env(), capture_output=True, text=True, timeout=300)
    assert (out.returncode, out.stdout) == (1, "")
    assert len(out.stderr.strip().splitlines()) == 1 and "shadows" not in out.stderr
    assert "python -m phi_fast: error: phi_fast was imported from" in out.stderr
    assert not (tmp_path / "demo").exists()


def test_kernel_sources_changed_after_the_build_are_named(tmp_path):
    csrc = tmp_path / "csrc"
    for name in ("cpu/linear.cpp", "cpu/linear.h", "cuda/linear.cu", "sim/runtime.cpp", "bindings.cpp"):
        (csrc / name).parent.mkdir(parents=True, exist_ok=True)
        (csrc / name).write_text("")
    built = tmp_path / "_C.so"
    built.write_text("")
    for path in [*csrc.rglob("*.*"), built]:
        os.utime(path, (1000, 1000))
    assert _ext.stale_sources(built, csrc, with_cuda=True) == []
    for name, mtime in (("cpu/linear.h", 3000), ("cuda/linear.cu", 2000), ("sim/runtime.cpp", 2000)):
        os.utime(csrc / name, (mtime, mtime))
    assert _ext.stale_sources(built, csrc, with_cuda=True) == [csrc / "cuda/linear.cu", csrc / "cpu/linear.h"]
    assert _ext.stale_sources(built, csrc, with_cuda=False) == [csrc / "cpu/linear.h"]  # no CUDA in that build
    assert _ext.stale_sources(built, tmp_path / "installed_copy_has_no_csrc", with_cuda=True) == []
    message = _ext.stale_build_message(built, [csrc / "cuda/linear.cu", csrc / "cpu/linear.h"])
    assert f"is older than {csrc / 'cuda/linear.cu'} and 1 more" in message and "build_ext --inplace" in message


def test_the_package_under_test_is_built_from_its_current_sources():
    extension = _ext.extension()
    assert _ext.stale_sources(Path(extension.__file__), PACKAGE_ROOT / "csrc", extension.has_cuda()) == []
