"""Issue 12's float16 accuracy case, emulated in float64 on the CPU: how much of the H error of a
16-bit H step comes from rounding the intra-chunk weights W to the input dtype before the P V
product (as both CUDA kernels do: numerator only, the row sums from the unrounded weights), what
rounding the row sums' weights too would give, and what the sm_80 kernel's inter-chunk product
adds (g q and C rounded to tf32, 10 mantissa bits; the sm_90a kernel keeps 16 bits of C). States
from the float64 recurrence; the kernels' frame shift (weights relative to m - delta); H rounded
to the input dtype at the end.

    python3 benchmarks/emulate_weight_rounding.py
"""
import os
import sys

import torch

sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from mlstm_ext.reference import MINIMUM_MAX_VAL, log_forget, recurrent_fw_states, rel_norm_err  # noqa: E402

F64 = torch.float64


def tf32(x):
    """x rounded to tf32 (10 mantissa bits, to nearest, ties away from zero: cvt.rna.tf32.f32)."""
    bits = x.float().contiguous().view(torch.int32)
    return ((bits + 0x1000) & ~0x1FFF).view(torch.float32).to(F64)


def h_step(q, k, v, i, f, C_all, n_all, m_all, L, round_w=None, den_from_rounded=False,
           tf32_inter=False, eps=1e-6):
    B, NH, S, DQ = q.shape
    DV, NC = v.shape[-1], S // L
    q, k = (t.to(F64).reshape(B, NH, NC, L, DQ) for t in (q, k))
    v = v.to(F64).reshape(B, NH, NC, L, DV)
    i, f = (t.to(F64).reshape(B, NH, NC, L) for t in (i, f))
    C = C_all.to(F64)[:, :, :NC * DQ].reshape(B, NH, NC, DQ, DV)
    n = n_all.to(F64)[:, :, :NC * DQ].reshape(B, NH, NC, DQ)
    m_prev = m_all.to(F64)[:, :, :NC].unsqueeze(-1)
    bg = torch.cumsum(log_forget(f), -1)
    D = (bg.unsqueeze(-1) - bg.unsqueeze(-2) + i.unsqueeze(-2)).masked_fill(
        ~torch.ones(L, L, dtype=torch.bool).tril(), float("-inf"))
    m_intra = D.amax(-1).clamp(min=MINIMUM_MAX_VAL)
    m = torch.maximum(bg + m_prev, m_intra)
    delta = (m - m_intra).clamp(max=64.0)
    frame = m - delta
    w = DQ ** -0.5 * (q @ k.transpose(-1, -2)) * torch.exp(D - frame.unsqueeze(-1))
    g = DQ ** -0.5 * torch.exp(bg + m_prev - frame)
    w16 = w if round_w is None else w.to(round_w).to(F64)
    inter = tf32(g.unsqueeze(-1) * q) @ tf32(C) if tf32_inter else g.unsqueeze(-1) * (q @ C)
    num = w16 @ v + inter
    nsum = (w16 if den_from_rounded else w).sum(-1) + g * (q @ n.unsqueeze(-1)).squeeze(-1)
    den = torch.maximum(nsum.abs(), torch.exp(delta - m))
    return (num / (den + eps * torch.exp(delta)).unsqueeze(-1)).reshape(B, NH, S, DV)


def main():
    torch.manual_seed(0)
    B, NH, S, DQ, DV, L, dt = 2, 4, 512, 128, 128, 64, torch.float16
    print("| i std | f | W rounded, numerator only (sm_90a kernel) | + tf32 g q C (sm_80 kernel) "
          "| W rounded, numerator and row sums | H rounding alone |")
    print("| ---: | --- | ---: | ---: | ---: | ---: |")
    for i_std, f_mean, f_std in [(8.0, 0.0, 0.1), (8.0, 0.0, 1.0), (8.0, 3.0, 1.0), (8.0, -5.0, 1.0),
                                 (4.0, 0.0, 0.5), (1.0, 3.0, 1.0)]:
        q, k, v = (torch.randn(B, NH, S, d).to(dt) for d in (DQ, DQ, DV))
        i, f = i_std * torch.randn(B, NH, S), f_mean + f_std * torch.randn(B, NH, S)
        states = recurrent_fw_states(k, v, i, f, L, compute_dtype=F64)
        ref = h_step(q, k, v, i, f, *states, L)
        errs = [rel_norm_err(h_step(q, k, v, i, f, *states, L, round_w=dt).to(dt), ref),
                rel_norm_err(h_step(q, k, v, i, f, *states, L, round_w=dt, tf32_inter=True).to(dt), ref),
                rel_norm_err(h_step(q, k, v, i, f, *states, L, round_w=dt, den_from_rounded=True).to(dt), ref),
                rel_norm_err(ref.to(dt), ref)]
        print(f"| {i_std} | {f_mean} +- {f_std} | " + " | ".join(f"{e:.2e}" for e in errs) + " |")


if __name__ == "__main__":
    main()
