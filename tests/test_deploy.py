"""Deployment without Python: TorchScript + the C++ example, and torch.export.

- The op library's ELF needs libtorch only (no libpython, no libtorch_python).
- ``mlstm_ext.MLSTMLayer`` scripts, and matches a float64 evaluation of the same layer.
- The scripted layer, saved here, runs in ``examples/cpp/run_model`` (built with CMake once per
  session, into a temporary folder or into $MLSTM_EXT_CPP_BUILD_DIR to reuse it across sessions),
  which dlopens the op library in a process with no Python interpreter; its output equals
  Python's bitwise (or, failing that, to float32 rounding). Also on CUDA, when present.
- ``torch.export`` of the layer runs (and survives save/load) and matches eager.
- AOTInductor: models that call the ops (the layer, the H step alone, the forward op when the build
  has it, the generation step; ``AOTI_CASES``) are exported and compiled into ``.pt2`` packages, which
  ``examples/cpp/run_aoti`` (same CMake build) runs after loading the op library; its outputs
  equal the package's in Python and eager's to float32 rounding. On CPU, and on CUDA when present.

The C++ tests skip only when cmake or a C++ compiler is missing, and fail instead under CI=true.
"""
import math
import os
import re
import shutil
import subprocess
import sys
import time
import warnings
import zipfile
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
def cpp_build(tmp_path_factory) -> Path:
    """Configure and build examples/cpp (run_model and run_aoti) once per session; the folder."""
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
    for exe in ("run_model", "run_aoti"):
        assert (build / exe).exists(), f"no {build / exe} after the build"
    return build


@pytest.fixture(scope="session")
def run_model(cpp_build) -> Path:
    return cpp_build / "run_model"


def run_example(exe: Path, *args) -> str:
    """Runs a C++ example (run_model or run_aoti) on the op library; its stdout."""
    cmd = [str(exe), mlstm_ext.library_path(), *map(str, args)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"{' '.join(cmd)} exited {r.returncode}:\n{r.stdout}\n{r.stderr}"
    return r.stdout


def printed(stdout: str, key: str) -> str:
    found = re.search(rf"^{re.escape(key)}: (.+)$", stdout, re.M)
    assert found, f"no '{key}:' line in the example's output:\n{stdout}"
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


def assert_needs_no_python(program: Path) -> None:
    """The program's dynamic section names neither libpython nor libtorch_python."""
    readelf = shutil.which("readelf")
    if not readelf:
        _tool_missing("readelf (binutils) not found")
    dyn = subprocess.run([readelf, "-d", str(program)], capture_output=True, text=True,
                         check=True).stdout
    assert "libpython" not in dyn and "libtorch_python" not in dyn, dyn


def test_run_model_needs_no_python(run_model):
    assert_needs_no_python(run_model)


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
    assert torch.ops.mlstm.chunkwise_fw.default in ops, "the op was not kept in the graph"
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


# ----------------------------------------------------------------------------------------------
# torch.export + AOTInductor, run from C++ (examples/cpp/run_aoti)
#
# Each case is a model that calls an mlstm op and its example inputs; it is exported, compiled
# ahead of time into a .pt2 package (the slow part: 30-70 s on two cores, once per case and device
# per session), then run by run_aoti, a C++ program that loads the op library and the package.
# Add a case: write `def _case_x(device) -> (module, inputs)` and list it in AOTI_CASES.


class _HStep(torch.nn.Module):
    """The H step alone: 8 inputs, 3 outputs (the runner's multi-tensor path)."""

    def __init__(self, chunk_size: int):
        super().__init__()
        self.chunk_size = chunk_size

    def forward(self, q, k, v, i, f, C, n, m):
        return torch.ops.mlstm.parallel_fw_hintra(q, k, v, i, f, C, n, m, chunk_size=self.chunk_size)


class _ChunkwiseFw(torch.nn.Module):
    """The whole forward op: q, k, v, i, f -> (matH, the last states, vecN, vecM)."""

    def __init__(self, chunk_size: int):
        super().__init__()
        self.chunk_size = chunk_size

    def forward(self, q, k, v, i, f):
        return torch.ops.mlstm.chunkwise_fw(q, k, v, i, f, chunk_size=self.chunk_size)


class _Step(torch.nn.Module):
    """One generation step: q, k, v, i, f and the states -> (h, the next states)."""

    def forward(self, q, k, v, i, f, C, n, m):
        return torch.ops.mlstm.recurrent_step(q, k, v, i, f, C, n, m)


def _case_layer(device):
    return _make_layer(4).to(device), (_randn(2, SEQ, D_MODEL, seed=14).to(device),)


def _case_hstep(device):
    from conftest import make_inputs
    inp = make_inputs(B=1, NH=2, S=128, DHQK=32, L=64, seed=15, device=device)
    return _HStep(inp.L), inp.args()


def _case_chunkwise_fw(device):
    if not hasattr(torch.ops.mlstm, "chunkwise_fw") or not torch._C._dispatch_has_kernel_for_dispatch_key(
            "mlstm::chunkwise_fw", "CUDA" if device == "cuda" else "CPU"):
        pytest.skip(f"torch.ops.mlstm.chunkwise_fw has no {device} kernel in this build")
    from conftest import make_inputs
    inp = make_inputs(B=1, NH=2, S=128, DHQK=32, L=64, seed=16, device=device)
    return _ChunkwiseFw(inp.L), inp.args()[:5]


def _case_step(device):
    g = torch.Generator().manual_seed(17)
    B, NH, DHQK, DHHV = 2, 2, 32, 48
    shapes = [(B, NH, DHQK), (B, NH, DHQK), (B, NH, DHHV), (B, NH), (B, NH), (B, NH, DHQK, DHHV),
              (B, NH, DHQK), (B, NH)]
    return _Step(), tuple(torch.randn(s, generator=g).to(device) for s in shapes)


AOTI_CASES = {"layer": _case_layer, "hstep": _case_hstep, "chunkwise_fw": _case_chunkwise_fw,
              "step": _case_step}
_NEEDS_GPU = pytest.mark.skipif(not HAS_CUDA_RUN,
                                reason="needs a CUDA device and mlstm_ext's CUDA kernels")
AOTI_PARAMS = [pytest.param((case, "cpu"), id=f"{case}-cpu") for case in AOTI_CASES] + [
    pytest.param((case, "cuda"), id=f"{case}-cuda", marks=[pytest.mark.cuda, _NEEDS_GPU])
    for case in AOTI_CASES
]


def _as_tuple(out):
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


_LOAD_PACKAGE = """
import sys, torch, mlstm_ext
path, x_file, out_file = sys.argv[1:4]
x = torch.load(x_file)
x = tuple(t.to(sys.argv[4]) for t in x)
with torch.no_grad():
    y = torch._inductor.aoti_load_package(path)(*x)
y = y if isinstance(y, (tuple, list)) else (y,)
torch.save(tuple(t.cpu() for t in y), out_file)
"""


def load_package_in_python(path, x_file, device, out_file):
    """The package run by Python's aoti_load_package, in a child process: on some torch builds
    (seen with torch 2.11 on the GPU machine) it crashes the process, which must not take the
    test session with it. Returns (outputs or None, why not)."""
    r = subprocess.run([sys.executable, "-c", _LOAD_PACKAGE, str(path), str(x_file), str(out_file), device],
                       capture_output=True, text=True)
    if r.returncode != 0:
        return None, f"aoti_load_package in Python failed (exit {r.returncode}): {r.stderr[-300:]}"
    return list(_as_tuple(torch.load(out_file))), ""


@pytest.fixture(scope="session", params=AOTI_PARAMS)
def aoti_package(request, tmp_path_factory):
    """A case exported and compiled into a .pt2 on its device, with its saved inputs and the
    outputs of eager and of the package loaded in Python."""
    case, device = request.param
    model, inputs = AOTI_CASES[case](device)
    model = model.eval()
    folder = tmp_path_factory.mktemp(f"aoti_{case}_{device}")
    if device == "cuda":
        print(f"\nAOTInductor on {torch.cuda.get_device_name()}")
    with torch.no_grad():
        t0 = time.perf_counter()
        ep = torch.export.export(model, inputs)
        t1 = time.perf_counter()
        # input_shapes: run_aoti makes inputs of these shapes when given no --input.
        shapes = ";".join(",".join(map(str, t.shape)) for t in inputs)
        path = torch._inductor.aoti_compile_and_package(
            ep, package_path=str(folder / f"{case}.pt2"),
            inductor_configs={"aot_inductor.metadata": {"input_shapes": shapes}})
        t2 = time.perf_counter()
        print(f"\nAOTInductor {case} on {device}: export {t1 - t0:.1f} s, compile {t2 - t1:.1f} s")
        eager = _as_tuple(model(*inputs))
    x_file = folder / "inputs.pt"
    torch.save(tuple(t.cpu() for t in inputs), x_file)
    loaded, why = load_package_in_python(path, x_file, device, folder / "loaded.pt")
    return SimpleNamespace(case=case, device=device, path=Path(path), model=model, inputs=inputs,
                           x_file=x_file, eager=[t.cpu() for t in eager], loaded=loaded,
                           loaded_why=why)


@pytest.fixture(scope="session")
def run_aoti(cpp_build) -> Path:
    return cpp_build / "run_aoti"


def test_run_aoti_needs_no_python(run_aoti):
    assert_needs_no_python(run_aoti)


def test_aoti_cpp_matches_python(run_aoti, aoti_package, tmp_path):
    pkg = aoti_package
    # A kernel op is not compiled into the package: its generated code calls it through libtorch's
    # proxy executor, from a JSON description of the call stored in the package. The generation
    # step is a composite (CompositeImplicitAutograd), decomposed when the package is made into its
    # fused kernel op (no gradient is wanted there).
    with zipfile.ZipFile(pkg.path) as z:
        extern = " ".join(z.read(n).decode() for n in z.namelist() if n.endswith(".json"))
    if pkg.case == "step":
        assert '"target": "mlstm::_recurrent_step_fused' in extern, "no fused step call in the package"
    else:
        assert '"target": "mlstm::' in extern, "no mlstm op call in the package's extern-node JSON"

    out_file = tmp_path / "y.pt"
    stdout = run_example(run_aoti, pkg.path, pkg.device, "--input", pkg.x_file, "--output", out_file)
    assert printed(stdout, "device") == pkg.device
    assert printed(stdout, "inputs") == str(len(pkg.inputs))
    y_cpp = _as_tuple(torch.load(out_file))
    assert len(y_cpp) == len(pkg.eager) == int(printed(stdout, "outputs"))
    for k, (c, ref) in enumerate(zip(y_cpp, pkg.eager)):
        what = f"{pkg.case} output {k} on {pkg.device}"
        # The same compiled code as Python's aoti_load_package ran it (where Python can load it).
        if pkg.loaded is not None:
            assert_same(c, pkg.loaded[k], f"{what}: C++ vs the package in Python")
        else:
            print(f"{what}: not compared with Python's aoti_load_package: {pkg.loaded_why}")
        # Inductor fuses and reorders the plain-PyTorch parts (projections, states), so vs eager
        # the agreement is to float32 rounding; the op's own outputs come out unchanged.
        torch.testing.assert_close(c, ref, rtol=1e-5, atol=1e-6, msg=lambda m: f"{what} vs eager: {m}")
        assert printed(stdout, f"y[{k}] shape").startswith(f"{list(c.shape)} dtype: ")
        assert math.isclose(float(printed(stdout, f"y[{k}] sum")), c.double().sum().item(),
                            rel_tol=1e-12, abs_tol=1e-9)
    if pkg.case == "hstep":
        for c, ref in zip(y_cpp, pkg.eager):
            assert torch.equal(c, ref), "the H step through the package differs from eager"


@pytest.mark.parametrize("aoti_package", AOTI_PARAMS[:1], indirect=True)  # the layer on the CPU
def test_aoti_cpp_default_input(run_aoti, aoti_package, tmp_path):
    # Without --input, run_aoti makes torch::randn of the metadata's input_shapes after
    # torch::manual_seed(0): the same numbers as Python's generator.
    pkg = aoti_package
    stdout = run_example(run_aoti, pkg.path)  # device: the package's own
    assert printed(stdout, "device") == "cpu"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        x = tuple(torch.randn(t.shape) for t in pkg.inputs)
    torch.save(x, tmp_path / "x.pt")
    loaded, why = load_package_in_python(pkg.path, tmp_path / "x.pt", "cpu", tmp_path / "y.pt")
    got = float(printed(stdout, "y[0] sum"))
    if loaded is not None:  # the same compiled code in Python
        assert math.isclose(got, loaded[0].double().sum().item(), rel_tol=1e-9, abs_tol=1e-9)
    else:
        print(f"not compared with Python's aoti_load_package: {why}")
    with torch.no_grad():
        y = _as_tuple(pkg.model(*x))[0]  # eager: the package agrees with it to float32 rounding
    assert math.isclose(got, y.double().sum().item(), rel_tol=1e-5, abs_tol=1e-5)


@pytest.mark.parametrize("aoti_package", AOTI_PARAMS[:1], indirect=True)  # the layer on the CPU
def test_aoti_cpp_refuses_wrong_device_and_missing_op(run_aoti, aoti_package):
    pkg = aoti_package
    cmd = [str(run_aoti), mlstm_ext.library_path(), str(pkg.path), "cuda"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 2 and "compiled for cpu, not cuda" in r.stderr, r.stderr
    # Without the op library in the process (libc10 registers no mlstm op), loading the package
    # fails: the proxy executor looks the op up in the dispatcher.
    c10 = Path(torch.__file__).parent / "lib" / "libc10.so"
    cmd = [str(run_aoti), str(c10), str(pkg.path), "--input", str(pkg.x_file)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 1 and "Could not find schema for mlstm::" in r.stderr, r.stderr[-2000:]
