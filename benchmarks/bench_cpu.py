#!/usr/bin/env python3
"""CPU benchmark: mlstm_ext's CPU kernel against the PyTorch eager reference (float32).

    python benchmarks/bench_cpu.py [--out benchmarks/RESULTS_CPU.md] [--dtypes fp32,bf16]
                                   [--budget 2.0] [--threads 1,2] [--shapes "2,4,1024,64,64,64"]

For each shape (B, NH, S, DHQK, DHHV, L) it first checks the op against the float64 reference
(relative-norm error of matH), then times the op and ``reference.parallel_fw_hintra_reference``
(float32, the same call the tests use) with time.perf_counter: one warm-up call, then repeats until
--budget seconds (at least 3, at most 50), and reports the median. Inputs are N(0, 1) q, k, v, i,
f = 3 + N(0, 1), states from the recurrent step. Writes a markdown table (with date, machine, torch
version and the command) to --out and prints it. Each shape is timed with 1 thread and with
torch's default thread count: on a small shared VM the multi-threaded eager reference can be
several times slower than the single-threaded one (OpenMP barriers on busy vCPUs), so both are
reported.
"""
import argparse
import datetime
import os
import platform
import shlex
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
if REPO not in sys.path:
    sys.path.insert(0, REPO)

SHAPES = [
    (2, 4, 1024, 64, 64, 64),  # the headline shape
    (1, 4, 2048, 128, 128, 64),
    (2, 4, 1024, 64, 64, 128),
    (1, 2, 1024, 256, 512, 64),
]
DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
TOL = {"fp32": 2e-5, "bf16": 1e-2, "fp16": 2e-3}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.path.join(HERE, "RESULTS_CPU.md"))
    p.add_argument("--dtypes", default="fp32", help="comma list of fp32,bf16,fp16 (input dtype "
                   "of the op; the eager reference always runs in float32)")
    p.add_argument("--budget", type=float, default=2.0, help="seconds of repeats per measurement")
    p.add_argument("--threads", default=None,
                   help="comma list of torch thread counts to run each shape with (default: 1 and "
                        "torch's default count, e.g. '1,2')")
    p.add_argument("--shapes", default=None,
                   help="semicolon list of B,NH,S,DHQK,DHHV,L (default: the built-in four)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def median_ms(fn, budget_s, min_reps=3, max_reps=50):
    fn()  # warm-up
    times = []
    start = time.perf_counter()
    while len(times) < min_reps or (len(times) < max_reps and time.perf_counter() - start < budget_s):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), len(times)


def main(argv=None):
    args = parse_args(argv)
    import torch
    from mlstm_ext.__main__ import _cpu_name

    import mlstm_ext
    from mlstm_ext.__main__ import make_inputs, rel_norm_err
    from mlstm_ext.reference import parallel_fw_hintra_reference

    default_threads = torch.get_num_threads()
    if args.threads:
        thread_counts = [int(t) for t in args.threads.split(",") if t.strip()]
    else:
        thread_counts = sorted({1, default_threads})
    shapes = SHAPES
    if args.shapes:
        shapes = [tuple(int(x) for x in s.split(",")) for s in args.shapes.split(";") if s.strip()]
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    for d in dtypes:
        if d not in DTYPES:
            sys.exit(f"unknown dtype {d!r}; choose from {list(DTYPES)}")

    try:
        load_before = " ".join(open("/proc/loadavg").read().split()[:3])
    except OSError:
        load_before = "n/a"
    gen = torch.Generator().manual_seed(args.seed)
    rows = []
    failed = False
    for shp in shapes:
        B, NH, S, DQ, DV, L = shp
        for dname in dtypes:
            dt = getattr(torch, DTYPES[dname])
            a = make_inputs(B, NH, S, DQ, DV, L, dt, "cpu", gen)
            H, _, _ = mlstm_ext.parallel_fw_hintra(*a, chunk_size=L)
            Hr, _, _ = parallel_fw_hintra_reference(*a, chunk_size=L, compute_dtype=torch.float64)
            err = rel_norm_err(H, Hr)
            ok = err <= TOL[dname]
            failed |= not ok
            del Hr
            for nt in thread_counts:
                torch.set_num_threads(nt)
                t_op, n_op = median_ms(lambda: mlstm_ext.parallel_fw_hintra(*a, chunk_size=L),
                                       args.budget)
                t_ref, n_ref = median_ms(
                    lambda: parallel_fw_hintra_reference(*a, chunk_size=L,
                                                         compute_dtype=torch.float32),
                    args.budget)
                NC = S // L
                flops = B * NH * NC * (2 * (L * (L + 1) // 2) * (DQ + DV) + 2 * L * DQ * DV)
                row = dict(shape=shp, dtype=dname, threads=nt, err=err, ok=ok, t_op=t_op,
                           n_op=n_op, t_ref=t_ref, n_ref=n_ref,
                           gflops=flops / (t_op * 1e-3) / 1e9)
                rows.append(row)
                print(f"{str(shp):28} {dname} {nt:2} thr  op {t_op:9.3f} ms ({n_op} reps)  eager "
                      f"fp32 {t_ref:9.3f} ms ({n_ref} reps)  x{t_ref / t_op:.2f}  err {err:.1e} "
                      f"{'PASS' if ok else 'FAIL'}", flush=True)
            torch.set_num_threads(default_threads)

    cmd = "python " + " ".join(shlex.quote(x) for x in [os.path.relpath(__file__, REPO)] + (
        sys.argv[1:] if argv is None else list(argv)))
    lines = [
        "# mlstm_ext CPU benchmark",
        "",
        f"- date: {datetime.datetime.now().astimezone().strftime('%Y-%m-%d %H:%M %Z')}",
        f"- machine: {_cpu_name()}, {os.cpu_count()} cores (torch default {default_threads} "
        f"threads), {platform.system()} {platform.machine()}; load average before the run "
        f"{load_before}",
        f"- torch {torch.__version__}, Python {platform.python_version()}",
        f"- command: `{cmd}`",
        "- timing: time.perf_counter, one warm-up call, median of repeats "
        f"(>= 3, <= 50, ~{args.budget:g} s each); inputs N(0,1) q/k/v/i, f = 3 + N(0,1), "
        "states from the recurrent step",
        "- eager: `mlstm_ext.reference.parallel_fw_hintra_reference` in float32; "
        "err: relative-norm error of the op's matH against the float64 reference",
        "- GFLOP/s: per chunk 2*(L(L+1)/2)*(DHQK+DHHV) + 2*L*DHQK*DHHV, times B*NH*NC, "
        "over the op's time",
        "",
        "| (B, NH, S, DHQK, DHHV, L) | dtype | threads | op ms | eager fp32 ms | speed-up "
        "| op GFLOP/s | matH rel err |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in rows:
        lines.append(f"| {r['shape']} | {r['dtype']} | {r['threads']} | {r['t_op']:.3f} | "
                     f"{r['t_ref']:.3f} | "
                     f"{r['t_ref'] / r['t_op']:.2f}x | {r['gflops']:.1f} | "
                     f"{r['err']:.1e} {'PASS' if r['ok'] else 'FAIL'} |")
    text = "\n".join(lines) + "\n"
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as fh:
            fh.write(text)
    print()
    print(text)
    if args.out:
        print(f"written to {args.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
