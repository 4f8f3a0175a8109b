"""The benchmark report of bench_gpu.py: markdown tables (timings and accuracy per table, ready
to paste into benchmarks/RESULTS.md) and the plot panels, from the result records."""
import accuracy as acc
from cases import FORWARD_OUT
from timing import fmt_ms, md_table, ratio


def cfg_str(cfg) -> str:
    """A Triton Hintra launch config (siz_b_LQ, siz_b_LKV, siz_b_DHQK, siz_b_DHHV, warps, stages)."""
    return "LQ{}/LKV{}/DQK{}/DHV{}/w{}/s{}".format(*cfg) if cfg else "-"


def gpu_short(rec) -> str:
    return rec["gpu"].replace("NVIDIA ", "")


def hstep_table(recs):
    head = ["(B, NH, S, DHQK, DHHV, L)", "dtype", "ours ms", "ours, sm_80 kernel ms",
            "Triton best ms (config, of n)", "Triton default ms", "eager ms", "floor ms",
            "vs Triton best", "vs Triton default", "ours / floor", "TFLOP/s", "GB/s", "GPU"]
    rows = []
    for r in recs:
        o, tri = r.get("ours", {}), r.get("triton", {})
        best = tri.get("best")
        best_s = f"{best['ms']:.3f} ({cfg_str(best['cfg'])}, {best['n_configs']})" if best else "-"
        rows.append([tuple(r["shape"]), r["dtype"], fmt_ms(o), fmt_ms(r.get("ours_sm80")), best_s,
                     fmt_ms(tri.get("default")), fmt_ms(r.get("eager")), fmt_floor(r.get("floor_ms")),
                     ratio(best and best["ms"], o.get("ms")),
                     ratio(tri.get("default", {}).get("ms"), o.get("ms")),
                     ratio(o.get("ms"), r.get("floor_ms"), ""), rate(r.get("flops"), o, 1e12),
                     rate(r.get("bytes"), o, 1e9), gpu_short(r)])
    return head, rows


def rate(amount, d, unit: float) -> str:
    """amount per second of the timed result d, in unit (1e12: TFLOP/s; 1e9: GB/s)."""
    return f"{amount / (d['ms'] * 1e-3) / unit:.1f}" if amount and d and "ms" in d else "-"


def forward_table(recs):
    head = ["(B, NH, S, DHQK, DHHV, L)", "dtype", "chunkwise_fw ms", "two-step ms",
            "states ms", "Triton xl_chunk fw ms", "Triton states ms", "fused floor ms",
            "two-step floor ms", "vs Triton", "vs two-step", "chunkwise_fw / fused floor",
            "two-step / its floor", "GPU"]
    rows = []
    for r in recs:
        o, two = r.get("ours", {}).get("ms"), r.get("two_step", {}).get("ms")
        rows.append([tuple(r["shape"]), r["dtype"], fmt_ms(r.get("ours")), fmt_ms(r.get("two_step")),
                     fmt_ms(r.get("states")), fmt_ms(r.get("triton")), fmt_ms(r.get("triton_states")),
                     fmt_floor(r.get("floor_fused_ms")), fmt_floor(r.get("floor_two_step_ms")),
                     ratio(r.get("triton", {}).get("ms"), o), ratio(two, o),
                     ratio(o, r.get("floor_fused_ms"), ""), ratio(two, r.get("floor_two_step_ms"), ""),
                     gpu_short(r)])
    return head, rows


def fwbw_table(recs):
    head = ["(B, NH, S, DHQK, DHHV, L)", "dtype", "ours fw+bw ms", "Triton fw+bw ms", "floor ms",
            "vs Triton", "ours / floor", "ours peak MiB", "Triton peak MiB", "GPU"]
    rows = []
    for r in recs:
        o, t = r.get("ours", {}), r.get("triton", {})
        rows.append([tuple(r["shape"]), r["dtype"], fmt_ms(o) if r.get("ours") else "absent",
                     fmt_ms(t), fmt_floor(r.get("floor_ms")), ratio(t.get("ms"), o.get("ms")),
                     ratio(o.get("ms"), r.get("floor_ms"), ""), fmt_mib(o), fmt_mib(t), gpu_short(r)])
    return head, rows


def accuracy_table(table, recs):
    """Per case: each peer's errors against float64 (matH first), ours with PASS/FAIL."""
    def cell(d):
        if not d:
            return "-"
        if "err" not in d:
            return "fail: " + d.get("error", "?")[:60]
        return acc.fmt(d["err"]) + ("" if "ok" not in d else (" PASS" if d["ok"] else " FAIL"))

    cols = {
        "hstep": [("ours (matH/vecN/vecM)", lambda r: r.get("ours")),
                  ("Triton default", lambda r: r.get("triton", {}).get("default")),
                  ("Triton best config", lambda r: r.get("triton", {}).get("best"))],
        "forward": [("ours chunkwise_fw (" + "/".join(FORWARD_OUT) + ")", lambda r: r.get("ours")),
                    ("ours two-step (matH)", lambda r: r.get("two_step")),
                    ("Triton xl_chunk (matH/matC/vecN/scaM last)", lambda r: r.get("triton"))],
        "fwbw": [("ours, exact (" + "/".join(acc.GRAD_NAMES) + ")", lambda r: r.get("ours")),
                 ("ours, normaliser constant", lambda r: r.get("ours_nc")),
                 ("Triton (normaliser constant)", lambda r: r.get("triton"))],
    }[table]
    head = ["(B, NH, S, DHQK, DHHV, L)", "dtype"] + [c[0] for c in cols]
    rows = [[tuple(r["shape"]), r["dtype"]] + [cell(get(r)) for _, get in cols] for r in recs]
    return head, rows


def fmt_floor(x) -> str:
    return f"{x:.3f}" if x else "-"


def fmt_mib(d) -> str:
    return f"{d['peak_MiB']:.0f}" if d and "peak_MiB" in d else "-"


TITLES = {
    "hstep": ("(a) H step: parallel_fw_hintra",
              "Floor: Q, K, V read and H written once (input dtype), NC float32 C/n/m states read, "
              "gates read, vecN/vecM written. Triton best: the fastest of its default and the "
              "config sweep, each config checked against float64 first."),
    "forward": ("(b) Whole forward: chunkwise_fw",
                "Triton xl_chunk forward under no_grad with return_last_states=True (ours returns "
                "them too). Two-step: recurrent_fw_states then parallel_fw_hintra. Fused floor: Q, "
                "K, V, gates read; H, vecN, vecM and the last state written. Two-step floor: the "
                "states step (K, V, gates read, NC+1 states written) plus the H step's floor."),
    "fwbw": ("(c) Forward + backward: h.sum().backward(), q, k, v, i, f requiring grad",
             "Peak: torch.cuda.max_memory_allocated during one step above what was allocated "
             "before it (the inputs), gradients included. Floor: the bytes of a forward + backward "
             "whose states never leave the chip (cases.fwbw_bytes) at the measured copy bandwidth."),
}


def markdown(meta: dict, results: dict):
    """The report: run facts, then per table its timings (unless --check-only) and accuracy."""
    bw = f"{meta['copy_bw_GBps']:.0f} GB/s ({meta['copy_desc']})" if meta["copy_bw_GBps"] else meta["copy_desc"]
    lines = [f"# mlstm_ext GPU benchmark ({meta['mode']})", "",
             f"- card: {meta['gpu']} ({meta['sm_count']} SMs, {meta['gpu_mem_gib']} GiB, L2 "
             f"{meta['l2_mib']} MiB); torch {meta['torch']} (CUDA {meta['cuda']}); triton "
             f"{meta['triton']}; Python {meta['python']}",
             f"- command: `{meta['command']}`",
             f"- date: {meta['date']}; elapsed {meta['elapsed_s']:.0f} s"
             + (f"; ABORTED: {meta['aborted']}" if meta["aborted"] else ""),
             f"- copy bandwidth (bytes read + written): {bw}",
             f"- peers: Triton Hintra {meta['peer_hintra']}; Triton xl_chunk {meta['peer_xl_chunk']}; "
             f"Triton recurrent_fw_C {meta['peer_recurrent_fw_C']}; ours fw+bw {meta['ours_fwbw']}",
             "- timing: CUDA events, median after warm-up, rotating among input sets that together "
             "exceed 2.5x L2; inputs q, k, v, i ~ N(0,1), f = 3 + N(0,1) (states from the "
             "recurrent step where an op takes them); ms unless said otherwise", ""]
    makers = {"hstep": hstep_table, "forward": forward_table, "fwbw": fwbw_table}
    for table, recs in results.items():
        title, note = TITLES[table]
        lines += [f"## {title}", "", note, ""]
        if table == "fwbw" and not meta["ours_fwbw_present"]:
            lines += [f"Ours: {meta['ours_fwbw']}; the Triton column only.", ""]
        if meta["timed"]:
            lines += md_table(*makers[table](recs)) + [""]
        lines += ["Accuracy (relative-norm error vs float64 on slices (0, 0) and (B-1, NH-1); ours "
                  "against mlstm_ext.reference.TOLERANCES):", ""]
        lines += md_table(*accuracy_table(table, recs), right_from=99) + [""]
    return lines


def plot_panels(results: dict):
    def label(r):
        return "{},{},{}\n{},{},{}\n".format(*r["shape"]) + r["dtype"]

    series = {
        "hstep": {"ours": lambda r: r.get("ours", {}).get("ms"),
                  "ours sm_80": lambda r: r.get("ours_sm80", {}).get("ms"),
                  "Triton best": lambda r: r.get("triton", {}).get("best", {}).get("ms"),
                  "Triton default": lambda r: r.get("triton", {}).get("default", {}).get("ms"),
                  "eager": lambda r: r.get("eager", {}).get("ms"),
                  "bytes floor": lambda r: r.get("floor_ms")},
        "forward": {"chunkwise_fw": lambda r: r.get("ours", {}).get("ms"),
                    "two-step": lambda r: r.get("two_step", {}).get("ms"),
                    "Triton xl_chunk": lambda r: r.get("triton", {}).get("ms"),
                    "fused floor": lambda r: r.get("floor_fused_ms"),
                    "two-step floor": lambda r: r.get("floor_two_step_ms")},
        "fwbw": {"ours": lambda r: r.get("ours", {}).get("ms"),
                 "Triton xl_chunk": lambda r: r.get("triton", {}).get("ms"),
                 "bytes floor": lambda r: r.get("floor_ms")},
    }
    return [(TITLES[t][0], [label(r) for r in recs], {n: [g(r) for r in recs] for n, g in series[t].items()})
            for t, recs in results.items()]
