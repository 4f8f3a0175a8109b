"""Accuracy against float64 on the benchmark inputs themselves.

The float64 references run on two (b, h) slices of an input set: the first and the last (the last
catches large-offset bugs); heads and batch rows are independent, so a slice of the outputs (and of
the gradients) is the function of that slice of the inputs. The error of a tensor is the
relative norm ||x - x64|| / ||x64|| over both slices together (inf when x is not finite).

Gradients (of ``H.sum()`` with respect to q, k, v, i, f) follow SPEC.md, "Gradients": every max
state m is a constant, and the normaliser either is differentiated ("exact") or is a constant
("normaliser_constant", the convention of mlstm-kernels' Triton backward). Both come from one
float64 autograd evaluation of ``reference.chunkwise_fw_reference`` (H, its normaliser N and max
state M): N and the numerator H (N + eps) scale with exp(-M), so multiplying them by exp(M - M0),
with M0 = M detached, gives the same values with M held constant.
"""
import math
from typing import Dict, List, Sequence, Tuple

import torch

from cases import Case, ref

GRAD_NAMES = ("dq", "dk", "dv", "di", "df")
F64 = torch.float64


def slices(c: Case) -> List[Tuple[int, int]]:
    return sorted({(0, 0), (c.B - 1, c.NH - 1)})


def take(x: Sequence[torch.Tensor], b: int, h: int) -> List[torch.Tensor]:
    return [t[b:b + 1, h:h + 1] for t in x]


def errors(outs: Sequence[torch.Tensor], refs: Sequence[Sequence[torch.Tensor]],
           sl: Sequence[Tuple[int, int]]) -> List[float]:
    """Relative-norm error of each of ``outs`` (full tensors) against ``refs`` (per slice, the
    float64 references of those outputs), over the slices together."""
    res = []
    for j, out in enumerate(outs):
        num = den = 0.0
        for (b, h), r in zip(sl, refs):
            x = out[b:b + 1, h:h + 1].detach().to(F64).reshape(r[j].shape)
            if not bool(torch.isfinite(x).all()):
                num = math.inf
                break
            num += ((x - r[j]).norm() ** 2).item()
            den += (r[j].norm() ** 2).item()
        res.append(math.sqrt(num / den) if den > 0 else (0.0 if num == 0 else math.inf))
    return res


def within(errs: Sequence[float], names: Sequence[str], dtype: torch.dtype) -> bool:
    """Whether errors of our outputs meet reference.TOLERANCES on CUDA (matH, float32 outputs)."""
    tol_h, tol_f32 = ref.TOLERANCES["cuda"][dtype]
    return all(e <= (tol_h if n == "matH" else tol_f32) for e, n in zip(errs, names))


def fmt(errs: Sequence[float]) -> str:
    return "/".join(f"{e:.1e}" for e in errs)


# ---------------------------------------------------------------------------------------------
# References on the slices


def hstep_refs(x, L: int, sl) -> List[tuple]:
    """(matH, vecN, vecM) of the H step per slice."""
    return [ref.parallel_fw_hintra_reference(*take(x, b, h), chunk_size=L, compute_dtype=F64)
            for b, h in sl]


def forward_refs(x, L: int, sl) -> List[tuple]:
    """(matH, matC_last, vecN_last, scaM_last, vecN, vecM) of the whole forward per slice."""
    return [ref.chunkwise_fw_reference(*take(x[:5], b, h), chunk_size=L, compute_dtype=F64)
            for b, h in sl]


def grad_refs(x, L: int, sl, eps: float = 1e-6) -> Dict[str, List[tuple]]:
    """{convention: per slice (dq, dk, dv, di, df)} of H.sum(), for "exact" and
    "normaliser_constant"."""
    out: Dict[str, List[tuple]] = {"exact": [], "normaliser_constant": []}
    for b, h in sl:
        leaves = [t.detach().to(F64).requires_grad_() for t in take(x[:5], b, h)]
        H, _, _, _, N, M = ref.chunkwise_fw_reference(*leaves, chunk_size=L, eps=eps, compute_dtype=F64)
        scale = torch.exp(M - M.detach())  # 1, with the derivative of M held constant removed
        num = H * ((N + eps) * scale).unsqueeze(-1)
        H_exact = num / (N * scale + eps).unsqueeze(-1)
        H_const = num / (N.detach() + eps).unsqueeze(-1)
        for conv, Hc in (("exact", H_exact), ("normaliser_constant", H_const)):
            out[conv].append(torch.autograd.grad(Hc.sum(), leaves, retain_graph=True))
    return out
