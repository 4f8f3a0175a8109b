"""Pure-PyTorch mLSTM chunkwise pieces, written straight from SPEC.md.

- ``parallel_fw_hintra_reference``: the H step, materialising the (NC, L, L) gate matrix. Runs in
  any floating dtype (the tests use float64; the benchmarks time it as the "PyTorch eager" peer).
- ``recurrent_fw_states``: the recurrent step that makes the chunk-border states the H step reads.
- ``chunkwise_fw_reference``: the whole forward (recurrent step, then the H step), differentiable,
  with every stabiliser detached (SPEC.md, "Gradients"); the backward of ``chunkwise_fw``
  (``mlstm_ext.autograd``) differentiates it.
- ``quadratic_mlstm`` (tests/quadratic.py): the fully parallel mLSTM, the independent check of the
  chained pair.

All functions are TorchScript-able so that ``mlstm_ext.layer`` can use them in scripted models.
"""
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F

MINIMUM_MAX_VAL: float = -10.0


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

    bg = torch.cumsum(F.logsigmoid(f), dim=-1)  # (B, NH, NC, L) inclusive
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
    bg = torch.cumsum(F.logsigmoid(vecF.to(dt).reshape(B, NH, NC, L)), dim=-1)
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
    grad_mode: str = "exact",
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The whole chunkwise forward (SPEC.md, "The whole forward") in ``compute_dtype``, written for
    torch.autograd: every m (states, H step, m_0) detached, and for ``grad_mode ==
    "normaliser_constant"`` the denominator den as well. Its gradients are the ones SPEC.md
    defines for ``chunkwise_fw`` in that convention.

    Returns (matH (B, NH, S, DHHV), matC_last (B, NH, DHQK, DHHV), vecN_last (B, NH, DHQK),
    scaM_last (B, NH)), all in ``compute_dtype``.

    Cost: the recurrence is a loop over the NC chunks (batched over B and NH), the H step one
    batched evaluation of every chunk, with (B, NH, NC, L, L) gate and score matrices; autograd
    keeps the NC+1 states (twice: the loop's and the stacked copy) and a few (B, NH, S, L) matrices.
    """
    if grad_mode != "exact" and grad_mode != "normaliser_constant":
        raise ValueError(
            'chunkwise_fw_reference: grad_mode must be "exact" or "normaliser_constant", got "' + grad_mode + '"'
        )
    DHQK = matQ.shape[-1]
    matC_all, vecN_all, scaM_all = recurrent_fw_states(
        matK, matV, vecI, vecF, chunk_size, matC_initial, vecN_initial, scaM_initial,
        compute_dtype=compute_dtype, detach_m=True,
    )
    matH, _, _ = parallel_fw_hintra_reference(
        matQ, matK, matV, vecI, vecF, matC_all, vecN_all, scaM_all, qk_scale=qk_scale,
        chunk_size=chunk_size, eps=eps, compute_dtype=compute_dtype, detach_m=True,
        detach_den=grad_mode == "normaliser_constant",
    )
    NC = scaM_all.shape[-1] - 1
    return (matH, matC_all[:, :, NC * DHQK:], vecN_all[:, :, NC * DHQK:], scaM_all[:, :, NC])
