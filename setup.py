"""Builds mlstm_ext._C: the op library (CPU kernel always; CUDA kernels when nvcc and a CUDA-enabled
torch are present; a GPU is not needed to compile them).

Build without build isolation, against the torch already installed:
    pip install --no-build-isolation -e .
    pip wheel --no-build-isolation --no-deps .      (a binary wheel, for that torch only)
Set MLSTM_EXT_CUDA=0 to skip the CUDA kernels, MLSTM_EXT_CUDA=1 to insist on them.

Every build records the torch it compiled against in mlstm_ext/_build_info.py (see
mlstm_ext/_build_check.py), and compiles into build/temp.* (also for `pip install -e .`, whose
own temporary folder would be thrown away), so that a later build or wheel recompiles only what
changed.
"""
import glob
import importlib.util
import os
import shutil
import sys
import sysconfig

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


def _load_build_check():
    """mlstm_ext/_build_check.py on its own (importing the package would load the library)."""
    path = os.path.join(HERE, "mlstm_ext", "_build_check.py")
    spec = importlib.util.spec_from_file_location("_mlstm_ext_build_check", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_build_check = _load_build_check()
# Where the objects go, whatever the command: setuptools' own default for `setup.py build_ext` and
# `pip wheel .`; `pip install -e .` would otherwise compile into a temporary folder.
BUILD_TEMP = os.path.join(HERE, "build", f"temp.{sysconfig.get_platform()}-{sys.implementation.cache_tag}")


class BuildExt(BuildExtension.with_options(use_ninja=True)):
    def finalize_options(self):
        super().finalize_options()
        self.build_temp = BUILD_TEMP  # ninja then rebuilds only what changed

    def run(self):
        super().run()
        # Record what _C was compiled against, next to the _C this build made: in the source tree
        # for in-place and editable builds, in build/lib (what a wheel packs) otherwise.
        inplace = self.inplace or getattr(self, "editable_mode", False)
        folder = os.path.join(HERE if inplace else self.build_lib, "mlstm_ext")
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, "_build_info.py")
        text = _build_check.render(torch.__version__, torch.version.cuda, WITH_CUDA)
        old = open(path, encoding="utf-8").read() if os.path.exists(path) else None
        if old != text:
            with open(path, "w", encoding="utf-8") as f:
                f.write(text)
        print(f"mlstm_ext: built against torch {torch.__version__}, CUDA kernels: {WITH_CUDA}; "
              f"recorded in {path}")


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

with open(os.path.join(HERE, "README.md"), encoding="utf-8") as f:
    long_description = f.read()

setup(
    name="mlstm_ext",
    version="0.1.0",
    description="Chunkwise mLSTM intra-chunk H step (xLSTM) as a compiled PyTorch operator",
    long_description=long_description,
    long_description_content_type="text/markdown",
    license_expression="BSD-3-Clause",
    license_files=["LICENSE"],
    packages=["mlstm_ext"],
    ext_modules=[ext],
    cmdclass={"build_ext": BuildExt},
    # The compiled library is C++ against libtorch's headers: it runs only with the torch release
    # it was built against (the wheel is for that torch; pip never needs to install one: use
    # --no-deps). The pin names the release without a variant label (2.14.1, not 2.14.1+cu130),
    # which every variant of it satisfies; _build_check refuses a wrong variant at import.
    install_requires=[f"torch=={_build_check.torch_release(torch.__version__)}"],
    # torch 2.14's own floor. The library uses no Python C API at all (py_limited_api, and it is
    # loaded with torch.ops.load_library), so one abi3 wheel serves every CPython from 3.10 on.
    python_requires=">=3.10",
    options={"bdist_wheel": {"py_limited_api": "cp310"}},
    classifiers=[
        "Intended Audience :: Science/Research",
        "Intended Audience :: Developers",
        "Operating System :: POSIX :: Linux",
        "Programming Language :: C++",
        "Programming Language :: Python :: 3",
        "Programming Language :: Python :: 3 :: Only",
        "Programming Language :: Python :: 3.10",
        "Programming Language :: Python :: 3.11",
        "Programming Language :: Python :: 3.12",
        "Programming Language :: Python :: 3.13",
        "Programming Language :: Python :: 3.14",
        "Environment :: GPU :: NVIDIA CUDA",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
