"""The op inside PyTorch's machinery: TorchScript (save, load in a fresh process), torch.compile,
torch.library.opcheck, and the Python wrapper's signature."""
import ast
import inspect
import os
import subprocess
import sys
import zipfile

import pytest
import torch

import mlstm_ext
from conftest import F32, F64, BF16, check_vs_reference, make_inputs, op, run_op

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class HintraModule(torch.nn.Module):
    """A scripted caller of the op, with non-default arguments."""

    def __init__(self, chunk_size: int):
        super().__init__()
        self.chunk_size = chunk_size

    def forward(self, q, k, v, i, f, C, n, m):
        h, vn, vm = torch.ops.mlstm.parallel_fw_hintra(
            q, k, v, i, f, C, n, m, qk_scale=0.3, chunk_size=self.chunk_size, eps=1e-5,
            output_dtype=torch.float64)
        return h * 2.0, vn, vm


CHILD = r"""
import sys, torch
import mlstm_ext  # registers torch.ops.mlstm
model = torch.jit.load(sys.argv[1])
args = torch.load(sys.argv[2])
torch.save(model(*args), sys.argv[3])
"""


def test_torchscript_fresh_process(make, tmp_path):
    inp = make(B=2, S=96, L=32, DHQK=24, DHHV=40)
    scripted = torch.jit.script(HintraModule(inp.L))
    expected = scripted(*inp.args())
    # the scripted module computes what the op does
    direct = run_op(inp, qk_scale=0.3, eps=1e-5, output_dtype=F64)
    assert torch.equal(expected[0], direct[0] * 2.0) and torch.equal(expected[1], direct[1])

    scripted.save(str(tmp_path / "m.pt"))
    torch.save(inp.args(), tmp_path / "args.pt")
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    res = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path / "m.pt"), str(tmp_path / "args.pt"),
                          str(tmp_path / "out.pt")], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    got = torch.load(tmp_path / "out.pt")
    assert len(got) == 3
    for a, b in zip(expected, got):
        assert a.dtype == b.dtype and torch.isfinite(b).all() and torch.equal(a, b)


def _fn(q, k, v, i, f, C, n, m):
    h, vn, vm = torch.ops.mlstm.parallel_fw_hintra(q * 1.0, k, v, i, f, C, n, m, chunk_size=32)
    return h + 1.0, vn.sqrt(), vm


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_compile_fullgraph(make, backend):
    torch._dynamo.reset()
    inp = make(B=2, S=96, L=32, DHQK=24, DHHV=40)
    compiled = torch.compile(_fn, backend=backend, fullgraph=True)
    for a, b in zip(_fn(*inp.args()), compiled(*inp.args())):
        assert torch.isfinite(b).all() and torch.equal(a, b)


def test_compile_dynamic_shapes(make):
    """The fake kernel gives the right shapes for symbolic sizes: two sequence lengths, one graph
    family, each result equal to eager."""
    torch._dynamo.reset()
    compiled = torch.compile(_fn, backend="aot_eager", fullgraph=True, dynamic=True)
    for S, DHHV in [(64, 40), (160, 24)]:
        inp = make(B=1, S=S, L=32, DHQK=16, DHHV=DHHV)
        out = compiled(*inp.args())
        assert out[0].shape == (1, 2, S, DHHV) and out[1].shape == (1, 2, S)
        for a, b in zip(_fn(*inp.args()), out):
            assert torch.equal(a, b)


def test_compile_inductor(make):
    torch._dynamo.reset()
    inp = make(B=2, S=96, L=32, DHQK=24, DHHV=40)
    compiled = torch.compile(_fn, fullgraph=True)  # default backend: inductor
    for a, b in zip(_fn(*inp.args()), compiled(*inp.args())):
        assert torch.isfinite(b).all()
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kw", [
    dict(dtype=F32, L=32, DHQK=24, DHHV=40, op_kw=dict()),
    dict(dtype=BF16, L=16, DHQK=8, DHHV=8, op_kw=dict(qk_scale=0.5, eps=1e-4, output_dtype=F64, siz_b_DHHV=16)),
])
def test_opcheck(seed, kw):
    kw = dict(kw)
    op_kw = kw.pop("op_kw")
    inp = make_inputs(B=2, S=64, seed=seed, **kw)
    torch.library.opcheck(torch.ops.mlstm.parallel_fw_hintra.default, inp.args(),
                          dict(chunk_size=inp.L, **op_kw))


# mlstm_kernels' torch mlstm_chunkwise__parallel_fw_Hintra, with our state names (SPEC) and
# output_dtype=None standing for float32.
EXPECTED_SIGNATURE = [
    ("matQ", inspect.Parameter.empty), ("matK", inspect.Parameter.empty),
    ("matV", inspect.Parameter.empty), ("vecI", inspect.Parameter.empty),
    ("vecF", inspect.Parameter.empty), ("matC_all", inspect.Parameter.empty),
    ("vecN_all", inspect.Parameter.empty), ("scaM_all", inspect.Parameter.empty),
    ("qk_scale", None), ("chunk_size", 64), ("siz_b_LQ", 32), ("siz_b_LKV", 32),
    ("siz_b_DHQK", None), ("siz_b_DHHV", None), ("num_warps", None), ("num_stages", None),
    ("eps", 1e-6), ("output_dtype", None),
]
REFERENCE_STATE_NAMES = {"matC_states": "matC_all", "vecN_states": "vecN_all", "scaMinter_states": "scaM_all"}


def test_wrapper_signature():
    assert mlstm_ext.mlstm_chunkwise__parallel_fw_Hintra is mlstm_ext.parallel_fw_hintra
    params = inspect.signature(mlstm_ext.parallel_fw_hintra).parameters.values()
    assert [(p.name, p.default) for p in params] == EXPECTED_SIGNATURE
    assert all(p.kind == inspect.Parameter.POSITIONAL_OR_KEYWORD for p in params)
    # the op's schema: same names, order and defaults
    schema = torch.ops.mlstm.parallel_fw_hintra.default._schema
    assert [a.name for a in schema.arguments] == [n for n, _ in EXPECTED_SIGNATURE]
    for a, (_, default) in zip(schema.arguments, EXPECTED_SIGNATURE):
        assert a.default_value == (None if default is inspect.Parameter.empty else default)
    assert [r.name for r in schema.returns] == ["matH", "vecN", "vecM"]


def test_signature_matches_mlstm_kernels_wheel():
    """Read the reference function's signature from the mlstm_kernels wheel (source only; nothing
    is imported), when the wheel is in the checkout."""
    wheels = [os.path.join(REPO, ".whl", w) for w in os.listdir(os.path.join(REPO, ".whl"))
              if w.startswith("mlstm_kernels")] if os.path.isdir(os.path.join(REPO, ".whl")) else []
    if not wheels:
        pytest.skip("no mlstm_kernels wheel in .whl/")
    with zipfile.ZipFile(wheels[0]) as z:
        src = z.read("mlstm_kernels/torch/chunkwise/triton_xl_chunk/fw_parallel.py").decode()
    fn = next(node for node in ast.walk(ast.parse(src))
              if isinstance(node, ast.FunctionDef) and node.name == "mlstm_chunkwise__parallel_fw_Hintra")
    names = [REFERENCE_STATE_NAMES.get(a.arg, a.arg) for a in fn.args.args]
    defaults = [ast.unparse(d) for d in fn.args.defaults]
    ours = [(p.name, p.default) for p in inspect.signature(mlstm_ext.parallel_fw_hintra).parameters.values()]
    assert names == [n for n, _ in ours]
    expected_defaults = [repr(d) for _, d in ours[len(ours) - len(defaults):]]
    expected_defaults[-1] = "torch.float32"  # ours: None, meaning float32
    assert defaults == expected_defaults


@pytest.mark.parametrize("out_dtype", [None, F32, F64, BF16], ids=str)
def test_positional_call_and_dtypes(make, out_dtype):
    inp = make(S=96, L=32, DHQK=24, DHHV=40, dtype=BF16)
    pos = (None, inp.L, 32, 32, None, None, None, None, 1e-6, out_dtype)
    a = op(*inp.args(), *pos)
    b = mlstm_ext.parallel_fw_hintra(*inp.args(), *pos)
    c = run_op(inp, output_dtype=out_dtype)
    want = F32 if out_dtype is None else out_dtype
    assert a[0].dtype == BF16 and a[1].dtype == want and a[2].dtype == want
    for x, y, z in zip(a, b, c):
        assert torch.equal(x, y) and torch.equal(x, z)
    check_vs_reference(inp, out_dtype=out_dtype)


def test_library_path_and_flags():
    assert os.path.isfile(mlstm_ext.library_path())
    assert isinstance(mlstm_ext.has_cuda_kernels(), bool)
    if torch.cuda.is_available():
        assert mlstm_ext.has_cuda_kernels(), "a GPU is present but the library has no CUDA kernels"
