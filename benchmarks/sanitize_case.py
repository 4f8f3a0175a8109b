#!/usr/bin/env python3
"""Small cases for compute-sanitizer (memcheck, racecheck): each runs the op once on the GPU and
synchronises, then checks the result against the float64 reference on the CPU.

    compute-sanitizer --tool memcheck --error-exitcode 1 python3 benchmarks/sanitize_case.py
    python3 benchmarks/sanitize_case.py [--cases bf16,odd_fp32] [--device cuda]

Inputs and border states are made on the CPU and copied over, so under the sanitizer the only
kernels launched are the op's own (plus nothing else of torch). Run memcheck with
PYTORCH_NO_CUDA_MEMORY_CACHING=1 so that every tensor is its own allocation and an out-of-bounds
access cannot hide inside a neighbour in the caching allocator's pool.
Exit code 1 when a result misses the reference, 2 when no CUDA device / kernels.
"""
import argparse
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
if REPO not in sys.path:
    sys.path.insert(0, REPO)

import torch  # noqa: E402

# name: ((B, NH, S, DHQK, DHHV, L), dtype, tolerance on the relative-norm error of matH/vecN/vecM)
CASES = {
    "bf16": ((2, 2, 256, 64, 64, 64), torch.bfloat16, 1e-2),
    # odd head dims (not multiples of 8/16), a short chunk, S = 6 chunks
    "odd_fp32": ((1, 2, 96, 50, 70, 16), torch.float32, 2e-5),
    # large heads, L = 128 (the sm_80 kernel's multi-tile paths; on Hopper too, by the dispatch rule)
    "big_bf16": ((1, 1, 256, 256, 512, 128), torch.bfloat16, 1e-2),
    # Hopper kernel: two row tiles and two key blocks (L = 128), a partial DHHV tile; odd dims
    "l128_fp16": ((1, 2, 256, 128, 200, 128), torch.float16, 2e-3),
    "odd_bf16": ((1, 2, 96, 50, 70, 16), torch.bfloat16, 1e-2),
}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", default=",".join(CASES), help=f"comma list of {', '.join(CASES)}")
    p.add_argument("--device", default="cuda")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    import mlstm_ext
    from mlstm_ext.__main__ import make_inputs, rel_norm_err
    from mlstm_ext.reference import parallel_fw_hintra_reference

    dev = torch.device(args.device)
    if dev.type == "cuda" and not (torch.cuda.is_available() and mlstm_ext.has_cuda_kernels()):
        print(f"sanitize_case.py: needs CUDA (available: {torch.cuda.is_available()}, "
              f"library CUDA kernels: {mlstm_ext.has_cuda_kernels()})", file=sys.stderr)
        return 2
    gen = torch.Generator().manual_seed(args.seed)
    failed = False
    for name in [c.strip() for c in args.cases.split(",") if c.strip()]:
        (B, NH, S, DQ, DV, L), dtype, tol = CASES[name]
        cpu_args = make_inputs(B, NH, S, DQ, DV, L, dtype, "cpu", gen)
        dev_args = [t.to(dev) for t in cpu_args]
        outs = mlstm_ext.parallel_fw_hintra(*dev_args, chunk_size=L)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        outs = [o.cpu() for o in outs]
        refs = parallel_fw_hintra_reference(*cpu_args, chunk_size=L, compute_dtype=torch.float64)
        errs = [rel_norm_err(o, r) for o, r in zip(outs, refs)]
        ok = all(e <= tol for e in errs)
        failed |= not ok
        print(f"{name:9} (B,NH,S,DHQK,DHHV,L)={(B, NH, S, DQ, DV, L)} {str(dtype)[6:]:8} "
              f"H/N/M rel err {errs[0]:.1e}/{errs[1]:.1e}/{errs[2]:.1e} "
              f"{'PASS' if ok else 'FAIL'} (tol {tol:g})", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
