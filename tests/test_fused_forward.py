"""The fused forward kernel (csrc/cuda/fused_fw_kernel.cuh): chunkwise_fw in one kernel that keeps
every chunk's C on chip (the default at chunk 64 on Hopper; MLSTM_EXT_FUSED_FW=1, set by these
tests, runs it wherever it applies: chunk 64 up to DHQK 256, chunk 128 up to 128). Checked against
the float64 chain (reference recurrent step, then reference H step) and against the two-kernel
forward on fresh random inputs, with NaN-poisoned output memory; that the fused kernel actually
ran (profiler); gradients through mlstm_chunkwise with its saved vecN / vecM. CUDA only (skips
elsewhere).
"""
import pytest
import torch

import mlstm_ext
from conftest import BF16, F16, assert_close, poison_allocator, relayout, requires_cuda
from test_chunkwise import check_against_chain, make_qkvif

pytestmark = [requires_cuda, pytest.mark.cuda]

SHAPES = {  # (B, NH, S, DHQK, DHHV, L): each instance (DHQK cap 128 or 256 at chunk 64, 128 at
    # chunk 128), partial DHQK and DHHV tiles
    "2x3x256-128x128": (2, 3, 256, 128, 128, 64),
    "1x2x192-72x100": (1, 2, 192, 72, 100, 64),
    "1x2x128-256x512": (1, 2, 128, 256, 512, 64),
    "2x1x320-200x64": (2, 1, 320, 200, 64, 64),
    "1x2x192-200x100": (1, 2, 192, 200, 100, 64),
    "2x2x384-128x128-L128": (2, 2, 384, 128, 128, 128),
    "1x2x256-72x100-L128": (1, 2, 256, 72, 100, 128),
}


# chunkwise_fw's outputs and how closely the fused kernel's must match the two kernels' (relative
# norm): H to a few bf16 roundings, the rest to float32 rounding.
OUTPUT_TOLS = [("H", 1e-2), ("C_last", 1e-5), ("n_last", 1e-5), ("m_last", 1e-6), ("vecN", 1e-5),
               ("vecM", 1e-6)]


@pytest.fixture
def fused(monkeypatch):
    monkeypatch.setenv("MLSTM_EXT_FUSED_FW", "1")


@pytest.fixture
def hopper_default(monkeypatch):
    """The default plan where it fuses (compute capability 9.x): MLSTM_EXT_FUSED_FW unset. Gives
    the SM count (grids that fill the GPU)."""
    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the default plan fuses on compute capability 9.x only")
    monkeypatch.delenv("MLSTM_EXT_FUSED_FW", raising=False)
    return torch.cuda.get_device_properties(0).multi_processor_count


def kernels_run(fn):
    """Names of the CUDA kernels that fn() launched."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return {e.name for e in prof.events()}


def two_kernel(monkeypatch, fn):
    monkeypatch.setenv("MLSTM_EXT_FUSED_FW", "0")
    try:
        return fn()
    finally:
        monkeypatch.setenv("MLSTM_EXT_FUSED_FW", "1")


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("dtype", [BF16, F16], ids=["bf16", "f16"])
@pytest.mark.parametrize("init", [False, True], ids=["zero-init", "init"])
def test_fused_matches_float64_chain(fused, seed, shape, dtype, init):
    B, NH, S, DHQK, DHHV, L = shape
    qkvif, st = make_qkvif(B, NH, S, DHQK, DHHV, dtype, init, seed=seed, device="cuda")
    poison_allocator("cuda", 4 * B * NH * S * (DHHV + DHQK * 4))
    out = mlstm_ext.mlstm_chunkwise(*qkvif, *st, return_last_states=True, chunk_size=L)
    cpu = lambda xs: tuple(None if t is None else t.cpu() for t in xs)  # noqa: E731
    H, states = out
    check_against_chain((H.cpu(), cpu(states)), cpu(qkvif), cpu(st), L, True)


AGREE = ["2x3x256-128x128", "1x2x192-72x100", "1x2x128-256x512", "2x2x384-128x128-L128"]


@pytest.mark.parametrize("shape", [SHAPES[k] for k in AGREE], ids=AGREE)
@pytest.mark.parametrize("signed", [False, True], ids=["den", "nsum"])
def test_fused_agrees_with_two_kernels(fused, monkeypatch, seed, shape, signed):
    """Every output of chunkwise_fw, against the two-kernel forward on the same inputs: the same
    products except that Q C_k reads C_k from the accumulators (split hi | lo) instead of from
    memory, so H agrees to a few bf16 roundings and the rest to float32 rounding."""
    B, NH, S, DHQK, DHHV, L = shape
    qkvif, st = make_qkvif(B, NH, S, DHQK, DHHV, BF16, True, seed=seed, device="cuda")
    run = lambda: torch.ops.mlstm.chunkwise_fw(*qkvif, *st, chunk_size=L, vecN_signed=signed)  # noqa: E731
    names = kernels_run(run)
    assert any("fused_fw_kernel" in n for n in names), f"the fused kernel did not run: {sorted(names)}"
    poison_allocator("cuda", 4 * B * NH * S * (DHHV + DHQK * 4))
    got = run()
    ref = two_kernel(monkeypatch, run)
    assert not any("fused_fw_kernel" in n for n in kernels_run(lambda: two_kernel(monkeypatch, run)))
    for (name, tol), a, b in zip(OUTPUT_TOLS, got, ref):
        assert a.shape == b.shape and a.dtype == b.dtype, name
        assert_close(a.float(), b.float(), tol, name)


@pytest.mark.parametrize("how", ["transpose", "pad"])
def test_fused_strided_inputs(fused, seed, how):
    B, NH, S, DHQK, DHHV, L = 2, 2, 192, 64, 96, 64
    qkvif, st = make_qkvif(B, NH, S, DHQK, DHHV, BF16, True, seed=seed, device="cuda")
    strided = tuple(relayout(t, how) for t in qkvif[:3]) + tuple(qkvif[3:])
    got = mlstm_ext.mlstm_chunkwise(*strided, *st, return_last_states=True, chunk_size=L)
    ref = mlstm_ext.mlstm_chunkwise(*qkvif, *st, return_last_states=True, chunk_size=L)
    assert torch.equal(got[0], ref[0])
    for a, b in zip(got[1], ref[1]):
        assert torch.equal(a, b)


def test_fused_gradients_match_two_kernels(fused, monkeypatch, seed):
    """Training through mlstm_chunkwise: the backward reads the fused forward's H, vecN, vecM."""
    B, NH, S, DHQK, DHHV, L = 1, 2, 192, 64, 64, 64
    qkvif, st = make_qkvif(B, NH, S, DHQK, DHHV, BF16, False, seed=seed, device="cuda")
    dH = torch.randn(B, NH, S, DHHV, device="cuda", dtype=BF16)

    def grads():
        x = [t.detach().clone().requires_grad_() for t in qkvif]
        mlstm_ext.mlstm_chunkwise(*x, chunk_size=L).backward(dH)
        return [t.grad for t in x]

    got, ref = grads(), two_kernel(monkeypatch, grads)
    for name, a, b in zip("qkvif", got, ref):
        assert_close(a.float(), b.float(), 2e-2, "d" + name)


def test_fused_default_plan(monkeypatch, seed):
    """Without MLSTM_EXT_FUSED_FW: the fused kernel at chunk 64 on compute capability 9.x (where it
    measured faster), chunk 128 too (run as chunk 64), where its grid of (b*h, 64 DHHV columns)
    blocks fills the GPU (here: two per SM at DHQK 128, one at DHQK 256, and one block on every
    SM at DHQK 128, which runs faster alone), the two kernels where it would leave SMs idle (half
    the SMs, 2 blocks);
    MLSTM_EXT_FUSED_FW=0 turns it off."""
    monkeypatch.delenv("MLSTM_EXT_FUSED_FW", raising=False)
    hopper = torch.cuda.get_device_capability()[0] == 9
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    for (NH, DHQK, L), want in [((2 * sms, 128, 64), hopper), ((sms, 256, 64), hopper),
                                ((2 * sms, 128, 128), hopper), ((sms, 256, 128), hopper),
                                ((sms, 128, 64), hopper), ((sms // 2, 128, 64), False),
                                ((2, 128, 64), False), ((2, 128, 128), False)]:
        qkvif, st = make_qkvif(1, NH, 256, DHQK, 64, BF16, True, seed=seed, device="cuda")
        run = lambda: mlstm_ext.mlstm_chunkwise(*qkvif, *st, chunk_size=L)  # noqa: E731
        assert any("fused_fw_kernel" in n for n in kernels_run(run)) == want, (NH, DHQK, L)
    monkeypatch.setenv("MLSTM_EXT_FUSED_FW", "0")
    qkvif, st = make_qkvif(1, 2 * sms, 128, 128, 64, BF16, True, seed=seed, device="cuda")
    names = kernels_run(lambda: mlstm_ext.mlstm_chunkwise(*qkvif, *st, chunk_size=64))
    assert not any("fused_fw_kernel" in n for n in names)


@pytest.mark.parametrize("DHQK", [128, 200])
def test_default_chunk128_runs_as_chunk64(hopper_default, monkeypatch, seed, DHQK):
    """The default plan runs chunk 128 on Hopper as chunk 64 (the same function up to rounding):
    against the float64 chain at chunk 128, and against the two kernels at chunk 128."""
    sms = hopper_default
    B, NH, S, DHHV, L = 1, 2 * sms if DHQK <= 128 else sms, 256, 64, 128
    qkvif, st = make_qkvif(B, NH, S, DHQK, DHHV, BF16, True, seed=seed, device="cuda")
    run = lambda: torch.ops.mlstm.chunkwise_fw(*qkvif, *st, chunk_size=L)  # noqa: E731
    assert any("fused_fw_kernel" in n for n in kernels_run(run))
    poison_allocator("cuda", 4 * B * NH * S * (DHHV + DHQK * 4))
    got = run()
    ref = two_kernel(monkeypatch, run)
    for (name, tol), a, b in zip(OUTPUT_TOLS, got, ref):
        assert a.shape == b.shape and a.dtype == b.dtype, name
        assert_close(a.float(), b.float(), tol, name)
    monkeypatch.delenv("MLSTM_EXT_FUSED_FW", raising=False)  # two_kernel() left it at 1
    sl = slice(0, 3)  # three heads against the float64 chain (CPU)
    cpu = lambda xs: tuple(None if t is None else t[:, sl].cpu() for t in xs)  # noqa: E731
    H, states = mlstm_ext.mlstm_chunkwise(*qkvif, *st, return_last_states=True, chunk_size=L)
    check_against_chain((H[:, sl].cpu(), cpu(states)), cpu(qkvif), cpu(st), L, True)


@pytest.mark.parametrize("DHQK", [128, 256])
def test_default_two_kernels_run_chunk64_as_128(hopper_default, monkeypatch, seed, DHQK):
    """Where the fused kernel does not run (a grid that leaves SMs idle), the default plan runs
    the two kernels of chunk 64 at chunk 128 when S allows (planned_two_step_chunk): bit for bit
    what MLSTM_EXT_FUSED_FW=0 gives at chunk 128, within rounding of it at chunk 64, and against the
    float64 chain at chunk 64. S = 320 (no multiple of 128) keeps chunk 64."""
    B, NH, S, DHHV = 1, 2, 256, 64
    qkvif, st = make_qkvif(B, NH, S, DHQK, DHHV, BF16, True, seed=seed, device="cuda")
    run = lambda L: torch.ops.mlstm.chunkwise_fw(*qkvif, *st, chunk_size=L)  # noqa: E731
    assert not any("fused_fw_kernel" in n for n in kernels_run(lambda: run(64)))
    poison_allocator("cuda", 4 * B * NH * S * (DHHV + DHQK * 4))
    got = run(64)
    at128, at64 = two_kernel(monkeypatch, lambda: run(128)), two_kernel(monkeypatch, lambda: run(64))
    for (name, tol), a, b, c in zip(OUTPUT_TOLS, got, at128, at64):
        assert torch.equal(a, b), name
        assert_close(a.float(), c.float(), tol, name)
    assert any(not torch.equal(a, c) for a, c in zip(got, at64))  # the plan did run chunk 128
    monkeypatch.delenv("MLSTM_EXT_FUSED_FW", raising=False)  # two_kernel() left it at 0
    cpu = lambda xs: tuple(None if t is None else t.cpu() for t in xs)  # noqa: E731
    H, states = mlstm_ext.mlstm_chunkwise(*qkvif, *st, return_last_states=True, chunk_size=64)
    check_against_chain((H.cpu(), cpu(states)), cpu(qkvif), cpu(st), 64, True)
    x, s320 = make_qkvif(B, NH, 320, DHQK, DHHV, BF16, True, seed=seed, device="cuda")
    got = torch.ops.mlstm.chunkwise_fw(*x, *s320, chunk_size=64)
    ref = two_kernel(monkeypatch, lambda: torch.ops.mlstm.chunkwise_fw(*x, *s320, chunk_size=64))
    assert all(torch.equal(a, b) for a, b in zip(got, ref))


@pytest.mark.parametrize("case", ["nan_v", "inf_k", "nan_q", "nan_f", "inf_i", "huge_forget",
                                  "wide_gates", "large_m"])
def test_default_chunk128_hostile_like_two_kernels(hopper_default, monkeypatch, seed, case):
    """Chunk 128 run as chunk 64 (default plan, Hopper) on hostile inputs: NaN and Inf at the two
    kernels' places at chunk 128, finite values within bf16 rounding."""
    _hostile_like_two_kernels(monkeypatch, seed, case, (1, 2 * hopper_default, 384, 64, 64, 128))


@pytest.mark.parametrize("case", ["plain", "huge_forget", "wide_gates"])
def test_default_chunk128_gradients(hopper_default, monkeypatch, seed, case):
    """Training at chunk 128 with the default plan: the backward (chunk 128) reads vecN and vecM
    of the forward run as chunk 64, whose per-row m may differ from chunk 128's by rounding; the
    gradients must stay finite and match those of the two kernels at chunk 128."""
    sms = hopper_default
    B, NH, S, DHQK, DHHV, L = 1, 2 * sms, 384, 64, 64, 128
    qkvif, st = make_qkvif(B, NH, S, DHQK, DHHV, BF16, False, seed=seed, device="cuda")
    if case != "plain":
        qkvif = _mutate(case, qkvif, L)
    dH = torch.randn(B, NH, S, DHHV, device="cuda", dtype=BF16)

    def grads():
        x = [t.detach().clone().requires_grad_() for t in qkvif]
        mlstm_ext.mlstm_chunkwise(*x, chunk_size=L).backward(dH)
        return [t.grad for t in x]

    assert any("fused_fw_kernel" in n for n in kernels_run(grads))
    got, ref = grads(), two_kernel(monkeypatch, grads)
    for name, a, b in zip("qkvif", got, ref):
        assert_close(a.float(), b.float(), 2e-2, "d" + name)


def test_fused_not_used_where_it_does_not_apply(fused, seed):
    """Chunk 128 with DHQK over 128, chunk 32, DHQK 320 and float32 inputs run the two kernels."""
    for shape, dtype in [((1, 2, 256, 200, 64, 128), BF16), ((1, 2, 128, 64, 64, 32), BF16),
                         ((1, 1, 128, 320, 64, 64), BF16),
                         ((1, 2, 128, 64, 64, 64), torch.float32)]:
        B, NH, S, DHQK, DHHV, L = shape
        qkvif, st = make_qkvif(B, NH, S, DHQK, DHHV, dtype, True, seed=seed, device="cuda")
        names = kernels_run(lambda: mlstm_ext.mlstm_chunkwise(*qkvif, *st, chunk_size=L))
        assert not any("fused_fw_kernel" in n for n in names), shape


def _mutate(case, qkvif, L):
    q, k, v, i, f = [t.clone() for t in qkvif]
    r = L + 37  # a row of chunk 1
    if case == "nan_v":
        v[:, 0, r] = float("nan")
    elif case == "inf_k":
        k[:, 0, r, 3] = -float("inf")
    elif case == "nan_q":
        q[:, 1, r] = float("nan")
    elif case == "nan_f":
        f[:, 0, r] = float("nan")
    elif case == "inf_i":
        i[:, 0, r] = float("inf")
    elif case == "huge_forget":
        f[:, 0, L + 5: L + 9] = -1e30
    elif case == "wide_gates":
        i = 8.0 * i
        f = f - 6.0
    elif case == "large_m":
        i[:, :, :L] += 95.0
    return q, k, v, i, f


def _hostile_like_two_kernels(monkeypatch, seed, case, shape, eps=0.0):
    """chunkwise_fw on inputs mutated by `case`, as the environment picks it, against the two
    kernels: NaN and Inf at the same places, finite values within bf16 rounding."""
    from test_hostile import assert_like
    B, NH, S, DHQK, DHHV, L = shape
    qkvif, st = make_qkvif(B, NH, S, DHQK, DHHV, BF16, True, seed=seed, device="cuda")
    x = _mutate(case, qkvif, L)
    run = lambda: torch.ops.mlstm.chunkwise_fw(*x, *st, chunk_size=L, eps=eps)  # noqa: E731
    poison_allocator("cuda", 4 * B * NH * S * (DHHV + DHQK * 4))
    got = run()
    ref = two_kernel(monkeypatch, run)
    for (name, tol), a, b in zip(OUTPUT_TOLS, got, ref):
        assert_like(a, b, tol, name)


@pytest.mark.parametrize("case", ["nan_v", "inf_k", "nan_q", "nan_f", "inf_i", "huge_forget",
                                  "wide_gates", "large_m"])
@pytest.mark.parametrize("eps", [1e-6, 0.0])
@pytest.mark.parametrize("L, DHQK", [(64, 64), (128, 64), (64, 200)], ids=["L64", "L128", "L64-d200"])
def test_fused_hostile_like_two_kernels(fused, monkeypatch, seed, case, eps, L, DHQK):
    """Non-finite inputs, huge forget gates, wide gates, a large stabiliser with eps = 0: the fused
    forward gives the two-kernel forward's NaN and Inf at the same places (the exact recomputation
    of non-finite tiles) and its finite values within bf16 rounding."""
    _hostile_like_two_kernels(monkeypatch, seed, case, (1, 2, 3 * L, DHQK, 96, L), eps)
