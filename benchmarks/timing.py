"""Measuring and writing: CUDA-event and wall-clock medians, the copy bandwidth behind the bytes
floor, peak memory, and the markdown / JSON / PNG writers of the benchmark reports."""
import json
import os
import statistics
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch


# ---------------------------------------------------------------------------------------------
# Timing


def cuda_time(fn: Callable[[object], object], sets: Sequence[object], rep_ms: float = 100.0,
              max_reps: int = 100) -> Dict[str, float]:
    """Median CUDA-event time of ``fn(set)`` in ms, rotating among ``sets`` (independently drawn
    inputs that together exceed L2, so no call reads its inputs from L2). The first call (JIT,
    autotune, allocation) is untimed, then a warm-up; about ``rep_ms`` of timed calls."""
    fn(sets[0])
    torch.cuda.synchronize()
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    e0.record()
    fn(sets[1 % len(sets)])
    e1.record()
    torch.cuda.synchronize()
    est = max(e0.elapsed_time(e1), 1e-3)
    reps = int(max(5, min(max_reps, rep_ms / est)))
    for r in range(int(max(len(sets), min(25, 25.0 / est)))):
        fn(sets[r % len(sets)])
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for r in range(reps):
        starts[r].record()
        fn(sets[(r + 1) % len(sets)])
        ends[r].record()
    torch.cuda.synchronize()
    ts = [s.elapsed_time(e) for s, e in zip(starts, ends)]
    return {"ms": statistics.median(ts), "min_ms": min(ts), "reps": reps}


def wall_time(fn: Callable[[], object], budget_s: float, min_reps: int = 3,
              max_reps: int = 50) -> Tuple[float, int]:
    """(median wall time of fn() in ms, repeats): one warm-up call, then repeats until budget_s
    (at least min_reps, at most max_reps)."""
    fn()
    times: List[float] = []
    start = time.perf_counter()
    while len(times) < min_reps or (len(times) < max_reps and time.perf_counter() - start < budget_s):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), len(times)


def copy_bandwidth(device, gib: float = 1.0, reps: int = 20) -> Tuple[float, str]:
    """(bytes/s, description) of a large device-to-device copy, bytes read + written: the rate
    the bytes floors are divided by."""
    n = int(gib * 2**30) // 4
    src = torch.ones(n, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    ts = []
    for _ in range(reps):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        dst.copy_(src)
        e1.record()
        e1.synchronize()
        ts.append(e0.elapsed_time(e1))
    ms = statistics.median(ts)
    del src, dst
    torch.cuda.empty_cache()
    return 2 * n * 4 / (ms * 1e-3), f"torch copy_ of {gib:g} GiB float32, median of {reps}: {ms:.3f} ms"


def peak_memory_above(fn: Callable[[], object], device) -> int:
    """Bytes that fn() allocates at its peak above what is allocated before it (the inputs)."""
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - base


# ---------------------------------------------------------------------------------------------
# Writers


def fmt_ms(d: Optional[dict]) -> str:
    """A result cell: its time, or why there is none."""
    if not d:
        return "-"
    if "ms" in d:
        return f"{d['ms']:.3f}"
    return "fail" if "error" in d else d.get("skipped", "-")


def ratio(num: Optional[float], den: Optional[float], suffix: str = "x") -> str:
    return f"{num / den:.2f}{suffix}" if num and den else "-"


def md_table(headers: Sequence[str], rows: Sequence[Sequence[object]], right_from: int = 2) -> List[str]:
    """Markdown table lines; columns from ``right_from`` on are right-aligned."""
    align = ["---" if c < right_from else "---:" for c in range(len(headers))]
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join(align) + " |"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return lines


def write_json(path: str, obj: object) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as fh:
        json.dump(obj, fh, indent=1, default=str)


def write_text(path: str, lines: Sequence[str]) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as fh:
        fh.write("\n".join(lines) + "\n")


def write_png(path: str, title: str, panels: Sequence[Tuple[str, List[str], Dict[str, List[Optional[float]]]]]) -> str:
    """One panel per table: (panel title, x labels, {series name: ms per label (None: absent)}),
    markers on a log time axis. Returns what was written or why not."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as e:
        return f"no plot (matplotlib unavailable: {e})"
    panels = [p for p in panels if any(v for s in p[2].values() for v in s)]
    if not panels:
        return "no plot (nothing timed)"
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.8), squeeze=False)
    markers = "os^vD<>px*"
    for ax, (name, labels, series) in zip(axes[0], panels):
        for k, (sname, vals) in enumerate(series.items()):
            pts = [(x, v) for x, v in enumerate(vals) if v]
            if pts:  # floors as horizontal bars, the peers as markers
                floor = "floor" in sname
                ax.plot([p[0] for p in pts], [p[1] for p in pts], "_" if floor else markers[k % len(markers)],
                        label=sname, markersize=14 if floor else 6, markeredgewidth=2 if floor else 1)
        ax.set_xticks(range(len(labels)))
        ax.set_xticklabels(labels, fontsize=7)
        ax.set_yscale("log")
        ax.set_ylabel("ms (median)")
        ax.set_title(name)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
