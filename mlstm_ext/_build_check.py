"""Refuse, with a clear message, to load the compiled library into a torch it was not built for.

The library (``_C.abi3.so``) is C++ compiled against libtorch's headers, and libtorch keeps no
stable C++ ABI from one release to the next: on another torch it fails to load with an undefined
symbol, or loads and misbehaves. So the build records the torch it compiled against, in
``_build_info.py`` (written by setup.py's build_ext, not kept in git), and ``import mlstm_ext``
calls :func:`check` before it loads the library.

What must match:
- torch's version, except a local label naming the build variant (``+cu130``, ``+cpu``,
  ``+rocm6.4``, ``+xpu``): the variants of one release are built from the same sources with the
  same compiler settings, and the CPU half of the library (libtorch_cpu, libc10) is the same in
  each. Any other local label (``2.14.0a0+git1a2b3c4``, a source build) is part of the version.
- when the library holds CUDA kernels, torch's CUDA version (``torch.version.cuda``) too: those
  kernels link libtorch_cuda / libc10_cuda and the CUDA runtime of that version, which a CPU-only
  torch or one for another CUDA version does not have.

An in-place or editable build made by a setup.py older than this check has no ``_build_info.py``:
nothing is checked then. ``MLSTM_EXT_LIBRARY`` (another build of the library) skips the check,
since the record describes this package's own library; ``MLSTM_EXT_SKIP_TORCH_CHECK=1`` skips it
on purpose (at your own risk).
"""
import os
import re
from typing import Optional

import torch

# Local version labels that name a build variant of one torch release.
_VARIANT = re.compile(r"^(cpu|cu\d+|rocm[\d.]+|xpu)$")


def torch_release(version: str) -> str:
    """``version`` without a local label that only names the build variant:
    ``2.14.1+cu130`` -> ``2.14.1``; ``2.14.0a0+git1a2b3c4`` stays as it is."""
    public, _, local = str(version).partition("+")
    return public if _VARIANT.match(local) else str(version)


def render(torch_version: str, torch_cuda: Optional[str], with_cuda: bool) -> str:
    """The text of ``_build_info.py`` (setup.py writes it at build time)."""
    return (
        '"""Written by setup.py when the library was built (not in git): what _C was compiled\n'
        'against. _build_check.check() compares it with the torch being imported."""\n'
        f"TORCH_VERSION = {str(torch_version)!r}  # torch.__version__ at build time\n"
        f"TORCH_CUDA = {torch_cuda!r}  # torch.version.cuda at build time (None: CPU-only torch)\n"
        f"WITH_CUDA = {bool(with_cuda)!r}  # whether _C holds the CUDA kernels\n"
    )


def mismatch(built_version: str, built_cuda: Optional[str], with_cuda: bool,
             running_version: str, running_cuda: Optional[str]) -> Optional[str]:
    """Why a library built as recorded cannot run on the given torch; None when it can."""
    if torch_release(built_version) != torch_release(running_version):
        return (f"mlstm_ext was built against torch {built_version}, but this is torch "
                f"{running_version}")
    if with_cuda and running_cuda != built_cuda:
        have = f"CUDA {running_cuda}" if running_cuda else "no CUDA (a CPU-only build)"
        return (f"mlstm_ext was built with CUDA kernels against torch {built_version} (CUDA "
                f"{built_cuda}), but this torch, {running_version}, has {have}")
    return None


def check() -> None:
    """Raise ImportError when the library was built against another torch than this one."""
    if os.environ.get("MLSTM_EXT_LIBRARY") or os.environ.get("MLSTM_EXT_SKIP_TORCH_CHECK") == "1":
        return
    try:
        from . import _build_info as info
    except ImportError:
        return  # built by a setup.py that recorded nothing
    why = mismatch(info.TORCH_VERSION, info.TORCH_CUDA, info.WITH_CUDA,
                   torch.__version__, torch.version.cuda)
    if why:
        raise ImportError(
            f"{why}. Its compiled library works only with the torch it was compiled against "
            f"(libtorch has no stable C++ ABI). Install torch=={torch_release(info.TORCH_VERSION)}"
            f"{' built for CUDA ' + str(info.TORCH_CUDA) if info.WITH_CUDA else ''}, or rebuild "
            "mlstm_ext against this torch (`pip install --no-build-isolation --no-deps .`, "
            "or `-e .`). MLSTM_EXT_SKIP_TORCH_CHECK=1 loads it anyway, at your own risk."
        )
