#!/usr/bin/env python3
"""A/B: one op timed with two builds of the op library in one session.

    python3 benchmarks/bench_gpu.py --ab OLD_LIB,NEW_LIB [--quick | --full] [--rounds 3] [--ab-op OP]
    python3 benchmarks/ab.py OLD_LIB,NEW_LIB [--mode quick|full] [--rounds 3] [--op OP] [--out PATH]

OP: hstep (default: ``parallel_fw_hintra``), forward (``chunkwise_fw``) or fwbw (``chunkwise_fw``
then ``chunkwise_bw`` with dH = 1, i.e. the gradients of H.sum(), exact convention; the ops
directly, without autograd, with vecN_signed as mlstm_chunkwise where the library has it).

Each library runs in subprocesses of its own (``ab.py --child LIB``), interleaved OLD NEW, NEW OLD,
OLD NEW, ... for --rounds rounds, so that drift in clocks or temperature falls on both alike. A
child loads its library with ``torch.ops.load_library`` (and has MLSTM_EXT_LIBRARY set to it) and
never imports the mlstm_ext package, so a library built from old sources without the later ops
works too; it makes the inputs of cases.py (same seeds: the same inputs in every child and as in
bench_gpu.py), measures the errors of the op's outputs against float64 on two (b, h) slices,
times it (timing.cuda_time) and writes a JSON. The parent prints, per case, the median over the
rounds of each library's time, new / old, and each library's errors with PASS/FAIL against
``mlstm_ext.reference.TOLERANCES``; it writes ab.md and ab.json to $OUT (or next to --out).
Other environment variables (MLSTM_EXT_SM90, say) reach both children.
Exit code: 0; 1 when a library failed a check or a child failed; 2 without a CUDA device.
"""
import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile

# ---------------------------------------------------------------------------------------------
# The ops: name, call(input set, L), float64 references(input set, L, slices), output names


def fwbw(x, L):
    """The gradients (dq, dk, dv, di, df) of H.sum() through the forward and backward ops, as
    mlstm_chunkwise calls them (with vecN_signed where the library has it)."""
    import torch

    kw = {"vecN_signed": True} if "vecN_signed" in str(torch.ops.mlstm.chunkwise_fw.default._schema) else {}
    out = torch.ops.mlstm.chunkwise_fw(*x[:5], chunk_size=L, **kw)
    dH = torch.ones_like(out[0])
    return torch.ops.mlstm.chunkwise_bw(*x[:5], None, None, None, out[0], out[4], out[5], dH, None, None,
                                        chunk_size=L, **kw)[:5]


OP_NAMES = ("hstep", "forward", "fwbw")  # the keys of op_table


def op_table(op: str):
    import accuracy as acc
    import cases as cs

    return {
        "hstep": ("parallel_fw_hintra", cs.hintra, acc.hstep_refs, cs.HSTEP_OUT),
        "forward": ("chunkwise_fw", cs.forward, acc.forward_refs, cs.FORWARD_OUT),
        "fwbw": ("chunkwise_fw + chunkwise_bw", fwbw, lambda x, L, sl: acc.grad_refs(x, L, sl)["exact"],
                 acc.GRAD_NAMES),
    }[op]


# ---------------------------------------------------------------------------------------------
# Child: one library, every case


def child(lib: str, mode: str, seed: int, out_json: str, op: str = "hstep") -> int:
    import torch

    torch.ops.load_library(lib)
    import accuracy as acc
    import cases as cs
    import timing

    _, call, make_refs, names = op_table(op)

    dev = torch.device("cuda")
    props = torch.cuda.get_device_properties(dev)
    l2 = int(getattr(props, "L2_cache_size", 0) or 50 * 2**20)
    rows = []
    for ci, case in enumerate(cs.cases(mode)):
        row = {"shape": list(case.shape), "dtype": case.dtype}
        rows.append(row)
        try:
            sets = cs.make_sets(case, cs.n_sets(case, l2, props.total_memory), seed + ci, dev)
            sl = acc.slices(case)
            out = call(sets[0], case.L)
            row["err"] = acc.errors(out, make_refs(sets[0], case.L, sl), sl)
            row["ok"] = acc.within(row["err"], names, case.torch_dtype) and out[0].dtype == case.torch_dtype
            del out
            row.update(timing.cuda_time(lambda a: call(a, case.L), sets))
            print(f"  {case.label():40} {row['ms']:.3f} ms  err {acc.fmt(row['err'])}", flush=True)
        except Exception as e:
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
            print(f"  {case.label():40} failed: {row['error']}", flush=True)
        sets = None
        torch.cuda.empty_cache()
    timing.write_json(out_json, {"lib": lib, "gpu": torch.cuda.get_device_name(dev), "rows": rows})
    return 0


# ---------------------------------------------------------------------------------------------
# Parent: interleaved children, then the table


def run_children(libs, mode: str, rounds: int, seed: int, tmp: str, op: str):
    """{library index: [child JSON per round]}, and the failures."""
    runs, failures = {0: [], 1: []}, []
    for r in range(rounds):
        for k in ((0, 1) if r % 2 == 0 else (1, 0)):
            path = os.path.join(tmp, f"{k}_{r}.json")
            print(f"\n== round {r + 1}/{rounds}: {'old' if k == 0 else 'new'} {libs[k]}", flush=True)
            cmd = [sys.executable, os.path.abspath(__file__), "--child", libs[k], "--mode", mode,
                   "--seed", str(seed), "--json", path, "--op", op]
            rc = subprocess.run(cmd, env=dict(os.environ, MLSTM_EXT_LIBRARY=libs[k])).returncode
            if rc == 0 and os.path.exists(path):
                with open(path) as fh:
                    runs[k].append(json.load(fh))
            else:
                failures.append(f"round {r + 1} {libs[k]}: exit code {rc}")
    return runs, failures


def summarize(runs, case_i: int) -> dict:
    """One library at one case over the rounds: median of the medians, spread, errors."""
    rows = [run["rows"][case_i] for run in runs]
    ms = [row["ms"] for row in rows if "ms" in row]
    first = next((row for row in rows if "err" in row), rows[0] if rows else {})
    return {"ms": statistics.median(ms) if ms else None, "rounds_ms": ms,
            "err": first.get("err"), "ok": bool(rows) and all(row.get("ok") for row in rows),
            "error": next((row["error"] for row in rows if "error" in row), None)}


def table(runs, names):
    import accuracy as acc

    def cell_ms(s):
        if s["ms"] is None:
            return "fail"
        return f"{s['ms']:.3f}"

    def cell_err(s):
        if s["err"] is None:
            return "fail: " + (s["error"] or "?")[:60]
        return acc.fmt(s["err"]) + (" PASS" if s["ok"] else " FAIL")

    def spread(s):
        return f"{min(s['rounds_ms']):.3f}-{max(s['rounds_ms']):.3f}" if s["rounds_ms"] else "-"

    first = (runs[0] or runs[1] or [{"rows": [], "gpu": "?"}])[0]
    ref_rows, gpu = first["rows"], first["gpu"].replace("NVIDIA ", "")
    rows, summary, all_ok = [], [], True
    for ci, case in enumerate(ref_rows):
        old, new = summarize(runs[0], ci), summarize(runs[1], ci)
        all_ok &= old["ok"] and new["ok"]
        summary.append({"shape": case["shape"], "dtype": case["dtype"], "old": old, "new": new, "gpu": gpu})
        r = f"{new['ms'] / old['ms']:.3f}" if old["ms"] and new["ms"] else "-"
        rows.append([tuple(case["shape"]), case["dtype"], cell_ms(old), cell_ms(new), r, spread(old),
                     spread(new), cell_err(old), cell_err(new), gpu])
    head = ["(B, NH, S, DHQK, DHHV, L)", "dtype", "old ms", "new ms", "new / old",
            "old, per round", "new, per round", "old err " + "/".join(names), "new err " + "/".join(names), "GPU"]
    return head, rows, summary, all_ok


def run_ab(libs, mode: str = "quick", rounds: int = 3, seed: int = 1234, out=None, op: str = "hstep") -> int:
    import torch
    import timing

    if len(libs) != 2:
        print("--ab takes two libraries: OLD_LIB,NEW_LIB", file=sys.stderr)
        return 2
    libs = [os.path.abspath(lib) for lib in libs]
    missing = [lib for lib in libs if not os.path.isfile(lib)]
    if missing or not torch.cuda.is_available():
        print(f"ab: {'missing ' + ', '.join(missing) if missing else 'no CUDA device'}; nothing run",
              file=sys.stderr)
        return 2
    mode = "full" if mode == "check" else mode
    with tempfile.TemporaryDirectory() as tmp:
        runs, failures = run_children(libs, mode, rounds, seed, tmp, op)
    title, _, _, names = op_table(op)
    head, rows, summary, all_ok = table(runs, names)
    date = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    lines = [f"# A/B of {title}: two builds of the library", "",
             f"- old: `{libs[0]}`", f"- new: `{libs[1]}`",
             f"- date: {date}; mode {mode}; {rounds} rounds, interleaved; each time the median over "
             "the rounds of a child's CUDA-event median; errors vs float64 on slices (0, 0) and "
             "(B-1, NH-1), against mlstm_ext.reference.TOLERANCES",
             f"- command: `python3 benchmarks/bench_gpu.py --ab OLD_LIB,NEW_LIB --{mode} --rounds {rounds} --ab-op {op}`",
             ""] + timing.md_table(head, rows) + [""]
    if failures:
        lines += ["Failed children: " + "; ".join(failures), ""]
    outdir = os.path.dirname(os.path.abspath(out)) if out else os.environ.get("OUT") or os.getcwd()
    timing.write_text(os.path.join(outdir, "ab.md"), lines)
    timing.write_json(os.path.join(outdir, "ab.json"), {"libs": libs, "op": op, "mode": mode, "rounds": rounds,
                                                        "date": date, "cases": summary, "failures": failures})
    print("\n" + "\n".join(lines))
    print(f"wrote {os.path.join(outdir, 'ab.md')}, ab.json")
    return 0 if all_ok and not failures and rows else 1


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("libs", nargs="?", help="OLD_LIB,NEW_LIB")
    p.add_argument("--mode", choices=["quick", "full"], default="quick")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--op", choices=OP_NAMES, default="hstep")
    p.add_argument("--out", default=None)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--json", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return child(args.child, args.mode, args.seed, args.json, args.op)
    if not args.libs:
        p.error("give OLD_LIB,NEW_LIB")
    return run_ab(args.libs.split(","), args.mode, args.rounds, args.seed, args.out, args.op)


if __name__ == "__main__":
    sys.exit(main())
