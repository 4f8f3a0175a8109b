#!/usr/bin/env python3
"""Small cases for compute-sanitizer (memcheck, racecheck): each runs an op once on the GPU and
synchronises, then checks the result against the float64 reference on the CPU (parallel_fw_hintra:
CASES; recurrent_fw_states: STATES_CASES, each also with S = 0).

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


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    names = list(CASES) + list(STATES_CASES)
    p.add_argument("--cases", default=",".join(names), help=f"comma list of {', '.join(names)}")
    p.add_argument("--device", default="cuda")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    import mlstm_ext
    from mlstm_ext.__main__ import make_inputs, rel_norm_err
    from mlstm_ext.reference import parallel_fw_hintra_reference, recurrent_fw_states

    dev = torch.device(args.device)
    if dev.type == "cuda" and not (torch.cuda.is_available() and mlstm_ext.has_cuda_kernels()):
        print(f"sanitize_case.py: needs CUDA (available: {torch.cuda.is_available()}, "
              f"library CUDA kernels: {mlstm_ext.has_cuda_kernels()})", file=sys.stderr)
        return 2
    gen = torch.Generator().manual_seed(args.seed)
    failed = False
    for name in [c.strip() for c in args.cases.split(",") if c.strip()]:
        if name in STATES_CASES:
            failed |= not states_case(name, *STATES_CASES[name], dev, gen, recurrent_fw_states)
            continue
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


def states_case(name, shape, dtype, tol, dev, gen, reference):
    """recurrent_fw_states on `dev` with random initial states vs the float64 reference."""
    import mlstm_ext
    from mlstm_ext.__main__ import rel_norm_err

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
        errs = [rel_norm_err(o.cpu(), r) for o, r in zip(outs, refs)]
        ok &= all(e <= tol for e in errs)
        print(f"{name:9} (B,NH,S,DHQK,DHHV,L)={(B, NH, s_used, DQ, DV, L)} {str(dtype)[6:]:8} "
              f"C/n/m rel err {errs[0]:.1e}/{errs[1]:.1e}/{errs[2]:.1e} "
              f"{'PASS' if all(e <= tol for e in errs) else 'FAIL'} (tol {tol:g})", flush=True)
    return ok


if __name__ == "__main__":
    sys.exit(main())
