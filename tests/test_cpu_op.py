"""Correctness of torch.ops.mlstm.parallel_fw_hintra against the float64 reference.

Every test takes the `device` fixture ('cpu' here); test_cuda_op.py imports these tests and runs
them again with device='cuda'.
"""
import pytest
import torch

from conftest import (BF16, F16, F32, F64, TOL, check_outputs, check_vs_reference,
                      check_whole_chain, make_inputs, poison_allocator, reference, relayout,
                      run_op)

DTYPES = [F32, BF16, F16]

# (B, NH, S, DHQK, DHHV, L): one and several chunks, L = 16..256 and odd L, head dims that are
# not powers of 2, DHQK != DHHV, tiny head dims.
GRID = [
    (1, 2, 16, 16, 16, 16),
    (2, 1, 96, 48, 80, 16),
    (1, 2, 128, 80, 48, 32),
    (1, 2, 64, 64, 64, 64),
    (2, 2, 256, 48, 48, 64),
    (1, 2, 256, 32, 96, 128),
    (1, 1, 512, 16, 40, 256),
    (1, 2, 72, 3, 5, 24),
    (2, 1, 48, 1, 1, 24),
    (1, 2, 96, 48, 80, 96),
]


def shape_id(c):
    return "B{}NH{}S{}qk{}hv{}L{}".format(*c)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", GRID, ids=shape_id)
def test_grid(make, device, case, dtype):
    B, NH, S, DHQK, DHHV, L = case
    check_vs_reference(make(B=B, NH=NH, S=S, DHQK=DHQK, DHHV=DHHV, L=L, dtype=dtype), device)


# Any chunk size >= 1 that divides S: L = 1, L = S, L = 3, L = 40.
@pytest.mark.parametrize("S,L", [(8, 1), (40, 40), (12, 3), (120, 40)])
def test_any_chunk_size(make, device, S, L):
    check_vs_reference(make(S=S, L=L, DHQK=8, DHHV=12), device)


@pytest.mark.parametrize("dtype", [F32, BF16], ids=str)
def test_vecI_4d(make, device, dtype):
    inp = make(B=2, S=192, L=64, DHQK=48, DHHV=80, dtype=dtype)
    out3 = run_op(inp)
    inp4 = inp.map(lambda t: t.reshape(2, 2, 3, 64), ["i"])
    out4 = check_vs_reference(inp4, device)
    for a, b in zip(out3, out4):  # (B, NH, S) and (B, NH, NC, L) are the same vecI
        assert torch.equal(a, b)


# (which tensors, layout): q/k/v as (B, S, NH, D).transpose(1, 2), sliced or strided last dims,
# column-major states, transposed/strided gates, batch-broadcast (stride 0) tensors.
NONCONTIG = [
    ("qkv", "transpose"), ("qkv", "pad"), ("qkv", "step"), ("qkv", "colmajor"), ("qkv", "bcast"),
    ("gates", "transpose"), ("gates", "step"), ("gates", "bcast"),
    ("states", "transpose"), ("states", "colmajor"), ("states", "pad"), ("states", "step"),
    ("all", "transpose"), ("all", "step"),
]
GROUPS = {"qkv": ["q", "k", "v"], "gates": ["i", "f"], "states": ["C", "n", "m"],
          "all": ["q", "k", "v", "i", "f", "C", "n", "m"]}


@pytest.mark.parametrize("dtype", [F32, BF16], ids=str)
@pytest.mark.parametrize("which,how", NONCONTIG, ids=lambda x: str(x))
def test_noncontiguous(make, device, which, how, dtype):
    inp = make(B=2, S=128, L=32, DHQK=48, DHHV=80, dtype=dtype)
    inp = inp.map(lambda t: relayout(t, how), GROUPS[which])
    assert not all(t.is_contiguous() for t in inp.args())
    check_vs_reference(inp, device)


# Gate regimes: the -10 clamp (very negative i), strong forgetting, huge i, no forgetting.
REGIMES = {
    "clamp": dict(i_mean=-30.0),
    "f_low": dict(f_mean=-2.0),
    "f_const": dict(f_const=-8.0),
    "i_big": dict(i_mean=15.0),
    "f_big": dict(f_mean=12.0),
}


@pytest.mark.parametrize("dtype", [F32, BF16], ids=str)
@pytest.mark.parametrize("regime", list(REGIMES))
def test_gate_regimes(make, device, regime, dtype):
    inp = make(B=1, S=256, L=64, DHQK=48, DHHV=32, dtype=dtype, **REGIMES[regime])
    tol = None
    if regime == "i_big":
        # exp(-m) ~ e^-15 no longer floors the normaliser: rows where |sum w| << sum |w| amplify the
        # float32 rounding of q.k (the float32 CPU kernel measures ~3e-3 here). Loose but finite.
        tol = (2e-2, TOL[torch.device(device).type][dtype][1])
    matH, vecN, vecM = check_vs_reference(inp, device, tol=tol)
    if regime == "clamp":  # the clamp must actually decide some rows
        assert (vecM == -10.0).any()


@pytest.mark.parametrize("qk_scale,eps", [(0.1, 1e-6), (1.0, 0.0), (2.5, 1e-3), (None, 0.5)])
def test_qk_scale_eps(make, device, qk_scale, eps):
    inp = make(S=128, L=32, DHQK=48, DHHV=80)
    check_vs_reference(inp, device, qk_scale=qk_scale, eps=eps)


@pytest.mark.parametrize("out_dtype", [F32, F64, BF16, F16], ids=str)
@pytest.mark.parametrize("dtype", [F32, BF16], ids=str)
def test_output_dtype(make, device, dtype, out_dtype):
    check_vs_reference(make(S=128, L=64, DHQK=32, DHHV=48, dtype=dtype), device, out_dtype=out_dtype)


# States and gates in other float dtypes ("others accepted / upcast"); the reference gets the same
# rounded values.
@pytest.mark.parametrize("state_dtype,gate_dtype", [(F64, F32), (BF16, F32), (F16, F32), (F32, BF16), (F32, F64), (F16, F16)], ids=str)
def test_state_and_gate_dtypes(make, device, state_dtype, gate_dtype):
    inp = make(S=128, L=32, DHQK=48, DHHV=32, state_dtype=state_dtype, gate_dtype=gate_dtype)
    check_vs_reference(inp, device)


@pytest.mark.parametrize("dtype", [F32, BF16], ids=str)
def test_state_slots(seed, device, dtype):
    """NC or NC+1 slots (slot NC is never read); more is an error (states of another chunk size)."""
    kw = dict(B=2, S=192, L=64, DHQK=48, DHHV=80, dtype=dtype)
    base = run_op(make_inputs(seed=seed, device=device, **kw))
    check_vs_reference(make_inputs(seed=seed, device=device, **kw), device)
    inp = make_inputs(seed=seed, device=device, slots="NC", **kw)
    for a, b in zip(base, run_op(inp)):
        assert torch.equal(a, b)
    for a, b in zip(base, run_op(inp.map(torch.Tensor.contiguous))):
        assert torch.equal(a, b)
    with pytest.raises(RuntimeError, match="states made with another chunk_size or sequence length"):
        run_op(make_inputs(seed=seed, device=device, slots="NC+2", **kw))


@pytest.mark.parametrize("hints", [
    dict(siz_b_LQ=7, siz_b_LKV=64),
    dict(siz_b_LQ=1, siz_b_LKV=1, siz_b_DHQK=1, siz_b_DHHV=1),
    dict(siz_b_LQ=128, siz_b_LKV=16, siz_b_DHQK=1000, siz_b_DHHV=1000, num_warps=1, num_stages=7),
    dict(siz_b_DHQK=16, siz_b_DHHV=16, num_warps=8, num_stages=1),
], ids=lambda h: "-".join(f"{k[6:] if k.startswith('siz_b_') else k}{v}" for k, v in h.items()))
def test_launch_hints(make, device, hints):
    """Any positive hint is accepted and does not change the result beyond rounding."""
    check_vs_reference(make(S=128, L=32, DHQK=48, DHHV=80), device, **hints)


@pytest.mark.parametrize("B,NH,S,DHQK,DHHV,L", [
    (0, 2, 64, 16, 16, 32), (1, 0, 64, 16, 16, 32), (1, 2, 0, 16, 16, 32), (0, 0, 0, 8, 8, 64),
])
@pytest.mark.parametrize("dtype", [F32, BF16], ids=str)
def test_zero_size(make, device, B, NH, S, DHQK, DHHV, L, dtype):
    inp = make(B=B, NH=NH, S=S, DHQK=DHQK, DHHV=DHHV, L=L, dtype=dtype)
    matH, vecN, vecM = run_op(inp, output_dtype=F64)
    assert matH.shape == (B, NH, S, DHHV) and matH.dtype == dtype
    assert vecN.shape == vecM.shape == (B, NH, S) and vecN.dtype == vecM.dtype == F64
    assert matH.device.type == vecN.device.type == torch.device(device).type


def test_zero_head_dims(make, device):
    """DHHV = 0 (no matH, vecN/vecM still computed) and DHQK = 0 (every q.k is 0)."""
    check_vs_reference(make(S=64, L=32, DHQK=16, DHHV=0), device)
    check_vs_reference(make(S=64, L=32, DHQK=0, DHHV=16), device, qk_scale=0.5)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_poison(make, device, dtype):
    """Every output element is written: NaN-filled memory just freed, odd sizes, and every
    reference element nonzero, so no element may be left over or skipped."""
    inp = make(B=2, NH=3, S=120, L=24, DHQK=19, DHHV=37, dtype=dtype)
    refs = reference(inp)
    assert all((r != 0).all() for r in refs)
    for numel in (2 * 3 * 120 * 37, 2 * 3 * 120):
        poison_allocator(device, numel, dtype)
        poison_allocator(device, numel, F32)
    outs = run_op(inp)
    check_outputs(outs, refs, dtype, device)
    # elementwise as well: one wrong element hides in a norm
    tol_h = TOL[torch.device(device).type][dtype][0]
    for o, r in zip(outs, refs):
        assert ((o.double() - r).abs() <= 50 * tol_h * (r.abs() + r.abs().mean())).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_determinism(make, device, dtype):
    inp = make(B=2, S=256, L=64, DHQK=48, DHHV=80, dtype=dtype)
    a, b = run_op(inp), run_op(inp)
    for x, y in zip(a, b):
        assert torch.isfinite(x).all() and torch.equal(x, y)


@pytest.mark.parametrize("S,L,DHQK,DHHV", [(256, 64, 48, 80), (384, 32, 32, 32), (256, 128, 16, 24)])
def test_whole_chain(make, device, S, L, DHQK, DHHV):
    """float64 recurrent states + the op (float32 inputs) == the quadratic mLSTM."""
    inp = make(B=2, S=S, L=L, DHQK=DHQK, DHHV=DHHV, state_dtype=F64, init_state=False)
    check_whole_chain(inp, tol=5e-5)


@pytest.mark.parametrize("regime", ["normal", "clamp", "f_low"])
def test_whole_chain_all_rows(make, device, regime):
    """Every row, floored ones included (see check_whole_chain)."""
    kw = {"normal": {}, "clamp": REGIMES["clamp"], "f_low": REGIMES["f_low"]}[regime]
    inp = make(B=2, S=256, L=64, DHQK=48, DHHV=80, state_dtype=F64, init_state=False, **kw)
    check_whole_chain(inp, tol=5e-5, margin=None)


def test_medium(make, device):
    """One medium shape: many chunks, realistic head dims."""
    inp = make(B=2, NH=4, S=2048, L=64, DHQK=128, DHHV=128)
    check_vs_reference(inp, device)


def test_wrappers(make, device):
    """Both Python names give the op's result."""
    import mlstm_ext
    inp = make(S=64, L=32, DHQK=16, DHHV=24)
    expected = run_op(inp)
    for fn in (mlstm_ext.parallel_fw_hintra, mlstm_ext.mlstm_chunkwise__parallel_fw_Hintra):
        for a, b in zip(expected, fn(*inp.args(), chunk_size=inp.L)):
            assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [F32, BF16], ids=str)
@pytest.mark.parametrize("case", GRID[:8], ids=shape_id)
def test_cpu_portable_path(make, device, monkeypatch, case, dtype):
    """The CPU kernel's SSE2/NEON build (the AVX2 one runs by default here) computes the same."""
    if device != "cpu":
        pytest.skip("CPU code path")
    B, NH, S, DHQK, DHHV, L = case
    inp = make(B=B, NH=NH, S=S, DHQK=DHQK, DHHV=DHHV, L=L, dtype=dtype)
    monkeypatch.setenv("MLSTM_EXT_CPU_PORTABLE", "1")
    check_vs_reference(inp, device)
