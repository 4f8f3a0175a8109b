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
    p.add_argument("--cases", default=",".join(CASES), help=f"comma list of {', '.join(CASES)}")
    p.add_argument("--device", default="cuda")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    dev = torch.device(args.device)
    if dev.type == "cuda" and not (torch.cuda.is_available() and mlstm_ext.has_cuda_kernels()):
        print(f"sanitize_case.py: needs CUDA (available: {torch.cuda.is_available()}, "
              f"library CUDA kernels: {mlstm_ext.has_cuda_kernels()})", file=sys.stderr)
        return 2
    gen = torch.Generator().manual_seed(args.seed)
    results = [run_case(c.strip(), dev, gen) for c in args.cases.split(",") if c.strip()]
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
