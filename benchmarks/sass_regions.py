"""Where a kernel's instructions and stalls go, from Nsight Compute's SASS page.

A kernel whose loop bodies are unrolled runs each instruction of one phase the same number of
times, so runs of equal execution counts mark its phases (the gate scan, the products, the
epilogue...). This prints each run that holds a visible share of the executed instructions or of
the stall samples, with its leading opcodes and stall reasons, and the opcode totals.

    ncu -k regex:KERNEL --launch-skip 1 --launch-count 1 --section InstructionStats \
        --section SourceCounters --import-source yes -o rep python3 benchmarks/ncu_case.py ...
    ncu --import rep.ncu-rep --page source --csv --print-source sass > sass.csv
    python3 benchmarks/sass_regions.py sass.csv [--min 0.002]
"""
import argparse
import collections
import csv

STALLS = ["stall_barrier", "stall_wait", "stall_short_sb", "stall_long_sb", "stall_mio", "stall_math",
          "stall_branch_resolving", "stall_no_inst", "stall_dispatch", "stall_selected", "stall_not_selected"]


def number(text):
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return 0.0


def opcode(source):
    words = source.split()
    if not words:
        return ""
    op = words[1] if words[0].startswith("@") and len(words) > 1 else words[0]
    return op.split(".")[0]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("csv")
    ap.add_argument("--min", type=float, default=0.002, help="smallest share of instructions or samples shown")
    args = ap.parse_args()
    rows = list(csv.reader(open(args.csv)))
    header = next(i for i, r in enumerate(rows) if "Source" in r and "Instructions Executed" in r)
    col = {name: i for i, name in enumerate(rows[header])}
    lines = [r for r in rows[header + 1:] if len(r) == len(rows[header])]
    executed = [number(r[col["Instructions Executed"]]) for r in lines]
    samples = [number(r[col["Warp Stall Sampling (All Samples)"]]) for r in lines]
    total_inst, total_samples = sum(executed) or 1.0, sum(samples) or 1.0

    runs = []  # consecutive instructions executed equally often
    for j, r in enumerate(lines):
        if not runs or runs[-1]["count"] != executed[j]:
            runs.append({"first": j, "count": executed[j], "length": 0, "samples": 0.0,
                         "ops": collections.Counter(), "stalls": collections.Counter()})
        run = runs[-1]
        run["length"] += 1
        run["samples"] += samples[j]
        run["ops"][opcode(r[col["Source"]])] += 1
        for name in STALLS:
            if name in col:
                run["stalls"][name] += number(r[col[name]])

    print(f"{len(lines)} SASS instructions, {total_inst:.0f} executed (warp level), {total_samples:.0f} stall samples")
    print("first  executed  length  inst%  samples% | opcodes | stalls")
    for run in runs:
        inst = run["count"] * run["length"] / total_inst
        samp = run["samples"] / total_samples
        if inst < args.min and samp < args.min:
            continue
        ops = " ".join(f"{k}:{v}" for k, v in run["ops"].most_common(6))
        stalls = " ".join(f"{k[6:]}:{v:.0f}" for k, v in run["stalls"].most_common(3))
        print(f"{run['first']:5d} {run['count']:9.0f} {run['length']:7d} {inst * 100:6.2f} {samp * 100:8.2f} | {ops} | {stalls}")

    by_op, by_op_samples = collections.Counter(), collections.Counter()
    for r, n, s in zip(lines, executed, samples):
        by_op[opcode(r[col["Source"]])] += n
        by_op_samples[opcode(r[col["Source"]])] += s
    print("\nopcode  inst%  samples%")
    for op, n in by_op.most_common(20):
        print(f"{op:8s} {n / total_inst * 100:6.2f} {by_op_samples[op] / total_samples * 100:8.2f}")


if __name__ == "__main__":
    main()
