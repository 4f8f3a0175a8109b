#!/usr/bin/env python3
"""Small cases for compute-sanitizer (memcheck, racecheck): each runs one op once on the GPU and
synchronises, then checks every output against the float64 reference on the CPU.

    compute-sanitizer --tool memcheck --error-exitcode 1 python3 benchmarks/sanitize_case.py
    python3 benchmarks/sanitize_case.py [--cases bf16,odd_fp32] [--device cuda]

Inputs and border states are made on the CPU and copied over, so under the sanitizer the only
kernels launched are the op's own (plus nothing else of torch). Run memcheck with
PYTORCH_NO_CUDA_MEMORY_CACHING=1 so that every tensor is its own allocation and an out-of-bounds
access cannot hide inside a neighbour in the caching allocator's pool.
Tolerances: mlstm_ext.reference.TOLERANCES. Exit code 1 when a result misses the reference or an
op raises, 2 when no CUDA device / kernels.
"""
import argparse
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

import torch  # noqa: E402

import mlstm_ext  # noqa: E402
from mlstm_ext import reference as ref  # noqa: E402

# name: (op, (B, NH, S, DHQK, DHHV, L), dtype)
CASES = {
    "bf16": ("hintra", (2, 2, 256, 64, 64, 64), torch.bfloat16),
    # odd head dims (not multiples of 8/16), a short chunk, S = 6 chunks
    "odd_fp32": ("hintra", (1, 2, 96, 50, 70, 16), torch.float32),
    # large heads, L = 128 (the sm_80 kernel's multi-tile paths; on Hopper too, by the dispatch rule)
    "big_bf16": ("hintra", (1, 1, 256, 256, 512, 128), torch.bfloat16),
    # Hopper kernel: two row tiles and two key blocks (L = 128), a partial DHHV tile; odd dims
    "l128_fp16": ("hintra", (1, 2, 256, 128, 200, 128), torch.float16),
    "odd_bf16": ("hintra", (1, 2, 96, 50, 70, 16), torch.bfloat16),
    # the recurrent step and the whole forward
    "states_bf16": ("states", (2, 2, 256, 64, 64, 64), torch.bfloat16),
    "states_odd_fp32": ("states", (1, 2, 96, 50, 70, 16), torch.float32),
    "forward_bf16": ("forward", (1, 2, 256, 128, 200, 128), torch.bfloat16),
    "forward_odd_fp16": ("forward", (1, 2, 96, 50, 70, 16), torch.float16),
    # chunk 64, DHQK over 128 and a partial DHHV tile: the fused forward under MLSTM_EXT_FUSED_FW=1
    "forward_l64_bf16": ("forward", (1, 2, 192, 200, 100, 64), torch.bfloat16),
    # chunk 64, DHQK 128, fp16: the fused forward's other instance (its default on Hopper)
    "forward_l64_d128_fp16": ("forward", (1, 2, 192, 128, 96, 64), torch.float16),
}
# recurrent_fw_states (two kernels: gates, states): name: ((B, NH, S, DHQK, DHHV, L), dtype,
# tolerance on the relative-norm error of matC_all/vecN_all/scaM_all vs float64)
STATES_CASES = {
    # head-dim tails (5, 7), L = 3 (partial mma k-steps), random initial states
    "states_odd_bf16": ((1, 2, 12, 5, 7, 3), torch.bfloat16, 2e-5),
    # two DHQK x two DHHV tiles with tails; L = 96: chunks of two ring steps, the second partial
    "states_tiles_fp32": ((1, 2, 288, 100, 72, 96), torch.float32, 2e-5),
    # large heads (4 x 8 tiles), L = 128, fp16
    "states_big_fp16": ((1, 1, 256, 256, 512, 128), torch.float16, 2e-5),
    # K/V rows not 16-byte aligned (DHQK = 50: the element-wise staging path)
    "states_unaligned_bf16": ((2, 2, 128, 50, 70, 64), torch.bfloat16, 2e-5),
}

# The backward (chunkwise_fw, then chunkwise_bw with random incoming gradients and initial
# states): name: ((B, NH, S, DHQK, DHHV, L), dtype, tolerance on every gradient vs float64)
BACKWARD_CASES = {
    # 16-bit, L = 64 / 128, head dims multiples of 64: the fused kernels (csrc/cuda/bw_kernels.cuh)
    "backward_bf16": ((2, 2, 256, 64, 64, 64), torch.bfloat16, 3e-2),
    "backward_fp16_l128": ((1, 2, 256, 128, 192, 128), torch.float16, 8e-3),
    # odd head dims, L = 16; the state scan's partial blocks (E = 50 * 70)
    "backward_odd_fp32": ((1, 2, 96, 50, 70, 16), torch.float32, 2e-5),
}

# The H step's rare paths: chunks whose gates are wide (exact exponents) and tiles whose
# accumulators come out non-finite (exact recomputation). name: ((B, NH, S, DHQK, DHHV, L), dtype, how)
HOSTILE_CASES = {
    "wide_gates_bf16": ((1, 2, 256, 64, 72, 64), torch.bfloat16, "wide"),
    "nan_in_v_fp16": ((1, 2, 128, 48, 40, 64), torch.float16, "nan_v"),
}

# The generation step's fused kernel: name: ((B, NH, DHQK, DHHV), dtype, state layout), against
# the CPU step on the same inputs in float64. "misaligned": C starts 4 bytes past 16 (scalar loads).
STEP_CASES = {
    "step_bf16": ((2, 4, 64, 96), torch.bfloat16, "contiguous"),
    "step_odd_fp32": ((1, 3, 33, 70), torch.float32, "misaligned"),
    "step_big_fp16": ((1, 2, 256, 512), torch.float16, "absent"),
}

# op: (call, reference, output names)
OPS = {
    "hintra": (lambda x, L: mlstm_ext.parallel_fw_hintra(*x, chunk_size=L),
               lambda x, L: ref.parallel_fw_hintra_reference(*x, chunk_size=L, compute_dtype=torch.float64),
               ("matH", "vecN", "vecM")),
    "states": (lambda x, L: mlstm_ext.recurrent_fw_states(*x[1:5], chunk_size=L),
               lambda x, L: ref.recurrent_fw_states(*x[1:5], chunk_size=L, compute_dtype=torch.float64),
               ("matC_all", "vecN_all", "scaM_all")),
    "forward": (lambda x, L: mlstm_ext.chunkwise_fw(*x[:5], chunk_size=L),
                lambda x, L: ref.chunkwise_fw_reference(*x[:5], chunk_size=L, compute_dtype=torch.float64),
                ("matH", "matC_last", "vecN_last", "scaM_last", "vecN", "vecM")),
}


def run_case(name: str, dev: torch.device, gen: torch.Generator) -> bool:
    op_key, shape, dtype = CASES[name]
    op, reference, names = OPS[op_key]
    L = shape[-1]
    cpu_args = ref.random_inputs(*shape, dtype, "cpu", gen)
    try:
        outs = op([t.to(dev) for t in cpu_args], L)
        if dev.type == "cuda":
            torch.cuda.synchronize()
    except Exception as e:
        print(f"{name:16} {op_key:7} {shape} FAIL: {type(e).__name__}: {e}", flush=True)
        return False
    tol_h, tol_f32 = ref.TOLERANCES[dev.type][dtype]
    errs = [ref.rel_norm_err(o.cpu(), r) for o, r in zip(outs, reference(cpu_args, L))]
    ok = all(e <= (tol_h if n == "matH" else tol_f32) for e, n in zip(errs, names))
    print(f"{name:16} {op_key:7} {shape} {str(dtype)[6:]:8} rel err "
          + " ".join(f"{n} {e:.1e}" for n, e in zip(names, errs)) + f" {'PASS' if ok else 'FAIL'}",
          flush=True)
    return ok


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    names = list(CASES) + list(STATES_CASES) + list(BACKWARD_CASES) + list(HOSTILE_CASES) + list(STEP_CASES)
    p.add_argument("--cases", default=",".join(names), help=f"comma list of {', '.join(names)}")
    p.add_argument("--device", default="cuda")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    dev = torch.device(args.device)
    if dev.type == "cuda" and not (torch.cuda.is_available() and mlstm_ext.has_cuda_kernels()):
        print(f"sanitize_case.py: needs CUDA (available: {torch.cuda.is_available()}, "
              f"library CUDA kernels: {mlstm_ext.has_cuda_kernels()})", file=sys.stderr)
        return 2
    gen = torch.Generator().manual_seed(args.seed)
    results = []
    for name in [c.strip() for c in args.cases.split(",") if c.strip()]:
        if name in STATES_CASES:
            results.append(states_case(name, *STATES_CASES[name], dev, gen, ref.recurrent_fw_states))
        elif name in BACKWARD_CASES:
            results.append(backward_case(name, *BACKWARD_CASES[name], dev, gen))
        elif name in HOSTILE_CASES:
            results.append(hostile_case(name, *HOSTILE_CASES[name], dev, gen))
        elif name in STEP_CASES:
            results.append(step_case(name, *STEP_CASES[name], dev, gen))
        else:
            results.append(run_case(name, dev, gen))
    return 0 if all(results) else 1


def hostile_case(name, shape, dtype, how, dev, gen):
    """wide: forget gates near -300 (|bg| >> 128 in every chunk), checked against float64.
    nan_v: a NaN in V at row 5 of a chunk: rows before it must stay finite, rows from it NaN."""
    L = shape[-1]
    x = list(ref.random_inputs(*shape, dtype, "cpu", gen))
    if how == "wide":
        x[4] = x[4] - 303.0
    else:
        x[2] = x[2].clone()
        x[2][:, :, 5, 3] = float("nan")
    outs = [o.cpu() for o in mlstm_ext.parallel_fw_hintra(*[t.to(dev) for t in x], chunk_size=L)]
    if dev.type == "cuda":
        torch.cuda.synchronize()
    if how == "wide":
        tol_h, tol_f32 = ref.TOLERANCES[dev.type][dtype]
        refs = ref.parallel_fw_hintra_reference(*x, chunk_size=L, compute_dtype=torch.float64)
        errs = [ref.rel_norm_err(o, r) for o, r in zip(outs, refs)]
        ok = errs[0] <= tol_h and max(errs[1:]) <= tol_f32
    else:
        H = outs[0]
        ok = bool(torch.isfinite(H[:, :, :5]).all() and torch.isnan(H[:, :, 5:L, 3]).all())
        errs = []
    print(f"{name:16} hintra  {shape} {str(dtype)[6:]:8} " + " ".join(f"{e:.1e}" for e in errs)
          + f" {'PASS' if ok else 'FAIL'}", flush=True)
    return ok


def step_case(name, shape, dtype, layout, dev, gen):
    """recurrent_step (no gradient: the fused kernel on CUDA) vs the CPU step in float64."""
    B, NH, DQ, DV = shape

    def rn(*s):
        return torch.randn(*s, generator=gen)

    x = [rn(B, NH, DQ).to(dtype), rn(B, NH, DQ).to(dtype), rn(B, NH, DV).to(dtype), rn(B, NH), 3.0 + rn(B, NH)]
    states = [rn(B, NH, DQ, DV), rn(B, NH, DQ), rn(B, NH)] if layout != "absent" else [None] * 3
    d = [t.to(dev) for t in x] + [None if t is None else t.to(dev) for t in states]
    if layout == "misaligned":
        wide = torch.empty(B, NH, DQ, DV + 1, device=dev)
        wide[..., 1:] = d[5]
        d[5] = wide[..., 1:]
    with torch.no_grad():
        outs = torch.ops.mlstm.recurrent_step(*d)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    refs = torch.ops.mlstm.recurrent_step(*[None if t is None else t.double() for t in x + states])
    tol_h, tol_f32 = ref.TOLERANCES[dev.type][dtype]
    errs = [ref.rel_norm_err(o.cpu(), r) for o, r in zip(outs, refs)]
    ok = errs[0] <= tol_h and max(errs[1:]) <= tol_f32
    print(f"{name:16} step    {shape} {str(dtype)[6:]:8} {layout:10} rel err h/C/n/m "
          + "/".join(f"{e:.1e}" for e in errs) + f" {'PASS' if ok else 'FAIL'}", flush=True)
    return ok


def states_case(name, shape, dtype, tol, dev, gen, reference):
    """recurrent_fw_states on `dev` with random initial states vs the float64 reference."""
    B, NH, S, DQ, DV, L = shape

    def rn(*s):
        return torch.randn(*s, generator=gen)

    cpu_args = [rn(B, NH, S, DQ).to(dtype), rn(B, NH, S, DV).to(dtype), rn(B, NH, S), 3.0 + rn(B, NH, S),
                rn(B, NH, DQ, DV), rn(B, NH, DQ), rn(B, NH)]
    ok = True
    for s_used in (S, 0):  # the sequence, then no chunks at all (only slot 0 is written)
        part = [t[:, :, :s_used] if j < 4 else t for j, t in enumerate(cpu_args)]
        outs = mlstm_ext.recurrent_fw_states(*[t.to(dev) for t in part], chunk_size=L)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        refs = reference(*part[:4], L, *part[4:], compute_dtype=torch.float64)
        errs = [ref.rel_norm_err(o.cpu(), r) for o, r in zip(outs, refs)]
        ok &= all(e <= tol for e in errs)
        print(f"{name:9} (B,NH,S,DHQK,DHHV,L)={(B, NH, s_used, DQ, DV, L)} {str(dtype)[6:]:8} "
              f"C/n/m rel err {errs[0]:.1e}/{errs[1]:.1e}/{errs[2]:.1e} "
              f"{'PASS' if all(e <= tol for e in errs) else 'FAIL'} (tol {tol:g})", flush=True)
    return ok


def backward_case(name, shape, dtype, tol, dev, gen):
    """chunkwise_bw on `dev` vs float64 autograd through the reference chain (m detached)."""
    B, NH, S, DQ, DV, L = shape

    def rn(*s):
        return torch.randn(*s, generator=gen)

    x = [rn(B, NH, S, DQ).to(dtype), rn(B, NH, S, DQ).to(dtype), rn(B, NH, S, DV).to(dtype), rn(B, NH, S),
         3.0 + rn(B, NH, S), rn(B, NH, DQ, DV), rn(B, NH, DQ), rn(B, NH)]
    dH, dC, dN = rn(B, NH, S, DV).to(dtype), rn(B, NH, DQ, DV), rn(B, NH, DQ)
    d = [t.to(dev) for t in x]
    out = mlstm_ext.chunkwise_fw(*d, chunk_size=L, vecN_signed=True)  # as mlstm_chunkwise runs them
    got = mlstm_ext.chunkwise_bw(*d, out[0], out[4], out[5], dH.to(dev), dC.to(dev), dN.to(dev), chunk_size=L,
                                 vecN_signed=True)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    leaves = [t.double().requires_grad_() for t in x[:7]]
    H, C, n = ref.chunkwise_fw_reference(*leaves, x[7].double(), chunk_size=L, compute_dtype=torch.float64,
                                         detach_m=True)[:3]
    want = torch.autograd.grad([H, C, n], leaves, [dH.double(), dC.double(), dN.double()])
    errs = [ref.rel_norm_err(g.cpu(), w) for g, w in zip(got, want)]
    ok = all(e <= tol for e in errs)
    print(f"{name:16} bw      {shape} {str(dtype)[6:]:8} dQ/dK/dV/dI/dF/dC0/dN0 rel err "
          + "/".join(f"{e:.1e}" for e in errs) + f" {'PASS' if ok else 'FAIL'}", flush=True)
    return ok


if __name__ == "__main__":
    sys.exit(main())
