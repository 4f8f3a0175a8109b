"""The quadratic (fully parallel) mLSTM of SPEC.md, in float64.

Written independently of mlstm_ext.reference (no chunking, no states): it is the check of the
whole chain "recurrent step + parallel_fw_hintra".
"""
from typing import Optional, Tuple

import torch
import torch.nn.functional as F


def quadratic_mlstm(
    q: torch.Tensor,  # (B, NH, S, DHQK)
    k: torch.Tensor,  # (B, NH, S, DHQK)
    v: torch.Tensor,  # (B, NH, S, DHHV)
    i: torch.Tensor,  # (B, NH, S)
    f: torch.Tensor,  # (B, NH, S)
    qk_scale: Optional[float] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (H (B, NH, S, DHHV), csum = sum_s c[t, s] (B, NH, S), M (B, NH, S)), float64.

    H_t = sum_{s<=t} c[t,s] v_s / max(|sum_{s<=t} c[t,s]|, exp(-M_t)),
    c[t,s] = qk_scale (q_t . k_s) exp(LD[t,s] - M_t),
    LD[t,s] = sum_{r=s+1..t} logsigmoid(f_r) + i_s,  M_t = max_{s<=t} LD[t,s].
    """
    q, k, v, i, f = (x.to(torch.float64) for x in (q, k, v, i, f))
    S, DHQK = q.shape[-2], q.shape[-1]
    if qk_scale is None:
        qk_scale = DHQK ** -0.5
    # sum_{r=s+1..t} logsigmoid(f_r) = cum[t] - cum[s], over the whole sequence (no chunks).
    cum = torch.cumsum(F.logsigmoid(f), dim=-1)  # (B, NH, S)
    LD = cum.unsqueeze(-1) - cum.unsqueeze(-2) + i.unsqueeze(-2)  # LD[t, s]
    t_idx = torch.arange(S, device=q.device)
    causal = t_idx.view(S, 1) >= t_idx.view(1, S)
    LD = LD.masked_fill(~causal, float("-inf"))
    M = LD.amax(-1)  # (B, NH, S)
    c = qk_scale * (q @ k.transpose(-1, -2)) * torch.exp(LD - M.unsqueeze(-1))
    csum = c.sum(-1)
    den = torch.maximum(csum.abs(), torch.exp(-M))
    H = (c @ v) / den.unsqueeze(-1)
    return H, csum, M
