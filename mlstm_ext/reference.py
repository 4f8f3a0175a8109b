"""The float64 contract: pure-PyTorch mLSTM chunkwise pieces written straight from SPEC.md, the
inputs SPEC's checks use, and the accuracy every op must meet against them.

- ``parallel_fw_hintra_reference``: the H step, materialising the (NC, L, L) gate matrix. Runs in
  any floating dtype (the tests use float64; the benchmarks time it as the "PyTorch eager" peer).
- ``recurrent_fw_states``: the recurrent step that makes the chunk-border states the H step reads.
- ``chunkwise_fw_reference``: the two chained, with the outputs of ``mlstm.chunkwise_fw``; with
  ``detach_m`` (and ``detach_den``) it is what the backward of ``chunkwise_fw``
  (``mlstm_ext.autograd``) differentiates (SPEC.md, "Gradients").
- ``random_inputs``, ``rel_norm_err``, ``TOLERANCES``: the inputs, the error measure and the
  tolerances of the self-check (``python -m mlstm_ext``), the tests and the benchmarks.

``recurrent_fw_states`` is TorchScript-able: ``mlstm_ext.layer`` uses it in scripted models.
"""
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

MINIMUM_MAX_VAL: float = -10.0

# Relative-norm error ||x - x64|| / ||x64|| allowed against the float64 reference evaluated on the
# same (rounded) inputs: device type -> input dtype -> (matH, the float32 outputs: vecN, vecM and
# the states). 16-bit inputs: about the rounding of the 16-bit output itself; float32 inputs:
# float32-accurate arithmetic (on CUDA 1e-4 for the float32 outputs, as the tests have required
# since the first CUDA kernel). The one table: the main job, tests/ and benchmarks/ import it.
TOLERANCES: Dict[str, Dict[torch.dtype, Tuple[float, float]]] = {
    "cpu": {torch.float32: (2e-5, 1e-5), torch.bfloat16: (1e-2, 1e-2), torch.float16: (2e-3, 2e-3)},
    "cuda": {torch.float32: (2e-5, 1e-4), torch.bfloat16: (1e-2, 1e-2), torch.float16: (2e-3, 2e-3)},
}
# chunkwise_bw, every gradient (any device): 16-bit inputs carry their rounding (of H, dH and, on
# CUDA, of the GEMM operands) into every gradient.
BACKWARD_TOLERANCES: Dict[torch.dtype, float] = {torch.float32: 2e-5, torch.bfloat16: 3e-2, torch.float16: 8e-3}


# Finite log forget gates below this count as this (SPEC.md, step 1): its weight e^-1e6 is 0 in
# any precision, and prefix sums of such gates stay exact to ~1e-8 beside ordinary ones (-1e30
# would absorb every other gate of its chunk even in float64).
MIN_LOG_FORGET = -1e6


def log_forget(f: torch.Tensor) -> torch.Tensor:
    """logsigmoid(f), finite values clamped at MIN_LOG_FORGET (-inf and NaN kept)."""
    lf = F.logsigmoid(f)
    return torch.where(torch.isinf(lf), lf, lf.clamp_min(MIN_LOG_FORGET))


def parallel_fw_hintra_reference(
    matQ: torch.Tensor,
    matK: torch.Tensor,
    matV: torch.Tensor,
    vecI: torch.Tensor,
    vecF: torch.Tensor,
    matC_all: torch.Tensor,
    vecN_all: torch.Tensor,
    scaM_all: torch.Tensor,
    qk_scale: Optional[float] = None,
    chunk_size: int = 64,
    eps: float = 1e-6,
    compute_dtype: Optional[torch.dtype] = None,
    detach_m: bool = False,
    detach_den: bool = False,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SPEC.md steps 1-7. Returns (matH, vecN, vecM) in ``compute_dtype`` (default: matQ's dtype
    promoted to at least float32).

    For autograd: ``detach_m`` makes the stabiliser m a constant (SPEC.md, "Gradients"; scaM_all
    must then carry no gradient either), ``detach_den`` the denominator den too (the
    "normaliser constant" convention)."""
    B, NH, S, DHQK = matQ.shape
    DHHV = matV.shape[-1]
    L = chunk_size
    NC = S // L
    if compute_dtype is None:
        compute_dtype = torch.promote_types(matQ.dtype, torch.float32)
    dt = compute_dtype
    if qk_scale is None:
        qk_scale = DHQK ** -0.5

    q = matQ.to(dt).reshape(B, NH, NC, L, DHQK)
    k = matK.to(dt).reshape(B, NH, NC, L, DHQK)
    v = matV.to(dt).reshape(B, NH, NC, L, DHHV)
    i = vecI.to(dt).reshape(B, NH, NC, L)
    f = vecF.to(dt).reshape(B, NH, NC, L)
    C = matC_all.to(dt)[:, :, : NC * DHQK].reshape(B, NH, NC, DHQK, DHHV)
    n = vecN_all.to(dt)[:, :, : NC * DHQK].reshape(B, NH, NC, DHQK)
    m_prev = scaM_all.to(dt)[:, :, :NC].unsqueeze(-1)  # (B, NH, NC, 1)

    bg = torch.cumsum(log_forget(f), dim=-1)  # (B, NH, NC, L) inclusive
    D = bg.unsqueeze(-1) - bg.unsqueeze(-2) + i.unsqueeze(-2)  # D[t, s]
    causal = torch.ones(L, L, dtype=torch.bool, device=matQ.device).tril()
    D = D.masked_fill(~causal, float("-inf"))
    m_intra = torch.clamp(D.amax(dim=-1), min=MINIMUM_MAX_VAL)  # (B, NH, NC, L)
    m = torch.maximum(bg + m_prev, m_intra)
    if detach_m:
        m = m.detach()

    w = qk_scale * (q @ k.transpose(-1, -2)) * torch.exp(D - m.unsqueeze(-1))
    g = qk_scale * torch.exp(bg + m_prev - m)  # (B, NH, NC, L)
    num = w @ v + g.unsqueeze(-1) * (q @ C)
    nsum = w.sum(-1) + g * (q @ n.unsqueeze(-1)).squeeze(-1)
    den = torch.maximum(nsum.abs(), torch.exp(-m))
    if detach_den:
        den = den.detach()
    H = num / (den.unsqueeze(-1) + eps)
    return H.reshape(B, NH, S, DHHV), den.reshape(B, NH, S), m.reshape(B, NH, S)


def recurrent_fw_states(
    matK: torch.Tensor,
    matV: torch.Tensor,
    vecI: torch.Tensor,
    vecF: torch.Tensor,
    chunk_size: int = 64,
    matC_initial: Optional[torch.Tensor] = None,
    vecN_initial: Optional[torch.Tensor] = None,
    scaM_initial: Optional[torch.Tensor] = None,
    compute_dtype: torch.dtype = torch.float32,
    detach_m: bool = False,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SPEC.md's recurrent step. Returns the NC+1 border states
    (matC_all (B, NH, (NC+1)*DHQK, DHHV), vecN_all (B, NH, (NC+1)*DHQK), scaM_all (B, NH, NC+1)).
    ``scaM_initial`` may be (B, NH) or (B, NH, 1). ``detach_m``: the m states carry no gradient
    (SPEC.md, "Gradients"); C and n are still differentiated through the gates."""
    B, NH, S, DHQK = matK.shape
    DHHV = matV.shape[-1]
    L = chunk_size
    NC = S // L
    dt = compute_dtype
    k = matK.to(dt).reshape(B, NH, NC, L, DHQK)
    v = matV.to(dt).reshape(B, NH, NC, L, DHHV)
    i = vecI.to(dt).reshape(B, NH, NC, L)
    bg = torch.cumsum(log_forget(vecF.to(dt).reshape(B, NH, NC, L)), dim=-1)
    g_all = bg[..., -1]  # (B, NH, NC)
    a_all = g_all.unsqueeze(-1) - bg + i  # (B, NH, NC, L)

    if matC_initial is None:
        C = torch.zeros(B, NH, DHQK, DHHV, dtype=dt, device=matK.device)
    else:
        C = matC_initial.to(dt)
    if vecN_initial is None:
        n = torch.zeros(B, NH, DHQK, dtype=dt, device=matK.device)
    else:
        n = vecN_initial.to(dt)
    if scaM_initial is None:
        m = torch.zeros(B, NH, dtype=dt, device=matK.device)
    else:
        m = scaM_initial.to(dt).reshape(B, NH)
    if detach_m:
        m = m.detach()

    Cs: List[torch.Tensor] = [C]
    ns: List[torch.Tensor] = [n]
    ms: List[torch.Tensor] = [m]
    for kk in range(NC):
        g = g_all[:, :, kk]
        a = a_all[:, :, kk]  # (B, NH, L)
        m_new = torch.maximum(g + m, a.amax(-1))
        if detach_m:
            m_new = m_new.detach()
        decay = torch.exp(g + m - m_new)
        wa = torch.exp(a - m_new.unsqueeze(-1))  # (B, NH, L)
        kw = k[:, :, kk] * wa.unsqueeze(-1)
        C = decay[..., None, None] * C + kw.transpose(-1, -2) @ v[:, :, kk]
        n = decay[..., None] * n + kw.sum(-2)
        m = m_new
        Cs.append(C)
        ns.append(n)
        ms.append(m)
    matC_all = torch.stack(Cs, dim=2).reshape(B, NH, (NC + 1) * DHQK, DHHV)
    vecN_all = torch.stack(ns, dim=2).reshape(B, NH, (NC + 1) * DHQK)
    scaM_all = torch.stack(ms, dim=2)
    return matC_all, vecN_all, scaM_all


def chunkwise_fw_reference(
    matQ: torch.Tensor,
    matK: torch.Tensor,
    matV: torch.Tensor,
    vecI: torch.Tensor,
    vecF: torch.Tensor,
    matC_initial: Optional[torch.Tensor] = None,
    vecN_initial: Optional[torch.Tensor] = None,
    scaM_initial: Optional[torch.Tensor] = None,
    qk_scale: Optional[float] = None,
    chunk_size: int = 64,
    eps: float = 1e-6,
    compute_dtype: torch.dtype = torch.float64,
    detach_m: bool = False,
    detach_den: bool = False,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """SPEC.md's whole forward: the recurrent step, then the H step on its slots. Returns what
    ``mlstm.chunkwise_fw`` returns, all in ``compute_dtype``: (matH, matC_last (B, NH, DHQK, DHHV),
    vecN_last (B, NH, DHQK), scaM_last (B, NH), vecN (B, NH, S), vecM (B, NH, S)).

    For torch.autograd (SPEC.md, "Gradients"): ``detach_m`` holds every stabiliser m (states, H
    step, m_0) constant: its gradients are the "exact" ones of ``chunkwise_fw``; ``detach_den``
    also holds the denominator den constant: the "normaliser_constant" ones.
    Cost: the recurrence is a loop over the NC chunks (batched over B and NH), the H step one
    batched evaluation of every chunk with (B, NH, NC, L, L) matrices."""
    B, NH, S, DHQK = matQ.shape
    NC = S // chunk_size
    if scaM_initial is not None:
        scaM_initial = scaM_initial.reshape(B, NH)
    C, n, m = recurrent_fw_states(matK, matV, vecI, vecF, chunk_size, matC_initial, vecN_initial,
                                  scaM_initial, compute_dtype, detach_m)
    H, vecN, vecM = parallel_fw_hintra_reference(matQ, matK, matV, vecI, vecF, C, n, m, qk_scale,
                                                 chunk_size, eps, compute_dtype, detach_m, detach_den)
    return (H, C[:, :, NC * DHQK:], n[:, :, NC * DHQK:], m[:, :, NC], vecN, vecM)


# ---------------------------------------------------------------------------------------------
# Inputs and the error measure of the checks (not TorchScript)


def random_inputs(B: int, NH: int, S: int, DHQK: int, DHHV: int, L: int, dtype: torch.dtype,
                  device, generator: Optional[torch.Generator] = None):
    """(matQ, matK, matV, vecI, vecF, matC_all, vecN_all, scaM_all) as SPEC.md's checks make them:
    q, k, v, i ~ N(0, 1) and f = 3 + N(0, 1), q, k, v rounded to ``dtype``; gates float32; the
    NC+1 border states from ``recurrent_fw_states`` in float32 on those inputs (never zeros)."""
    def rn(*shape):
        return torch.randn(*shape, generator=generator, device=device, dtype=torch.float32)

    q, k, v = rn(B, NH, S, DHQK).to(dtype), rn(B, NH, S, DHQK).to(dtype), rn(B, NH, S, DHHV).to(dtype)
    i = rn(B, NH, S)
    f = 3.0 + rn(B, NH, S)
    C, n, m = recurrent_fw_states(k, v, i, f, chunk_size=L, compute_dtype=torch.float32)
    return q, k, v, i, f, C, n, m


def rel_norm_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """||x - ref|| / ||ref|| in float64; inf when x holds a non-finite value or the shapes differ."""
    x = x.detach().to(torch.float64)
    ref = ref.detach().to(torch.float64)
    if x.shape != ref.shape or not bool(torch.isfinite(x).all()):
        return float("inf")
    den = ref.norm().item()
    num = (x - ref).norm().item()
    return num / den if den > 0 else num
