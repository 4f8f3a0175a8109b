"""Builds mlstm_ext._C: the op library (CPU kernel always; CUDA kernels when nvcc and a CUDA-enabled
torch are present; a GPU is not needed to compile them).

Build without build isolation, against the torch already installed:
    pip install --no-build-isolation -e .
Set MLSTM_EXT_CUDA=0 to skip the CUDA kernels, MLSTM_EXT_CUDA=1 to insist on them.
"""
import glob
import os
import shutil

from setuptools import setup


def _find_cuda_home():
    """The CUDA toolkit root holding nvcc *and* the headers (nvcc may be a wrapper elsewhere)."""
    nvcc = shutil.which("nvcc")
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    candidates.append("/usr/local/cuda")
    for c in candidates:
        if c and os.path.exists(os.path.join(c, "bin", "nvcc")) and os.path.exists(
            os.path.join(c, "include", "cuda_runtime_api.h")
        ):
            return c
    return None


# Must be set before torch.utils.cpp_extension reads it at import.
_cuda_home = _find_cuda_home()
if _cuda_home:
    os.environ["CUDA_HOME"] = _cuda_home

import torch  # noqa: E402
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension  # noqa: E402


def _cuda_wanted() -> bool:
    flag = os.environ.get("MLSTM_EXT_CUDA", "auto")
    if flag == "0":
        return False
    nvcc = CUDA_HOME is not None and os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc"))
    present = torch.version.cuda is not None and nvcc
    if flag == "1" and not present:
        raise RuntimeError(
            "MLSTM_EXT_CUDA=1 but CUDA kernels cannot be built: "
            f"torch.version.cuda={torch.version.cuda}, CUDA_HOME={CUDA_HOME}"
        )
    return present


WITH_CUDA = _cuda_wanted()
HERE = os.path.dirname(os.path.abspath(__file__))

sources = sorted(glob.glob("csrc/*.cpp")) + sorted(glob.glob("csrc/cpu/*.cpp"))
# -fopenmp: at::parallel_for is inline OpenMP code, serial without it (libgomp.so.1 is the one
# libtorch_cpu already loads). The C++ standard is the one torch asks for.
cxx_flags = ["-O3", "-fopenmp"]
define_macros = []
extra = {"cxx": cxx_flags}

if WITH_CUDA:
    # Portable sm_80 code plus Hopper's own (sm_90a), and compute_80 PTX for newer GPUs to JIT
    # (compute_90a PTX would not do: no later GPU can compile Hopper-only instructions); they run
    # the sm_80 kernel. Set here so the build never depends on which GPU this machine has.
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0+PTX;9.0a")
    sources += sorted(glob.glob("csrc/cuda/*.cu")) + sorted(glob.glob("csrc/cuda/*.cpp"))
    define_macros.append(("MLSTM_EXT_WITH_CUDA", None))
    if "9.0a" in os.environ["TORCH_CUDA_ARCH_LIST"]:
        define_macros.append(("MLSTM_EXT_SM90A", None))  # the Hopper kernel has machine code
    extra["nvcc"] = ["-O3", "--expt-relaxed-constexpr", "-lineinfo",
                     "-Xptxas=-warn-spills"]
    Ext = CUDAExtension
else:
    Ext = CppExtension

ext = Ext(
    name="mlstm_ext._C",
    sources=sources,
    include_dirs=[os.path.join(HERE, "csrc")],
    define_macros=define_macros,
    extra_compile_args=extra,
    extra_link_args=["-fopenmp"],
    # py_limited_api keeps libtorch_python out of the link: the library depends on libtorch only
    # and loads in a C++ process with no Python interpreter.
    py_limited_api=True,
)

setup(
    name="mlstm_ext",
    version="0.1.0",
    description="Chunkwise mLSTM intra-chunk H step (xLSTM) as a compiled PyTorch operator",
    packages=["mlstm_ext"],
    ext_modules=[ext],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    python_requires=">=3.9",
)
