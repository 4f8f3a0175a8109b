"""CUDA: the CPU correctness tests again on the GPU, plus GPU-only checks (head-dim sweep, streams,
devices, CPU/CUDA agreement, CUDA graphs, large shapes). Skipped without a CUDA device."""
import pytest
import torch

from conftest import (BF16, F16, F32, F64, TOL, assert_close, check_outputs, check_vs_reference,
                      check_whole_chain, make_inputs, op, reference, requires_cuda, run_op)

# The CPU tests, rerun here with device='cuda' (the `device` fixture below).
from test_cpu_op import (  # noqa: F401
    test_any_chunk_size, test_determinism, test_gate_regimes, test_grid, test_launch_hints,
    test_medium, test_noncontiguous, test_output_dtype, test_poison, test_qk_scale_eps,
    test_state_and_gate_dtypes, test_state_slots, test_vecI_4d, test_whole_chain,
    test_whole_chain_all_rows, test_wrappers, test_zero_head_dims, test_zero_size)

pytestmark = [pytest.mark.cuda, requires_cuda]


@pytest.fixture
def device():
    return "cuda"


# Head dims 1..512, paired (DHQK, DHHV), each with a chunk size.
HEAD_DIMS = [
    (1, 1, 16), (3, 8, 32), (8, 3, 64), (16, 16, 128), (48, 80, 64), (64, 64, 256), (80, 48, 32),
    (96, 100, 64), (100, 96, 16), (128, 128, 64), (192, 256, 64), (256, 192, 128), (256, 512, 64),
    (512, 256, 32), (512, 512, 128),
]


@pytest.mark.parametrize("dtype", [F32, BF16, F16], ids=str)
@pytest.mark.parametrize("DHQK,DHHV,L", HEAD_DIMS, ids=lambda x: str(x))
def test_head_dims(make, device, DHQK, DHHV, L, dtype):
    S = 3 * L if L <= 64 else 2 * L
    check_vs_reference(make(B=1, NH=2, S=S, L=L, DHQK=DHQK, DHHV=DHHV, dtype=dtype), device)


@pytest.mark.parametrize("dtype", [F32, BF16, F16], ids=str)
@pytest.mark.parametrize("L", [16, 32, 64, 128, 256, 24, 48, 96])
def test_chunk_sizes(make, device, L, dtype):
    check_vs_reference(make(B=2, NH=2, S=4 * L, L=L, DHQK=64, DHHV=128, dtype=dtype), device)


def _hopper_kernel_used():
    return (torch.ops.mlstm._built_with_sm90a() and torch.cuda.get_device_capability() == (9, 0))


# Shapes for the two 16-bit kernels: tile edges (L < 64, L = 128 with two row tiles, DHHV not a
# multiple of the tile, DHQK not a multiple of 16 or 32) and the standard one; wide heads (DHQK
# above 128: the Hopper kernel's wide layout, K in parts of 128 columns, a short last part, DHQK
# not a multiple of 32).
KERNEL_SHAPES = [(2, 3, 256, 64, 64, 64), (1, 2, 512, 128, 128, 128), (1, 2, 96, 48, 80, 16),
                 (1, 1, 96, 50, 70, 32), (1, 2, 256, 128, 200, 64), (1, 1, 64, 3, 5, 64),
                 (1, 2, 256, 256, 200, 128), (1, 1, 128, 160, 136, 64), (1, 2, 192, 250, 128, 64)]


@pytest.mark.parametrize("dtype", [BF16, F16], ids=str)
@pytest.mark.parametrize("shape", KERNEL_SHAPES, ids=str)
def test_both_16bit_kernels(make, shape, dtype):
    """The Hopper (wgmma) kernel and the sm_80 kernel each match the float64 reference; on an
    H100/H200 with sm_90a code built they are different code (different summation orders), so
    the outputs (H, or the float32 normaliser) differ in low bits: proof that the switch picked
    each."""
    B, NH, S, DHQK, DHHV, L = shape
    inp = make(B=B, NH=NH, S=S, L=L, DHQK=DHQK, DHHV=DHHV, dtype=dtype)
    outs = {}
    try:
        for flag in ("1", "0"):
            torch.ops.mlstm._set_sm90_enabled(flag == "1")
            outs[flag] = check_vs_reference(inp, "cuda")
    finally:
        torch.ops.mlstm._set_sm90_enabled(True)
    if _hopper_kernel_used() and DHQK >= 8:
        assert any(not torch.equal(a, b) for a, b in zip(outs["1"], outs["0"])), \
            "both runs took the same kernel"


# Issue 12's float16 case: input gates spread widely (std 8), forget gates near 0 (f ~ N(0, 1)) or
# near 1 (N(3, 1)), S = 512. Rows whose normaliser cancels pass on every rounding of the weights'
# exponents and of q . n (benchmarks/NOTES.md), so the 16-bit kernels are held to the CPU kernel
# (float32 throughout) on the same inputs: within 2.5x, the float16 rounding of the P V weights
# being ~1.5x on its own (H200: 1.9-2.0x; before the fixes 2.8x at L = 64 and 24x at L = 128).
@pytest.mark.parametrize("L,f_mean", [(64, 0.0), (128, 0.0), (64, 3.0)], ids=str)
def test_wide_input_gates_float16_accuracy(L, f_mean):
    from mlstm_ext.reference import parallel_fw_hintra_reference, recurrent_fw_states
    worst = {"sm90a": 0.0, "sm80": 0.0, "cpu": 0.0}
    for seed in range(3):
        g = torch.Generator(device="cuda").manual_seed(seed)
        B, NH, S, D = 2, 4, 512, 128
        q, k, v = (torch.randn(B, NH, S, D, generator=g, device="cuda").half() for _ in range(3))
        i = 8 * torch.randn(B, NH, S, generator=g, device="cuda")
        f = f_mean + torch.randn(B, NH, S, generator=g, device="cuda")
        C, n, m = (t.float() for t in recurrent_fw_states(k, v, i, f, L, compute_dtype=F64))
        ref = parallel_fw_hintra_reference(q, k, v, i, f, C, n, m, chunk_size=L, compute_dtype=F64)[0]

        def err(H):
            H = H.to(ref.device).double()
            assert torch.isfinite(H).all()
            return ((H - ref).norm() / ref.norm()).item()
        try:
            for name, on in (("sm90a", True), ("sm80", False)):
                torch.ops.mlstm._set_sm90_enabled(on)
                H = op(q, k, v, i, f, C, n, m, chunk_size=L)[0]
                worst[name] = max(worst[name], err(H))
        finally:
            torch.ops.mlstm._set_sm90_enabled(True)
        cpu = [t.cpu() for t in (q, k, v, i, f, C, n, m)]
        worst["cpu"] = max(worst["cpu"], err(op(*cpu, chunk_size=L)[0]))
    assert worst["cpu"] < 2e-3
    for name in ("sm90a", "sm80"):
        assert worst[name] <= 2.5 * worst["cpu"], (name, worst)


def test_transposed_layout_strides(make, device):
    """q/k/v viewed from a (B, S, NH, D) buffer, as a model's projections give them."""
    inp = make(B=2, NH=4, S=256, L=64, DHQK=64, DHHV=96, dtype=BF16)
    inp2 = inp.map(lambda t: t.transpose(1, 2).contiguous().transpose(1, 2), ["q", "k", "v"])
    assert inp2.q.stride()[1:] == (64, 4 * 64, 1)
    out = check_vs_reference(inp2, device)
    for a, b in zip(out, run_op(inp)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [F32, BF16], ids=str)
def test_side_stream(make, dtype):
    """The kernel runs on the current stream: inputs written on a side stream behind a long sleep
    are read correctly, and the result equals the default-stream one."""
    inp = make(B=2, NH=4, S=512, L=64, DHQK=64, DHHV=128, dtype=dtype)
    expected = run_op(inp)
    torch.cuda.synchronize()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        bufs = inp.map(lambda t: torch.full_like(t, float("nan")))  # NaN until the copy below
        torch.cuda._sleep(200_000_000)  # ~0.1 s: a kernel on the wrong stream would run first
        for nm in inp.NAMES:
            getattr(bufs, nm).copy_(getattr(inp, nm))
        got = run_op(bufs)
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    for a, b in zip(expected, got):
        assert torch.isfinite(b).all() and torch.equal(a, b)


def test_cuda_graph(make):
    """Capturable: no host sync or allocation outside the caching allocator."""
    inp = make(B=2, NH=2, S=256, L=64, DHQK=64, DHHV=64)
    expected = run_op(inp)
    static = inp.map(torch.clone)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # warm-up
        run_op(static)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        outs = run_op(static)
    new = make(B=2, NH=2, S=256, L=64, DHQK=64, DHHV=64)
    for nm in inp.NAMES:
        getattr(static, nm).copy_(getattr(new, nm))
    g.replay()
    torch.cuda.synchronize()
    for a, b in zip(run_op(new), outs):
        assert torch.equal(a, b)
    assert not torch.equal(outs[0], expected[0])


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_second_device(make):
    """Tensors on cuda:1 while cuda:0 is current: the kernel runs on their device."""
    inp = make(B=2, S=256, L=64, DHQK=48, DHHV=80, device="cuda:1")
    with torch.cuda.device(0):
        outs = run_op(inp)
    assert all(o.device == torch.device("cuda:1") for o in outs)
    check_outputs(outs, reference(inp), F32, "cuda")


@pytest.mark.parametrize("dtype", [F32, BF16, F16], ids=str)
def test_cpu_cuda_agree(seed, dtype):
    inp = make_inputs(B=2, NH=2, S=256, L=64, DHQK=48, DHHV=80, dtype=dtype, seed=seed)
    cpu = run_op(inp)
    gpu = run_op(inp.to("cuda"))
    tol_h, tol_nm = TOL["cuda"][dtype]
    for name, a, b, tol in zip(("matH", "vecN", "vecM"), cpu, gpu, (tol_h, tol_nm, tol_nm)):
        assert b.device.type == "cuda" and a.dtype == b.dtype
        assert_close(b.cpu(), a, tol, name)


@pytest.mark.parametrize("bad,field", list(zip(
    ["matK", "matV", "vecI", "vecF", "matC_all", "vecN_all", "scaM_all"], ["k", "v", "i", "f", "C", "n", "m"])))
def test_mixed_devices(make, bad, field):
    inp = make(B=1, S=64, L=32, DHQK=16, DHHV=16)
    moved = inp.map(lambda t: t.cpu(), [field])
    with pytest.raises(RuntimeError, match=rf"parallel_fw_hintra: {bad} must be on the same device as matQ \(cuda:0\), got cpu"):
        run_op(moved)
    # matQ on the CPU, the rest on the GPU: dispatched to CUDA, rejected there
    with pytest.raises(RuntimeError, match=r"parallel_fw_hintra: matK must be on the same device as matQ \(cpu\), got cuda:0"):
        run_op(inp.map(lambda t: t.cpu(), ["q"]))


def test_compile_inductor_cuda(make):
    torch._dynamo.reset()
    inp = make(B=2, S=128, L=64, DHQK=64, DHHV=64, dtype=BF16)

    def fn(*args):
        h, n, m = op(*args, chunk_size=64)
        return h.float() * 2.0, n, m

    compiled = torch.compile(fn, fullgraph=True)
    for a, b in zip(fn(*inp.args()), compiled(*inp.args())):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-6)


def check_large(inp, n_f64_slices=3, tol=1e-2):
    """Large shapes: all of matH vs a float32 GPU reference, batch by batch; a few (b, h) slices
    vs float64."""
    B, NH = inp.q.shape[:2]
    dev = inp.q.device.type
    outs = run_op(inp)
    for o in outs:
        assert torch.isfinite(o).all()
    tol_h, tol_nm = TOL[dev][inp.q.dtype]
    for b in range(B):
        ref = reference(inp.map(lambda t: t[b : b + 1]), dtype=F32)
        for name, o, r, t in zip(("matH", "vecN", "vecM"), outs, ref, (tol_h, tol_nm, tol_nm)):
            assert_close(o[b : b + 1], r, t, f"{name}[b={b}] vs float32 reference")
        del ref
    for b, h in [(0, 0), (B - 1, NH - 1), (B // 2, NH // 3)][:n_f64_slices]:
        ref = reference(inp.map(lambda t: t[b : b + 1, h : h + 1]))
        check_outputs([o[b : b + 1, h : h + 1] for o in outs], ref, inp.q.dtype, dev)


def test_large_b8_nh16_s4096(seed, device):
    inp = make_inputs(B=8, NH=16, S=4096, L=64, DHQK=128, DHHV=128, dtype=BF16, device=device,
                      seed=seed, state_compute=F32)
    check_large(inp)


def test_large_s16384_dhqk256_dhhv512(seed, device):
    inp = make_inputs(B=1, NH=8, S=16384, L=128, DHQK=256, DHHV=512, dtype=BF16, device=device,
                      seed=seed, state_compute=F32)
    check_large(inp)


@pytest.mark.parametrize("S,L,D", [(1024, 64, 128), (512, 128, 64)])
def test_whole_chain_cuda_large(make, S, L, D):
    """The chain vs the quadratic mLSTM at model-like sizes."""
    check_whole_chain(make(B=2, NH=4, S=S, L=L, DHQK=D, DHHV=D, state_dtype=F64, init_state=False), tol=5e-5)
