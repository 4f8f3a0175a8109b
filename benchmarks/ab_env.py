#!/usr/bin/env python3
"""A/B of an environment variable that the library reads at every call, in one process: forward +
backward through autograd (``mlstm_ext.mlstm_chunkwise``, random dH, bf16 unless --dtype), or with
--op forward the forward alone (no grad, last states returned), each value timed in interleaved
rounds, with the peak memory of one step above the inputs and the relative difference of H.

    python3 benchmarks/ab_env.py MLSTM_EXT_GRAM_SCAN --old 0 [--new unset] [--rounds 4] [--out PATH]
    python3 benchmarks/ab_env.py MLSTM_EXT_FUSED_FW --old 0 --new 1 --op forward
    python3 benchmarks/ab_env.py MLSTM_EXT_BACKWARD_WORKSPACE_MB --old 512,517,2068 --new unset

--old / --new: one value for every shape, or one per shape (comma list in the shapes' order);
--shapes "B,NH,S,DHQK,DHHV,L;..." replaces cases.SHAPES;
"unset" removes the variable. Variables read once per process (MLSTM_EXT_SM90) need two builds:
``bench_gpu.py --ab``. The library is the one ``import mlstm_ext`` finds. Writes a markdown table
(card, command, date) to --out or $OUT/ab_env.md. Exit code 2 without a CUDA device.
"""
import argparse
import datetime
import os
import statistics
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))
import cases as cs  # noqa: E402


def per_shape(spec: str, n: int):
    values = spec.split(",")
    if len(values) not in (1, n):
        raise SystemExit(f"give one value or {n} (one per shape), got {spec!r}")
    return values * n if len(values) == 1 else values


def setenv(name: str, value: str):
    if value == "unset":
        os.environ.pop(name, None)
    else:
        os.environ[name] = value


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("var")
    ap.add_argument("--old", required=True)
    ap.add_argument("--new", default="unset")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--steps", type=int, default=12, help="timed steps per round")
    ap.add_argument("--dtype", default="bf16", choices=sorted(cs.DTYPES))
    ap.add_argument("--op", default="fwbw", choices=["fwbw", "forward"])
    ap.add_argument("--out", default=None)
    ap.add_argument("--shapes", default=None, help='"B,NH,S,DHQK,DHHV,L;..." instead of cases.SHAPES')
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device")
        return 2
    import mlstm_ext
    from mlstm_ext.reference import random_inputs

    shapes = cs.SHAPES
    if args.shapes is not None:
        shapes = [tuple(int(x) for x in sh.split(",")) for sh in args.shapes.split(";")]
    olds, news = per_shape(args.old, len(shapes)), per_shape(args.new, len(shapes))
    dtype = cs.DTYPES[args.dtype]
    gen = torch.Generator(device="cuda").manual_seed(1234)
    rows = []
    for shape, old, new in zip(shapes, olds, news):
        B, NH, S, DQ, DV, L = shape
        fwbw = args.op == "fwbw"
        x = [t.detach().clone().requires_grad_(fwbw)
             for t in random_inputs(B, NH, S, DQ, DV, L, dtype, "cuda", generator=gen)[:5]]
        dH = torch.randn(B, NH, S, DV, device="cuda", dtype=dtype, generator=gen)

        def step():
            if not fwbw:
                with torch.no_grad():
                    return mlstm_ext.mlstm_chunkwise(*x, chunk_size=L, return_last_states=True)[0]
            for t in x:
                t.grad = None
            H = mlstm_ext.mlstm_chunkwise(*x, chunk_size=L)
            H.backward(dH)
            return H.detach()

        def timed():
            ev = [torch.cuda.Event(enable_timing=True) for _ in range(2 * args.steps)]
            for i in range(args.steps):
                ev[2 * i].record()
                step()
                ev[2 * i + 1].record()
            torch.cuda.synchronize()
            return statistics.median(ev[2 * i].elapsed_time(ev[2 * i + 1]) for i in range(args.steps))

        ms, peak, H = {"old": [], "new": []}, {}, {}
        for name, value in (("old", old), ("new", new)):
            setenv(args.var, value)
            for t in x:
                t.grad = None
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            H[name] = step().float()
            torch.cuda.synchronize()
            peak[name] = (torch.cuda.max_memory_allocated() - base) / 2**20
        dh = ((H["new"] - H["old"]).norm() / H["old"].norm()).item()
        del H
        for r in range(args.rounds):
            order = (("old", old), ("new", new)) if r % 2 == 0 else (("new", new), ("old", old))
            for name, value in order:
                setenv(args.var, value)
                step()  # warm-up with this value
                torch.cuda.synchronize()
                ms[name].append(timed())
        o, n = statistics.median(ms["old"]), statistics.median(ms["new"])
        rows.append(f"| {shape} | {args.dtype} | {old} | {new} | {o:.3f} | {n:.3f} | {n / o:.3f} | "
                    f"{min(ms['old']):.3f}-{max(ms['old']):.3f} | {min(ms['new']):.3f}-{max(ms['new']):.3f} | "
                    f"{peak['old']:.0f} | {peak['new']:.0f} | {dh:.1e} |")
        print(rows[-1], flush=True)
        del x, dH
        torch.cuda.empty_cache()
    setenv(args.var, "unset")

    gpu = torch.cuda.get_device_name().replace("NVIDIA ", "")
    what = "forward + backward through autograd" if args.op == "fwbw" else "forward, no grad"
    md = [f"# A/B of {args.var} in one process ({what})", "",
          f"- card: {gpu}; torch {torch.__version__}",
          f"- command: `python3 benchmarks/ab_env.py {' '.join(sys.argv[1:])}`",
          f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; {args.rounds} interleaved "
          f"rounds of {args.steps} steps, the median of each round's CUDA-event median; peak: one step "
          "above the inputs" + (", gradients included" if args.op == "fwbw" else "")
          + "; H new vs old: relative norm of the difference of the two values' H", "",
          "| (B, NH, S, DHQK, DHHV, L) | dtype | old value | new value | old ms | new ms | new / old | "
          "old, per round | new, per round | old peak MiB | new peak MiB | H new vs old (rel. norm) |",
          "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |", *rows]
    out = args.out or os.path.join(os.environ.get("OUT", "."), "ab_env.md")
    with open(out, "w") as fh:
        fh.write("\n".join(md) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
