"""What the benchmarks run: the shapes, the inputs, our ops and their references, and the bytes
and FLOPs that the floors and rates are computed from.

Our ops are called as ``torch.ops.mlstm.*`` and the references come from ``mlstm_ext/reference.py``
of this tree, loaded from its file: nothing here imports the ``mlstm_ext`` package, so an A/B child
(``ab.py``) can pair the reference with any build of the library, even one without the later ops.
"""
import importlib.util
import math
import os
from dataclasses import dataclass
from typing import List, Tuple

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load_reference():
    path = os.path.join(REPO, "mlstm_ext", "reference.py")
    spec = importlib.util.spec_from_file_location("mlstm_ext_reference_file", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


ref = _load_reference()
TOLERANCES = ref.TOLERANCES

# (B, NH, S, DHQK, DHHV, L)
SHAPES = [
    (8, 16, 4096, 128, 128, 64),
    (8, 16, 4096, 128, 128, 128),
    (1, 8, 16384, 256, 512, 128),
    (4, 8, 8192, 256, 512, 64),
]
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass(frozen=True)
class Case:
    B: int
    NH: int
    S: int
    DQ: int  # DHQK
    DV: int  # DHHV
    L: int  # chunk size
    dtype: str  # a key of DTYPES

    @property
    def shape(self) -> Tuple[int, int, int, int, int, int]:
        return (self.B, self.NH, self.S, self.DQ, self.DV, self.L)

    @property
    def NC(self) -> int:
        return self.S // self.L

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def es(self) -> int:
        return torch.empty((), dtype=self.torch_dtype).element_size()

    def label(self) -> str:
        return f"{self.shape} {self.dtype}"


def cases(mode: str) -> List[Case]:
    """quick: the four shapes in bf16; full and check: also fp16 and fp32 at the first shape."""
    out = [Case(*s, "bf16") for s in SHAPES]
    if mode in ("full", "check"):
        out += [Case(*SHAPES[0], "fp16"), Case(*SHAPES[0], "fp32")]
    return out


# ---------------------------------------------------------------------------------------------
# Inputs


def input_bytes(c: Case) -> int:
    """One input set: q, k, v, gates, and the NC+1 float32 border states."""
    BH = c.B * c.NH
    return BH * (c.S * (2 * c.DQ + c.DV) * c.es + 2 * c.S * 4 + (c.NC + 1) * (c.DQ * c.DV + c.DQ + 1) * 4)


def n_sets(c: Case, l2_bytes: int, mem_bytes: int, max_sets: int = 8) -> int:
    """How many input sets to rotate among: together > 2.5x L2, at most 30% of GPU memory."""
    n = max(2, min(max_sets, math.ceil(2.5 * l2_bytes / input_bytes(c))))
    while n > 1 and n * input_bytes(c) > 0.3 * mem_bytes:
        n -= 1
    return n


def make_sets(c: Case, n: int, seed: int, device) -> List[tuple]:
    """n independently drawn input sets (q, k, v, i, f, C_all, n_all, m_all), the same for the
    same (case, seed) in every process."""
    sets = []
    for k in range(n):
        g = torch.Generator(device=device).manual_seed(seed * 1000 + k)
        sets.append(ref.random_inputs(*c.shape, c.torch_dtype, device, g))
    return sets


# ---------------------------------------------------------------------------------------------
# Our ops and their references, on an input set x and chunk size L

HSTEP_OUT = ("matH", "vecN", "vecM")
STATES_OUT = ("matC_all", "vecN_all", "scaM_all")
FORWARD_OUT = ("matH", "matC_last", "vecN_last", "scaM_last", "vecN", "vecM")


def hintra(x, L):
    return torch.ops.mlstm.parallel_fw_hintra(*x, chunk_size=L)


def states(x, L):
    return torch.ops.mlstm.recurrent_fw_states(*x[1:5], chunk_size=L)


def forward(x, L):
    return torch.ops.mlstm.chunkwise_fw(*x[:5], chunk_size=L)


def two_step(x, L):
    """The forward as two ops: the states, then the H step on them."""
    C, n, m = states(x, L)
    return hintra(tuple(x[:5]) + (C, n, m), L)


def hintra_ref(x, L, dtype):
    return ref.parallel_fw_hintra_reference(*x, chunk_size=L, compute_dtype=dtype)


def states_ref(x, L, dtype):
    return ref.recurrent_fw_states(*x[1:5], chunk_size=L, compute_dtype=dtype)


def forward_ref(x, L, dtype):
    return ref.chunkwise_fw_reference(*x[:5], chunk_size=L, compute_dtype=dtype)


# ---------------------------------------------------------------------------------------------
# Work and bytes (per call; BH = B * NH)


def hstep_flops(c: Case) -> int:
    """Matrix products only: the causal halves of Q K^T and S V, and the full Q C, per chunk."""
    per_chunk = 2 * (c.L * (c.L + 1) // 2) * (c.DQ + c.DV) + 2 * c.L * c.DQ * c.DV
    return c.B * c.NH * c.NC * per_chunk


def _state_bytes(c: Case, slots: int) -> int:
    return slots * (c.DQ * c.DV + c.DQ + 1) * 4


def hstep_bytes(c: Case) -> int:
    """Q, K, V read and H written once (input dtype); NC float32 C/n/m states read; vecI, vecF
    read and vecN, vecM written (float32)."""
    BH, S = c.B * c.NH, c.S
    return BH * (S * (2 * c.DQ + 2 * c.DV) * c.es + _state_bytes(c, c.NC) + 4 * S * 4)


def states_bytes(c: Case) -> int:
    """K, V and the gates read; the NC+1 float32 states written."""
    BH, S = c.B * c.NH, c.S
    return BH * (S * (c.DQ + c.DV) * c.es + 2 * S * 4 + _state_bytes(c, c.NC + 1))


def forward_bytes(c: Case) -> int:
    """The whole forward fused: Q, K, V, the gates read once; H, vecN, vecM and the last state
    written; the border states never leave the chip."""
    BH, S = c.B * c.NH, c.S
    return BH * (S * (2 * c.DQ + 2 * c.DV) * c.es + 4 * S * 4 + _state_bytes(c, 1))


def fwbw_bytes(c: Case) -> int:
    """Forward + backward with no state ever leaving the chip (a lower bound for any design): the
    forward reads Q, K, V and the gates and writes H, vecN, vecM; the backward reads Q, K, V, H,
    dH, the gates, vecN, vecM and writes dQ, dK, dV, dI, dF (float32 gate gradients)."""
    BH, S = c.B * c.NH, c.S
    fw = S * ((2 * c.DQ + 2 * c.DV) * c.es + 4 * 4)
    bw = S * ((2 * c.DQ + 3 * c.DV) * c.es + (2 * c.DQ + c.DV) * c.es + 6 * 4)
    return BH * (fw + bw)


def two_step_bytes(c: Case) -> int:
    """The forward as two ops: the states written by one and read by the other."""
    return states_bytes(c) + hstep_bytes(c)
