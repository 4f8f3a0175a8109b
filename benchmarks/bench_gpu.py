#!/usr/bin/env python3
"""GPU benchmark of mlstm_ext's ops against mlstm-kernels' Triton kernels: the one GPU entry.

    python3 benchmarks/bench_gpu.py [--quick | --full | --check-only] [--tables hstep,forward,fwbw]
                                    [--out PATH] [--budget-s S] [--seed N]
    python3 benchmarks/bench_gpu.py --ab OLD_LIB,NEW_LIB [--quick | --full] [--rounds N] [--ab-op OP]

Tables, per case (shape, dtype):
(a) hstep: the H step ``torch.ops.mlstm.parallel_fw_hintra`` against mlstm-kernels'
    ``mlstm_chunkwise__parallel_fw_Hintra``: Triton best (the fastest of its default and a fixed
    sweep of launch configs, ~6 with --quick, ~16 with --full, each checked against float64 first
    and rejected above PEER_REJECT), Triton default, the PyTorch eager reference in the input
    dtype, the bytes floor; on Hopper also our sm_80 kernel (the Hopper kernel switched off).
(b) forward: the whole forward ``torch.ops.mlstm.chunkwise_fw`` against Triton's
    ``mlstm_chunkwise__xl_chunk`` forward (no grad, last states returned, as ours) and against our
    two ops in sequence (recurrent_fw_states + parallel_fw_hintra); the states step alone (ours and
    Triton's ``mlstm_chunkwise__recurrent_fw_C``); the bytes floors of a fused forward and of the
    two steps.
(c) fwbw: forward + backward, ``h.sum().backward()`` with q, k, v, i, f requiring grad, of
    ``mlstm_ext.mlstm_chunkwise`` (skipped with a note while the package has none) and of Triton's
    ``mlstm_chunkwise__xl_chunk``: time, and peak memory above the inputs.
(d) accuracy: for each of them, every peer's relative-norm error against float64 on the same
    inputs (accuracy.py); our ops must meet ``mlstm_ext.reference.TOLERANCES``.

Cases (cases.py): (8,16,4096,128,128,64), (8,16,4096,128,128,128), (1,8,16384,256,512,128),
(4,8,8192,256,512,64) in bf16; --full and --check-only add fp16 and fp32 at the first shape.
--check-only: accuracy only, no timing. --budget-s bounds the Triton config sweep (each case gets
its share). --ab: ab.py (one op, the H step unless --ab-op says forward or fwbw, timed with two
builds of the library, interleaved).

Timing (timing.py): CUDA events, median after warm-up, rotating among input sets that together
exceed 2.5x L2; floors: bytes that must move (cases.py) over the measured copy bandwidth.
Outputs: bench.md, bench.json (every number; each row names the GPU) and bench.png in $OUT (or
next to --out); the markdown is printed last, ready to paste into benchmarks/RESULTS.md.
Exit code: 0; 1 when one of our ops failed its accuracy check or the run aborted; 2 when it cannot
run (no GPU, library without CUDA kernels).

Helpers: cases.py (shapes, inputs, our ops, bytes), accuracy.py (float64 references on slices),
peers.py (the Triton loader), timing.py (timers, writers), report.py (tables, plot), ab.py (A/B).
"""
import argparse
import datetime
import inspect
import os
import platform
import shlex
import sys
import time
import traceback

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(1, REPO)  # mlstm_ext from this tree without installing it

import torch

import ab
import accuracy as acc
import cases as cs
import peers
import report
import timing

# Triton Hintra launch configs (siz_b_LQ, siz_b_LKV, siz_b_DHQK, siz_b_DHHV, num_warps,
# num_stages), most promising first; head-dim blocks are clipped to the next power of 2 of the head
# dim, configs its asserts reject (LQ <= L, LKV <= LQ, LQ % LKV == 0) dropped.
TRITON_CONFIGS = [
    (64, 32, 64, 128, 4, 1), (64, 64, 64, 128, 8, 1), (32, 32, 64, 128, 4, 2),
    (64, 32, 128, 128, 8, 1), (128, 64, 64, 128, 8, 1), (64, 32, 64, 64, 4, 1),
    (32, 32, 128, 64, 4, 1), (64, 64, 128, 64, 8, 2), (64, 16, 64, 128, 4, 1),
    (32, 16, 64, 64, 2, 1), (128, 32, 64, 64, 8, 1), (64, 64, 64, 256, 8, 1),
    (32, 32, 64, 256, 8, 1), (128, 128, 64, 128, 8, 1), (64, 32, 32, 128, 4, 3),
    (16, 16, 64, 128, 4, 1), (128, 64, 128, 128, 8, 2), (64, 64, 64, 64, 4, 2),
]
N_CONFIGS = {"quick": 6, "full": 16, "check": 0}
# A Triton config whose errors (matH, vecN, vecM) exceed these is rejected, not timed (its fp32
# dot runs in tf32).
PEER_REJECT = {"fp32": 1e-2, "bf16": 3e-2, "fp16": 1e-2}
TABLES = ("hstep", "forward", "fwbw")
DEVICE = "cuda"  # where the cases run (a test harness may point it elsewhere)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", dest="mode", action="store_const", const="quick",
                      help="the four shapes in bf16, ~6 Triton configs (the default)")
    mode.add_argument("--full", dest="mode", action="store_const", const="full",
                      help="also fp16 and fp32 at the first shape, ~16 Triton configs")
    mode.add_argument("--check-only", dest="mode", action="store_const", const="check",
                      help="the full cases, accuracy only")
    p.set_defaults(mode="quick")
    p.add_argument("--tables", default=",".join(TABLES), help="comma list of " + ", ".join(TABLES))
    p.add_argument("--out", default=None, help="markdown report (default $OUT/bench.md, else "
                   "benchmarks/bench_latest.md); .json and .png go next to it")
    p.add_argument("--budget-s", type=float, default=None,
                   help="time for the Triton config sweeps (default 150 quick, 330 full)")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--ab", default=None, metavar="OLD_LIB,NEW_LIB",
                   help="A/B: time one op with two builds of the library (ab.py)")
    p.add_argument("--rounds", type=int, default=3, help="--ab: subprocesses per library")
    p.add_argument("--ab-op", choices=ab.OP_NAMES, default="hstep",
                   help="--ab: the op timed (fwbw: chunkwise_fw then chunkwise_bw)")
    args = p.parse_args(argv)
    args.tables = [t.strip() for t in args.tables.split(",") if t.strip()]
    for t in args.tables:
        if t not in TABLES:
            p.error(f"unknown table {t!r}; choose from {', '.join(TABLES)}")
    return args


# ---------------------------------------------------------------------------------------------
# The run: device facts, peers, the copy bandwidth, guarded calls


def short(e: BaseException) -> str:
    msg = str(e).splitlines()[0][:200] if str(e) else ""
    return f"{type(e).__name__}: {msg}"


class ContextLost(RuntimeError):
    """The CUDA context is unusable (after an illegal access, say): the run stops."""


def ensure_context(e: BaseException) -> None:
    """After a failed call: frees memory after an OOM; raises ContextLost when the context is."""
    if isinstance(e, torch.cuda.OutOfMemoryError):
        torch.cuda.empty_cache()
        return
    try:
        torch.cuda.synchronize()
    except Exception as lost:
        raise ContextLost(f"CUDA context lost after {short(e)}") from lost


def guarded(fn):
    """(fn(), None), or (None, error text) when fn raises."""
    try:
        out = fn()
        torch.cuda.synchronize()
        return out, None
    except Exception as e:
        ensure_context(e)
        return None, short(e)


def load_ours_chunkwise():
    """mlstm_ext.mlstm_chunkwise (forward + backward), imported when first needed."""
    try:
        from mlstm_ext.chunkwise import mlstm_chunkwise
    except Exception as e:
        return None, f"mlstm_ext.chunkwise.mlstm_chunkwise not available ({short(e)})"
    return mlstm_chunkwise, "mlstm_ext.chunkwise.mlstm_chunkwise"


def raise_dynamo_limits() -> None:
    """mlstm-kernels torch.compile's its gate helpers; every case's sizes compile anew, and past
    torch._dynamo's default limit (8) later cases would fall back to eager."""
    try:
        import torch._dynamo
        for name, val in (("cache_size_limit", 64), ("recompile_limit", 64),
                          ("accumulated_cache_size_limit", 1024), ("accumulated_recompile_limit", 1024)):
            if hasattr(torch._dynamo.config, name):
                setattr(torch._dynamo.config, name, val)
    except Exception:
        pass


class Run:
    def __init__(self, args):
        raise_dynamo_limits()
        self.args = args
        self.dev = torch.device(DEVICE)
        self.props = torch.cuda.get_device_properties(self.dev)
        self.gpu = torch.cuda.get_device_name(self.dev)
        self.l2 = int(getattr(self.props, "L2_cache_size", 0) or 50 * 2**20)
        self.timed = args.mode != "check"
        self.copy_bw, self.copy_desc = (None, "not measured (--check-only)")
        if self.timed:
            self.copy_bw, self.copy_desc = timing.copy_bandwidth(self.dev)
        self.hintra, self.hintra_how = peers.hintra()
        self.xl, self.xl_how = peers.xl_chunk()
        self.rec_C, self.rec_C_how = peers.recurrent_fw_C()
        self.ours_fwbw, self.ours_fwbw_how = (None, "not run")
        if "fwbw" in args.tables:
            self.ours_fwbw, self.ours_fwbw_how = load_ours_chunkwise()
        budget = args.budget_s if args.budget_s is not None else (330.0 if args.mode == "full" else 150.0)
        self.t0, self.budget = time.time(), budget
        self.failed = False  # one of our ops missed its accuracy check
        self.aborted = None

    def time(self, fn, sets, **kw):
        """timing.cuda_time, or {"error": ...}."""
        if not self.timed:
            return {}
        try:
            return timing.cuda_time(fn, sets, **kw)
        except Exception as e:
            ensure_context(e)
            return {"error": short(e)}

    def floor_ms(self, nbytes: int):
        return nbytes / self.copy_bw * 1e3 if self.copy_bw else None

    def check(self, fn, refs, sl, names, case=None):
        """Runs fn() and measures its outputs' errors against refs: {"err": [...]} or
        {"error": ...}. With case (our op): "ok" against TOLERANCES and output dtypes."""
        outs, error = guarded(fn)
        if error:
            res = {"error": error}
        else:
            res = {"err": acc.errors(list(outs)[:len(names)], refs, sl)}
        if case is not None:
            res["ok"] = ("err" in res and acc.within(res["err"], names, case.torch_dtype)
                         and outs[0].dtype == case.torch_dtype
                         and all(o.dtype == torch.float32 for o in list(outs)[1:len(names)]))
            self.failed |= not res["ok"]
        return res

    def measure(self, fn, sets, refs, sl, names, case=None, **time_kw):
        """check() on the first input set, then (when it ran) the time of fn over the sets."""
        res = self.check(lambda: fn(sets[0]), refs, sl, names, case)
        if "error" not in res:
            res.update(self.time(fn, sets, **time_kw))
        return res


def log(name: str, d: dict) -> None:
    parts = []
    if "err" in d:
        parts.append(f"err {acc.fmt(d['err'])}" + ("" if "ok" not in d else (" PASS" if d["ok"] else " FAIL")))
    if "ms" in d:
        parts.append(f"{d['ms']:.3f} ms")
    if "peak_MiB" in d:
        parts.append(f"peak {d['peak_MiB']:.0f} MiB")
    for k in ("error", "rejected", "skipped"):
        if k in d:
            parts.append(f"{k}: {d[k]}")
    print(f"  {name:30} " + "  ".join(parts), flush=True)


# ---------------------------------------------------------------------------------------------
# (a) the H step


def sweep_configs(case: cs.Case, n: int):
    out = []
    for lq, lkv, bdq, bdv, w, st in TRITON_CONFIGS:
        cfg = (lq, lkv, min(bdq, peers.next_pow2(case.DQ)), min(bdv, peers.next_pow2(case.DV)), w, st)
        if lq <= case.L and lkv <= lq and lq % lkv == 0 and cfg not in out:
            out.append(cfg)
    return out[:n]


def triton_hstep(run: Run, case: cs.Case, sets, refs, sl, deadline: float) -> dict:
    """Triton's default and its config sweep; returns {"default", "sweep", "best"}."""
    L = case.L

    def call(cfg):
        if cfg is None:
            return lambda a: run.hintra(*a, chunk_size=L)
        names = ("siz_b_LQ", "siz_b_LKV", "siz_b_DHQK", "siz_b_DHHV", "num_warps", "num_stages")
        return lambda a: run.hintra(*a, chunk_size=L, **dict(zip(names, cfg)))

    def measure(cfg, entry):
        """Checked first; a config above PEER_REJECT is not timed (the default is, for its column)."""
        entry.update(run.check(lambda: call(cfg)(sets[0]), refs, sl, cs.HSTEP_OUT))
        if "err" in entry and max(entry["err"]) > PEER_REJECT[case.dtype]:
            entry["rejected"] = f"error {acc.fmt(entry['err'])} above {PEER_REJECT[case.dtype]:g}"
        if "error" not in entry and (cfg is None or "rejected" not in entry):
            entry.update(run.time(call(cfg), sets))
        return entry

    dflt = peers.triton_default_config(case.DQ, case.DV)
    out = {"default": measure(None, {"cfg": dflt}), "sweep": []}
    log("Triton default " + report.cfg_str(dflt), out["default"])
    for cfg in sweep_configs(case, N_CONFIGS[run.args.mode]):
        if cfg == dflt:
            continue
        if time.time() > deadline:
            out["sweep"].append({"cfg": cfg, "skipped": "time budget"})
            continue
        out["sweep"].append(measure(cfg, {"cfg": cfg}))
        log("Triton " + report.cfg_str(cfg), out["sweep"][-1])
    good = [e for e in [out["default"]] + out["sweep"] if "ms" in e and "rejected" not in e]
    if good:
        best = min(good, key=lambda e: e["ms"])
        out["best"] = dict(best, n_configs=len(good))
    return out


def with_sm80(fn):
    """fn() with the Hopper kernel switched off. The library reads MLSTM_EXT_SM90 once, at its
    first CUDA call, so the run-time switch is what turns it off here."""
    old = torch.ops.mlstm._set_sm90_enabled(False)
    try:
        return fn()
    finally:
        torch.ops.mlstm._set_sm90_enabled(old)


def run_hstep(run: Run, case: cs.Case, sets, deadline: float) -> dict:
    L, sl = case.L, acc.slices(case)
    refs = acc.hstep_refs(sets[0], L, sl)
    rec = {"ours": run.measure(lambda a: cs.hintra(a, L), sets, refs, sl, cs.HSTEP_OUT, case)}
    log("ours parallel_fw_hintra", rec["ours"])
    if (case.dtype != "fp32" and torch.ops.mlstm._built_with_sm90a()
            and torch.cuda.get_device_capability(run.dev) == (9, 0) and run.timed):
        rec["ours_sm80"] = with_sm80(lambda: run.time(lambda a: cs.hintra(a, L), sets))
        log("ours, sm_80 kernel (Hopper kernel switched off)", rec["ours_sm80"])
    if run.hintra is not None:
        rec["triton"] = triton_hstep(run, case, sets, refs, sl, deadline)
    if run.timed:
        rec["eager"] = run.time(lambda a: cs.hintra_ref(a, L, case.torch_dtype), sets, max_reps=20)
        log("eager reference", rec["eager"])
    rec["bytes"] = cs.hstep_bytes(case)
    rec["floor_ms"] = run.floor_ms(rec["bytes"])
    rec["flops"] = cs.hstep_flops(case)
    return rec


# ---------------------------------------------------------------------------------------------
# (b) the whole forward


def run_forward(run: Run, case: cs.Case, sets, deadline: float) -> dict:
    L, sl = case.L, acc.slices(case)
    refs = acc.forward_refs(sets[0], L, sl)
    rec = {"ours": run.measure(lambda a: cs.forward(a, L), sets, refs, sl, cs.FORWARD_OUT, case)}
    log("ours chunkwise_fw", rec["ours"])
    rec["two_step"] = run.measure(lambda a: cs.two_step(a, L), sets, refs, sl, ("matH",))
    log("ours two-step", rec["two_step"])
    if run.timed:
        rec["states"] = run.time(lambda a: cs.states(a, L), sets)
        log("ours recurrent_fw_states", rec["states"])
    if run.xl is not None:
        def triton_fw(a):
            with torch.no_grad():
                H, (C, n, m) = run.xl(*a[:5], chunk_size=L, return_last_states=True)
            return H, C, n, m
        rec["triton"] = run.measure(triton_fw, sets, refs, sl, cs.FORWARD_OUT[:4])
        log("Triton xl_chunk forward", rec["triton"])
    if run.rec_C is not None and run.timed:  # note its argument order: K, V, F, I
        rec["triton_states"] = run.time(lambda a: run.rec_C(a[1], a[2], a[4], a[3], chunk_size=L), sets)
        log("Triton recurrent_fw_C", rec["triton_states"])
    for name, nbytes in (("fused", cs.forward_bytes(case)), ("two_step", cs.two_step_bytes(case)),
                         ("states", cs.states_bytes(case))):
        rec[f"bytes_{name}"] = nbytes
        rec[f"floor_{name}_ms"] = run.floor_ms(nbytes)
    return rec


# ---------------------------------------------------------------------------------------------
# (c) forward + backward


def fwbw_call(fn, L: int, **kw):
    """a -> gradients (dq, dk, dv, di, df) of fn(q, k, v, i, f).sum() on input set a."""
    def call(a):
        leaves = [t.detach().requires_grad_() for t in a[:5]]
        h = fn(*leaves, chunk_size=L, **kw)
        (h[0] if isinstance(h, tuple) else h).sum().backward()
        return [t.grad for t in leaves]
    return call


def measure_fwbw(run: Run, call, sets, refs, sl) -> dict:
    """Gradient errors, time, and peak memory above the inputs of one step."""
    res = run.measure(call, sets, refs, sl, acc.GRAD_NAMES)
    if "ms" in res:
        peak, error = guarded(lambda: timing.peak_memory_above(lambda: call(sets[0]), run.dev))
        res.update({"peak_MiB": peak / 2**20} if error is None else {"peak_error": error})
    return res


def run_fwbw(run: Run, case: cs.Case, sets, deadline: float) -> dict:
    L, sl = case.L, acc.slices(case)
    refs = acc.grad_refs(sets[0], L, sl)
    rec = {}
    if run.ours_fwbw is not None:
        rec["ours"] = measure_fwbw(run, fwbw_call(run.ours_fwbw, L), sets, refs["exact"], sl)
        run.failed |= "error" in rec["ours"]
        log("ours mlstm_chunkwise fw+bw", rec["ours"])
        if "grad_mode" in inspect.signature(run.ours_fwbw).parameters:
            call = fwbw_call(run.ours_fwbw, L, grad_mode="normaliser_constant")
            rec["ours_nc"] = run.check(lambda: call(sets[0]), refs["normaliser_constant"], sl, acc.GRAD_NAMES)
            log("ours, normaliser constant", rec["ours_nc"])
    if run.xl is not None:
        rec["triton"] = measure_fwbw(run, fwbw_call(run.xl, L), sets, refs["normaliser_constant"], sl)
        log("Triton xl_chunk fw+bw", rec["triton"])
    rec["bytes"] = cs.fwbw_bytes(case)
    rec["floor_ms"] = run.floor_ms(rec["bytes"])
    return rec


RUNNERS = {"hstep": run_hstep, "forward": run_forward, "fwbw": run_fwbw}


def run_case(run: Run, case: cs.Case, sets, deadline: float, results: dict) -> None:
    """One case through every table; a table that raises is recorded as failed (ContextLost
    goes on up)."""
    for table in run.args.tables:
        print(f" {table}", flush=True)
        rec = {"shape": list(case.shape), "dtype": case.dtype, "gpu": run.gpu}
        results[table].append(rec)
        try:
            rec.update(RUNNERS[table](run, case, sets, deadline))
        except ContextLost:
            raise
        except Exception as e:
            ensure_context(e)
            traceback.print_exc()
            rec["error"] = short(e)
            run.failed = True


def run_cases(run: Run) -> dict:
    """Every case through every table; the input sets are made once per case."""
    cl = cs.cases(run.args.mode)
    results = {t: [] for t in run.args.tables}
    for ci, case in enumerate(cl):
        deadline = run.t0 + run.budget * (ci + 1) / len(cl)
        n = cs.n_sets(case, run.l2, run.props.total_memory) if run.timed else 1
        print(f"\n[{ci + 1}/{len(cl)}] {case.label()}: {n} input set(s) of "
              f"{cs.input_bytes(case) / 1e6:.0f} MB (t = {time.time() - run.t0:.0f} s)", flush=True)
        try:
            sets = cs.make_sets(case, n, run.args.seed + ci, run.dev)
            run_case(run, case, sets, deadline, results)
        except ContextLost as e:
            run.aborted = f"{case.label()}: {e}"
            print("ABORTED:", run.aborted)
            break
        except Exception as e:  # the inputs could not be made (out of memory, say)
            print(f"  inputs failed: {short(e)}")
            for table in run.args.tables:
                results[table].append({"shape": list(case.shape), "dtype": case.dtype,
                                       "gpu": run.gpu, "error": short(e)})
            run.failed = True
        finally:
            sets = None
            torch.cuda.empty_cache()
    return results


def describe(run: Run, argv) -> dict:
    try:
        import triton
        triton_ver = triton.__version__
    except Exception:
        triton_ver = "n/a"
    args = sys.argv[1:] if argv is None else list(argv)
    return {
        "date": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        "gpu": run.gpu, "sm_count": run.props.multi_processor_count,
        "gpu_mem_gib": round(run.props.total_memory / 2**30, 1), "l2_mib": round(run.l2 / 2**20, 1),
        "torch": torch.__version__, "cuda": torch.version.cuda, "triton": triton_ver,
        "mlstm_kernels": peers.version(), "python": platform.python_version(),
        "command": "python3 " + " ".join(shlex.quote(a) for a in ["benchmarks/bench_gpu.py"] + args),
        "mode": run.args.mode, "timed": run.timed, "copy_bw_GBps": run.copy_bw and run.copy_bw / 1e9,
        "copy_desc": run.copy_desc, "peer_hintra": run.hintra_how, "peer_xl_chunk": run.xl_how,
        "peer_recurrent_fw_C": run.rec_C_how, "ours_fwbw": run.ours_fwbw_how,
        "ours_fwbw_present": run.ours_fwbw is not None,
    }


def write_outputs(run: Run, meta: dict, results: dict, out_md: str) -> None:
    base = os.path.splitext(out_md)[0]
    lines = report.markdown(meta, results)
    timing.write_text(out_md, lines)
    timing.write_json(base + ".json", {"meta": meta, **results})
    png = timing.write_png(base + ".png", f"mlstm_ext vs Triton on {run.gpu}", report.plot_panels(results))
    print("\n" + "\n".join(lines))
    print(f"wrote {out_md}, {base}.json; {png}")


# ---------------------------------------------------------------------------------------------


def cannot_run():
    """Why the benchmark cannot run here, or None."""
    if not torch.cuda.is_available():
        return "no CUDA device (torch.cuda.is_available() is False)"
    try:
        import mlstm_ext
    except Exception as e:
        return f"cannot import mlstm_ext ({short(e)}); build it first"
    if not mlstm_ext.has_cuda_kernels():
        return "mlstm_ext was built without its CUDA kernels; rebuild with MLSTM_EXT_CUDA=1"
    return None


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.ab:
        return ab.run_ab(args.ab.split(","), args.mode, args.rounds, args.seed, args.out, args.ab_op)
    why = cannot_run()
    if why:
        print(f"bench_gpu.py: {why}. Nothing was run.", file=sys.stderr)
        return 2
    out_md = args.out or (os.path.join(os.environ["OUT"], "bench.md") if os.environ.get("OUT")
                          else os.path.join(cs.REPO, "benchmarks", "bench_latest.md"))
    run = Run(args)
    print(f"GPU: {run.gpu}; mode {args.mode}; tables {', '.join(args.tables)}; copy bandwidth "
          + (f"{run.copy_bw / 1e9:.0f} GB/s" if run.copy_bw else "not measured"), flush=True)
    results = run_cases(run)
    meta = describe(run, argv)
    meta.update(elapsed_s=time.time() - run.t0, aborted=run.aborted)
    write_outputs(run, meta, results, out_md)
    if run.failed:
        print("\none of our ops FAILED its accuracy check (see above)", file=sys.stderr)
    return 1 if run.failed or run.aborted else 0


if __name__ == "__main__":
    sys.exit(main())
