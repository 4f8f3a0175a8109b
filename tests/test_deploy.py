"""Deployment without Python: TorchScript + the C++ example, and torch.export.

- The op library's ELF needs libtorch only (no libpython, no libtorch_python).
- ``mlstm_ext.MLSTMLayer`` scripts, and matches a float64 evaluation of the same layer.
- The scripted layer, saved here, runs in ``examples/cpp/run_model`` (built with CMake once per
  session, into a temporary folder or into $MLSTM_EXT_CPP_BUILD_DIR to reuse it across sessions),
  which dlopens the op library in a process with no Python interpreter; its output equals
  Python's bitwise (or, failing that, to float32 rounding). Also on CUDA, when present.
- ``torch.export`` of the layer runs (and survives save/load) and matches eager.

The C++ tests skip only when cmake or a C++ compiler is missing, and fail instead under CI=true.
"""
import math
import os
import re
import shutil
import subprocess
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import mlstm_ext
from mlstm_ext import MLSTMLayer
from mlstm_ext.reference import parallel_fw_hintra_reference, recurrent_fw_states

EXAMPLE_DIR = Path(__file__).resolve().parents[1] / "examples" / "cpp"
ON_CI = os.environ.get("CI", "").lower() not in ("", "0", "false")
HAS_CUDA_RUN = torch.cuda.is_available() and mlstm_ext.has_cuda_kernels()

# torch.jit.* warn that TorchScript is deprecated; deploying through it is what is tested here.
pytestmark = pytest.mark.filterwarnings(r"ignore:`torch\.jit\.\w+` is deprecated:FutureWarning")

D_MODEL, NUM_HEADS, CHUNK = 64, 2, 32
SEQ = 100  # not a multiple of CHUNK: the layer's padding path is part of what is deployed


def assert_same(out: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    """Bitwise equal, or else equal to float32 rounding of the output's scale (with a warning)."""
    assert out.shape == ref.shape and out.dtype == ref.dtype, (what, out.shape, ref.shape)
    if torch.equal(out, ref):
        return
    diff = (out.double() - ref.double()).abs().max().item()
    scale = ref.double().abs().max().item()
    bound = 16 * torch.finfo(torch.float32).eps * max(scale, 1.0)
    assert diff <= bound, f"{what}: max |diff| {diff:.3e} > {bound:.3e} (max |ref| {scale:.3e})"
    warnings.warn(f"{what}: not bitwise equal; max |diff| {diff:.3e}, within float32 rounding")


def _tool_missing(reason: str):
    if ON_CI:
        pytest.fail(f"{reason} (CI=true: the C++ deployment test must run on CI)")
    pytest.skip(reason)


# ----------------------------------------------------------------------------------------------
# The op library needs no Python


def test_library_elf_needs_no_python():
    lib = mlstm_ext.library_path()
    readelf, nm = shutil.which("readelf"), shutil.which("nm")
    if not (readelf and nm):
        _tool_missing("readelf/nm (binutils) not found")
    dyn = subprocess.run([readelf, "-d", lib], capture_output=True, text=True, check=True).stdout
    needed = re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", dyn)
    assert any(n.startswith(("libtorch", "libc10")) for n in needed), needed
    bad = [n for n in needed if n.startswith(("libpython", "libtorch_python"))]
    assert not bad, f"{lib} needs {bad}: it would not load in a process without Python"
    # A Python extension may also leave Python symbols undefined without NEEDing libpython.
    undef = subprocess.run([nm, "-D", "--undefined-only", lib], capture_output=True, text=True,
                           check=True).stdout.split()
    py_syms = [s for s in undef if re.match(r"_?Py[A-Z_]|THP", s) or "pybind11" in s
               or "5torch6python" in s or "5torch3jit6python" in s]
    assert not py_syms, f"{lib} refers to Python symbols: {py_syms[:10]}"


# ----------------------------------------------------------------------------------------------
# The layer in Python


def _layer_float64(layer: MLSTMLayer, x: torch.Tensor) -> torch.Tensor:
    """The same layer, all in float64 and with the reference H step (no compiled code)."""
    layer = layer.double()
    x = x.double()
    B, S, _ = x.shape
    L, NH = layer.chunk_size, layer.num_heads
    pad = (L - S % L) % L
    x = torch.nn.functional.pad(x, [0, 0, 0, pad])
    SP = S + pad

    def heads(t, d):
        return t.view(B, SP, NH, d).transpose(1, 2)

    q = heads(layer.q_proj(x), layer.qk_dim)
    k = heads(layer.k_proj(x), layer.qk_dim)
    v = heads(layer.v_proj(x), layer.v_dim)
    i, f = layer.igate(x).transpose(1, 2), layer.fgate(x).transpose(1, 2)
    C, n, m = recurrent_fw_states(k, v, i, f, chunk_size=L, compute_dtype=torch.float64)
    H, _, _ = parallel_fw_hintra_reference(q, k, v, i, f, C, n, m, chunk_size=L,
                                           compute_dtype=torch.float64)
    return layer.out_proj(H.transpose(1, 2).reshape(B, SP, -1)[:, :S])


def _make_layer(seed: int) -> MLSTMLayer:
    with torch.random.fork_rng(devices=[]):  # leave the global generator as it was
        torch.manual_seed(seed)
        layer = MLSTMLayer(D_MODEL, num_heads=NUM_HEADS, chunk_size=CHUNK).eval()
        with torch.no_grad():  # gates with some spread, so that the states matter
            layer.igate.bias.normal_()
            layer.fgate.bias.normal_(3.0, 1.0)
    return layer


def _randn(*shape, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("seq", [SEQ, 2 * CHUNK])
def test_layer_scripts_and_matches_float64(seq):
    layer = _make_layer(1)
    x = _randn(2, seq, D_MODEL, seed=11)
    with torch.no_grad():
        y = layer(x)
        y_script = torch.jit.script(layer)(x)
        y64 = _layer_float64(_make_layer(1), x)
    assert y.shape == (2, seq, D_MODEL)
    assert torch.equal(y_script, y), "scripted layer differs from eager"
    rel = ((y.double() - y64).norm() / y64.norm()).item()
    assert rel < 1e-5, f"layer vs float64 evaluation: relative error {rel:.2e}"


def test_layer_is_causal_under_padding():
    layer = _make_layer(2)
    x = _randn(1, 2 * CHUNK, D_MODEL, seed=12)
    with torch.no_grad():
        full, part = layer(x), layer(x[:, :40])  # 40: padded to 64 inside
    torch.testing.assert_close(part, full[:, :40], rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# TorchScript in C++


@pytest.fixture(scope="session")
def run_model(tmp_path_factory) -> Path:
    """Configure and build examples/cpp once per session; the run_model executable."""
    cmake = shutil.which("cmake")
    cxx = (shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++")
           or shutil.which("clang++"))
    if not cmake or not cxx:
        _tool_missing(f"cannot build the C++ example: cmake={cmake}, C++ compiler={cxx}")
    cached = os.environ.get("MLSTM_EXT_CPP_BUILD_DIR")
    build = Path(cached) if cached else tmp_path_factory.mktemp("cpp_build")
    args = [cmake, "-S", str(EXAMPLE_DIR), "-B", str(build),
            f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}"]
    if not (build / "CMakeCache.txt").exists() and shutil.which("ninja"):
        args += ["-G", "Ninja"]
    # With a CUDA-enabled torch, CMakeLists.txt finds the CUDA toolkit that find_package(Torch)
    # wants by itself ($CUDA_HOME, $CUDA_PATH or /usr/local/cuda); nothing to pass here.

    def step(cmd, name):
        t0 = time.perf_counter()
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        if r.returncode != 0:
            pytest.fail(f"C++ example {name} failed ({' '.join(cmd)}):\n"
                        f"{r.stdout[-6000:]}\n{r.stderr[-6000:]}")
        return time.perf_counter() - t0

    t_conf = step(args, "configure")
    t_build = step([cmake, "--build", str(build), "--parallel", str(os.cpu_count() or 2)], "build")
    print(f"\nexamples/cpp: configure {t_conf:.1f} s, build {t_build:.1f} s in {build}")
    exe = build / "run_model"
    assert exe.exists(), f"no {exe} after the build"
    return exe


def run_example(exe: Path, *args) -> str:
    """Runs run_model on the op library; its stdout."""
    cmd = [str(exe), mlstm_ext.library_path(), *map(str, args)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"{' '.join(cmd)} exited {r.returncode}:\n{r.stdout}\n{r.stderr}"
    return r.stdout


def printed(stdout: str, key: str) -> str:
    found = re.search(rf"^{key}: (.+)$", stdout, re.M)
    assert found, f"no '{key}:' line in run_model's output:\n{stdout}"
    return found.group(1).strip()


@pytest.fixture(scope="session")
def scripted(tmp_path_factory):
    """The layer, scripted and saved, with a saved input."""
    folder = tmp_path_factory.mktemp("deploy")
    layer = _make_layer(0)
    model = folder / "mlstm_layer.pt"
    torch.jit.script(layer).save(str(model))
    x = _randn(2, SEQ, D_MODEL, seed=10)
    x_file = folder / "x.pt"
    torch.save(x, x_file)
    return SimpleNamespace(layer=layer, model=model, x=x, x_file=x_file)


def test_run_model_needs_no_python(run_model):
    readelf = shutil.which("readelf")
    if not readelf:
        _tool_missing("readelf (binutils) not found")
    dyn = subprocess.run([readelf, "-d", str(run_model)], capture_output=True, text=True,
                         check=True).stdout
    assert "libpython" not in dyn and "libtorch_python" not in dyn, dyn


def test_cpp_matches_python_cpu(run_model, scripted, tmp_path):
    out_file = tmp_path / "y_cpp.pt"
    stdout = run_example(run_model, scripted.model, "cpu", "--input", scripted.x_file,
                         "--output", out_file)
    y_cpp = torch.load(out_file)
    with torch.inference_mode():
        y_script = torch.jit.load(str(scripted.model))(scripted.x)
        y_eager = scripted.layer(scripted.x)
    assert_same(y_cpp, y_script, "C++ vs Python (same scripted model), CPU")
    assert_same(y_cpp, y_eager, "C++ vs Python eager, CPU")
    assert printed(stdout, "shape").startswith(f"[2, {SEQ}, {D_MODEL}]")
    assert math.isclose(float(printed(stdout, "sum")), y_script.double().sum().item(),
                        rel_tol=1e-12, abs_tol=1e-9)
    assert math.isclose(float(printed(stdout, "abs_sum")), y_script.double().abs().sum().item(),
                        rel_tol=1e-12)


def test_cpp_default_input(run_model, scripted):
    # Without --input, run_model makes torch::randn(2, 2 * chunk_size, d_model) after
    # torch::manual_seed(0): the same numbers as Python's generator.
    stdout = run_example(run_model, scripted.model)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        x = torch.randn(2, 2 * CHUNK, D_MODEL)
    with torch.inference_mode():
        y = torch.jit.load(str(scripted.model))(x)
    assert printed(stdout, "shape").startswith(f"[2, {2 * CHUNK}, {D_MODEL}]")
    assert math.isclose(float(printed(stdout, "sum")), y.double().sum().item(),
                        rel_tol=1e-9, abs_tol=1e-9)


@pytest.mark.skipif(not HAS_CUDA_RUN, reason="needs a CUDA device and mlstm_ext's CUDA kernels")
def test_cpp_matches_python_cuda(run_model, scripted, tmp_path):
    out_file = tmp_path / "y_cpp_cuda.pt"
    stdout = run_example(run_model, scripted.model, "cuda", "--input", scripted.x_file,
                         "--output", out_file)
    assert printed(stdout, "device") == "cuda"
    y_cpp = torch.load(out_file)
    with torch.inference_mode():
        y_py = torch.jit.load(str(scripted.model), map_location="cuda")(scripted.x.cuda()).cpu()
    assert_same(y_cpp, y_py, "C++ vs Python (same scripted model), CUDA")


# ----------------------------------------------------------------------------------------------
# torch.export


def test_torch_export_matches_eager(tmp_path):
    layer = _make_layer(3)
    x = _randn(2, SEQ, D_MODEL, seed=13)
    ep = torch.export.export(layer, (x,))
    ops = {n.target for n in ep.graph.nodes if n.op == "call_function"}
    assert torch.ops.mlstm.parallel_fw_hintra.default in ops, "the op was not kept in the graph"
    with torch.no_grad():
        y_eager = layer(x)
        y_export = ep.module()(x)
    assert_same(y_export, y_eager, "exported program vs eager")
    # The saved program reloads (the op and its fake kernel come with `import mlstm_ext`).
    path = tmp_path / "mlstm_layer.pt2"
    torch.export.save(ep, path)
    with torch.no_grad():
        y_loaded = torch.export.load(path).module()(x)
    assert torch.equal(y_loaded, y_export)
