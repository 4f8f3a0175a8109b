"""Hostile inputs (issue 13): extreme gates and states, NaN and Inf, scalars that do not fit the
compute type, states made for another chunk size, huge chunks, 16-bit states; and float64 inputs
on the CPU.

Every test runs on the CPU (its AVX2 build and, where the code path matters, its portable SSE2
build) and on CUDA when a GPU is present, with the same expectation: the float64 evaluation of
SPEC's arithmetic (``mlstm_ext.reference``) within the accuracy of a float32 evaluation, NaN and
Inf exactly where a plain evaluation has them, or the same clear RuntimeError.
"""
import json
import math
import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch

from conftest import BF16, F16, F32, F64, TOL, errors, op, requires_cuda
from mlstm_ext.reference import parallel_fw_hintra_reference, recurrent_fw_states

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEVICES = ["cpu", pytest.param("cuda", marks=requires_cuda)]
INF, NAN = float("inf"), float("nan")


@pytest.fixture(params=["cpu", "cpu-portable", pytest.param("cuda", marks=requires_cuda)])
def device(request, monkeypatch):
    """Where the op runs: the CPU kernel's default (AVX2) build, its portable build, CUDA."""
    if request.param == "cpu-portable":
        monkeypatch.setenv("MLSTM_EXT_CPU_PORTABLE", "1")
        return "cpu"
    return request.param


def skip_f64_on_cuda(device, dtype):
    if dtype == F64 and device != "cpu":
        pytest.skip("float64 inputs are a CPU-only case")


# ----------------------------------------------------------------------------------------------
# Inputs and checks


def build(seed, S=64, L=16, DHQK=16, DHHV=24, B=1, NH=2, dtype=F32, i=None, f=None,
          states="recurrent", m_state=None):
    """Random q, k, v (N(0, 1), rounded to dtype) on the CPU; gates i, f given as (B, NH, S)
    tensors or N(0, 1) and 3 + N(0, 1); states from the float64 recurrent step on these gates
    (from random initial states), or zero C and n with scaM_all = m_state ("zero")."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=F64)

    q, k = randn(B, NH, S, DHQK).to(dtype), randn(B, NH, S, DHQK).to(dtype)
    v = randn(B, NH, S, DHHV).to(dtype)
    i = randn(B, NH, S) if i is None else i
    f = 3.0 + randn(B, NH, S) if f is None else f
    i, f = i.to(F32), f.to(F32)
    NC = S // L
    if states == "zero":
        C = torch.zeros(B, NH, (NC + 1) * DHQK, DHHV)
        n = torch.zeros(B, NH, (NC + 1) * DHQK)
        m = torch.full((B, NH, NC + 1), float(m_state)) if not torch.is_tensor(m_state) else m_state
    else:
        init = (randn(B, NH, DHQK, DHHV), randn(B, NH, DHQK), randn(B, NH))
        C, n, m = recurrent_fw_states(k, v, i, f, L, *init, compute_dtype=F64)
        sd = F64 if dtype == F64 else F32
        C, n, m = C.to(sd), n.to(sd), m.to(sd)
    if dtype == F64:
        i, f = i.to(F64), f.to(F64)
    return [q, k, v, i, f, C, n, m]


def to(args, device):
    return [t.to(device) for t in args]


def run(args, device, L, **kw):
    if args[0].dtype == F64:  # float64 inputs: vecN / vecM in float64 too (unless asked otherwise)
        kw.setdefault("output_dtype", F64)
    return op(*to(args, device), chunk_size=L, **kw)


def reference(args, L, **kw):
    return parallel_fw_hintra_reference(*[t.cpu() for t in args], chunk_size=L,
                                        compute_dtype=F64, **kw)


def tol_for(device, dtype):
    """(matH, vecN/vecM) relative-norm tolerances: conftest's, or float64's own accuracy."""
    if dtype == F64:
        return (1e-12, 1e-12)
    return TOL[torch.device(device).type][dtype]


def assert_like(out, ref, tol, name):
    """out matches ref: NaN, +Inf and -Inf at the same places; the finite values within tol
    (relative norm)."""
    o, r = out.detach().cpu().double(), ref.detach().cpu().double()
    assert o.shape == r.shape, f"{name}: shape {tuple(o.shape)} != {tuple(r.shape)}"
    for what, fn in (("NaN", torch.isnan), ("+Inf", lambda x: x == INF), ("-Inf", lambda x: x == -INF)):
        om, rm = fn(o), fn(r)
        if not torch.equal(om, rm):
            bad = (om != rm).nonzero()
            raise AssertionError(f"{name}: {what} differs from the reference at {bad.shape[0]} places, "
                                 f"first {bad[0].tolist()}: got {o[tuple(bad[0])].item()}, "
                                 f"reference {r[tuple(bad[0])].item()}")
    fin = torch.isfinite(r)
    rel, mx = errors(o[fin], r[fin])
    assert rel <= tol, f"{name}: relative-norm error {rel:.3g} > {tol:.3g} (max abs err {mx:.3g})"


def check(outs, refs, device, dtype, tol=None):
    tol_h, tol_nm = tol_for(device, dtype) if tol is None else tol
    for o, r, name, t in zip(outs, refs, ("matH", "vecN", "vecM"), (tol_h, tol_nm, tol_nm)):
        assert_like(o, r, t, name)


# ----------------------------------------------------------------------------------------------
# 1. Huge negative forget gates must not lose the input gate.


def test_huge_negative_forget_gate_issue_case(device):
    """The issue's case: f = -1e30, i = -3, q = k = 0.1, v = 1, zero states, S = 2, chunk 2."""
    args = [torch.full((1, 1, 2, 1), 0.1), torch.full((1, 1, 2, 1), 0.1), torch.ones(1, 1, 2, 1),
            torch.full((1, 1, 2), -3.0), torch.full((1, 1, 2), -1e30),
            torch.zeros(1, 1, 2, 1), torch.zeros(1, 1, 2), torch.zeros(1, 1, 2)]
    outs, refs = run(args, device, 2), reference(args, 2)
    assert (refs[2] == -3.0).all()  # the input gate decides m (the bug gave 0)
    check(outs, refs, device, F32)


@pytest.mark.parametrize("dtype", [F32, BF16, F64], ids=str)
@pytest.mark.parametrize("f_big", [-1e12, -1e30, -1e38])
@pytest.mark.parametrize("where", ["all", "some"])
@pytest.mark.parametrize("L", [32, 128])  # on Hopper, 16-bit L = 128 runs the wgmma kernel
def test_huge_negative_forget_gates(device, seed, dtype, f_big, where, L):
    # The CUDA kernels once lost the ordinary gates beside huge ones (float32 prefix sums); they
    # now clamp at -1e6 and sum in float64 like the CPU (H200, 2026-11-28: every case passes).
    skip_f64_on_cuda(device, dtype)
    gen = torch.Generator().manual_seed(seed)
    B, NH, S = 2, 2, 2 * L
    f = 3.0 + torch.randn(B, NH, S, generator=gen)
    mask = torch.rand(B, NH, S, generator=gen) < (1.0 if where == "all" else 0.3)
    f = torch.where(mask, torch.full_like(f, f_big), f)
    i = 3.0 * torch.randn(B, NH, S, generator=gen)
    args = build(seed, S=S, L=L, B=B, NH=NH, DHQK=24, DHHV=40, dtype=dtype, i=i, f=f)
    check(run(args, device, L), reference(args, L), device, dtype)


# ----------------------------------------------------------------------------------------------
# 2. eps = 0 with a large m state: exponentials below -87 must not flush the result to 0 or NaN.


@pytest.mark.parametrize("dtype", [F32, BF16, F64], ids=str)
@pytest.mark.parametrize("m_state", [86.0, 87.5, 95.0, 110.0, 130.0])
@pytest.mark.parametrize("L", [16, 64])
def test_large_m_state_eps0(device, seed, dtype, m_state, L):
    """The issue's case: C = n = 0, i = 0, f = 10, m = m_state, eps = 0; vecN in float64 (its
    value e^-m is below float32's range) and in float32."""
    skip_f64_on_cuda(device, dtype)
    B, NH, S = 1, 2, 4 * L
    args = build(seed, S=S, L=L, B=B, NH=NH, DHQK=32, DHHV=16, dtype=dtype,
                 i=torch.zeros(B, NH, S), f=torch.full((B, NH, S), 10.0), states="zero", m_state=m_state)
    refs = reference(args, L, eps=0.0)
    assert (refs[1] < 1e-30).all()  # the regime of the issue: den far below float32's normal range
    outs = run(args, device, L, eps=0.0, output_dtype=F64)
    checked = outs
    if device == "cuda" and m_state > 100:
        # The CUDA kernels hold den in float32 (the CPU kernel in float64): below float32's
        # range (e^-m < 1.4e-45) vecN reads 0, while H and vecM stay right.
        assert (outs[1] >= 0).all() and (outs[1] <= 1.5e-45).all()
        checked = (outs[0], refs[1], outs[2])
    check(checked, refs, device, dtype)
    matH, vecN, vecM = run(args, device, L, eps=0.0, output_dtype=F32)  # the same, rounded
    assert torch.equal(matH, outs[0])
    assert torch.equal(vecN, outs[1].float()) and torch.equal(vecM, outs[2].float())


@pytest.mark.parametrize("dtype", [F32, BF16, F64], ids=str)
@pytest.mark.parametrize("eps", [0.0, 1e-6])
def test_large_m_state_random(device, seed, dtype, eps):
    """Zero C, n and random large m states (80..140) with random gates."""
    skip_f64_on_cuda(device, dtype)
    gen = torch.Generator().manual_seed(seed)
    B, NH, S, L = 2, 2, 256, 32
    m_state = 80.0 + 60.0 * torch.rand(B, NH, S // L + 1, generator=gen)
    args = build(seed, S=S, L=L, B=B, NH=NH, DHQK=32, DHHV=48, dtype=dtype, states="zero",
                 m_state=m_state)
    refs = reference(args, L, eps=eps)
    check(run(args, device, L, eps=eps, output_dtype=F64), refs, device, dtype)


@pytest.mark.parametrize("case", ["huge_forget", "large_m_eps0", "nan_gate", "nan_v"])
@pytest.mark.parametrize("L", [64, 128])
def test_wide_heads_hostile(device, seed, case, L):
    """xLSTM-7B's DHQK (256): on an H100 / H200, 16-bit inputs run the Hopper kernel's wide-head
    layout (K in parts, one shared region); the hostile cases above at that width: huge negative
    forget gates, zero states under m = 110 with eps = 0, a NaN gate, a NaN row of v."""
    B, NH, S, DHQK, DHHV = 1, 2, 2 * L, 256, 128
    gen = torch.Generator().manual_seed(seed)
    i, f, states, m_state, eps = 3.0 * torch.randn(B, NH, S, generator=gen), None, "recurrent", None, 1e-6
    if case == "huge_forget":
        f = torch.where(torch.rand(B, NH, S, generator=gen) < 0.3, torch.full((B, NH, S), -1e30),
                        3.0 + torch.randn(B, NH, S, generator=gen))
    elif case == "large_m_eps0":
        i, f, states, m_state, eps = torch.zeros(B, NH, S), torch.full((B, NH, S), 10.0), "zero", 110.0, 0.0
    args = build(seed, S=S, L=L, B=B, NH=NH, DHQK=DHQK, DHHV=DHHV, dtype=BF16, i=i, f=f, states=states,
                 m_state=m_state)
    refs = reference(args, L, eps=eps)
    if case == "nan_gate":
        args[3][:, 0, L + 5] = NAN
        refs = reference(args, L, eps=eps)
    elif case == "nan_v":  # rows from r on in its chunk turn NaN, the rest keeps the clean values
        r = L + 7
        args[2][:, 1, r] = NAN
        matH = run(args, device, L, eps=eps, output_dtype=F64)[0]
        keep = torch.ones(S, dtype=torch.bool)
        keep[r:2 * L] = False
        assert_like(matH[:, 0], refs[0][:, 0], tol_for(device, BF16)[0], "matH, the other head")
        assert_like(matH[:, 1, keep], refs[0][:, 1, keep], tol_for(device, BF16)[0], "matH, clean rows")
        assert (~torch.isfinite(matH[:, 1, ~keep])).all()
        return
    outs = run(args, device, L, eps=eps, output_dtype=F64)
    checked = outs
    if device == "cuda" and case == "large_m_eps0":  # vecN below float32's range reads 0 on CUDA
        checked = (outs[0], refs[1], outs[2])
    check(checked, refs, device, BF16)


# ----------------------------------------------------------------------------------------------
# 3. qk_scale and eps must fit the compute type.

SMALL = dict(S=8, L=4, DHQK=4, DHHV=5, B=2, NH=3)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [F32, BF16, F16], ids=str)
@pytest.mark.parametrize("name,value", [("qk_scale", 1e39), ("qk_scale", -1e39), ("qk_scale", 1e300),
                                        ("eps", 1e39), ("eps", 1e300)])
def test_scalar_too_large_for_float32(device, seed, dtype, name, value):
    args = build(seed, dtype=dtype, **SMALL)
    with pytest.raises(RuntimeError, match=rf"parallel_fw_hintra: {name}\b"):
        run(args, device, 4, **{name: value})


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [F32, BF16], ids=str)
def test_large_scalars_that_fit_are_accepted(device, seed, dtype):
    """eps = 1e30 and qk_scale = 1e-30 fit float32: accepted, and computed as the reference."""
    args = build(seed, dtype=dtype, **SMALL)
    for kw in (dict(eps=1e30), dict(qk_scale=1e-30), dict(qk_scale=3e38, eps=1e-6)):
        outs = run(args, device, 4, **kw)
        if "qk_scale" in kw and kw["qk_scale"] > 1:
            continue  # q.k * 3e38 overflows float32, like a float32 evaluation: accepted is enough
        check(outs, reference(args, 4, **kw), device, dtype)


def test_large_scalars_fit_float64(seed):
    """float64 inputs compute in float64: qk_scale = 1e39 and eps = 1e39 fit."""
    args = build(seed, dtype=F64, **SMALL)
    for kw in (dict(qk_scale=1e39), dict(eps=1e39)):
        check(run(args, "cpu", 4, **kw), reference(args, 4, **kw), "cpu", F64)


# ----------------------------------------------------------------------------------------------
# 4. A NaN gate makes vecM NaN too, from its row on; infinite gates as a plain evaluation.


@pytest.mark.parametrize("dtype", [F32, BF16, F64], ids=str)
@pytest.mark.parametrize("gate,value", [("i", NAN), ("f", NAN), ("f", -INF), ("i", INF), ("i", -INF),
                                        ("f", INF), ("m", NAN), ("m", INF), ("m", -INF)])
@pytest.mark.parametrize("row", [0, 3, 13])
def test_nonfinite_gates(device, seed, dtype, gate, value, row):
    skip_f64_on_cuda(device, dtype)
    S, L = 48, 16
    args = build(seed, S=S, L=L, dtype=dtype, DHQK=16, DHHV=24)
    q, k, v, i, f, C, n, m = args
    if gate == "m":  # the m state entering chunk 1 (rows 16..31)
        m[:, 0, 1] = value
    else:
        (i if gate == "i" else f)[:, 0, L + row] = value  # row `row` of chunk 1, head 0
    outs, refs = run(args, device, L), reference(args, L)
    check(outs, refs, device, dtype)
    first = L if gate == "m" else L + row
    if math.isnan(value) or (gate == "f" and value == -INF):
        # NaN from the row on in that chunk, vecM included; every other row finite.
        for o in outs:
            assert torch.isnan(o[:, 0, first:2 * L]).all()
            assert torch.isfinite(o[:, 0, :first]).all() and torch.isfinite(o[:, 0, 2 * L:]).all()
            assert torch.isfinite(o[:, 1]).all()
    if value == -INF and gate == "i":
        assert all(torch.isfinite(o).all() for o in outs)  # e^-inf = 0: nothing to poison


# ----------------------------------------------------------------------------------------------
# 5. A row never depends on later rows, NaN and Inf included.


@pytest.mark.parametrize("dtype", [F32, BF16, F64], ids=str)
@pytest.mark.parametrize("tensor,value", [("v", NAN), ("v", INF), ("k", NAN), ("k", -INF), ("q", NAN)])
@pytest.mark.parametrize("L,row", [(16, 5), (16, 0), (16, 15), (64, 5), (64, 37), (64, 63)])
def test_nonfinite_row_stays_in_its_rows(device, seed, dtype, tensor, value, L, row):
    """Poison one row r of q, k or v in chunk 1: rows before r (and other chunks) equal the
    reference of the clean inputs; rows from r on are not finite exactly where a plain evaluation
    of the causal sum makes them so."""
    skip_f64_on_cuda(device, dtype)
    S = 3 * L
    args = build(seed, S=S, L=L, dtype=dtype, DHQK=16, DHHV=24)
    clean = reference(args, L)
    poisoned = list(args)
    idx = "qkv".index(tensor)
    poisoned[idx] = args[idx].clone()
    r = L + row
    poisoned[idx][:, 0, r] = value
    matH, vecN, vecM = run(poisoned, device, L)
    tol_h, tol_nm = tol_for(device, dtype)

    # Untouched rows: every row of head 1 and of chunks 0 and 2, and rows < r of chunk 1.
    keep = torch.ones(S, dtype=torch.bool)
    if tensor == "q":
        keep[r] = False
    else:
        keep[r:2 * L] = False
    assert_like(matH[:, 0, keep], clean[0][:, 0, keep], tol_h, "matH, rows not after the poisoned one")
    assert_like(matH[:, 1], clean[0][:, 1], tol_h, "matH, the other head")
    assert_like(vecM, clean[2], tol_nm, "vecM (does not depend on q, k, v)")
    if tensor == "v":
        assert_like(vecN, clean[1], tol_nm, "vecN (does not depend on v)")
        assert (~torch.isfinite(matH[:, 0, r:2 * L])).all()
    else:  # q . k not finite: the weights, so matH and vecN
        assert_like(vecN[:, 0, keep], clean[1][:, 0, keep], tol_nm, "vecN, rows before the poisoned one")
        assert (~torch.isfinite(matH[:, 0, ~keep])).all() and (~torch.isfinite(vecN[:, 0, ~keep])).all()
        if math.isnan(value):
            assert torch.isnan(matH[:, 0, ~keep]).all() and torch.isnan(vecN[:, 0, ~keep]).all()


# ----------------------------------------------------------------------------------------------
# 6. The meta / fake kernel validates like the backends (torch.compile, torch.export).

import test_errors  # noqa: E402  (the CPU's cases and their messages)


DHQK_E = test_errors.DHQK


def errors_cases():
    """test_errors' cases, plus this file's new rejections (items 3 and 7)."""
    extra = [
        ("qk_scale-1e39", test_errors.set_(qk_scale=1e39)),
        ("eps-1e39", test_errors.set_(eps=1e39)),
        ("matC-too-many", test_errors.set_(matC_all=lambda t: test_errors.grow(t, 2, 2 * DHQK_E))),
        ("scaM-too-many", test_errors.set_(scaM_all=lambda t: test_errors.grow(t, 2, 2))),
    ]
    return [(c[0], c[1]) for c in test_errors.CASES] + extra


def cpu_outcome(mutate):
    """The CPU op's answer to a mutated base call: (tensors, kwargs, error message or None)."""
    t, kw = test_errors.base("cpu")
    mutate(t, kw)
    try:
        test_errors.call(op, t, kw)
        return t, kw, None
    except RuntimeError as e:
        return t, kw, str(e).splitlines()[0]


@pytest.mark.parametrize("name,mutate", errors_cases(), ids=[c[0] for c in errors_cases()])
def test_meta_validates_like_cpu(name, mutate):
    t, kw, msg = cpu_outcome(mutate)
    meta = {nm: x.to("meta") for nm, x in t.items()}
    if msg is None:  # accepted on the CPU: accepted on meta, with the CPU's shapes and dtypes
        outs = test_errors.call(op, meta, kw)
        cpu = test_errors.call(op, t, kw)
        assert [(o.shape, o.dtype) for o in outs] == [(o.shape, o.dtype) for o in cpu]
        return
    assert msg.startswith("parallel_fw_hintra: ")
    with pytest.raises(RuntimeError) as err:
        test_errors.call(op, meta, kw)
    assert msg in str(err.value), f"meta raised {str(err.value)[:300]!r}, the CPU {msg!r}"


COMPILE_CASES = ["vecF-size2", "matC-too-few", "output-dtype-int", "eps-negative", "qk_scale-nan",
                 "qk_scale-1e39", "matC-too-many"]


@pytest.mark.parametrize("name", COMPILE_CASES)
def test_compile_rejects_when_tracing(name):
    """torch.compile(fullgraph=True) raises the CPU's error while tracing, before any graph
    reaches the backend (which would then fail only when run)."""
    mutate = dict(errors_cases())[name]
    t, kw, msg = cpu_outcome(mutate)
    assert msg is not None
    torch._dynamo.reset()
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    fn = torch.compile(lambda *a: op(*a, **kw), backend=backend, fullgraph=True)
    with pytest.raises(RuntimeError) as err:
        fn(*[t[nm] for nm in test_errors.NAMES])
    torch._dynamo.reset()
    assert not graphs, "the invalid call traced cleanly and failed only when run"
    assert msg in str(err.value), f"compile raised {str(err.value)[:300]!r}, the CPU {msg!r}"


@pytest.mark.parametrize("name", COMPILE_CASES[:4])
def test_export_rejects(name):
    mutate = dict(errors_cases())[name]
    t, kw, msg = cpu_outcome(mutate)

    class M(torch.nn.Module):
        def forward(self, matQ, matK, matV, vecI, vecF, matC_all, vecN_all, scaM_all):
            return op(matQ, matK, matV, vecI, vecF, matC_all, vecN_all, scaM_all, **kw)

    with pytest.raises(RuntimeError) as err:
        torch.export.export(M(), tuple(t[nm] for nm in test_errors.NAMES))
    assert msg in str(err.value), f"export raised {str(err.value)[:300]!r}, the CPU {msg!r}"


# ----------------------------------------------------------------------------------------------
# 7. Only NC or NC + 1 state slots: more means the states were made for another chunk size.


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("which", ["all", "matC_all", "vecN_all", "scaM_all"])
def test_states_of_another_chunk_size(device, seed, which):
    S, DHQK = 24, 8
    made = build(seed, S=S, L=4, DHQK=DHQK, DHHV=8)  # NC = 6 at chunk size 4: 7 slots
    fit = build(seed, S=S, L=8, DHQK=DHQK, DHHV=8)   # NC = 3 at chunk size 8: 4 slots
    args = list(fit)
    for nm, idx in (("matC_all", 5), ("vecN_all", 6), ("scaM_all", 7)):
        if which in ("all", nm):
            args[idx] = made[idx]
    name = "matC_all" if which == "all" else which
    with pytest.raises(RuntimeError) as err:
        run(args, device, 8)
    msg = str(err.value)
    assert "parallel_fw_hintra: " + name in msg and "slots" in msg, msg
    assert re.search(r"chunk[_ ]size", msg), f"the message should name the likely cause: {msg}"
    # NC and NC + 1 slots stay accepted.
    for slots in (3, 4):
        ok = fit[:5] + [fit[5][:, :, : slots * DHQK], fit[6][:, :, : slots * DHQK], fit[7][:, :, :slots]]
        check(run(ok, device, 8), reference(ok, 8), device, F32)


# ----------------------------------------------------------------------------------------------
# 8. chunk_size = S: bounded scratch, and a clear error where memory runs out.


@pytest.mark.parametrize("dtype", [F32, BF16], ids=str)
@pytest.mark.parametrize("S,L", [(2048, 2048), (3000, 1500), (4096, 1024)])
def test_large_chunks(device, seed, dtype, S, L):
    """Large chunks (the CPU works in blocks of rows there) against the full reference."""
    args = build(seed, S=S, L=L, NH=1, DHQK=16, DHHV=8, dtype=dtype)
    check(run(args, device, L), reference(args, L), device, dtype)


def run_script(body: str, timeout=300):
    """Runs PROLOGUE + body in a fresh process (this repository's mlstm_ext); returns the last
    line it prints, parsed as JSON."""
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", PROLOGUE + textwrap.dedent(body)], capture_output=True,
                          text=True, timeout=timeout, env=env)
    assert proc.returncode == 0, f"script failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


# Common prologue: one thread, an address-space limit helper, and a row-wise float64 reference
# (SPEC steps 1-7 for selected rows of a single chunk: the full reference needs L^2 memory).
PROLOGUE = """
import json, math, resource, torch, torch.nn.functional as F
import mlstm_ext
torch.set_num_threads(1)
op = torch.ops.mlstm.parallel_fw_hintra

def vm_bytes():
    with open("/proc/self/status") as fh:
        return next(int(l.split()[1]) * 1024 for l in fh if l.startswith("VmSize:"))

def limit_address_space(extra):
    lim = vm_bytes() + extra
    resource.setrlimit(resource.RLIMIT_AS, (lim, lim))

def rows_reference(q, k, v, i, f, C, n, m0, rows, qk_scale, eps=1e-6):
    q, k, v, i, f, C, n = (x.double() for x in (q, k, v, i, f, C, n))
    bg = torch.cumsum(F.logsigmoid(f), 0)
    H, N, M = [], [], []
    for t in rows:
        D = (bg[t] - bg[: t + 1]) + i[: t + 1]
        mt = max(bg[t].item() + m0, max(-10.0, D.max().item()))
        w = qk_scale * (k[: t + 1] @ q[t]) * torch.exp(D - mt)
        g = qk_scale * torch.exp(bg[t] + m0 - mt)
        num = w @ v[: t + 1] + g * (q[t] @ C)
        den = max(abs((w.sum() + g * (q[t] @ n)).item()), math.exp(-mt))
        H.append(num / (den + eps)); N.append(den); M.append(mt)
    return torch.stack(H), torch.tensor(N, dtype=torch.float64), torch.tensor(M, dtype=torch.float64)
"""


@pytest.mark.parametrize("device", DEVICES)
def test_chunk_size_equals_S_bounded_scratch(device):
    """S = chunk_size = 2^15 at head dims 2, under an address-space limit of 1 GiB more than the
    inputs use (the (L, L) matrix alone would be 4 GiB): runs, and matches the row-wise float64
    reference on 40 rows spread over the chunk (the last ones see all 2^15 keys)."""
    if device == "cuda":
        # The CUDA kernels keep a chunk's gates in shared memory: a chunk this long is refused
        # with a clear error instead (the CPU kernel tiles the chunk).
        S = L = 1 << 15
        x = [torch.randn(1, 1, S, 2, device="cuda") for _ in range(3)]
        x += [torch.randn(1, 1, S, device="cuda"), torch.randn(1, 1, S, device="cuda")]
        x += [torch.randn(1, 1, 2, 2, device="cuda"), torch.randn(1, 1, 2, device="cuda"), torch.zeros(1, 1, 1, device="cuda")]
        with pytest.raises(RuntimeError, match="chunk_size = 32768.*shared memory"):
            op(*x, chunk_size=L)
        return
    res = run_script(f"""
    dev = "{device}"
    S = L = 1 << 15
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 1, S, 2, generator=g) for _ in range(3))
    i, f = torch.randn(1, 1, S, generator=g), 3 + torch.randn(1, 1, S, generator=g)
    C, n = torch.randn(1, 1, 2, 2, generator=g), torch.randn(1, 1, 2, generator=g)  # NC = 1 slot
    m = torch.zeros(1, 1, 1)
    args = [x.to(dev) for x in (q, k, v, i, f, C, n, m)]
    op(*[x[:, :, :64] if x.dim() > 2 and x.shape[2] == S else x for x in args], chunk_size=64)  # warm up
    if dev == "cpu":
        limit_address_space(1 << 30)
    H, N, M = (x.cpu() for x in op(*args, chunk_size=L))
    rows = [0, 1, 7, 255, 256, 1000, 4097, S - 2, S - 1] + torch.randint(0, S, (31,), generator=g).tolist()
    rows = sorted(set(rows))
    Hr, Nr, Mr = rows_reference(*(x[0, 0] for x in (q, k, v, i, f, C, n)), 0.0, rows, 2 ** -0.5)
    err = lambda a, b: ((a.double() - b).norm() / b.norm()).item()
    bg = torch.cumsum(F.logsigmoid(f[0, 0].double()), 0)  # vecM for every row, O(L) in float64
    Mall = torch.maximum(bg, torch.clamp(bg + torch.cummax(i[0, 0].double() - bg, 0).values, min=-10.0))
    print(json.dumps(dict(finite=bool(torch.isfinite(H).all() and torch.isfinite(N).all()),
                          H=err(H[0, 0, rows], Hr), N=err(N[0, 0, rows], Nr), M=err(M[0, 0], Mall))))
    """)
    assert res["finite"]
    assert res["H"] < 1e-4 and res["N"] < 1e-4 and res["M"] < 1e-6, res


def test_out_of_memory_is_explained():
    """Where the scratch cannot be allocated, a RuntimeError says how many bytes, for what."""
    res = run_script("""
    S = L = 1 << 20
    x = [torch.randn(1, 1, S, 1) for _ in range(3)] + [torch.randn(1, 1, S), 3 + torch.randn(1, 1, S)]
    states = [torch.zeros(1, 1, 2, 1), torch.zeros(1, 1, 2), torch.zeros(1, 1, 2)]
    op(*[t[:, :, :64] for t in x], *states, chunk_size=64)  # warm up
    limit_address_space(48 << 20)  # the outputs (12 MiB) fit, the scratch does not
    try:
        op(*x, *states, chunk_size=L)
        print(json.dumps(dict(error=None)))
    except Exception as e:
        print(json.dumps(dict(error=type(e).__name__, msg=str(e).splitlines()[0])))
    """)
    assert res["error"] == "RuntimeError", res
    msg = res["msg"]
    assert msg.startswith("parallel_fw_hintra: ") and re.search(r"\d+ bytes", msg), msg
    assert "chunk_size = 1048576" in msg and "scratch" in msg, msg


# ----------------------------------------------------------------------------------------------
# 9. 16-bit (and float64) states are read in place, not copied to float32 whole.


@pytest.mark.parametrize("state_dtype", [BF16, F16, F64], ids=str)
@pytest.mark.parametrize("layout", ["contig", "colmajor"])
def test_state_dtypes(device, seed, state_dtype, layout):
    args = build(seed, S=128, L=32, DHQK=48, DHHV=40, B=2)
    for idx in (5, 6, 7):
        args[idx] = args[idx].to(state_dtype)
    if layout == "colmajor":
        args[5] = args[5].transpose(-1, -2).contiguous().transpose(-1, -2)
    check(run(args, device, 32), reference(args, 32), device, F32)


def test_bf16_states_not_copied():
    """A 64 MiB bfloat16 matC_all: the op's peak memory grows by far less than the 128 MiB a
    float32 copy would take."""
    res = run_script("""
    B, NH, S, L, D = 1, 1, 4096, 2, 128
    NC = S // L
    q, k, v = (torch.empty(B, NH, S, D).normal_() for _ in range(3))
    i, f = torch.empty(B, NH, S).normal_(), torch.empty(B, NH, S).normal_(3.0)
    C = torch.empty(B, NH, (NC + 1) * D, D, dtype=torch.bfloat16).normal_()
    n = torch.empty(B, NH, (NC + 1) * D, dtype=torch.bfloat16).normal_()
    m = torch.zeros(B, NH, NC + 1, dtype=torch.bfloat16)
    small = [x[:, :, :64] for x in (q, k, v, i, f)] + [C[:, :, :33 * D], n[:, :, :33 * D], m[:, :, :33]]
    op(*small, chunk_size=L)  # warm up

    def status(key):
        with open("/proc/self/status") as fh:
            return next(int(l.split()[1]) * 1024 for l in fh if l.startswith(key + ":"))

    with open("/proc/self/clear_refs", "w") as fh:  # reset the peak (VmHWM) to the current RSS
        fh.write("5")
    before = status("VmRSS")
    H, N, M = op(q, k, v, i, f, C, n, m, chunk_size=L)
    grow = status("VmHWM") - before
    print(json.dumps(dict(grow=grow, C_bytes=C.numel() * 2, H_finite=bool(torch.isfinite(H).all()))))
    """)
    assert res["H_finite"]
    assert res["grow"] < res["C_bytes"] // 2, res


# ----------------------------------------------------------------------------------------------
# float64 inputs (CPU): float64 end to end, to the float64 reference.

F64_GRID = [(1, 2, 16, 16, 16, 16), (2, 1, 96, 48, 80, 16), (1, 2, 128, 80, 48, 32),
            (1, 2, 72, 3, 5, 24), (2, 1, 48, 1, 1, 24), (1, 1, 40, 8, 12, 40), (1, 2, 12, 8, 8, 3)]


@pytest.mark.parametrize("case", F64_GRID, ids=lambda c: "B{}NH{}S{}qk{}hv{}L{}".format(*c))
@pytest.mark.parametrize("out_dtype", [F32, F64], ids=str)
def test_float64_inputs(seed, case, out_dtype):
    B, NH, S, DHQK, DHHV, L = case
    args = build(seed, S=S, L=L, B=B, NH=NH, DHQK=DHQK, DHHV=DHHV, dtype=F64)
    matH, vecN, vecM = run(args, "cpu", L, output_dtype=out_dtype)
    assert matH.dtype == F64 and vecN.dtype == vecM.dtype == out_dtype
    tol = (1e-12, 1e-12 if out_dtype == F64 else 1e-6)
    check((matH, vecN, vecM), reference(args, L), "cpu", F64, tol)


@pytest.mark.parametrize("state_dtype", [F32, BF16, F64], ids=str)
def test_float64_noncontiguous_and_state_dtypes(seed, state_dtype):
    args = build(seed, S=96, L=32, B=2, NH=2, DHQK=24, DHHV=40, dtype=F64)
    args = [t.transpose(-1, -2).contiguous().transpose(-1, -2) if t.dim() == 4 else t for t in args]
    for idx in (5, 6, 7):
        args[idx] = args[idx].to(state_dtype)
    args[3] = torch.stack([args[3], args[3]], -1)[..., 0]  # vecI with stride 2
    kw = dict(qk_scale=0.3, eps=1e-3)
    check(run(args, "cpu", 32, **kw), reference(args, 32, **kw), "cpu", F64)


@pytest.mark.parametrize("f_big", [-1e12, -1e30, -1e38])
def test_huge_forget_gate_beside_ordinary_ones_cpu(seed, f_big):
    """A huge negative forget gate followed in its chunk by ordinary and moderate ones, on the
    CPU: the whole forward against the step-by-step recurrence in float64 (which forms no prefix
    sums: no gate is absorbed by a huge one). A plain prefix sum loses the later gates (H off by
    11% in this case at -1e30 before the clamp of SPEC.md step 1)."""
    from test_autograd import step_reference
    gen = torch.Generator().manual_seed(seed)
    B, NH, S, DHQK, DHHV, L = 1, 2, 32, 8, 8, 8
    q, k, v = (torch.randn(B, NH, S, d, generator=gen) for d in (DHQK, DHQK, DHHV))
    i, f = torch.randn(B, NH, S, generator=gen), 3 + torch.randn(B, NH, S, generator=gen)
    f[:, :, 5], f[:, :, 20], f[:, :, 21] = f_big, f_big, -9.0
    C0, n0, m0 = torch.randn(B, NH, DHQK, DHHV, generator=gen), torch.randn(B, NH, DHQK, generator=gen), \
        torch.randn(B, NH, generator=gen)
    H, C, n, m = step_reference(q, k, v, i, f, C0, n0, m0)
    out = torch.ops.mlstm.chunkwise_fw(q, k, v, i, f, C0, n0, m0, chunk_size=L)
    for name, o, r in (("matH", out[0], H), ("matC_last", out[1], C), ("vecN_last", out[2], n)):
        err = (o.double() - r).norm() / r.norm()
        assert err <= 2e-5, f"{name}: relative-norm error {err:.2e}"
