"""torch.ops.mlstm.recurrent_step (one generation step) and mlstm_ext.mlstm_step.

- S steps equal chunkwise_fw with chunk_size 1 (H and the last states), in float64, float32 and
  bfloat16, with and without initial states, m as (B, NH) or (B, NH, 1);
- against the float64 reference chain (states, then the H step) at chunk size 1, including the
  -10 floor of the stabiliser;
- gradients: gradcheck in float64, and against float64 autograd through test_autograd's
  independent step reference;
- hostile inputs: wrong shapes, dtypes, devices, scalars (same messages on meta and under
  torch.compile / torch.export), huge and non-finite gates, large m with eps = 0, zero sizes;
- torch.compile(fullgraph, dynamic), torch.export with a dynamic batch, torch.jit.trace, opcheck;
- CUDA: the same on the GPU against the CPU.
"""
import math

import pytest
import torch

import mlstm_ext
from conftest import BF16, F16, F32, F64, TOL, assert_close, requires_cuda
from mlstm_ext import reference as ref
from test_autograd import cotangents, grads_of, leaves, step_reference

step_op = torch.ops.mlstm.recurrent_step
NAN, INF = float("nan"), float("inf")


def make(B=2, NH=3, S=6, DHQK=5, DHHV=7, dtype=F32, init=True, seed=0, device="cpu", f_mean=3.0):
    """q, k, v, i ~ N(0, 1), f = f_mean + N(0, 1) (gates float32, float64 for float64), and
    random initial states (C, n ~ N(0, 1), m ~ N(0, 1)) or Nones."""
    g = torch.Generator().manual_seed(seed)
    gd = F64 if dtype == F64 else F32

    def randn(*shape, dt=F32):
        return torch.randn(*shape, generator=g, dtype=F64).to(dt).to(device)

    q, k = randn(B, NH, S, DHQK, dt=dtype), randn(B, NH, S, DHQK, dt=dtype)
    v = randn(B, NH, S, DHHV, dt=dtype)
    i, f = randn(B, NH, S, dt=gd), randn(B, NH, S, dt=gd) + f_mean
    st = (randn(B, NH, DHQK, DHHV, dt=gd), randn(B, NH, DHQK, dt=gd), randn(B, NH, dt=gd)) if init else (None,) * 3
    return (q, k, v, i, f), st


def run_steps(qkvif, st, m_keepdim=False, **kw):
    """The sequence one step at a time; returns (H, C, n, m) as chunkwise_fw's first four."""
    q, k, v, i, f = qkvif
    C, n, m = st
    if m is not None and m_keepdim:
        m = m[..., None]
    hs = []
    for t in range(q.shape[2]):
        h, C, n, m = step_op(q[:, :, t], k[:, :, t], v[:, :, t], i[:, :, t], f[:, :, t], C, n, m, **kw)
        hs.append(h)
    return torch.stack(hs, 2), C, n, m


@pytest.mark.parametrize("dtype", [F64, F32, BF16], ids=str)
@pytest.mark.parametrize("init", [False, True], ids=["zero-init", "init"])
@pytest.mark.parametrize("m_keepdim", [False, True], ids=["m(B,NH)", "m(B,NH,1)"])
def test_steps_equal_chunkwise_chunk_size_1(seed, dtype, init, m_keepdim):
    qkvif, st = make(dtype=dtype, init=init, seed=seed)
    H, C, n, m = run_steps(qkvif, st, m_keepdim)
    want = torch.ops.mlstm.chunkwise_fw(*qkvif, *st, chunk_size=1)
    cd = F64 if dtype == F64 else F32
    assert H.dtype == dtype and (C.dtype, n.dtype, m.dtype) == (cd, cd, cd)
    assert m.shape == ((2, 3, 1) if (m_keepdim and init) else (2, 3))
    tol = 1e-12 if dtype == F64 else 2e-5
    assert_close(H.to(F64), want[0].to(F64), tol if dtype != BF16 else 8e-3, "H")  # bf16: one rounding
    for name, a, b in zip(("C", "n", "m"), (C, n, m.reshape(2, 3)), want[1:4]):
        assert_close(a, b, tol, name)


@pytest.mark.parametrize("dtype,case", [(F32, "random"), (BF16, "random"), (F16, "random"),
                                        (F32, "floor"), (BF16, "floor"), (F64, "floor")], ids=str)
def test_vs_float64_chain(seed, dtype, case):
    """Against the float64 reference (states, then the H step) at chunk size 1. "floor": m and
    the gates far below -10, where the H step's stabiliser is floored at -10 (SPEC step 3) and
    the state's is not (H is then ~1e-12: below float16's range, so not in float16)."""
    qkvif, st = make(dtype=dtype, seed=seed)
    if case == "floor":
        q, k, v, i, f = qkvif
        qkvif = (q, k, v, i - 30.0, f - 6.0)
        st = (st[0], st[1], st[2] - 40.0)
    H, C, n, m = run_steps(qkvif, st)
    x64 = [t.to(F64) for t in qkvif]
    C_all, n_all, m_all = ref.recurrent_fw_states(*x64[1:], 1, *[t.to(F64) for t in st], compute_dtype=F64)
    H64, _, m_h = ref.parallel_fw_hintra_reference(*x64, C_all, n_all, m_all, chunk_size=1, compute_dtype=F64)
    if case == "floor":
        assert (m_h == ref.MINIMUM_MAX_VAL).float().mean() > 0.5  # the floor decides most rows
    S, DHQK = qkvif[0].shape[2], qkvif[0].shape[3]
    assert_close(H.to(F64), H64, TOL["cpu"][dtype][0] if dtype != F64 else 1e-12, "H")
    assert_close(C.to(F64), C_all[:, :, S * DHQK:], 2e-6, "C")
    assert_close(n.to(F64), n_all[:, :, S * DHQK:], 2e-6, "n")
    assert_close(m.to(F64), m_all[:, :, S], 1e-7, "m")


@pytest.mark.parametrize("init", [False, True], ids=["zero-init", "init"])
def test_gradcheck(seed, init):
    """Finite differences vs autograd in float64. The states are compared as C e^m, n e^m (the
    stabiliser carries no gradient by convention: test_autograd.py::test_gradcheck_exact says
    why); eps = 0 (eps is added to the stabilised denominator)."""
    (q, k, v, i, f), st = make(B=1, NH=2, S=1, DHQK=3, DHHV=4, dtype=F64, init=init, seed=seed)
    xs = [t[:, :, 0].clone().requires_grad_() for t in (q, k, v, i, f)]
    if init:
        xs += [st[0].clone().requires_grad_(), st[1].clone().requires_grad_()]
    m0 = st[2]

    def fn(*xs):
        C, n = (xs[5], xs[6]) if init else (None, None)
        h, C1, n1, m1 = step_op(*xs[:5], C, n, m0, eps=0.0)
        s = torch.exp(m1)
        return h, C1 * s[..., None, None], n1 * s[..., None]

    assert torch.autograd.gradcheck(fn, xs, eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("dtype", [F32, F64], ids=str)
def test_grads_vs_float64_step_reference(seed, dtype):
    """Every gradient (q, k, v, i, f, C0, n0) of a 4-step loss through H and the last states vs
    float64 autograd through test_autograd's independent step reference."""
    qkvif, st = make(B=2, NH=2, S=4, DHQK=5, DHHV=7, dtype=F32, seed=seed)
    xs = leaves(qkvif + st[:2], dtype)
    H, C, n, m = run_steps(tuple(xs[:5]), (xs[5], xs[6], st[2].to(dtype)))
    refs = leaves(qkvif + st[:2], F64)
    rH, rC, rn, rm = step_reference(*refs, st[2])
    assert_close(m, rm, 1e-6, "m")
    cots = cotangents((H, C, n), seed)
    got = grads_of((H, C, n), xs, cots)
    want = grads_of((rH, rC, rn), refs, cots)
    for name, g, w in zip(("q", "k", "v", "i", "f", "C0", "n0"), got, want):
        assert g is not None and g.dtype == dtype, name
        assert_close(g, w, 2e-5 if dtype == F32 else 1e-10, f"d{name}")


# ----------------------------------------------------------------------------------------------
# Hostile inputs


def one_step(dtype=F32, B=2, NH=3, DHQK=5, DHHV=7, seed=0):
    (q, k, v, i, f), (C, n, m) = make(B=B, NH=NH, S=1, DHQK=DHQK, DHHV=DHHV, dtype=dtype, seed=seed)
    return [q[:, :, 0], k[:, :, 0], v[:, :, 0], i[:, :, 0], f[:, :, 0], C, n, m]


BAD = {  # name: (mutate the argument list, expected message)
    "q rank": (lambda a: a.__setitem__(0, a[0][..., None]), r"vecQ must have 3 dims \(B, NH, DHQK\), got 4"),
    "k DHQK": (lambda a: a.__setitem__(1, a[1][..., :4]), r"vecK.size\(2\) must be DHQK \(vecQ.size\(2\)\) = 5, got 4"),
    "v batch": (lambda a: a.__setitem__(2, a[2][:1]), r"vecV.size\(0\) must be B = 2, got 1"),
    "k dtype": (lambda a: a.__setitem__(1, a[1].double()), r"vecK must have vecQ's dtype \(Float\), got Double"),
    "q int": (lambda a: a.__setitem__(0, a[0].int()), r"vecQ must be float32, bfloat16, float16 or float64"),
    "i shape": (lambda a: a.__setitem__(3, a[3][..., None, None]), r"scaI must have shape \(B, NH\) or \(B, NH, 1\), got 4 dims"),
    "f trailing": (lambda a: a.__setitem__(4, torch.stack([a[4], a[4]], -1)), r"scaF must have shape \(B, NH\) or \(B, NH, 1\), got \[2, 3, 2\]"),
    "f int": (lambda a: a.__setitem__(4, a[4].long()), r"scaF must be a floating tensor"),
    "C DHHV": (lambda a: a.__setitem__(5, a[5][..., :3]), r"matC.size\(3\) must be DHHV = 7, got 3"),
    "n rank": (lambda a: a.__setitem__(6, a[6][..., None]), r"vecN must have 3 dims \(B, NH, DHQK\), got 4"),
    "m heads": (lambda a: a.__setitem__(7, a[7][:, :2]), r"scaM.size\(1\) must be NH = 3, got 2"),
}


@pytest.mark.parametrize("name", BAD.keys())
@pytest.mark.parametrize("device", ["cpu", "meta"])
@pytest.mark.parametrize("op", ["recurrent_step", "_recurrent_step_fused"])
def test_bad_input_is_named(name, device, op):
    """The op and its fused-kernel op (which users may call too) share the checks and messages."""
    args = [t.to(device) for t in one_step()]
    mutate, msg = BAD[name]
    mutate(args)
    with pytest.raises(RuntimeError, match="recurrent_step: " + msg):
        getattr(torch.ops.mlstm, op)(*args)


@pytest.mark.parametrize("name", ["k DHQK", "i shape", "C DHHV"])
def test_compile_and_export_reject(name):
    args = one_step()
    mutate, msg = BAD[name]
    mutate(args)
    with pytest.raises(Exception, match=msg):
        torch.compile(lambda *a: step_op(*a), fullgraph=True)(*args)

    class M(torch.nn.Module):
        def forward(self, *a):
            return step_op(*a)

    with pytest.raises(Exception, match=msg):
        torch.export.export(M(), tuple(args))


def test_device_mismatch_is_named():
    args = one_step()
    args[5] = args[5].to("meta")
    with pytest.raises(RuntimeError, match=r"recurrent_step: matC must be on the same device as vecQ \(cpu\), got meta"):
        step_op(*args)


@pytest.mark.parametrize("name,value,match", [
    ("qk_scale", 1e39, "qk_scale must be finite"), ("qk_scale", INF, "qk_scale must be finite"),
    ("eps", -1e-6, r"eps must be finite and >= 0"), ("eps", 1e39, "eps must be finite"),
    ("eps", NAN, "eps must be finite")])
def test_bad_scalars(name, value, match):
    for op in (step_op, torch.ops.mlstm._recurrent_step_fused):
        with pytest.raises(RuntimeError, match="recurrent_step: " + match):
            op(*one_step(), **{name: value})
    step_op(*one_step(dtype=F64), qk_scale=1e39)  # fits float64: accepted


@pytest.mark.parametrize("f_big", [-1e12, -1e30, -1e38])
@pytest.mark.parametrize("dtype", [F32, BF16, F64], ids=str)
def test_huge_negative_forget_gate(seed, f_big, dtype):
    """A huge negative (finite) forget gate wipes the state: equal to chunkwise_fw at chunk size
    1, and to a step from zero states; the input gate still decides m."""
    args = one_step(dtype=dtype, seed=seed)
    args[4] = torch.full_like(args[4], f_big)
    h, C, n, m = step_op(*args)
    want = torch.ops.mlstm.chunkwise_fw(*[t[:, :, None] for t in args[:5]], *args[5:], chunk_size=1)
    assert_close(h.to(F64), want[0][:, :, 0].to(F64), 1e-5 if dtype != BF16 else 8e-3, "H")
    for name, a, b in zip(("C", "n", "m"), (C, n, m), want[1:4]):
        assert_close(a, b, 1e-6, name)
    assert torch.equal(m, args[3].to(m.dtype))
    fresh = step_op(*args[:5], None, None, torch.zeros_like(args[7]))
    for a, b in zip((C, n), fresh[1:3]):
        assert torch.equal(a, b)


def test_minus_inf_forget_gate_wipes_the_state(seed):
    """f = -inf (forget gate exactly 0): the state is dropped and every output is finite and the
    step from zero states (the chunkwise form's bg[t] - bg[t] would be NaN; SPEC.md)."""
    args = one_step(seed=seed)
    args[4][0, 1] = -INF
    outs = step_op(*args)
    fresh = step_op(*args[:5], torch.zeros_like(args[5]), torch.zeros_like(args[6]), torch.zeros_like(args[7]))
    for o, w in zip(outs, fresh):
        assert torch.isfinite(o).all()
        assert torch.equal(o[0, 1], w[0, 1])
        assert not torch.equal(o[1], w[1])  # other heads keep their states


@pytest.mark.parametrize("tensor,value", [("i", NAN), ("f", NAN), ("m", NAN), ("q", NAN), ("v", INF)])
def test_nonfinite_input_stays_in_its_head(seed, tensor, value):
    """A NaN gate or state poisons its own head's outputs (h and the states: m included, as a
    NaN gate makes m NaN in the chunkwise ops); every other head stays finite and unchanged."""
    args = one_step(seed=seed)
    clean = step_op(*args)
    idx = {"q": 0, "v": 2, "i": 3, "f": 4, "m": 7}[tensor]
    args[idx][1, 2] = value
    outs = step_op(*args)
    other = torch.ones(2, 3, dtype=torch.bool)
    other[1, 2] = False
    for o, c in zip(outs, clean):
        assert torch.equal(o[other], c[other])
    if tensor in ("i", "f", "m"):
        for o in outs:
            assert torch.isnan(o[1, 2]).all()
    else:  # q touches only h; an infinite v only h and C
        assert not torch.isfinite(outs[0][1, 2]).all()
        assert torch.equal(outs[2], clean[2]) and torch.equal(outs[3], clean[3])


@pytest.mark.parametrize("m_state", [87.5, 110.0, 300.0])
@pytest.mark.parametrize("dtype", [F32, BF16], ids=str)
def test_large_m_state_eps0(seed, m_state, dtype):
    """eps = 0 and m far above float32's exponent range: h still the float64 chain's (the scalars
    run in float64, so exp(-m) never underflows)."""
    (q, k, v, i, f), st = make(S=1, dtype=dtype, seed=seed, init=False, f_mean=10.0)
    i = torch.zeros_like(i)
    m0 = torch.full((2, 3), m_state)
    C0, n0 = torch.zeros(2, 3, 5, 7), torch.zeros(2, 3, 5)
    h = step_op(q[:, :, 0], k[:, :, 0], v[:, :, 0], i[:, :, 0], f[:, :, 0], C0, n0, m0, eps=0.0)[0]
    x64 = [t.to(F64) for t in (q, k, v, i, f)]
    C_all, n_all, m_all = ref.recurrent_fw_states(*x64[1:], 1, C0.double(), n0.double(), m0.double(), compute_dtype=F64)
    H64 = ref.parallel_fw_hintra_reference(*x64, C_all, n_all, m_all, chunk_size=1, eps=0.0, compute_dtype=F64)[0]
    assert_close(h.to(F64), H64[:, :, 0], TOL["cpu"][dtype][0], "H")


@pytest.mark.parametrize("sizes", [(0, 3, 5, 7), (2, 0, 5, 7), (2, 3, 0, 7), (2, 3, 5, 0)])
def test_zero_sizes(sizes):
    B, NH, DHQK, DHHV = sizes
    q, k = torch.randn(B, NH, DHQK), torch.randn(B, NH, DHQK)
    v, i, f = torch.randn(B, NH, DHHV), torch.randn(B, NH), torch.randn(B, NH)
    h, C, n, m = step_op(q, k, v, i, f)
    assert h.shape == (B, NH, DHHV) and C.shape == (B, NH, DHQK, DHHV) and n.shape == (B, NH, DHQK)
    assert torch.isfinite(h).all() and torch.isfinite(C).all() and torch.equal(m, torch.maximum(m, i))


def test_strided_inputs_and_state_dtypes(seed):
    """Transposed / sliced inputs and bf16 / float64 states give the contiguous float32 result."""
    args = one_step(seed=seed)
    want = step_op(*args)
    strided = [t.transpose(0, 1).contiguous().transpose(0, 1) for t in args]
    strided[2] = torch.cat([args[2], args[2]], -1)[..., :7]
    for a, b in zip(step_op(*strided), want):
        assert torch.equal(a, b)
    for dt in (BF16, F64):
        C, n, m = (t.to(dt) for t in args[5:])
        got = step_op(*args[:5], C, n, m)
        again = step_op(*args[:5], C.float(), n.float(), m.float())
        for a, b in zip(got, again):
            assert a.dtype == b.dtype and torch.equal(a, b)


# ----------------------------------------------------------------------------------------------
# torch.compile, torch.export, tracing, opcheck, the mlstm_kernels calling convention


class StepModule(torch.nn.Module):
    def forward(self, q, k, v, i, f, C, n, m):
        return step_op(q, k, v, i, f, C, n, m)


def compile_and_export(args, want, check):
    """torch.compile(fullgraph), static and dynamic, and torch.export with a dynamic batch give
    `want` (check(got, expected) per output); returns the exported program."""
    for dynamic in (False, True):
        got = torch.compile(lambda *a: step_op(*a), fullgraph=True, dynamic=dynamic)(*args)
        for a, b in zip(got, want):
            check(a, b)
    B = torch.export.Dim("B", min=1, max=64)
    ep = torch.export.export(StepModule(), tuple(args), dynamic_shapes=tuple({0: B} for _ in args))
    for a, b in zip(ep.module()(*[t[:1] for t in args]), want):
        check(a, b[:1])
    return ep


def test_compile_export_trace_opcheck(seed):
    args = one_step(seed=seed)
    want = step_op(*args)
    compile_and_export(args, want, torch.testing.assert_close)
    traced = torch.jit.trace(StepModule(), tuple(args))
    for a, b in zip(traced(*args), want):
        assert torch.equal(a, b)
    torch.library.opcheck(step_op.default, tuple(args))


def test_autocast_does_not_change_the_step(seed):
    """Under autocast the step still computes q C with the float32 state (the composite turns
    autocast off inside, as the kernel ops are unaffected by it): bitwise the result without."""
    args = one_step(seed=seed)
    want = step_op(*args)
    with torch.autocast("cpu", dtype=BF16):
        got = step_op(*args)
    for a, b in zip(got, want):
        assert a.dtype == b.dtype and torch.equal(a, b)


def test_mlstm_step_convention(seed):
    """mlstm_kernels' step-kernel convention: gates (B, NH, 1), m returned as (B, NH, 1), states
    in dtype_state; the same numbers as the op."""
    args = one_step(dtype=BF16, seed=seed)
    q, k, v, i, f, C, n, m = args
    h, (C1, n1, m1) = mlstm_ext.mlstm_step(q=q, k=k, v=v, i=i[..., None], f=f[..., None], c=C, n=n,
                                           m=m[..., None], eps=1e-6, dtype_state=F32, unused_option=1)
    want = step_op(*args)
    assert h.dtype == BF16 and m1.shape == (2, 3, 1)
    assert torch.equal(h, want[0]) and torch.equal(C1, want[1]) and torch.equal(n1, want[2])
    assert torch.equal(m1[..., 0], want[3])
    _, (C2, _, _) = mlstm_ext.mlstm_step(q, k, v, i, f, C, n, m, dtype_state=BF16)
    assert C2.dtype == BF16


@requires_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [F32, BF16, F16], ids=str)
def test_cuda_matches_cpu(seed, dtype):
    """The step on the GPU (the caller's stream, under autocast) against the CPU step."""
    args = one_step(dtype=dtype, seed=seed, DHQK=64, DHHV=96)
    want = step_op(*args)
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream), torch.autocast("cuda", dtype=BF16):
        got = step_op(*[t.cuda() for t in args])
    stream.synchronize()
    for a, b in zip(got, want):
        assert a.device.type == "cuda" and a.dtype == b.dtype
        assert_close(a.cpu().to(F64), b.to(F64), 1e-5 if dtype == F32 else 1e-2, "out")


def test_without_grad_the_fused_kernel_runs(seed):
    """No input needs a gradient: the composite calls the fused kernel's op (no ATen arithmetic in
    the profile) and gives its result bit for bit; inputs that require grad take the ATen path,
    whose values agree to rounding."""
    args = one_step(seed=seed, DHQK=32, DHHV=48)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        got = step_op(*args)
    names = {e.name for e in prof.events()}
    assert "mlstm::_recurrent_step_fused" in names and "aten::matmul" not in names, sorted(names)
    for a, b in zip(got, torch.ops.mlstm._recurrent_step_fused(*args)):
        assert torch.equal(a, b)
    with_grad = step_op(*[t.clone().requires_grad_() for t in args])
    for a, b in zip(with_grad, got):
        assert_close(a.detach().to(F64), b.to(F64), 1e-6, "ATen path vs fused")
