#!/usr/bin/env python3
"""The generation step: ``mlstm_ext.mlstm_step`` (torch.ops.mlstm.recurrent_step) against
mlstm-kernels' step kernels ("native", and "triton" on a GPU) in the same run, eager and (ours and
native) under torch.compile.

    python benchmarks/bench_step.py [--device cpu|cuda] [--budget 1.0]

Shapes (B, NH, DHQK, DHHV): xLSTM-7B's heads at batch 1 and 8, and a small layer. One token per
call, states in float32, inputs in float32 on the CPU and bfloat16 on a GPU. Timing: wall clock
around synchronised calls (timing.wall_time; a step is launch-bound on a GPU, so the host time is
the time), median. Prints a markdown table with the date, machine and command.
"""
import argparse
import datetime
import os
import platform
import shlex
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(1, REPO)

import torch  # noqa: E402

import mlstm_ext  # noqa: E402
from timing import wall_time  # noqa: E402

SHAPES = [(1, 8, 256, 512), (8, 8, 256, 512), (4, 4, 64, 64)]


def peers(device):
    """name -> step function under mlstm_kernels' convention."""
    out = {"ours": mlstm_ext.mlstm_step}
    try:
        from mlstm_kernels.torch.recurrent import registry_step
    except ImportError:
        return out
    out["mlstm-kernels native"] = registry_step["native"]
    if device == "cuda" and "triton" in registry_step:
        out["mlstm-kernels triton"] = registry_step["triton"]
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--budget", type=float, default=1.0, help="seconds per measurement")
    ap.add_argument("--no-compile", action="store_true")
    args = ap.parse_args()
    dev = torch.device(args.device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    fns = peers(dev.type)
    if not args.no_compile:
        for name in list(fns):
            if name in ("ours", "mlstm-kernels native"):
                fns[name + ", torch.compile"] = torch.compile(fns[name], fullgraph=True)
    machine = torch.cuda.get_device_name() if dev.type == "cuda" else f"{platform.processor() or 'cpu'}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"
    print(f"# generation step, {machine}; torch {torch.__version__}; {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC")
    print(f"command: `{shlex.join(['python', 'benchmarks/' + os.path.basename(__file__)] + sys.argv[1:])}`; "
          f"inputs {str(dtype)[6:]}, states float32; median ms per token and layer\n")
    print("| (B, NH, DHQK, DHHV) | " + " | ".join(fns) + " |")
    print("| --- |" + " ---: |" * len(fns))
    g = torch.Generator().manual_seed(0)
    for B, NH, DQ, DV in SHAPES:
        def rn(*s, dt=torch.float32):
            return torch.randn(*s, generator=g).to(dt).to(dev)
        q, k, v = rn(B, NH, DQ, dt=dtype), rn(B, NH, DQ, dt=dtype), rn(B, NH, DV, dt=dtype)
        i, f = rn(B, NH, 1), rn(B, NH, 1) + 3.0
        C, n, m = rn(B, NH, DQ, DV), rn(B, NH, DQ), rn(B, NH, 1)
        cells = []
        for name, fn in fns.items():
            def call():
                out = fn(q=q, k=k, v=v, i=i, f=f, c=C, n=n, m=m, eps=1e-6)
                sync()
                return out
            try:
                ms, _ = wall_time(call, args.budget)
                cells.append(f"{ms:.3f}")
            except Exception as e:  # a peer that cannot run this case
                cells.append(f"fails ({type(e).__name__})")
        print(f"| {(B, NH, DQ, DV)} | " + " | ".join(cells) + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
