"""torch.ops.mlstm.recurrent_fw_states (the chunk-border states) and torch.ops.mlstm.chunkwise_fw
(states + H step): against float64 references on fresh random inputs, chained with
parallel_fw_hintra against the quadratic mLSTM, bad inputs, and PyTorch's machinery.

Tests that take `device` run on the CPU and again on CUDA where there is a GPU.
"""
import contextlib
import re

import pytest
import torch
import torch.nn.functional as F

import mlstm_ext
from conftest import (BF16, F16, F32, F64, HAS_CUDA, Inputs, assert_close, check_whole_chain, errors,
                      poison_allocator, relayout)
from mlstm_ext.reference import recurrent_fw_states as reference_states
from quadratic import quadratic_mlstm

states_op = torch.ops.mlstm.recurrent_fw_states
forward_op = torch.ops.mlstm.chunkwise_fw
hintra_op = torch.ops.mlstm.parallel_fw_hintra

DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda,
                                               pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")])]
# Relative-norm tolerance of the states vs float64 on the same (rounded) inputs: only accumulation
# error remains (products and sums in float32; measured about 1e-7).
TOL = {F32: 1e-5, BF16: 1e-5, F16: 1e-5, F64: 1e-12}
GATES = {"f3": 3.0, "f0": 0.0}  # f = mean + N(0, 1): weak and strong forgetting


def _meta_validation_recurses() -> bool:
    """True while the ops' fake kernels (mlstm_ext/ops.py), which torch.library.register_fake also
    installs as the Meta kernels over the C++ ones, call the op on meta tensors to validate and
    so call themselves. The tests marked with needs_meta_path then fail by design (strict xfail);
    they run normally once the meta path works."""
    t = torch.empty(1, 1, 2, 2, device="meta")
    try:
        states_op(t, t, t[..., 0], t[..., 0], chunk_size=2)
    except RecursionError:
        return True
    return False


needs_meta_path = pytest.mark.xfail(_meta_validation_recurses(), strict=True, raises=Exception,
                                    reason="fake kernels recurse on meta tensors (mlstm_ext/ops.py _validate)")


def make_states_inputs(seed, B=2, NH=3, S=128, DHQK=32, DHHV=48, L=32, dtype=F32, device="cpu",
                       f_mean=3.0, init=False, m_shape=2, with_q=False):
    """Keyword arguments of recurrent_fw_states: k, v, i ~ N(0, 1), f = f_mean + N(0, 1), k and v
    rounded to dtype, gates in the compute dtype; initial states N(0, 1) when `init`, with
    scaM_initial of shape (B, NH) or (B, NH, 1) (m_shape 2 or 3). with_q adds matQ."""
    gen = torch.Generator().manual_seed(seed)
    compute = F64 if dtype == F64 else F32

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=F64).to(device)

    kw = dict(matK=randn(B, NH, S, DHQK).to(dtype), matV=randn(B, NH, S, DHHV).to(dtype),
              vecI=randn(B, NH, S).to(compute), vecF=(f_mean + randn(B, NH, S)).to(compute), chunk_size=L)
    if init:
        kw["matC_initial"] = randn(B, NH, DHQK, DHHV).to(compute)
        kw["vecN_initial"] = randn(B, NH, DHQK).to(compute)
        kw["scaM_initial"] = randn(B, NH, *([1] if m_shape == 3 else [])).to(compute)
    if with_q:
        kw["matQ"] = randn(B, NH, S, DHQK).to(dtype)
    return kw


def run_states(kw):
    return states_op(kw["matK"], kw["matV"], kw["vecI"], kw["vecF"], kw.get("matC_initial"),
                     kw.get("vecN_initial"), kw.get("scaM_initial"), kw["chunk_size"])


def reference64(kw):
    """The float64 reference on exactly the op's inputs (16-bit k, v upcast exactly)."""
    m0 = kw.get("scaM_initial")
    if m0 is not None:
        m0 = m0.reshape(m0.shape[0], m0.shape[1])
    return reference_states(kw["matK"], kw["matV"], kw["vecI"], kw["vecF"], kw["chunk_size"],
                            kw.get("matC_initial"), kw.get("vecN_initial"), m0, compute_dtype=F64)


def suffix_reference64(kw):
    """SPEC's recurrence in float64 with g_k - bg[s] formed as the sum of the forget gates after s
    (no difference of two cumulative sums), so it stays exact for forget gates like -1e30.
    Written apart from mlstm_ext.reference (no initial states)."""
    k, v, i, f = (kw[n].double() for n in ("matK", "matV", "vecI", "vecF"))
    B, NH, S, DHQK = k.shape
    L = kw["chunk_size"]
    C = torch.zeros(B, NH, DHQK, v.shape[-1], dtype=F64)
    n = torch.zeros(B, NH, DHQK, dtype=F64)
    m = torch.zeros(B, NH, dtype=F64)
    Cs, ns, ms = [C], [n], [m]
    for c0 in range(0, S, L):
        fl = F.logsigmoid(f[..., c0:c0 + L])
        g = fl.sum(-1)
        after = torch.cat([fl[..., 1:], torch.zeros_like(fl[..., :1])], -1)  # fl[s+1], 0 at the end
        sfx = after.flip(-1).cumsum(-1).flip(-1)  # sum_{r > s} fl[r]
        a = sfx + i[..., c0:c0 + L]
        m_new = torch.maximum(g + m, a.amax(-1))
        w = torch.exp(a - m_new[..., None])
        decay = torch.exp(g + m - m_new)
        kw_ = k[..., c0:c0 + L, :] * w[..., None]
        C = decay[..., None, None] * C + kw_.transpose(-1, -2) @ v[..., c0:c0 + L, :]
        n = decay[..., None] * n + kw_.sum(-2)
        m = m_new
        Cs.append(C), ns.append(n), ms.append(m)
    return (torch.stack(Cs, 2).reshape(B, NH, -1, v.shape[-1]), torch.stack(ns, 2).reshape(B, NH, -1),
            torch.stack(ms, 2))


def check_states(outs, refs, dtype, tol=None, elementwise=False):
    """Shapes, dtypes, contiguity, and each output close to the reference."""
    out_dtype = F64 if dtype == F64 else F32
    tol = TOL[dtype] if tol is None else tol
    rels = []
    for name, o, r in zip(("matC_all", "vecN_all", "scaM_all"), outs, refs):
        assert o.dtype == out_dtype and o.is_contiguous(), f"{name}: {o.dtype}, contiguous={o.is_contiguous()}"
        rels.append(assert_close(o, r, tol, name)[0])
        if elementwise:  # one wrong element hides in a norm
            bad = (o.double() - r).abs() > 50 * tol * (r.abs() + r.abs().mean())
            assert not bad.any(), f"{name}: {bad.sum().item()} elements off"
    return rels


# ----------------------------------------------------------------------------------------------
# Against the float64 reference

SHAPES = [(2, 3, 128, 32, 48, 32), (1, 2, 192, 48, 80, 64)]  # (B, NH, S, DHQK, DHHV, L)


@pytest.mark.parametrize("init", [False, True], ids=["zero_init", "init"])
@pytest.mark.parametrize("gates", list(GATES))
@pytest.mark.parametrize("dtype", [F32, BF16, F16], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda c: "B{}NH{}S{}qk{}hv{}L{}".format(*c))
@pytest.mark.parametrize("device", DEVICES)
def test_vs_reference(seed, device, shape, dtype, gates, init):
    B, NH, S, DHQK, DHHV, L = shape
    kw = make_states_inputs(seed, B, NH, S, DHQK, DHHV, L, dtype, device, GATES[gates], init)
    outs = run_states(kw)
    check_states([o.cpu() for o in outs], [r.cpu() for r in reference64(kw)], dtype)
    if init:  # slot 0 is the initial state, exactly
        assert torch.equal(outs[0][:, :, :DHQK], kw["matC_initial"])
        assert torch.equal(outs[1][:, :, :DHQK], kw["vecN_initial"])
        assert torch.equal(outs[2][:, :, 0], kw["scaM_initial"])
    else:
        assert not outs[0][:, :, :DHQK].any() and not outs[1][:, :, :DHQK].any() and not outs[2][:, :, 0].any()


@pytest.mark.parametrize("m_shape", [2, 3])
@pytest.mark.parametrize("gates", list(GATES))
def test_float64(seed, gates, m_shape):
    """float64 inputs are computed in float64 (the gradcheck path): 1e-12."""
    kw = make_states_inputs(seed, 2, 2, 96, 20, 12, 16, F64, f_mean=GATES[gates], init=True, m_shape=m_shape)
    check_states(run_states(kw), reference64(kw), F64, elementwise=True)


@pytest.mark.parametrize("m_shape", [2, 3])
@pytest.mark.parametrize("device", DEVICES)
def test_scaM_initial_shapes(seed, device, m_shape):
    """scaM_initial as (B, NH) or (B, NH, 1), as in mlstm-kernels; both give the same states."""
    kw = make_states_inputs(seed, 2, 3, 64, 16, 24, 16, device=device, init=True, m_shape=m_shape)
    outs = run_states(kw)
    check_states([o.cpu() for o in outs], [r.cpu() for r in reference64(kw)], F32)
    kw["scaM_initial"] = kw["scaM_initial"].reshape(2, 3, *([] if m_shape == 3 else [1]))
    for a, b in zip(outs, run_states(kw)):
        assert torch.equal(a, b)


# (B, NH, S, DHQK, DHHV, L): odd head dims and chunk sizes, one chunk (NC = 1), L = 1, S = 0
# (NC = 0: only slot 0), head dims below one register tile.
ODD = [(1, 2, 12, 5, 7, 3), (2, 1, 40, 5, 7, 40), (1, 1, 9, 3, 17, 1), (2, 3, 0, 5, 7, 4),
       (1, 2, 60, 13, 33, 20), (1, 1, 32, 1, 1, 8)]


@pytest.mark.parametrize("init", [False, True], ids=["zero_init", "init"])
@pytest.mark.parametrize("dtype", [F32, BF16, F64], ids=str)
@pytest.mark.parametrize("shape", ODD, ids=lambda c: "B{}NH{}S{}qk{}hv{}L{}".format(*c))
@pytest.mark.parametrize("device", DEVICES)
def test_odd_sizes(seed, device, shape, dtype, init):
    if dtype == F64 and device == "cuda":
        pytest.skip("float64 is CPU only")
    B, NH, S, DHQK, DHHV, L = shape
    kw = make_states_inputs(seed, B, NH, S, DHQK, DHHV, L, dtype, device, init=init)
    outs = run_states(kw)
    NC = S // L
    assert outs[0].shape == (B, NH, (NC + 1) * DHQK, DHHV)
    assert outs[1].shape == (B, NH, (NC + 1) * DHQK) and outs[2].shape == (B, NH, NC + 1)
    check_states([o.cpu() for o in outs], [r.cpu() for r in reference64(kw)], dtype, elementwise=True)


@pytest.mark.parametrize("B,NH,S,DHQK,DHHV", [(0, 2, 16, 4, 4), (2, 0, 16, 4, 4), (0, 0, 0, 4, 4),
                                              (2, 2, 16, 0, 4), (2, 2, 16, 4, 0), (2, 2, 16, 0, 0)])
@pytest.mark.parametrize("device", DEVICES)
def test_zero_sizes(seed, device, B, NH, S, DHQK, DHHV):
    """Empty outputs, or (DHQK = 0 / DHHV = 0) the states that remain, m included."""
    kw = make_states_inputs(seed, B, NH, S, DHQK, DHHV, 8, device=device, init=True)
    outs = run_states(kw)
    refs = reference64(kw)
    for o, r in zip(outs, refs):
        assert o.shape == r.shape and o.dtype == F32 and o.device.type == torch.device(device).type
        assert errors(o.cpu(), r.cpu())[0] <= TOL[F32]


# (tensors, layout): k/v as (B, S, NH, D).transpose(1, 2), column-major, sliced and strided last
# dims, batch-broadcast; gates transposed/strided; initial states column-major/strided.
LAYOUTS = [("kv", "transpose"), ("kv", "colmajor"), ("kv", "pad"), ("kv", "step"), ("kv", "bcast"),
           ("gates", "transpose"), ("gates", "step"), ("init", "colmajor"), ("init", "step"),
           ("all", "transpose"), ("all", "step")]
GROUPS = {"kv": ["matK", "matV"], "gates": ["vecI", "vecF"],
          "init": ["matC_initial", "vecN_initial", "scaM_initial"]}
GROUPS["all"] = GROUPS["kv"] + GROUPS["gates"] + GROUPS["init"]


@pytest.mark.parametrize("dtype", [F32, BF16], ids=str)
@pytest.mark.parametrize("which,how", LAYOUTS, ids=lambda x: str(x))
@pytest.mark.parametrize("device", DEVICES)
def test_strided(seed, device, which, how, dtype):
    kw = make_states_inputs(seed, 2, 3, 96, 24, 40, 32, dtype, device, init=True)
    base = run_states(kw)
    for nm in GROUPS[which]:
        if not (how == "transpose" and kw[nm].dim() < 3):  # scaM_initial (B, NH) has no dim 2
            kw[nm] = relayout(kw[nm], how)
    assert not all(t.is_contiguous() for t in kw.values() if isinstance(t, torch.Tensor))
    outs = run_states(kw)
    check_states([o.cpu() for o in outs], [r.cpu() for r in reference64(kw)], dtype)
    if how != "bcast":  # the same values in other strides: the same result
        for a, b in zip(base, outs):
            assert torch.equal(a, b)


@contextlib.contextmanager
def nan_filled_empty():
    """torch.empty, and the op's at::empty, fill floating tensors with NaN while deterministic
    algorithms are on (poison_allocator alone rarely hands the CPU op NaN memory: malloc reuses
    freed blocks only in part)."""
    old_mode, old_fill = torch.are_deterministic_algorithms_enabled(), torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(old_mode)
        torch.utils.deterministic.fill_uninitialized_memory = old_fill


@pytest.mark.parametrize("dtype", [F32, BF16, F64], ids=str)
@pytest.mark.parametrize("device", DEVICES)
def test_poison(seed, device, dtype):
    """Every output element is written: outputs allocated in NaN-filled memory, odd sizes, and
    every reference element nonzero."""
    if dtype == F64 and device == "cuda":
        pytest.skip("float64 is CPU only")
    B, NH, S, DHQK, DHHV, L = 2, 3, 60, 19, 37, 12
    kw = make_states_inputs(seed, B, NH, S, DHQK, DHHV, L, dtype, device, f_mean=0.0, init=True)
    refs = reference64(kw)
    assert all((r != 0).all() for r in refs)
    out_dtype = F64 if dtype == F64 else F32
    for numel in (B * NH * 6 * DHQK * DHHV, B * NH * 6 * DHQK, B * NH * 6):
        poison_allocator(device, numel, out_dtype)
    with nan_filled_empty():
        assert torch.isnan(torch.empty(4, device=device)).all()
        outs = run_states(kw)
    check_states([o.cpu() for o in outs], [r.cpu() for r in refs], dtype, elementwise=True)


# ----------------------------------------------------------------------------------------------
# Gate edge cases


@pytest.mark.parametrize("gate", ["vecF", "vecI"])
@pytest.mark.parametrize("device", DEVICES)
def test_nan_gate(seed, device, gate):
    """A NaN gate in chunk 1 of one head makes m NaN from slot 2 on (max must not drop it); the
    slots before and the other heads stay finite."""
    kw = make_states_inputs(seed, 2, 2, 96, 8, 8, 16, device=device)
    kw[gate] = kw[gate].clone()
    kw[gate][1, 0, 16 + 5] = float("nan")
    C, n, m = (o.cpu() for o in run_states(kw))
    assert torch.isnan(m[1, 0, 2:]).all(), m[1, 0]
    assert torch.isfinite(m[1, 0, :2]).all() and torch.isfinite(C[1, 0, :2 * 8]).all()
    assert torch.isnan(C[1, 0, 2 * 8:]).all() and torch.isnan(n[1, 0, 2 * 8:]).all()
    others = [(0, 0), (0, 1), (1, 1)]
    assert all(torch.isfinite(t[b, h]).all() for t in (C, n, m) for b, h in others)


@pytest.mark.parametrize("dtype", [F32, F64], ids=str)
@pytest.mark.parametrize("device", DEVICES)
def test_huge_forget_gates_all(seed, device, dtype):
    """f = -1e30 everywhere: a chunk forgets all but its last key, whose a = i exactly, so
    C_{k+1} = k v^T, n_{k+1} = k and m_{k+1} = i at the chunk's last position."""
    if dtype == F64 and device == "cuda":
        pytest.skip("float64 is CPU only")
    L, DHQK = 16, 8
    kw = make_states_inputs(seed, 1, 2, 64, DHQK, 12, L, dtype, device, init=True)
    kw["vecF"] = torch.full_like(kw["vecF"], -1e30)
    kw["vecI"] = kw["vecI"] * 5
    C, n, m = (o.cpu().double() for o in run_states(kw))
    k, v, i = (kw[nm].cpu().double() for nm in ("matK", "matV", "vecI"))
    last = torch.arange(L - 1, 64, L)
    expect_C = (k[:, :, last, :, None] * v[:, :, last, None, :]).reshape(1, 2, -1, 12)
    tol = 1e-12 if dtype == F64 else 1e-6
    assert_close(C[:, :, DHQK:], expect_C, tol, "matC_all")
    assert_close(n[:, :, DHQK:], k[:, :, last].reshape(1, 2, -1), tol, "vecN_all")
    assert torch.equal(m[:, :, 1:], i[:, :, last])


@pytest.mark.parametrize("dtype", [F32, F64], ids=str)
@pytest.mark.parametrize("device", DEVICES)
def test_huge_forget_gate_first_in_chunk(seed, device, dtype, monkeypatch):
    """f = -1e30 at the first position of every chunk, N(0, 1) elsewhere: the chunk's other keys
    keep their decays sum_{r>s} logsigmoid(f_r). A kernel that forms them as g_k - bg[s] (two sums
    of size 1e30) loses them, as a plain float64 prefix sum without SPEC's clamp of step 1 does
    (checked, so the test can fail; the reference's clamp makes it exact)."""
    if dtype == F64 and device == "cuda":
        pytest.skip("float64 is CPU only")
    L = 16
    kw = make_states_inputs(seed, 2, 2, 64, 12, 20, L, dtype, device, f_mean=0.0)
    kw["vecF"] = kw["vecF"].clone()
    kw["vecF"][..., ::L] = -1e30
    outs = [o.cpu() for o in run_states(kw)]
    exact = suffix_reference64({nm: t.cpu() if isinstance(t, torch.Tensor) else t for nm, t in kw.items()})
    check_states(outs, exact, dtype)
    assert errors(reference64(kw)[0].cpu(), exact[0])[0] < 1e-9  # the clamped reference is exact
    monkeypatch.setattr(mlstm_ext.reference, "MIN_LOG_FORGET", float("-inf"))
    naive = reference64(kw)
    assert errors(naive[0].cpu(), exact[0])[0] > 1e-2  # the case really separates the two forms


# ----------------------------------------------------------------------------------------------
# CPU code paths


def test_cpu_threads_and_paths(seed, monkeypatch):
    """Bitwise the same for 1 and 2 threads (the row tiling changes, each row's arithmetic does
    not); the SSE2/NEON build of the micro-kernel agrees with the AVX2 one to rounding."""
    kw = make_states_inputs(seed, 1, 2, 256, 70, 50, 64, init=True)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run_states(kw)
        torch.set_num_threads(2)
        two = run_states(kw)
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(one, two):
        assert torch.equal(a, b)
    monkeypatch.setenv("MLSTM_EXT_CPU_PORTABLE", "1")
    portable = run_states(kw)
    check_states(portable, reference64(kw), F32)
    for a, b in zip(one, portable):
        assert errors(a, b)[0] < 1e-6


def test_medium(seed):
    """A realistic shape: many chunks, head dims 128 (two row tiles per head or more)."""
    kw = make_states_inputs(seed, 1, 4, 1024, 128, 128, 64, init=True)
    check_states(run_states(kw), reference64(kw), F32)


# ----------------------------------------------------------------------------------------------
# The whole forward


def chain_inputs(kw, outs) -> Inputs:
    C, n, m = outs
    return Inputs(kw["matQ"], kw["matK"], kw["matV"], kw["vecI"], kw["vecF"], C, n, m, kw["chunk_size"])


@pytest.mark.parametrize("gates", list(GATES))
@pytest.mark.parametrize("S,L,DHQK,DHHV", [(256, 64, 48, 80), (192, 32, 32, 32)])
@pytest.mark.parametrize("device", DEVICES)
def test_chain_vs_quadratic(seed, device, S, L, DHQK, DHHV, gates):
    """recurrent_fw_states then parallel_fw_hintra (float32) == the quadratic mLSTM (float64);
    with strong forgetting (f0) most rows are floored by exp(-m), so every row is compared."""
    kw = make_states_inputs(seed, 2, 2, S, DHQK, DHHV, L, F32, device, f_mean=GATES[gates], with_q=True)
    check_whole_chain(chain_inputs(kw, run_states(kw)), tol=5e-5, margin=2.0 if gates == "f3" else None)


def run_forward(kw, **extra):
    return forward_op(kw["matQ"], kw["matK"], kw["matV"], kw["vecI"], kw["vecF"], kw.get("matC_initial"),
                      kw.get("vecN_initial"), kw.get("scaM_initial"), chunk_size=kw["chunk_size"], **extra)


@pytest.mark.parametrize("extra", [{}, dict(qk_scale=0.3, eps=1e-3)], ids=["defaults", "scale_eps"])
@pytest.mark.parametrize("init", [False, True], ids=["zero_init", "init"])
@pytest.mark.parametrize("dtype", [F32, BF16], ids=str)
@pytest.mark.parametrize("device", DEVICES)
def test_chunkwise_fw_is_the_chain(seed, device, dtype, init, extra):
    """chunkwise_fw's H (and vecN, vecM) are the chain's; its last states are slot NC."""
    kw = make_states_inputs(seed, 2, 3, 128, 24, 40, 32, dtype, device, init=init, m_shape=3, with_q=True)
    H, C_last, n_last, m_last, vecN, vecM = run_forward(kw, **extra)
    C, n, m = run_states(kw)
    inp = chain_inputs(kw, (C, n, m))
    H2, vecN2, vecM2 = hintra_op(*inp.args(), chunk_size=inp.L, **extra)
    assert H.dtype == dtype and C_last.dtype == n_last.dtype == m_last.dtype == vecN.dtype == F32
    assert C_last.shape == (2, 3, 24, 40) and n_last.shape == (2, 3, 24) and m_last.shape == (2, 3)
    for a, b in [(H, H2), (vecN, vecN2), (vecM, vecM2), (C_last, C[:, :, 4 * 24:]),
                 (n_last, n[:, :, 4 * 24:]), (m_last, m[:, :, 4])]:
        assert torch.equal(a, b)


@pytest.mark.parametrize("device", DEVICES)
def test_chunkwise_fw_vs_quadratic(seed, device):
    """chunkwise_fw's H against the quadratic mLSTM directly (check_whole_chain on an Inputs
    whose H step is replaced by chunkwise_fw's output)."""
    kw = make_states_inputs(seed, 1, 2, 256, 32, 48, 64, F32, device, with_q=True)
    H, C_last, n_last, m_last, vecN, vecM = run_forward(kw)
    Hq, csum, M = (t.cpu() for t in quadratic_mlstm(kw["matQ"], kw["matK"], kw["matV"], kw["vecI"], kw["vecF"]))
    keep = (csum.abs() > 2 * torch.exp(-M)) & (vecN.double().cpu() > 2 * torch.exp(-vecM.double().cpu()))
    assert keep.float().mean() > 0.5
    vecN = vecN.double().cpu()
    H = H.double().cpu() * ((vecN + 1e-6) / vecN).unsqueeze(-1)  # undo eps
    assert_close(H[keep], Hq.cpu()[keep], 5e-5, "matH (chunkwise_fw vs quadratic)")


def test_chunkwise_fw_float64(seed):
    kw = make_states_inputs(seed, 1, 2, 64, 8, 12, 16, F64, init=True, with_q=True)
    H, C_last, n_last, m_last, vecN, vecM = run_forward(kw)
    C, n, m = reference64(kw)
    assert H.dtype == C_last.dtype == F64
    assert_close(C_last, C[:, :, 4 * 8:], 1e-12, "matC_last")


# ----------------------------------------------------------------------------------------------
# Bad inputs: csrc/validate.cpp's messages, naming the op and the argument

B, NH, S, DHQK, DHHV, L = 2, 3, 8, 4, 5, 4
STATES_ARGS = ["matK", "matV", "vecI", "vecF", "matC_initial", "vecN_initial", "scaM_initial"]
FORWARD_ARGS = ["matQ"] + STATES_ARGS


def grow(t, d, by=1):
    return torch.cat([t, t.narrow(d, 0, 1).expand(*[by if i == d else -1 for i in range(t.dim())])], d)


def base_args():
    kw = make_states_inputs(11, B, NH, S, DHQK, DHHV, L, init=True, with_q=True)
    return kw


# (id, argument, change, message after "<op>: "); both ops check the states' arguments alike.
COMMON_CASES = [
    ("matK-rank", "matK", lambda t: t[0], "matK must have 4 dims (B, NH, S, DHQK), got 3 dims with shape [3, 8, 4]"),
    ("matV-rank", "matV", lambda t: t[..., None], "matV must have 4 dims (B, NH, S, DHHV), got 5 dims"),
    ("vecI-rank", "vecI", lambda t: t[0], "vecI must have 3 dims (B, NH, S), got 2 dims"),
    ("vecF-rank", "vecF", lambda t: t[..., None], "vecF must have 3 dims (B, NH, S), got 4 dims"),
    ("matV-B", "matV", lambda t: grow(t, 0), "matV.size(0) must be B = 2, got 3 (matV has shape [3, 3, 8, 5])"),
    ("matV-S", "matV", lambda t: grow(t, 2), "matV.size(2) must be S = 8, got 9"),
    ("vecI-NH", "vecI", lambda t: grow(t, 1), "vecI.size(1) must be NH = 3, got 4"),
    ("vecF-S", "vecF", lambda t: t[..., :4], "vecF.size(2) must be S = 8, got 4"),
    ("matV-dtype", "matV", lambda t: t.bfloat16(), "matV must have matK's dtype (Float), got BFloat16"),
    ("vecI-long", "vecI", lambda t: t.long(), "vecI must be a floating tensor (float32, bfloat16, float16 or float64), got Long"),
    ("vecF-bool", "vecF", lambda t: t > 0, "vecF must be a floating tensor (float32, bfloat16, float16 or float64), got Bool"),
    ("C0-rank", "matC_initial", lambda t: t[0], "matC_initial must have 4 dims (B, NH, DHQK, DHHV), got 3 dims"),
    ("C0-DHQK", "matC_initial", lambda t: grow(t, 2), "matC_initial.size(2) must be DHQK = 4, got 5"),
    ("C0-DHHV", "matC_initial", lambda t: t[..., :2], "matC_initial.size(3) must be DHHV = 5, got 2"),
    ("C0-B", "matC_initial", lambda t: t[:1], "matC_initial.size(0) must be B = 2, got 1"),
    ("C0-int", "matC_initial", lambda t: t.int(), "matC_initial must be a floating tensor (float32, bfloat16, float16 or float64), got Int"),
    ("n0-rank", "vecN_initial", lambda t: t[..., None], "vecN_initial must have 3 dims (B, NH, DHQK), got 4 dims"),
    ("n0-DHQK", "vecN_initial", lambda t: grow(t, 2), "vecN_initial.size(2) must be DHQK = 4, got 5"),
    ("n0-NH", "vecN_initial", lambda t: t[:, :1], "vecN_initial.size(1) must be NH = 3, got 1"),
    ("m0-BNH2", "scaM_initial", lambda t: t[..., None].expand(B, NH, 2), "scaM_initial must have shape (B, NH) or (B, NH, 1), got 3 dims with shape [2, 3, 2]"),
    ("m0-rank1", "scaM_initial", lambda t: t[0], "scaM_initial must have shape (B, NH) or (B, NH, 1), got 1 dims with shape [3]"),
    ("m0-NH", "scaM_initial", lambda t: grow(t, 1), "scaM_initial.size(1) must be NH = 3, got 4"),
    ("m0-B3", "scaM_initial", lambda t: grow(t[..., None], 0), "scaM_initial.size(0) must be B = 2, got 3"),
    ("chunk-3", "chunk_size", 3, "the sequence length S = 8 (matK.size(2)) must be a multiple of chunk_size = 3"),
    ("chunk-16", "chunk_size", 16, "the sequence length S = 8 (matK.size(2)) must be a multiple of chunk_size = 16"),
    ("chunk-0", "chunk_size", 0, "chunk_size must be positive, got 0"),
]
STATES_CASES = COMMON_CASES + [
    ("matK-int", "matK", lambda t: t.int(), "matK must be float32, bfloat16, float16 or float64 (CPU), got Int"),
]
FORWARD_CASES = COMMON_CASES + [
    ("matQ-rank", "matQ", lambda t: t[0], "matQ must have 4 dims (B, NH, S, DHQK), got 3 dims"),
    ("matQ-int", "matQ", lambda t: t.int(), "matQ must be float32, bfloat16, float16 or float64 (CPU), got Int"),
    ("matK-dtype", "matK", lambda t: t.half(), "matK must have matQ's dtype (Float), got Half"),
    ("matK-DHQK", "matK", lambda t: grow(t, 3), "matK.size(3) must be DHQK (matQ.size(3)) = 4, got 5"),
    ("matK-S", "matK", lambda t: grow(t, 2), "matK.size(2) must be matQ's = 8, got 9"),
    ("eps-negative", "eps", -1e-3, "eps must be finite and >= 0 in the compute dtype"),
    ("qk_scale-nan", "qk_scale", float("nan"), "qk_scale must be finite in the compute dtype"),
]


def mutated(case):
    _, name, change, _ = case
    kw = base_args()
    kw[name] = change(kw[name]) if callable(change) else change
    return kw


@pytest.mark.parametrize("case", STATES_CASES, ids=[c[0] for c in STATES_CASES])
def test_states_rejected(case):
    kw = mutated(case)
    del kw["matQ"]
    with pytest.raises(RuntimeError, match=re.escape("recurrent_fw_states: " + case[3])):
        states_op(**kw)


@pytest.mark.parametrize("case", FORWARD_CASES, ids=[c[0] for c in FORWARD_CASES])
def test_forward_rejected(case):
    kw = mutated(case)
    with pytest.raises(RuntimeError, match=re.escape("chunkwise_fw: " + case[3])):
        forward_op(**kw)


@pytest.mark.parametrize("op_name,on_meta", [("recurrent_fw_states", "matK"), ("recurrent_fw_states", "vecF"),
                                             ("recurrent_fw_states", "matC_initial"),
                                             ("recurrent_fw_states", "scaM_initial"),
                                             ("chunkwise_fw", "matQ"), ("chunkwise_fw", "matV"),
                                             ("chunkwise_fw", "vecN_initial")])
def test_mixed_cpu_meta_rejected(op_name, on_meta):
    """One meta tensor among CPU tensors is rejected, naming the argument, not answered with
    uninitialised (or meta) outputs."""
    kw = base_args()
    if op_name == "recurrent_fw_states":
        del kw["matQ"]
    kw[on_meta] = kw[on_meta].to("meta")
    with pytest.raises(RuntimeError, match=f"{op_name}: .*must be on the same device as .*got"):
        getattr(torch.ops.mlstm, op_name)(**kw)


def test_grad_refused():
    kw = base_args()
    del kw["matQ"]
    kw["matK"].requires_grad_(True)
    with pytest.raises(RuntimeError, match="recurrent_fw_states: this op has no backward, but matK require grad"):
        states_op(**kw)
    with torch.no_grad():
        states_op(**kw)


@needs_meta_path
@pytest.mark.parametrize("dtype", [F32, BF16, F64], ids=str)
def test_meta_shapes(dtype):
    """All-meta inputs give the outputs' shapes and dtypes without running a kernel."""
    kw = {k: v.to("meta") if isinstance(v, torch.Tensor) else v for k, v in base_args().items()}
    kw["matQ"], kw["matK"], kw["matV"] = (kw[n].to(dtype) for n in ("matQ", "matK", "matV"))
    out_dt = F64 if dtype == F64 else F32
    q = kw.pop("matQ")
    C, n, m = states_op(**kw)
    NC = S // L
    assert C.shape == (B, NH, (NC + 1) * DHQK, DHHV) and n.shape == (B, NH, (NC + 1) * DHQK)
    assert m.shape == (B, NH, NC + 1)
    assert all(t.device.type == "meta" and t.dtype == out_dt for t in (C, n, m))
    outs = forward_op(q, **kw)
    shapes = [(B, NH, S, DHHV), (B, NH, DHQK, DHHV), (B, NH, DHQK), (B, NH), (B, NH, S), (B, NH, S)]
    assert [tuple(t.shape) for t in outs] == shapes
    assert outs[0].dtype == dtype and all(t.dtype == out_dt for t in outs[1:])
    with pytest.raises(RuntimeError, match="recurrent_fw_states: scaM_initial must have shape"):
        states_op(**dict(kw, scaM_initial=torch.empty(B, NH, 2, device="meta")))


# ----------------------------------------------------------------------------------------------
# PyTorch machinery


def _states_fn(k, v, i, f, C0, n0, m0):
    C, n, m = torch.ops.mlstm.recurrent_fw_states(k * 1.0, v, i, f, C0, n0, m0, chunk_size=16)
    return C + 1.0, n, m.exp()


def _forward_fn(q, k, v, i, f, C0, n0, m0):
    H, C, n, m, vn, vm = torch.ops.mlstm.chunkwise_fw(q, k, v, i, f, C0, n0, m0, qk_scale=0.25, chunk_size=16)
    return H * 2.0, C, n, m, vn, vm


def machinery_args(seed, with_q):
    kw = make_states_inputs(seed, 2, 2, 64, 12, 20, 16, init=True, with_q=with_q)
    names = (["matQ"] if with_q else []) + STATES_ARGS
    return tuple(kw[n] for n in names)


@needs_meta_path
@pytest.mark.parametrize("fn,with_q", [(_states_fn, False), (_forward_fn, True)], ids=["states", "forward"])
def test_compile_fullgraph(seed, fn, with_q):
    torch._dynamo.reset()
    args = machinery_args(seed, with_q)
    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    for a, b in zip(fn(*args), compiled(*args)):
        assert torch.isfinite(b).all() and torch.equal(a, b)


@needs_meta_path
@pytest.mark.parametrize("init", [False, True], ids=["zero_init", "init"])
@pytest.mark.parametrize("op_name", ["recurrent_fw_states", "chunkwise_fw"])
def test_opcheck(seed, op_name, init):
    args = machinery_args(seed, op_name == "chunkwise_fw")
    if not init:
        args = args[:-3] + (None, None, None)
    torch.library.opcheck(getattr(torch.ops.mlstm, op_name).default, args, dict(chunk_size=16))


def test_torchscript(seed):
    scripted_states = torch.jit.script(_states_fn)
    scripted_forward = torch.jit.script(_forward_fn)
    for fn, scripted, with_q in [(_states_fn, scripted_states, False), (_forward_fn, scripted_forward, True)]:
        args = machinery_args(seed, with_q)
        for a, b in zip(fn(*args), scripted(*args)):
            assert torch.equal(a, b)


def test_wrappers(seed):
    """mlstm_ext's Python names call the ops (keyword arguments as in the schema)."""
    kw = make_states_inputs(seed, 1, 2, 64, 8, 12, 16, init=True, with_q=True)
    q = kw.pop("matQ")
    for a, b in zip(states_op(**kw), mlstm_ext.recurrent_fw_states(**kw)):
        assert torch.equal(a, b)
    for a, b in zip(forward_op(q, **kw), mlstm_ext.chunkwise_fw(q, **kw)):
        assert torch.equal(a, b)
