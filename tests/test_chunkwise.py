"""mlstm_ext.mlstm_chunkwise: the whole chunkwise forward (torch.ops.mlstm.chunkwise_fw) under the
calling convention of mlstm_kernels' chunkwise kernels.

Checked against the float64 chain of the reference recurrent step and H step
(mlstm_ext.reference) on fresh random inputs; the last states' shapes, dtypes and layout as
mlstm_kernels' ``mlstm_chunkwise__xl_chunk`` returns them; argument handling and errors.
"""
import pytest
import torch

import mlstm_ext
from conftest import BF16, F16, F32, F64, TOL, assert_close, requires_cuda
from mlstm_ext.reference import parallel_fw_hintra_reference, recurrent_fw_states

# Relative-norm tolerance of the last states vs float64 (float32 accumulation only).
STATE_TOL = 2e-5


def make_qkvif(B=2, NH=2, S=64, DHQK=16, DHHV=24, dtype=F32, init=True, m_shape="B,NH,1",
               device="cpu", seed=0, f_mean=3.0):
    """q, k, v, i ~ N(0, 1), f = f_mean + N(0, 1), rounded to `dtype` (gates float32), and random
    initial states (C0, n0 ~ N(0, 1), m0 ~ N(0, 1)) or Nones."""
    g = torch.Generator(device=device).manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g, device=device, dtype=F32)

    q, k, v = randn(B, NH, S, DHQK).to(dtype), randn(B, NH, S, DHQK).to(dtype), randn(B, NH, S, DHHV).to(dtype)
    i, f = randn(B, NH, S), f_mean + randn(B, NH, S)
    if not init:
        return (q, k, v, i, f), (None, None, None)
    m0 = randn(B, NH, 1) if m_shape == "B,NH,1" else randn(B, NH)
    return (q, k, v, i, f), (randn(B, NH, DHQK, DHHV), randn(B, NH, DHQK), m0)


def chain64(qkvif, init, L, qk_scale=None, eps=1e-6):
    """SPEC.md's whole forward in float64: reference recurrent step, then reference H step.
    Returns (H, C_last, n_last, m_last (B, NH))."""
    q, k, v, i, f = qkvif
    DHQK = q.shape[-1]
    C0, n0, m0 = init
    m0 = None if m0 is None else m0.reshape(m0.shape[0], m0.shape[1])
    C_all, n_all, m_all = recurrent_fw_states(k, v, i, f, L, C0, n0, m0, compute_dtype=F64)
    H, _, _ = parallel_fw_hintra_reference(q, k, v, i, f, C_all, n_all, m_all, qk_scale=qk_scale,
                                           chunk_size=L, eps=eps, compute_dtype=F64)
    NC = m_all.shape[-1] - 1
    return H, C_all[:, :, NC * DHQK:], n_all[:, :, NC * DHQK:], m_all[:, :, NC]


SHAPES = {  # (B, NH, S, DHQK, DHHV, L)
    "2x2x64-16x24-L16": (2, 2, 64, 16, 24, 16),
    "1x3x24-5x7-L8": (1, 3, 24, 5, 7, 8),
    "1x1x6-3x5-L1": (1, 1, 6, 3, 5, 1),
}


def check_against_chain(out, qkvif, init, L, return_last_states, device="cpu", **kw):
    q = qkvif[0]
    B, NH, S, DHQK = q.shape
    DHHV = qkvif[2].shape[-1]
    H64, C64, n64, m64 = chain64(qkvif, init, L, **kw)
    if return_last_states:
        assert isinstance(out, tuple) and len(out) == 2 and len(out[1]) == 3
        H, (C, n, m) = out
    else:
        assert isinstance(out, torch.Tensor), "return_last_states=False must return H alone"
        H = out
    assert H.dtype == q.dtype and H.shape == (B, NH, S, DHHV) and H.device.type == device
    assert_close(H, H64, TOL[device][q.dtype][0], "H")
    if return_last_states:
        # As mlstm_kernels' xl_chunk: float32 states, m as (B, NH, 1), contiguous (xlstm updates
        # them in place during generation).
        assert (C.shape, n.shape, m.shape) == ((B, NH, DHQK, DHHV), (B, NH, DHQK), (B, NH, 1))
        for t in (C, n, m):
            assert t.dtype == F32 and t.is_contiguous() and t.device.type == device
        assert_close(C, C64, STATE_TOL, "C_last")
        assert_close(n, n64, STATE_TOL, "n_last")
        assert_close(m.squeeze(-1), m64, STATE_TOL, "m_last")


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("dtype", [F32, BF16], ids=["f32", "bf16"])
@pytest.mark.parametrize("init", [False, True], ids=["zero-init", "init"])
@pytest.mark.parametrize("return_last_states", [False, True], ids=["H", "H+states"])
def test_matches_float64_chain(seed, shape, dtype, init, return_last_states):
    B, NH, S, DHQK, DHHV, L = shape
    qkvif, st = make_qkvif(B, NH, S, DHQK, DHHV, dtype, init, seed=seed)
    out = mlstm_ext.mlstm_chunkwise(*qkvif, *st, return_last_states=return_last_states, chunk_size=L)
    check_against_chain(out, qkvif, st, L, return_last_states)


def test_keyword_call_and_options(seed):
    """Keyword arguments under mlstm_kernels' names; qk_scale and eps reach the kernel."""
    qkvif, st = make_qkvif(1, 2, 32, 8, 8, F32, True, seed=seed)
    q, k, v, i, f = qkvif
    out = mlstm_ext.mlstm_chunkwise(q=q, k=k, v=v, i=i, f=f, c_initial=st[0], n_initial=st[1],
                                    m_initial=st[2], return_last_states=True, eps=1e-3,
                                    chunk_size=8, qk_scale=0.7)
    check_against_chain(out, qkvif, st, 8, True, qk_scale=0.7, eps=1e-3)


def test_m_initial_shapes_agree(seed):
    """m_initial as (B, NH, 1) (mlstm_kernels) or (B, NH) gives the same result."""
    qkvif, st = make_qkvif(2, 2, 32, 8, 8, F32, True, seed=seed)
    a = mlstm_ext.mlstm_chunkwise(*qkvif, *st, return_last_states=True, chunk_size=16)
    b = mlstm_ext.mlstm_chunkwise(*qkvif, st[0], st[1], st[2].reshape(2, 2), return_last_states=True, chunk_size=16)
    assert torch.equal(a[0], b[0]) and all(torch.equal(x, y) for x, y in zip(a[1], b[1]))


def test_strided_inputs(seed):
    """q, k, v as xlstm passes them (views of (B, S, NH, D) transposed to (B, NH, S, D)) give
    the result of contiguous copies."""
    qkvif, st = make_qkvif(2, 3, 32, 8, 12, F32, True, seed=seed)
    strided = [t.transpose(1, 2).contiguous().transpose(1, 2) for t in qkvif[:3]]
    strided += [t.transpose(1, 2).contiguous().transpose(1, 2) for t in qkvif[3:]]
    assert not strided[0].is_contiguous()
    a = mlstm_ext.mlstm_chunkwise(*qkvif, *st, return_last_states=True, chunk_size=8)
    b = mlstm_ext.mlstm_chunkwise(*strided, *st, return_last_states=True, chunk_size=8)
    torch.testing.assert_close(b[0], a[0], rtol=1e-6, atol=1e-6)
    for x, y in zip(b[1], a[1]):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-6)


def test_grad_modes_share_the_forward(seed):
    qkvif, st = make_qkvif(1, 2, 32, 8, 8, F32, True, seed=seed)
    a = mlstm_ext.mlstm_chunkwise(*qkvif, *st, return_last_states=True, chunk_size=8)
    b = mlstm_ext.mlstm_chunkwise(*qkvif, *st, return_last_states=True, chunk_size=8,
                                  grad_mode="normaliser_constant")
    assert torch.equal(a[0], b[0]) and all(torch.equal(x, y) for x, y in zip(a[1], b[1]))


def test_triton_tuning_kwargs_ignored(seed):
    """The tuning arguments of mlstm_chunkwise__xl_chunk are accepted (and have no effect)."""
    qkvif, st = make_qkvif(1, 2, 32, 8, 8, F32, True, seed=seed)
    a = mlstm_ext.mlstm_chunkwise(*qkvif, chunk_size=16)
    b = mlstm_ext.mlstm_chunkwise(*qkvif, chunk_size=16, siz_b_L_parallel=16, siz_b_L_loop=16,
                                  num_warps_intra=4, chunk_size_inter=16, recompute_states_in_bw=True)
    assert torch.equal(a, b)


def test_autocast_casts_qkv(seed):
    """Under autocast for q's device, q, k, v go to autocast_kernel_dtype (mlstm_kernels'
    custom_fwd(cast_inputs=...)); outside autocast the argument has no effect."""
    qkvif, st = make_qkvif(1, 2, 32, 8, 8, F32, True, seed=seed)
    plain = mlstm_ext.mlstm_chunkwise(*qkvif, *st, chunk_size=16, autocast_kernel_dtype=BF16)
    assert plain.dtype == F32
    with torch.autocast("cpu", dtype=BF16):
        auto = mlstm_ext.mlstm_chunkwise(*qkvif, *st, return_last_states=True, chunk_size=16,
                                         autocast_kernel_dtype=BF16)
        auto32 = mlstm_ext.mlstm_chunkwise(*qkvif, *st, chunk_size=16, autocast_kernel_dtype=F32)
    cast = [t.to(BF16) for t in qkvif[:3]] + list(qkvif[3:])
    expected = mlstm_ext.mlstm_chunkwise(*cast, *st, return_last_states=True, chunk_size=16)
    assert auto[0].dtype == BF16 and torch.equal(auto[0], expected[0])
    assert all(x.dtype == F32 and torch.equal(x, y) for x, y in zip(auto[1], expected[1]))
    assert auto32.dtype == F32 and torch.equal(auto32, plain)


# ----------------------------------------------------------------------------------------------
# Errors


def test_sequence_not_multiple_of_chunk():
    qkvif, _ = make_qkvif(1, 1, 24, 4, 4, F32, False)
    with pytest.raises(ValueError, match=r"S = 24 \(q.size\(2\)\) must be a multiple of chunk_size = 16; pad"):
        mlstm_ext.mlstm_chunkwise(*qkvif, chunk_size=16)


@pytest.mark.parametrize("bad", [0, -8, 8.0], ids=["zero", "negative", "float"])
def test_bad_chunk_size(bad):
    qkvif, _ = make_qkvif(1, 1, 16, 4, 4, F32, False)
    with pytest.raises(ValueError, match="chunk_size must be a positive int, got"):
        mlstm_ext.mlstm_chunkwise(*qkvif, chunk_size=bad)


def test_unknown_kwarg():
    qkvif, _ = make_qkvif(1, 1, 16, 4, 4, F32, False)
    with pytest.raises(TypeError, match="unexpected keyword argument.*chunksize"):
        mlstm_ext.mlstm_chunkwise(*qkvif, chunksize=16)


def test_bad_grad_mode():
    qkvif, _ = make_qkvif(1, 1, 16, 4, 4, F32, False)
    with pytest.raises(ValueError, match="grad_mode must be \"exact\" or \"normaliser_constant\", got 'custbw'"):
        mlstm_ext.mlstm_chunkwise(*qkvif, chunk_size=16, grad_mode="custbw")


def test_op_errors_name_the_argument():
    """Shape errors come from the op's validation, naming the argument."""
    qkvif, st = make_qkvif(1, 2, 16, 4, 4, F32, True)
    with pytest.raises(RuntimeError, match=r"chunkwise_fw: vecF.size\(2\) must be S"):
        mlstm_ext.mlstm_chunkwise(*qkvif[:4], qkvif[4][:, :, :8], chunk_size=8)
    with pytest.raises(RuntimeError, match=r"chunkwise_fw: matC_initial.size\(3\) must be DHHV"):
        mlstm_ext.mlstm_chunkwise(*qkvif, st[0][..., :3], st[1], st[2], chunk_size=8)
    with pytest.raises(ValueError, match=r"q must be a 4-dim tensor"):
        mlstm_ext.mlstm_chunkwise(qkvif[0][0], *qkvif[1:], chunk_size=8)


# ----------------------------------------------------------------------------------------------
# CUDA (the lead runs these on an H100)


@requires_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [F32, BF16, F16], ids=["f32", "bf16", "f16"])
@pytest.mark.parametrize("init", [False, True], ids=["zero-init", "init"])
def test_matches_float64_chain_cuda(seed, dtype, init):
    B, NH, S, DHQK, DHHV, L = 2, 4, 256, 64, 96, 64
    qkvif, st = make_qkvif(B, NH, S, DHQK, DHHV, dtype, init, seed=seed, device="cuda")
    out = mlstm_ext.mlstm_chunkwise(*qkvif, *st, return_last_states=True, chunk_size=L)
    cpu = lambda xs: tuple(None if t is None else t.cpu() for t in xs)  # noqa: E731
    H, states = out
    check_against_chain((H.cpu(), cpu(states)), cpu(qkvif), cpu(st), L, True)
