"""The generation step's fused CUDA kernel (torch.ops.mlstm._recurrent_step_fused), which
recurrent_step runs on CUDA when no input needs a gradient.

- against the float64 step chain (states, then the H step at chunk size 1) for every dtype, with
  and without states, odd sizes (DHHV not a multiple of the 64-column tile or of 4), outputs in
  NaN-poisoned memory, on a side stream;
- one kernel launch per step; with inputs that require grad, the ATen path (gradients equal the
  CPU's);
- the state's layouts: transposed, misaligned (scalar loads) and bf16 / float64 states;
- hostile inputs as on the CPU (huge and infinite forget gates, a NaN in one head, large m with
  eps = 0, zero sizes, mismatched devices), each compared with the CPU step;
- torch.compile(fullgraph), torch.export (the fused op in the graph) and opcheck of the fused op.
"""
import pytest
import torch

from conftest import BF16, F16, F32, F64, assert_close, poison_allocator, requires_cuda
from mlstm_ext import reference as ref
from test_step import compile_and_export, one_step

pytestmark = [requires_cuda, pytest.mark.cuda]

step_op = torch.ops.mlstm.recurrent_step
fused_op = torch.ops.mlstm._recurrent_step_fused
NAN, INF = float("nan"), float("inf")


def cuda(args):
    return [t.cuda() if isinstance(t, torch.Tensor) else t for t in args]


def step_reference(args, eps=1e-6):
    """One step in float64 through the chunkwise reference (states, then the H step, L = 1)."""
    q, k, v, i, f, C, n, m = (None if t is None else t.cpu().to(F64) for t in args)
    B, NH, DHQK = q.shape
    C = torch.zeros(B, NH, DHQK, v.shape[-1], dtype=F64) if C is None else C
    n = torch.zeros(B, NH, DHQK, dtype=F64) if n is None else n
    m = torch.zeros(B, NH, dtype=F64) if m is None else m.reshape(B, NH)
    x = [t[:, :, None] for t in (q, k, v, i, f)]
    C_all, n_all, m_all = ref.recurrent_fw_states(*x[1:], 1, C, n, m, compute_dtype=F64)
    h = ref.parallel_fw_hintra_reference(*x, C_all, n_all, m_all, chunk_size=1, eps=eps, compute_dtype=F64)[0]
    return h[:, :, 0], C_all[:, :, DHQK:], n_all[:, :, DHQK:], m_all[:, :, 1]


def like_cpu(args, **kw):
    """The CUDA step and the CPU step on the same inputs: same NaN / inf pattern, values close."""
    want = step_op(*args, **kw)
    got = step_op(*cuda(args), **kw)
    for name, a, b in zip(("h", "C", "n", "m"), got, want):
        assert a.device.type == "cuda" and a.dtype == b.dtype and a.shape == b.shape, name
        a = a.cpu().to(F64)
        b = b.to(F64)
        assert torch.equal(torch.isnan(a), torch.isnan(b)), f"{name}: NaN pattern differs"
        assert torch.equal(torch.isinf(a), torch.isinf(b)), f"{name}: inf pattern differs"
        fin = torch.isfinite(b)
        tol = 1e-2 if name == "h" and args[0].dtype in (BF16, F16) else 1e-5
        if fin.any():
            assert_close(a[fin], b[fin], tol, name)
    return got


SHAPES = [(2, 3, 5, 7), (2, 4, 64, 96), (1, 8, 256, 512), (3, 2, 33, 130)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [F32, BF16, F16], ids=str)
@pytest.mark.parametrize("init", [True, False], ids=["states", "no-states"])
def test_fused_vs_float64(seed, shape, dtype, init):
    B, NH, DHQK, DHHV = shape
    args = one_step(dtype=dtype, B=B, NH=NH, DHQK=DHQK, DHHV=DHHV, seed=seed)
    if not init:
        args[5:] = [None, None, None]
    want = step_reference(args)
    poison_allocator("cuda", 4 * B * NH * DHQK * DHHV + 4096)
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        got = step_op(*cuda(args))
    stream.synchronize()
    tol_h = {F32: 1e-5, BF16: 1e-2, F16: 2e-3}[dtype]
    assert got[0].dtype == dtype and all(t.dtype == F32 for t in got[1:])
    for name, a, b, tol in zip(("h", "C", "n", "m"), got, want, (tol_h, 1e-6, 1e-6, 1e-6)):
        assert_close(a.cpu().to(F64), b, tol, name)


def test_one_launch_and_m_shape(seed):
    """No input needs a gradient: the step is one kernel; m keeps a (B, NH, 1) shape."""
    args = cuda(one_step(dtype=BF16, B=2, NH=4, DHQK=64, DHHV=128, seed=seed))
    args[7] = args[7][..., None]
    step_op(*args)  # warm up
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        h, C, n, m = step_op(*args)
        torch.cuda.synchronize()
    kernels = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    assert len(kernels) == 1 and "step_kernel" in kernels[0], kernels
    assert m.shape == (2, 4, 1)
    for a, b in zip((h, C, n, m), fused_op(*args)):
        assert torch.equal(a, b)


def test_requires_grad_takes_the_aten_path(seed):
    """With inputs that require grad the step runs its ATen ops (the fused kernel has no backward):
    gradients equal the CPU's, and the values the fused kernel's."""
    args = one_step(seed=seed, B=2, NH=3, DHQK=16, DHHV=24)
    outs = {}
    for dev in ("cpu", "cuda"):
        x = [t.detach().to(dev).requires_grad_() for t in args]
        y = step_op(*x)
        loss = sum((o * torch.linspace(-1, 1, o.numel(), device=dev).reshape(o.shape)).sum() for o in y)
        outs[dev] = (y, torch.autograd.grad(loss, x, allow_unused=True))
    for j, (a, b) in enumerate(zip(outs["cuda"][1], outs["cpu"][1])):
        if j == 7:  # m: a stabiliser, no gradient (SPEC.md)
            assert a is None and b is None
        else:
            assert_close(a.cpu().to(F64), b.to(F64), 1e-5, f"grad {j}")
    with torch.no_grad():
        fused = step_op(*cuda(args))
    for a, b in zip(outs["cuda"][0], fused):
        assert_close(a.detach().to(F64), b.to(F64), 1e-5, "value")
    bad = cuda(args)
    bad[0].requires_grad_()
    with pytest.raises(RuntimeError, match=r"_recurrent_step_fused: this op has no backward, but vecQ require grad\."):
        fused_op(*bad)


def test_state_layouts(seed):
    """Transposed and misaligned states (the kernel's scalar loads) and bf16 / float64 states give
    the contiguous float32 state's result."""
    args = cuda(one_step(seed=seed, B=2, NH=3, DHQK=32, DHHV=72))
    want = step_op(*args)
    C = args[5]
    transposed = C.transpose(-1, -2).contiguous().transpose(-1, -2)
    wide = torch.empty(*C.shape[:-1], C.shape[-1] + 1, device="cuda")
    wide[..., 1:] = C
    for C2 in (transposed, wide[..., 1:]):
        for a, b in zip(step_op(*args[:5], C2, *args[6:]), want):
            assert torch.equal(a, b)
    for dt in (BF16, F64):
        got = step_op(*args[:5], *(t.to(dt) for t in args[5:]))
        again = step_op(*args[:5], *(t.to(dt).float() for t in args[5:]))
        for a, b in zip(got, again):
            assert a.dtype == b.dtype and torch.equal(a, b)


@pytest.mark.parametrize("case", ["f -1e30", "f -1e38", "f -inf", "f +inf", "i NaN", "f NaN", "m NaN",
                                  "q NaN", "v inf", "i 80", "m 300 eps 0"])
def test_hostile_like_cpu(seed, case):
    args = one_step(seed=seed, B=2, NH=3, DHQK=20, DHHV=70)
    kw = {}
    what, value = case.split()[:2]
    idx = {"q": 0, "v": 2, "i": 3, "f": 4, "m": 7}[what]
    if what in ("f",) and value in ("-1e30", "-1e38"):
        args[idx] = torch.full_like(args[idx], float(value))
    else:
        args[idx][1, 2] = float(value)
    if case.endswith("eps 0"):
        kw["eps"] = 0.0
    got = like_cpu(args, **kw)
    if what in ("i", "f", "m") and value.lower() == "nan":
        for o in got:
            assert torch.isnan(o[1, 2]).all()
        other = torch.ones(2, 3, dtype=torch.bool)
        other[1, 2] = False
        for o in got:
            assert torch.isfinite(o[other.cuda()]).all()


@pytest.mark.parametrize("m_state", [110.0, 300.0])
def test_large_m_zero_state_eps0(seed, m_state):
    """eps = 0, m far above float32's exponent range and a zero state: g / den (~e^m) passes
    float32's range while q C is exactly 0; h must stay finite (the kernel combines in float64)."""
    args = one_step(seed=seed, B=2, NH=3, DHQK=20, DHHV=70)
    args[3] = torch.zeros_like(args[3])
    args[5], args[6] = torch.zeros_like(args[5]), torch.zeros_like(args[6])
    args[7] = torch.full_like(args[7], m_state)
    h = like_cpu(args, eps=0.0)[0]
    assert torch.isfinite(h).all()


@pytest.mark.parametrize("sizes", [(0, 3, 5, 7), (2, 0, 5, 7), (2, 3, 0, 7), (2, 3, 5, 0)])
def test_zero_sizes(sizes):
    B, NH, DHQK, DHHV = sizes
    x = [torch.randn(B, NH, DHQK), torch.randn(B, NH, DHQK), torch.randn(B, NH, DHHV),
         torch.randn(B, NH), torch.randn(B, NH)]
    h, C, n, m = like_cpu(x + [None, None, None])
    assert h.shape == (B, NH, DHHV) and C.shape == (B, NH, DHQK, DHHV) and m.shape == (B, NH)


def test_device_mismatch_is_named(seed):
    args = cuda(one_step(seed=seed))
    args[5] = args[5].cpu()
    with pytest.raises(RuntimeError, match=r"recurrent_step: matC must be on the same device as vecQ \(cuda:0\), got cpu"):
        step_op(*args)


def test_compile_export_opcheck(seed):
    args = cuda(one_step(dtype=BF16, seed=seed, B=2, NH=3, DHQK=32, DHHV=40))
    want = step_op(*args)

    def same(a, b):
        assert torch.equal(a, b)

    ep = compile_and_export(args, want, same)  # the fused op's Meta kernel, symbolic batch
    assert "mlstm.recurrent_step" in str(ep.graph)  # a custom composite stays whole in export
    decomposed = ep.run_decompositions()  # as AOTInductor lowers it: the fused op, no ATen ops
    assert "mlstm._recurrent_step_fused" in str(decomposed.graph), str(decomposed.graph)
    for program in (ep, decomposed):
        for a, b in zip(program.module()(*[t[:1] for t in args]), want):
            assert torch.equal(a, b[:1])
    torch.library.opcheck(fused_op.default, tuple(args))
