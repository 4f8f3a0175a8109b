"""mlstm_ext: the chunkwise mLSTM of xLSTM as compiled PyTorch operators.

Importing this package loads the compiled library, which registers the ops
``torch.ops.mlstm.{parallel_fw_hintra, recurrent_fw_states, chunkwise_fw, chunkwise_bw}`` (CPU, and CUDA when
built with it) and ``torch.ops.mlstm.recurrent_step`` (one generation step, any device), and
registers their fake kernels (``mlstm_ext.ops``) for torch.compile / torch.export.
"""
import glob
import os

import torch

__all__ = [
    "library_path",
    "has_cuda_kernels",
    "parallel_fw_hintra",
    "recurrent_fw_states",
    "chunkwise_fw",
    "chunkwise_bw",
    "recurrent_step",
    "mlstm_chunkwise",
    "mlstm_step",
    "register_backend",
    "mlstm_chunkwise__parallel_fw_Hintra",
    "MLSTMLayer",
]

_HERE = os.path.dirname(os.path.abspath(__file__))


def library_path() -> str:
    """Path of the compiled op library. It depends on libtorch only (no Python), so a C++
    program can dlopen it (or link it) to get ``mlstm::parallel_fw_hintra``.
    ``MLSTM_EXT_LIBRARY`` overrides it (to compare two builds in one session)."""
    if os.environ.get("MLSTM_EXT_LIBRARY"):
        return os.environ["MLSTM_EXT_LIBRARY"]
    found = sorted(glob.glob(os.path.join(_HERE, "_C*.so")) + glob.glob(os.path.join(_HERE, "_C*.pyd")))
    if not found:
        raise ImportError(
            "mlstm_ext: the compiled library _C*.so was not found next to " + _HERE + "; build it "
            "with `pip install --no-build-isolation -e .` or `python setup.py build_ext --inplace`"
        )
    return found[0]


from ._build_check import check as _check_build  # noqa: E402
_check_build()  # ImportError, before loading, if _C was built against another torch
torch.ops.load_library(library_path())

from . import ops  # noqa: E402  (wrappers and fake kernels of every op)
from .ops import chunkwise_bw, chunkwise_fw, parallel_fw_hintra, recurrent_fw_states, recurrent_step  # noqa: E402
from . import autograd  # noqa: E402,F401  (registers chunkwise_fw's backward)
from .chunkwise import mlstm_chunkwise  # noqa: E402
from .step import mlstm_step  # noqa: E402


def has_cuda_kernels() -> bool:
    """True when the library was compiled with its CUDA kernels."""
    return bool(torch.ops.mlstm._built_with_cuda())


# The name of the reference function, so code written for mlstm_kernels switches by import.
mlstm_chunkwise__parallel_fw_Hintra = parallel_fw_hintra

from .layer import MLSTMLayer  # noqa: E402  (a TorchScript-able layer on the op; see examples/cpp)


def register_backend():
    """Make mlstm_ext's kernels available to the ``xlstm`` package (explicit opt-in): adds
    "mlstm_ext" (exact gradients) and "mlstm_ext_custbw" (normaliser-constant gradients) to
    mlstm_kernels' chunkwise registry, so ``xLSTMLargeConfig(chunkwise_kernel="chunkwise--mlstm_ext")``
    runs on them, and "mlstm_ext" (``mlstm_step``) to its step registry, so ``step_kernel="mlstm_ext"``
    generates on ``recurrent_step``. See ``mlstm_ext.xlstm_backend``. Raises ImportError without
    mlstm-kernels."""
    from .xlstm_backend import register_backend as _register

    return _register()
