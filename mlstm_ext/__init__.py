"""mlstm_ext: the chunkwise mLSTM intra-chunk H step as a compiled PyTorch operator.

Importing this package loads the compiled library, which registers
``torch.ops.mlstm.parallel_fw_hintra`` (CPU, and CUDA when built with it), and registers the
fake kernel used by torch.compile / torch.export.
"""
import glob
import os
from typing import Optional, Tuple

import torch

__all__ = [
    "library_path",
    "has_cuda_kernels",
    "parallel_fw_hintra",
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

from . import _fake  # noqa: E402,F401  (registers the fake kernel)


def has_cuda_kernels() -> bool:
    """True when the library was compiled with its CUDA kernels."""
    return bool(torch.ops.mlstm._built_with_cuda())


def parallel_fw_hintra(
    matQ: torch.Tensor,
    matK: torch.Tensor,
    matV: torch.Tensor,
    vecI: torch.Tensor,
    vecF: torch.Tensor,
    matC_all: torch.Tensor,
    vecN_all: torch.Tensor,
    scaM_all: torch.Tensor,
    qk_scale: Optional[float] = None,
    chunk_size: int = 64,
    siz_b_LQ: int = 32,
    siz_b_LKV: int = 32,
    siz_b_DHQK: Optional[int] = None,
    siz_b_DHHV: Optional[int] = None,
    num_warps: Optional[int] = None,
    num_stages: Optional[int] = None,
    eps: float = 1e-6,
    output_dtype: Optional[torch.dtype] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The intra-chunk H step of the chunkwise mLSTM forward pass (see SPEC.md).

    Same signature and defaults as ``mlstm_kernels``' ``mlstm_chunkwise__parallel_fw_Hintra``.
    Returns ``(matH (B, NH, S, DHHV) in matQ's dtype, vecN (B, NH, S), vecM (B, NH, S))``, the last
    two in ``output_dtype`` (float32 by default).
    """
    return torch.ops.mlstm.parallel_fw_hintra(
        matQ, matK, matV, vecI, vecF, matC_all, vecN_all, scaM_all,
        qk_scale=qk_scale, chunk_size=chunk_size, siz_b_LQ=siz_b_LQ, siz_b_LKV=siz_b_LKV,
        siz_b_DHQK=siz_b_DHQK, siz_b_DHHV=siz_b_DHHV, num_warps=num_warps, num_stages=num_stages,
        eps=eps, output_dtype=output_dtype,
    )


# The name of the reference function, so code written for mlstm_kernels switches by import.
mlstm_chunkwise__parallel_fw_Hintra = parallel_fw_hintra

from .layer import MLSTMLayer  # noqa: E402  (a TorchScript-able layer on the op; see examples/cpp)
