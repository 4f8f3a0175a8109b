#!/usr/bin/env python3
"""CPU benchmark of mlstm_ext's ops against the PyTorch eager reference: the one CPU entry.

    python benchmarks/bench_cpu.py [--quick] [--out benchmarks/RESULTS_CPU.md] [--ops hintra,states,forward]
                                   [--dtypes fp32,bf16] [--threads 1,2] [--budget 2.0]
                                   [--shapes "2,4,1024,64,64,64;1,4,2048,128,128,64"]

For each op (parallel_fw_hintra, recurrent_fw_states, chunkwise_fw), shape (B, NH, S, DHQK, DHHV,
L) and input dtype: first the check against float64 (relative-norm error of every output, PASS/FAIL
against mlstm_ext.reference.TOLERANCES["cpu"]), then the op and its reference in float32 (the same
call the tests use) timed with timing.wall_time (one warm-up call, median of 3..50 repeats within
--budget seconds), with 1 thread and with torch's default count: on a small shared VM the
multi-threaded eager reference can be several times slower than the single-threaded one (OpenMP
barriers on busy vCPUs), so both are reported. Inputs: reference.random_inputs. --quick: the first
shape, 0.5 s per measurement.

Prints a markdown table (date, machine, torch, command) and writes it to --out (default
$OUT/bench_cpu.md when $OUT is set). Exit code 1 when an op failed its check or raised.
"""
import argparse
import datetime
import os
import platform
import shlex
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(1, REPO)  # mlstm_ext from this tree without installing it

import torch

import cases as cs
import timing

import mlstm_ext  # noqa: F401  (loads the op library)
from mlstm_ext.__main__ import cpu_name

SHAPES = [
    (2, 4, 1024, 64, 64, 64),  # the headline shape
    (1, 4, 2048, 128, 128, 64),
    (2, 4, 1024, 64, 64, 128),
    (1, 2, 1024, 256, 512, 64),
]
# name: (op, reference, output names)
OPS = {
    "hintra": (cs.hintra, cs.hintra_ref, cs.HSTEP_OUT),
    "states": (cs.states, cs.states_ref, cs.STATES_OUT),
    "forward": (cs.forward, cs.forward_ref, cs.FORWARD_OUT),
}
OP_NAMES = {"hintra": "parallel_fw_hintra", "states": "recurrent_fw_states", "forward": "chunkwise_fw"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="the first shape, 0.5 s per measurement")
    p.add_argument("--out", default=None, help="markdown output (default $OUT/bench_cpu.md if $OUT is set)")
    p.add_argument("--ops", default=",".join(OPS), help="comma list of " + ", ".join(OPS))
    p.add_argument("--dtypes", default="fp32", help="comma list of fp32, bf16, fp16 (the op's "
                   "input dtype; the eager reference always computes in float32)")
    p.add_argument("--budget", type=float, default=None, help="seconds of repeats per measurement "
                   "(default 2, --quick 0.5)")
    p.add_argument("--threads", default=None, help="comma list of torch thread counts (default: 1 "
                   "and torch's default count)")
    p.add_argument("--shapes", default=None, help="semicolon list of B,NH,S,DHQK,DHHV,L")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    args.ops = [o.strip() for o in args.ops.split(",") if o.strip()]
    args.dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    for name, allowed in (("ops", OPS), ("dtypes", cs.DTYPES)):
        bad = [x for x in getattr(args, name) if x not in allowed]
        if bad:
            p.error(f"unknown {name} {bad}; choose from {list(allowed)}")
    if args.shapes:
        args.shapes = [tuple(int(x) for x in s.split(",")) for s in args.shapes.split(";") if s.strip()]
    else:
        args.shapes = SHAPES[:1] if args.quick else SHAPES
    args.budget = args.budget if args.budget is not None else (0.5 if args.quick else 2.0)
    default = torch.get_num_threads()
    args.threads = ([int(t) for t in args.threads.split(",") if t.strip()] if args.threads
                    else sorted({1, default}))
    return args


def check(op_key: str, x, L: int, dtype: torch.dtype):
    """(errors per output, ok) of one op against float64."""
    op, reference, names = OPS[op_key]
    tol_h, tol_f32 = cs.TOLERANCES["cpu"][dtype]
    errs = [cs.ref.rel_norm_err(o, r) for o, r in zip(op(x, L), reference(x, L, torch.float64))]
    ok = all(e <= (tol_h if n == "matH" else tol_f32) for e, n in zip(errs, names))
    return errs, ok


def measure(op_key: str, shape, dtype_name: str, args, gen) -> list:
    """Rows (one per thread count) of one op at one shape and dtype."""
    op, reference, _ = OPS[op_key]
    L = shape[-1]
    x = cs.ref.random_inputs(*shape, cs.DTYPES[dtype_name], "cpu", gen)
    base = {"op": OP_NAMES[op_key], "shape": shape, "dtype": dtype_name}
    try:
        errs, ok = check(op_key, x, L, cs.DTYPES[dtype_name])
    except Exception as e:
        print(f"{OP_NAMES[op_key]:19} {str(shape):28} {dtype_name}: {type(e).__name__}: {e}", flush=True)
        return [dict(base, error=f"{type(e).__name__}: {str(e).splitlines()[0]}", ok=False)]
    rows = []
    default = torch.get_num_threads()
    for nt in args.threads:
        torch.set_num_threads(nt)
        t_op, n_op = timing.wall_time(lambda: op(x, L), args.budget)
        t_ref, n_ref = timing.wall_time(lambda: reference(x, L, torch.float32), args.budget)
        flops = cs.hstep_flops(cs.Case(*shape, dtype_name)) if op_key == "hintra" else None
        rows.append(dict(base, threads=nt, errs=errs, ok=ok, t_op=t_op, n_op=n_op, t_ref=t_ref,
                         n_ref=n_ref, gflops=flops and flops / (t_op * 1e-3) / 1e9))
        print(f"{OP_NAMES[op_key]:19} {str(shape):28} {dtype_name} {nt:2} thr  op {t_op:9.3f} ms "
              f"({n_op})  eager fp32 {t_ref:9.3f} ms ({n_ref})  x{t_ref / t_op:.2f}  "
              f"max err {max(errs):.1e} {'PASS' if ok else 'FAIL'}", flush=True)
    torch.set_num_threads(default)
    return rows


def markdown(rows, args, argv, load_before: str):
    cmd = "python " + " ".join(shlex.quote(a) for a in ["benchmarks/bench_cpu.py"] + (
        sys.argv[1:] if argv is None else list(argv)))
    lines = [
        "# mlstm_ext CPU benchmark", "",
        f"- date: {datetime.datetime.now().astimezone().strftime('%Y-%m-%d %H:%M %Z')}",
        f"- machine: {cpu_name()}, {os.cpu_count()} cores (torch default {torch.get_num_threads()} "
        f"threads), {platform.system()} {platform.machine()}; load average before the run {load_before}",
        f"- torch {torch.__version__}, Python {platform.python_version()}",
        f"- command: `{cmd}`",
        f"- timing: time.perf_counter, one warm-up call, median of 3..50 repeats (~{args.budget:g} s "
        "each); inputs N(0,1) q/k/v/i, f = 3 + N(0,1), states from the recurrent step",
        "- eager: the mlstm_ext.reference function of the op in float32; errors: relative norm "
        "against float64, matH and the largest of the other outputs",
        "- GFLOP/s (H step): per chunk 2*(L(L+1)/2)*(DHQK+DHHV) + 2*L*DHQK*DHHV, times B*NH*NC", "",
    ]
    table = []
    for r in rows:
        if "error" in r:
            table.append([r["op"], r["shape"], r["dtype"], "-", "-", "-", "-", "-", "FAIL: " + r["error"][:80]])
            continue
        errs = f"{r['errs'][0]:.1e} / {max(r['errs'][1:]):.1e} {'PASS' if r['ok'] else 'FAIL'}"
        table.append([r["op"], r["shape"], r["dtype"], r["threads"], f"{r['t_op']:.3f}",
                      f"{r['t_ref']:.3f}", f"{r['t_ref'] / r['t_op']:.2f}x",
                      f"{r['gflops']:.1f}" if r["gflops"] else "-", errs])
    head = ["op", "(B, NH, S, DHQK, DHHV, L)", "dtype", "threads", "op ms", "eager fp32 ms",
            "speed-up", "GFLOP/s", "errors (first / rest)"]
    return lines + timing.md_table(head, table, right_from=3)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        load_before = " ".join(open("/proc/loadavg").read().split()[:3])
    except OSError:
        load_before = "n/a"
    gen = torch.Generator().manual_seed(args.seed)
    rows = []
    for op_key in args.ops:
        for shape in args.shapes:
            for dtype_name in args.dtypes:
                rows += measure(op_key, shape, dtype_name, args, gen)
    lines = markdown(rows, args, argv, load_before)
    out = args.out or (os.path.join(os.environ["OUT"], "bench_cpu.md") if os.environ.get("OUT") else None)
    print("\n" + "\n".join(lines))
    if out:
        timing.write_text(out, lines)
        print(f"written to {out}")
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
