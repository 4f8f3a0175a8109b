"""Shared helpers and fixtures of the mlstm_ext tests.

Test modules import the plain helpers with ``from conftest import ...`` (tests/ is on sys.path under
pytest's default import mode) and use the fixtures (``make``, ``seed``, ``device``) by name.
"""
import zlib
from dataclasses import dataclass, replace
from typing import Optional

import pytest
import torch

import mlstm_ext  # noqa: F401  (loads the op library)
from mlstm_ext.reference import TOLERANCES, parallel_fw_hintra_reference, recurrent_fw_states
from quadratic import quadratic_mlstm

op = torch.ops.mlstm.parallel_fw_hintra
HAS_CUDA = torch.cuda.is_available()
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")

F32, BF16, F16, F64 = torch.float32, torch.bfloat16, torch.float16, torch.float64
# Relative-norm tolerances vs the float64 reference on the same (rounded) inputs, defined once in
# the package: device type -> input dtype -> (matH, vecN/vecM).
TOL = TOLERANCES
# Extra room for vecN/vecM stored in a narrow output_dtype (one rounding of the result).
OUT_ROUNDING = {F32: 0.0, F64: 0.0, BF16: 1e-2, F16: 2e-3}


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA device (skipped without one)")


def pytest_collection_modifyitems(config, items):
    if not HAS_CUDA:
        skip = pytest.mark.skip(reason="needs a CUDA device")
        for item in items:
            if "cuda" in item.keywords:
                item.add_marker(skip)


# ----------------------------------------------------------------------------------------------
# Inputs


@dataclass
class Inputs:
    q: torch.Tensor  # (B, NH, S, DHQK)
    k: torch.Tensor
    v: torch.Tensor  # (B, NH, S, DHHV)
    i: torch.Tensor  # (B, NH, S) or (B, NH, NC, L)
    f: torch.Tensor  # (B, NH, S)
    C: torch.Tensor  # (B, NH, slots*DHQK, DHHV)
    n: torch.Tensor  # (B, NH, slots*DHQK)
    m: torch.Tensor  # (B, NH, slots)
    L: int

    NAMES = ("q", "k", "v", "i", "f", "C", "n", "m")

    def args(self):
        return tuple(getattr(self, nm) for nm in self.NAMES)

    def map(self, fn, names=NAMES) -> "Inputs":
        """A copy with fn applied to the named tensors."""
        return replace(self, **{nm: fn(getattr(self, nm)) for nm in names})

    def to(self, device) -> "Inputs":
        return self.map(lambda t: t.to(device))


def make_inputs(
    B=1, NH=2, S=128, DHQK=32, DHHV=None, L=64, dtype=F32, device="cpu", seed=0,
    i_mean=0.0, f_mean=3.0, f_const=None, gate_dtype=F32,
    state_dtype=F32, state_compute=F64, slots="NC+1", init_state=True,
) -> Inputs:
    """Random q, k, v, i ~ N(0, 1), f = f_mean + N(0, 1) (or the constant f_const), rounded to
    their dtypes; the states come from the recurrent step on those rounded values, starting from
    random N(0, 1) states (init_state) or from zeros (the quadratic mLSTM's case)."""
    DHHV = DHQK if DHHV is None else DHHV
    gen = torch.Generator(device=device).manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, device=device, dtype=F32)

    q, k = randn(B, NH, S, DHQK).to(dtype), randn(B, NH, S, DHQK).to(dtype)
    v = randn(B, NH, S, DHHV).to(dtype)
    i = (i_mean + randn(B, NH, S)).to(gate_dtype)
    f = (f_mean + randn(B, NH, S)) if f_const is None else torch.full((B, NH, S), float(f_const), device=device)
    f = f.to(gate_dtype)
    init = (randn(B, NH, DHQK, DHHV), randn(B, NH, DHQK), randn(B, NH)) if init_state else (None,) * 3
    C, n, m = recurrent_fw_states(k, v, i, f, L, *init, compute_dtype=state_compute)
    C, n, m = C.to(state_dtype), n.to(state_dtype), m.to(state_dtype)
    NC = S // L
    extra = {"NC": 0, "NC+1": 1, "NC+2": 2}[slots]
    if extra == 2:  # one more (never read) slot of junk
        C = torch.cat([C, randn(B, NH, DHQK, DHHV).to(state_dtype)], 2)
        n = torch.cat([n, randn(B, NH, DHQK).to(state_dtype)], 2)
        m = torch.cat([m, randn(B, NH, 1).to(state_dtype)], 2)
    else:
        C, n, m = C[:, :, : (NC + extra) * DHQK], n[:, :, : (NC + extra) * DHQK], m[:, :, : NC + extra]
    return Inputs(q, k, v, i, f, C, n, m, L)


def relayout(t: torch.Tensor, how: str) -> torch.Tensor:
    """The same values (except 'bcast') with other strides."""
    if how == "contig":
        return t.contiguous()
    if how == "transpose":  # memory order of (B, S, NH, ...) seen as (B, NH, S, ...)
        return t.transpose(1, 2).contiguous().transpose(1, 2)
    if how == "colmajor":  # last two dims swapped in memory
        return t.transpose(-1, -2).contiguous().transpose(-1, -2)
    if how == "pad":  # a slice of a wider last dim (unit stride, padded rows)
        return torch.cat([t, torch.full_like(t[..., :3], float("nan"))], -1)[..., : t.shape[-1]]
    if how == "step":  # last-dim stride 2
        return torch.stack([t, torch.full_like(t, float("nan"))], -1).flatten(-2)[..., ::2]
    if how == "bcast":  # batch stride 0 (values of batch 0 everywhere)
        return t[:1].expand_as(t)
    raise ValueError(how)


@pytest.fixture
def seed(request) -> int:
    """A seed of its own per test and per parameter set (stable across runs)."""
    s = zlib.crc32(request.node.nodeid.encode()) & 0x7FFFFFFF
    torch.manual_seed(s)
    return s


@pytest.fixture
def device() -> str:
    """Where the op runs; test_cuda_op.py overrides it with 'cuda'."""
    return "cpu"


@pytest.fixture
def make(seed, device):
    """make(**kw) -> Inputs: fresh random inputs on `device`, a new seed per call."""
    count = [0]

    def _make(**kw):
        count[0] += 1
        kw.setdefault("device", device)
        return make_inputs(seed=seed * 7919 + count[0], **kw)

    return _make


# ----------------------------------------------------------------------------------------------
# Running and checking


def run_op(inp: Inputs, **kw):
    return op(*inp.args(), chunk_size=inp.L, **kw)


def reference(inp: Inputs, qk_scale=None, eps=1e-6, dtype=F64):
    """SPEC's arithmetic in `dtype` (float64 by default) on exactly the op's inputs."""
    return parallel_fw_hintra_reference(*inp.args(), qk_scale=qk_scale, chunk_size=inp.L, eps=eps,
                                        compute_dtype=dtype)


def errors(out: torch.Tensor, ref: torch.Tensor):
    """(relative norm ||out - ref|| / ||ref||, max abs error), in float64."""
    if out.numel() == 0:
        return 0.0, 0.0
    d = out.double() - ref.double()
    return (d.norm() / ref.double().norm().clamp_min(1e-300)).item(), d.abs().max().item()


def assert_close(out, ref, tol, name="out"):
    """Shapes equal, everything finite, relative-norm error <= tol."""
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    assert torch.isfinite(ref).all(), f"{name}: the reference is not finite (test bug)"
    assert torch.isfinite(out).all(), f"{name}: {(~torch.isfinite(out)).sum().item()} non-finite values"
    rel, mx = errors(out, ref)
    amax = ref.abs().max().item() if ref.numel() else 0.0
    assert rel <= tol, f"{name}: relative-norm error {rel:.3g} > {tol:.3g} (max abs err {mx:.3g}, max |ref| {amax:.3g})"
    return rel, mx


def check_outputs(outs, refs, in_dtype, device="cpu", out_dtype=F32, tol=None):
    """Dtypes and shapes of (matH, vecN, vecM), and each close to the float64 reference."""
    matH, vecN, vecM = outs
    assert matH.dtype == in_dtype and vecN.dtype == out_dtype and vecM.dtype == out_dtype
    assert matH.device.type == vecN.device.type == vecM.device.type == torch.device(device).type
    tol_h, tol_nm = TOL[torch.device(device).type][in_dtype] if tol is None else tol
    tol_nm = max(tol_nm, OUT_ROUNDING[out_dtype])
    return (assert_close(matH, refs[0], tol_h, "matH"),
            assert_close(vecN, refs[1], tol_nm, "vecN"),
            assert_close(vecM, refs[2], tol_nm, "vecM"))


def check_vs_reference(inp: Inputs, device="cpu", out_dtype=None, tol=None, **kw):
    """Run the op and compare all three outputs with the float64 reference; returns the outputs."""
    outs = run_op(inp, output_dtype=out_dtype, **kw)
    refs = reference(inp, **{k: v for k, v in kw.items() if k in ("qk_scale", "eps")})
    check_outputs(outs, refs, inp.q.dtype, device, F32 if out_dtype is None else out_dtype, tol)
    return outs


def check_whole_chain(inp: Inputs, tol: float, margin: Optional[float] = 2.0, eps: float = 1e-6):
    """Recurrent states (in inp) + the op vs the quadratic mLSTM, on the rows whose |sum c| clears
    both normaliser floors by `margin` (SPEC: the two stabilisers may floor differently).
    margin=None compares every row: in unscaled terms both normalisers are max(|sum|, 1) times
    exp(-stabiliser), so the floored rows agree as well (clamp included)."""
    B, NH, S, _ = inp.q.shape
    assert not inp.C[:, :, : inp.q.shape[-1]].any(), "the quadratic form needs zero initial states"
    matH, vecN, vecM = run_op(inp, eps=eps)
    Hq, csum, M = quadratic_mlstm(inp.q, inp.k, inp.v, inp.i.reshape(B, NH, S), inp.f)
    for t in (matH, vecN, vecM):
        assert torch.isfinite(t).all()
    vecN, vecM = vecN.double(), vecM.double()
    keep = torch.ones_like(csum, dtype=torch.bool)
    if margin is not None:
        keep = (csum.abs() > margin * torch.exp(-M)) & (vecN > margin * torch.exp(-vecM))
        assert keep.float().mean() > 0.5, "too few rows to compare: change the inputs"
    H = matH.double() * ((vecN + eps) / vecN).unsqueeze(-1)  # undo eps: the quadratic form has none
    return assert_close(H[keep], Hq[keep], tol, "matH (chain vs quadratic)")


def poison_allocator(device, numel: int, dtype=F32):
    """Fill then free a block, so that the op's torch.empty may reuse NaN-filled memory."""
    junk = torch.full((numel,), float("nan"), dtype=dtype, device=device)
    del junk
