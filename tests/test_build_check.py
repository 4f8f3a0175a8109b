"""The torch-version check at import (mlstm_ext/_build_check.py; the wheel itself is built and
installed by .ci/run).

- which torch versions a recorded build accepts;
- a package whose record names another torch fails at import with an ImportError that names both
  versions, before it looks for the library (the copy made here has none);
- this build's own record matches the running torch.
"""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import mlstm_ext
from mlstm_ext import _build_check

PACKAGE = Path(mlstm_ext.__file__).resolve().parent


@pytest.mark.parametrize("version, release", [
    ("2.14.1+cu130", "2.14.1"), ("2.14.1+cpu", "2.14.1"), ("2.14.1+rocm6.4", "2.14.1"),
    ("2.14.1+xpu", "2.14.1"), ("2.14.1", "2.14.1"), ("2.15.0.dev20260101+cu130", "2.15.0.dev20260101"),
    ("2.14.0a0+git1a2b3c4", "2.14.0a0+git1a2b3c4"),
])
def test_torch_release(version, release):
    assert _build_check.torch_release(version) == release


@pytest.mark.parametrize("built, built_cuda, with_cuda, running, running_cuda, ok", [
    ("2.14.1+cu130", "13.0", False, "2.14.1+cu130", "13.0", True),
    ("2.14.1+cu130", "13.0", False, "2.14.1+cpu", None, True),  # CPU-only library: any variant
    ("2.14.1+cpu", None, False, "2.14.1+cu128", "12.8", True),
    ("2.14.1+cu130", "13.0", True, "2.14.1+cu130", "13.0", True),
    ("2.14.1+cu130", "13.0", True, "2.14.1+cpu", None, False),  # CUDA kernels need that CUDA
    ("2.14.1+cu130", "13.0", True, "2.14.1+cu128", "12.8", False),
    ("2.14.1+cu130", "13.0", False, "2.14.0+cu130", "13.0", False),
    ("2.14.1+cu130", "13.0", False, "2.15.0+cu130", "13.0", False),
    ("2.14.0a0+gitaaaaaaa", None, False, "2.14.0a0+gitbbbbbbb", None, False),
])
def test_mismatch(built, built_cuda, with_cuda, running, running_cuda, ok):
    why = _build_check.mismatch(built, built_cuda, with_cuda, running, running_cuda)
    assert (why is None) == ok, why
    if not ok:
        assert built in why and running in why


def test_render_round_trip():
    ns = {}
    exec(_build_check.render("2.14.1+cu130", "13.0", True), ns)
    assert (ns["TORCH_VERSION"], ns["TORCH_CUDA"], ns["WITH_CUDA"]) == ("2.14.1+cu130", "13.0", True)


def test_this_build_matches_running_torch():
    info = PACKAGE / "_build_info.py"
    if not info.exists():
        pytest.skip(f"{info} not written (built by an older setup.py)")
    from mlstm_ext import _build_info
    assert _build_check.mismatch(_build_info.TORCH_VERSION, _build_info.TORCH_CUDA,
                                 _build_info.WITH_CUDA, torch.__version__, torch.version.cuda) is None
    assert _build_info.WITH_CUDA == mlstm_ext.has_cuda_kernels()


def _import_copy(tmp_path: Path, info_text, env_extra=None) -> subprocess.CompletedProcess:
    """`import mlstm_ext` from a copy of the package's Python files (no library) with the given
    _build_info.py (None: none), in a fresh interpreter."""
    pkg = tmp_path / "mlstm_ext"
    pkg.mkdir(parents=True)
    for f in PACKAGE.glob("*.py"):
        if f.name != "_build_info.py":
            shutil.copy(f, pkg / f.name)
    if info_text is not None:
        (pkg / "_build_info.py").write_text(info_text)
    env = {k: v for k, v in os.environ.items()
           if k not in ("MLSTM_EXT_LIBRARY", "MLSTM_EXT_SKIP_TORCH_CHECK")}
    env["PYTHONPATH"] = str(tmp_path)
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-c", "import mlstm_ext"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)


def test_import_refuses_other_torch_before_loading(tmp_path):
    r = _import_copy(tmp_path, _build_check.render("2.13.0+cu126", "12.6", False))
    assert r.returncode != 0
    last = r.stderr.strip().splitlines()[-1]
    # The version check, not the missing library, stops the import.
    assert last.startswith("ImportError: mlstm_ext was built against torch 2.13.0+cu126, but "
                           f"this is torch {torch.__version__}"), r.stderr
    assert "_C*.so was not found" not in r.stderr


def test_import_without_record_or_with_skip_goes_on(tmp_path):
    # No record (an older in-place build): no check, so the import goes on to look for _C.
    r = _import_copy(tmp_path / "a", None)
    assert r.returncode != 0 and "_C*.so was not found" in r.stderr, r.stderr
    # MLSTM_EXT_SKIP_TORCH_CHECK=1: the same with a mismatched record.
    r = _import_copy(tmp_path / "b", _build_check.render("2.13.0", None, False),
                     {"MLSTM_EXT_SKIP_TORCH_CHECK": "1"})
    assert r.returncode != 0 and "_C*.so was not found" in r.stderr, r.stderr
