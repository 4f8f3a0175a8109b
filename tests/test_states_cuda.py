"""CUDA kernel of torch.ops.mlstm.recurrent_fw_states against the float64 reference
(mlstm_ext.reference.recurrent_fw_states on the CPU, on exactly the op's rounded inputs).
Skipped without a CUDA device."""
import pytest
import torch
import torch.nn.functional as F

from conftest import BF16, F16, F32, F64, errors, poison_allocator, requires_cuda
from mlstm_ext.reference import recurrent_fw_states as reference_states

op = torch.ops.mlstm.recurrent_fw_states
pytestmark = [pytest.mark.cuda, requires_cuda]

# Relative-norm error vs float64: (matC_all, vecN_all, scaM_all). The kernel splits k*w into
# hi + lo halves of the 16-bit dtype, sums n in float32 and runs the gates in float32; float32
# inputs go through 3xTF32. A float32 emulation of that arithmetic gives ~2e-6 (bf16) and ~1e-7
# (fp16) for C, ~1e-7 for n and m; one rounding of k*w to bf16 (the Triton kernel) gives ~1e-3.
TOL = {F32: (2e-5, 1e-5, 1e-5), BF16: (2e-5, 1e-5, 1e-5), F16: (2e-5, 1e-5, 1e-5)}
NAMES = ("matC_all", "vecN_all", "scaM_all")


def make(B, NH, S, DHQK, DHHV, dtype, seed, init=True, f_mean=3.0, i_mean=0.0, device="cuda"):
    """k, v, i ~ N(0, 1) (i + i_mean), f = f_mean + N(0, 1); random initial states when init."""
    gen = torch.Generator().manual_seed(seed)

    def rn(*shape):
        return torch.randn(*shape, generator=gen)

    k, v = rn(B, NH, S, DHQK).to(dtype), rn(B, NH, S, DHHV).to(dtype)
    i, f = i_mean + rn(B, NH, S), f_mean + rn(B, NH, S)
    init_states = (rn(B, NH, DHQK, DHHV), rn(B, NH, DHQK), rn(B, NH)) if init else (None,) * 3
    return [t if t is None else t.to(device) for t in (k, v, i, f, *init_states)]


def run(args, L):
    k, v, i, f, C0, n0, m0 = args
    return op(k, v, i, f, C0, n0, m0, chunk_size=L)


def ref64(args, L):
    k, v, i, f, C0, n0, m0 = [t if t is None else t.cpu() for t in args]
    return reference_states(k, v, i, f, L, C0, n0, m0, compute_dtype=F64)


def check(outs, refs, dtype, tol=None):
    tol = TOL[dtype] if tol is None else tol
    for name, o, r, t in zip(NAMES, outs, refs, tol):
        assert o.dtype == F32 and o.device.type == "cuda", f"{name}: {o.dtype} on {o.device}"
        assert o.shape == r.shape, f"{name}: shape {tuple(o.shape)} != {tuple(r.shape)}"
        assert o.is_contiguous(), name
        o = o.cpu()
        assert torch.isfinite(o).all(), f"{name}: {(~torch.isfinite(o)).sum().item()} non-finite values"
        rel, mx = errors(o, r)
        assert rel <= t, f"{name}: relative-norm error {rel:.3g} > {t:.3g} (max abs err {mx:.3g})"
    return outs


# (B, NH, S, DHQK, DHHV, L): tails of every tile edge (head dims not multiples of 8/16/64, L not a
# multiple of the ring step, L > the step so a chunk takes several steps), large heads.
SHAPES = [
    (1, 2, 12, 5, 7, 3),
    (2, 3, 256, 64, 64, 64),
    (1, 2, 256, 100, 200, 64),
    (1, 2, 128, 256, 512, 64),
    (2, 2, 512, 128, 128, 128),
    (1, 2, 288, 48, 80, 96),
    (1, 1, 200, 72, 40, 100),
    (1, 2, 64, 16, 16, 1),
    (1, 1, 96, 1, 1, 32),
    (1, 1, 64, 8, 3, 64),
]


# The kernel runs one or two warps per 16-row strip (the plan picks two for grids of at most two
# blocks per SM, i.e. every small shape here); MLSTM_EXT_STATES_SPLIT forces either.
SPLITS = pytest.mark.parametrize("split", ["0", "1"], ids=["one_warp_per_strip", "two_warps_per_strip"])


@SPLITS
@pytest.mark.parametrize("init", [True, False], ids=["init", "zeros"])
@pytest.mark.parametrize("dtype", [F32, BF16, F16], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_vs_reference(shape, dtype, init, split, monkeypatch):
    monkeypatch.setenv("MLSTM_EXT_STATES_SPLIT", split)
    B, NH, S, DHQK, DHHV, L = shape
    args = make(B, NH, S, DHQK, DHHV, dtype, seed=hash(shape) % 1000, init=init)
    check(run(args, L), ref64(args, L), dtype)


@pytest.mark.parametrize("f_mean,i_mean", [(-2.0, 0.0), (6.0, 0.0), (3.0, 5.0), (3.0, -5.0), (0.0, 10.0)])
@SPLITS
@pytest.mark.parametrize("dtype", [F32, BF16], ids=str)
def test_gate_regimes(dtype, f_mean, i_mean, split, monkeypatch):
    monkeypatch.setenv("MLSTM_EXT_STATES_SPLIT", split)
    args = make(2, 2, 384, 64, 96, dtype, seed=7, f_mean=f_mean, i_mean=i_mean)
    check(run(args, 64), ref64(args, 64), dtype)


def _relayout(t, how):
    if how == "transpose":  # (B, S, NH, ...) memory seen as (B, NH, S, ...)
        return t.transpose(1, 2).contiguous().transpose(1, 2)
    if how == "step":  # last-dim stride 2 (the op copies it once)
        return torch.stack([t, torch.full_like(t, float("nan"))], -1).flatten(-2)[..., ::2]
    if how == "pad":  # rows padded by 3 elements: unit stride, rows not 16-byte aligned
        return torch.cat([t, torch.full_like(t[..., :3], float("nan"))], -1)[..., : t.shape[-1]]
    if how == "colmajor":
        return t.transpose(-1, -2).contiguous().transpose(-1, -2)
    if how == "bcast":  # batch stride 0
        return t[:1].expand_as(t)
    raise ValueError(how)


@pytest.mark.parametrize("how", ["transpose", "step", "pad"])
@pytest.mark.parametrize("dtype", [F32, BF16], ids=str)
def test_strided_kv(dtype, how):
    args = make(2, 3, 256, 64, 96, dtype, seed=11)
    args[0], args[1] = _relayout(args[0], how), _relayout(args[1], how)
    out = check(run(args, 64), ref64(args, 64), dtype)
    contiguous = run([t if t is None else t.contiguous() for t in args], 64)
    for a, b in zip(out, contiguous):
        assert torch.equal(a, b), "the layout changed the result"


@pytest.mark.parametrize("dtype", [F32, BF16], ids=str)
def test_strided_gates_and_states(dtype):
    """Gates and initial states in the caller's strides (no copies), m_initial as (B, NH, 1)."""
    B, NH, S, DHQK, DHHV = 2, 3, 192, 48, 80
    k, v, i, f, C0, n0, m0 = make(B, NH, S, DHQK, DHHV, dtype, seed=13)
    args = [k, v, _relayout(i, "transpose"), _relayout(f, "step"), _relayout(C0, "colmajor"),
            _relayout(n0, "step"), m0.unsqueeze(-1)]
    assert args[2].stride()[1:] == (1, NH) and args[3].stride(-1) == 2
    out = check(run(args, 64), ref64(args[:6] + [m0], 64), dtype)
    plain = run([k, v, i, f, C0, n0, m0], 64)
    for a, b in zip(out, plain):
        assert torch.equal(a, b)
    # broadcast (stride 0) initial states and gates in bfloat16 (validation converts them)
    args = [k, v, i.to(BF16), f.to(BF16), _relayout(C0, "bcast"), _relayout(n0, "bcast"), _relayout(m0, "bcast")]
    check(run(args, 64), ref64(args, 64), dtype)


@pytest.mark.parametrize("init", [True, False], ids=["init", "zeros"])
@pytest.mark.parametrize("dtype", [F32, BF16, F16], ids=str)
def test_no_chunks(dtype, init):
    """S = 0 (NC = 0): only slot 0, the initial state itself (zeros when not given)."""
    args = make(2, 2, 0, 24, 40, dtype, seed=3, init=init)
    C, n, m = run(args, 64)
    assert C.shape == (2, 2, 24, 40) and n.shape == (2, 2, 24) and m.shape == (2, 2, 1)
    if init:
        assert torch.equal(C, args[4]) and torch.equal(n, args[5]) and torch.equal(m[..., 0], args[6])
    else:
        assert not C.any() and not n.any() and not m.any()


def test_zero_sizes():
    for B, NH, S, DHQK, DHHV in [(0, 2, 64, 16, 16), (2, 0, 64, 16, 16), (1, 2, 64, 0, 16), (1, 2, 64, 16, 0),
                                 (1, 1, 64, 0, 0)]:
        args = make(B, NH, S, DHQK, DHHV, BF16, seed=5)
        outs = run(args, 32)
        refs = ref64(args, 32)
        for name, o, r in zip(NAMES, outs, refs):
            assert o.shape == r.shape, name
            if o.numel():
                torch.testing.assert_close(o.cpu(), r.float(), rtol=1e-5, atol=1e-5)


def test_first_slot_exact():
    """Slot 0 is the initial state bit for bit; slot NC of a one-chunk run matches the reference."""
    args = make(2, 2, 64, 72, 136, F32, seed=17)
    C, n, m = run(args, 64)
    assert torch.equal(C[:, :, :72], args[4]) and torch.equal(n[:, :, :72], args[5])
    assert torch.equal(m[:, :, 0], args[6])


@pytest.mark.parametrize("dtype", [F32, BF16], ids=str)
def test_huge_negative_forget_gate(dtype):
    """f = -1e30 at some positions: g_k - bg[s] is a sum of the gates after s, so the other gates
    of the chunk survive (a difference of prefix sums would cancel them to 0). Compared with a
    float64 recurrence that forms g_k - bg[s] as that suffix sum."""
    B, NH, S, D, L = 1, 2, 256, 32, 64
    args = make(B, NH, S, D, D, dtype, seed=19)
    args[3][:, :, [5, 70, 71, 200]] = -1e30
    k, v, i, f, C0, n0, m0 = [t.cpu().double() for t in args]
    fl = F.logsigmoid(f).reshape(B, NH, S // L, L)
    after = torch.cat([fl.flip(-1).cumsum(-1).flip(-1)[..., 1:], torch.zeros_like(fl[..., :1])], -1)
    a = after + i.reshape(B, NH, S // L, L)
    g = fl.sum(-1)
    C, n, m = C0, n0, m0
    Cs, ns, ms = [C], [n], [m]
    kk, vv = k.reshape(B, NH, S // L, L, D), v.reshape(B, NH, S // L, L, D)
    for c in range(S // L):
        m_new = torch.maximum(g[..., c] + m, a[..., c, :].amax(-1))
        decay = torch.exp(g[..., c] + m - m_new)
        kw = kk[:, :, c] * torch.exp(a[..., c, :] - m_new[..., None])[..., None]
        C = decay[..., None, None] * C + kw.transpose(-1, -2) @ vv[:, :, c]
        n = decay[..., None] * n + kw.sum(-2)
        m = m_new
        Cs.append(C), ns.append(n), ms.append(m)
    refs = (torch.stack(Cs, 2).reshape(B, NH, -1, D), torch.stack(ns, 2).reshape(B, NH, -1), torch.stack(ms, 2))
    check(run(args, L), refs, dtype)


@pytest.mark.parametrize("dtype", [F32, BF16, F16], ids=str)
def test_poisoned_outputs(dtype):
    """The caching allocator hands out NaN-filled memory: every output element must be written."""
    for init in (True, False):
        args = make(2, 2, 640, 100, 200, dtype, seed=23, init=init)
        torch.cuda.synchronize()
        poison_allocator("cuda", 4 * 2 * 2 * 11 * 100 * 200)  # large pool (matC_all is 3.5 MB)
        poison_allocator("cuda", 100_000)  # small pool (vecN_all, scaM_all, gate scratch)
        check(run(args, 64), ref64(args, 64), dtype)


def test_determinism():
    args = make(2, 4, 512, 128, 128, BF16, seed=29)
    a, b = run(args, 64), run(args, 64)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


@pytest.mark.parametrize("dtype", [F32, BF16], ids=str)
def test_side_stream(dtype):
    """The kernels run on the current stream: inputs written on a side stream behind a long sleep
    are read correctly, and the result equals the default-stream one."""
    args = make(2, 4, 512, 64, 128, dtype, seed=31)
    expected = run(args, 64)
    torch.cuda.synchronize()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        bufs = [torch.full_like(t, float("nan")) for t in args]
        torch.cuda._sleep(200_000_000)  # ~0.1 s: a kernel on the wrong stream would run first
        for b_, t in zip(bufs, args):
            b_.copy_(t)
        got = run(bufs, 64)
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    for a, b in zip(expected, got):
        assert torch.isfinite(b).all() and torch.equal(a, b)


def test_cuda_graph():
    """Capturable: the scratch buffers come from the caching allocator, no host sync."""
    args = make(2, 2, 256, 64, 64, BF16, seed=37)
    expected = run(args, 64)
    static = [t.clone() for t in args]
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        run(static, 64)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        outs = run(static, 64)
    new = make(2, 2, 256, 64, 64, BF16, seed=41)
    for st, t in zip(static, new):
        st.copy_(t)
    g.replay()
    torch.cuda.synchronize()
    for a, b in zip(run(new, 64), outs):
        assert torch.equal(a, b)
    assert not torch.equal(outs[0], expected[0])


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_second_device():
    """Tensors on cuda:1 while cuda:0 is current: the kernels run on their device."""
    args = make(2, 2, 256, 48, 80, BF16, seed=43, device="cuda:1")
    with torch.cuda.device(0):
        outs = run(args, 64)
    assert all(o.device == torch.device("cuda:1") for o in outs)
    check(outs, ref64(args, 64), BF16)


def test_float64_refused():
    args = make(1, 1, 64, 8, 8, F64, seed=47)
    with pytest.raises(RuntimeError, match="recurrent_fw_states: float64 inputs run on the CPU only"):
        run(args, 32)


@pytest.mark.parametrize("split", ["plan", "1"])
def test_large_model_shape(split, monkeypatch):
    """(8, 16, 4096, 128, 128, 64) bf16 (512 blocks: one warp per strip by the plan, or two
    forced): three (b, h) slices against float64."""
    if split != "plan":
        monkeypatch.setenv("MLSTM_EXT_STATES_SPLIT", split)
    B, NH, S, D, L = 8, 16, 4096, 128, 64
    args = make(B, NH, S, D, D, BF16, seed=53)
    outs = run(args, L)
    for o in outs:
        assert torch.isfinite(o).all()
    for b, h in [(0, 0), (B - 1, NH - 1), (3, 5)]:
        sl = [t[b : b + 1, h : h + 1] for t in args]
        check([o[b : b + 1, h : h + 1] for o in outs], ref64(sl, L), BF16)


def test_chunkwise_fw_uses_these_states(monkeypatch):
    """The two-kernel forward's last states are slot NC of this op (same kernel, same numbers).
    The fused forward (MLSTM_EXT_FUSED_FW=1) makes the same state with its own warp split of the
    sums, so it agrees to float32 rounding, not bit for bit."""
    B, NH, S, D, L = 2, 2, 256, 64, 64
    k, v, i, f, C0, n0, m0 = make(B, NH, S, D, D, BF16, seed=59)
    q = torch.randn_like(k)
    C, n, m = run([k, v, i, f, C0, n0, m0], L)
    NC = S // L
    monkeypatch.setenv("MLSTM_EXT_FUSED_FW", "0")
    outs = torch.ops.mlstm.chunkwise_fw(q, k, v, i, f, C0, n0, m0, chunk_size=L)
    assert torch.equal(outs[1], C[:, :, NC * D :]) and torch.equal(outs[2], n[:, :, NC * D :])
    assert torch.equal(outs[3], m[:, :, NC])
    monkeypatch.setenv("MLSTM_EXT_FUSED_FW", "1")
    fused = torch.ops.mlstm.chunkwise_fw(q, k, v, i, f, C0, n0, m0, chunk_size=L)
    for a, b in [(fused[1], outs[1]), (fused[2], outs[2])]:
        assert torch.isfinite(a).all() and ((a - b).norm() / b.norm()).item() < 1e-5
    assert torch.equal(fused[3], outs[3])
