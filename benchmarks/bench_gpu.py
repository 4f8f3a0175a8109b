#!/usr/bin/env python3
"""GPU benchmark of ``mlstm_ext.parallel_fw_hintra`` against its peers. Builds nothing.

    python3 benchmarks/bench_gpu.py [--quick] [--check-only] [--out PATH] [--budget-s S] ...

Peers
- ours: ``mlstm_ext.parallel_fw_hintra`` (the compiled CUDA kernel), default hints.
- Triton best: mlstm-kernels' ``mlstm_chunkwise__parallel_fw_Hintra`` (Triton), the fastest of a
  fixed sweep of launch configs (siz_b_LQ, siz_b_LKV, siz_b_DHQK, siz_b_DHHV, num_warps,
  num_stages), ~16 valid ones per shape (~6 with --quick), together with its default config.
  Configs that fail to compile/launch are skipped; configs whose output misses the float64
  reference by more than the peer tolerance are rejected. For the S sweep the best config of the
  matching main shape is reused; for the head-dim sweep likewise or a small sweep.
- Triton default: the same function with no launch hints.
- eager: ``mlstm_ext.reference.parallel_fw_hintra_reference`` in the input dtype.
- compile: the same function under ``torch.compile(dynamic=False)``, where it compiles within
  the time budget (compile seconds reported separately, not in the time).

Shapes (B, NH, S, DHQK, DHHV, L)
- main: (8,16,4096,128,128,64), (8,16,4096,128,128,128), (1,8,16384,256,512,128),
  (4,8,8192,256,512,64) in bf16 and fp16; fp32 at (8,16,4096,128,128,64) and (2,4,2048,64,64,64).
- S sweep (bf16, NH=8, DHQK=DHHV=128, L=64): S = 1k..64k with B = 65536 / S, i.e. the total token
  count (and so the work, the bytes and the bytes floor) is fixed: small S still fill the GPU
  (B*NH*NC = 8192 blocks of one chunk each) and the curve shows only how the time depends on S.
- head-dim sweep (bf16, B=2, NH=8, S=8192, L=64): (DHQK, DHHV) from (64,64) to (512,512).
--quick runs the 4 main shapes in bf16 and the 2 fp32 shapes with a ~6-config Triton sweep
(~2 minutes); the full run is time-budgeted to ~6 minutes (--budget-s; the Triton sweep of later
shapes and the torch.compile peer are cut first when time runs short).

Timing: CUDA events around each call, median over repeats after a warm-up; the calls rotate among
several independently drawn input sets (2..8, together > 2.5x the L2 size) so no input is read
from L2 between calls. The first call of each peer (JIT, compile, autotune) is outside the timing.

Before timing, every peer's output is checked against a float64 evaluation of the reference on
two (b, h) slices of the same inputs (the first and the last head: the last catches large-offset
bugs): relative-norm errors ||x - x64|| / ||x64|| of matH, vecN, vecM. Inputs: q, k, v, i ~ N(0,1),
f = 3 + N(0,1), states from the recurrent step (never zeros).

Definitions
- FLOPs (matrix products only): per chunk 2*(L*(L+1)/2)*(DHQK+DHHV) (the causal half of Q K^T and
  of S V) + 2*L*DHQK*DHHV (Q C, full), times B*NH*NC. TFLOP/s = FLOPs / time.
- bytes floor: Q, K, V read once and H written once in the input dtype; the NC C states
  (NC*DHQK*DHHV), n states (NC*DHQK) and m states (NC) read once in their dtype (float32 here);
  vecI, vecF read and vecN, vecM written (float32). floor ms = bytes / measured copy bandwidth,
  where the copy bandwidth is that of a large device-to-device copy (bytes read + written over
  time). GB/s = bytes floor / time; "% copy BW" = that over the copy bandwidth.

Outputs: a markdown report (--out; default $OUT/bench.md when $OUT is set, else
benchmarks/bench_latest.md), a JSON of raw numbers and a PNG of time vs S and vs head dim next to
it (same name, .json / .png). Exit code: 0, 1 when our op failed a check, 2 when it cannot run
(no CUDA device, library without CUDA kernels).
"""
import argparse
import datetime
import json
import math
import os
import platform
import shlex
import statistics
import sys
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
if REPO not in sys.path:
    sys.path.insert(0, REPO)

MAIN_SHAPES = [
    (8, 16, 4096, 128, 128, 64),
    (8, 16, 4096, 128, 128, 128),
    (1, 8, 16384, 256, 512, 128),
    (4, 8, 8192, 256, 512, 64),
]
FP32_SHAPES = [(8, 16, 4096, 128, 128, 64), (2, 4, 2048, 64, 64, 64)]
S_SWEEP = [1024, 2048, 4096, 8192, 16384, 32768, 65536]
S_SWEEP_TOKENS, S_SWEEP_NH, S_SWEEP_D, S_SWEEP_L = 65536, 8, 128, 64
HD_SWEEP = [(64, 64), (128, 128), (256, 256), (256, 512), (512, 512)]
HD_SWEEP_B, HD_SWEEP_NH, HD_SWEEP_S, HD_SWEEP_L = 2, 8, 8192, 64

# Our op must meet these (relative-norm error of matH, vecN, vecM against float64).
TOL_OURS = {"fp32": 2e-5, "bf16": 1e-2, "fp16": 2e-3}
# A Triton config is rejected (not timed) above these; Triton's fp32 dot runs in tf32.
TOL_PEER = {"fp32": 1e-2, "bf16": 3e-2, "fp16": 1e-2}
DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}

# Triton launch configs (siz_b_LQ, siz_b_LKV, siz_b_DHQK, siz_b_DHHV, num_warps, num_stages), most
# promising first. Head-dim blocks are clipped to next_power_of_2(head dim); configs the kernel's
# asserts reject (siz_b_LQ <= L, siz_b_LKV <= siz_b_LQ, siz_b_LQ % siz_b_LKV == 0) are dropped.
TRITON_CONFIGS = [
    (64, 32, 64, 128, 4, 1),
    (64, 64, 64, 128, 8, 1),
    (32, 32, 64, 128, 4, 2),
    (64, 32, 128, 128, 8, 1),
    (128, 64, 64, 128, 8, 1),
    (64, 32, 64, 64, 4, 1),
    (32, 32, 128, 64, 4, 1),
    (64, 64, 128, 64, 8, 2),
    (64, 16, 64, 128, 4, 1),
    (32, 16, 64, 64, 2, 1),
    (128, 32, 64, 64, 8, 1),
    (64, 64, 64, 256, 8, 1),
    (32, 32, 64, 256, 8, 1),
    (128, 128, 64, 128, 8, 1),
    (64, 32, 32, 128, 4, 3),
    (16, 16, 64, 128, 4, 1),
    (128, 64, 128, 128, 8, 2),
    (64, 64, 64, 64, 4, 2),
    (64, 32, 64, 128, 8, 2),
    (32, 32, 64, 128, 8, 1),
    (32, 32, 32, 64, 2, 1),
]
N_CONFIGS = {"full": 16, "small": 6}
DEVICE = "cuda"  # the device the cases run on (a test harness may point it elsewhere)


def default_out():
    if os.environ.get("OUT"):
        return os.path.join(os.environ["OUT"], "bench.md")
    return os.path.join(HERE, "bench_latest.md")


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="GPU benchmark of mlstm_ext.parallel_fw_hintra vs mlstm-kernels' Triton "
                    "Hintra, the eager and the torch.compile'd reference (see the module docstring)")
    p.add_argument("--quick", action="store_true",
                   help="4 main shapes in bf16 + 2 fp32 shapes, ~6 Triton configs (~2 min)")
    p.add_argument("--check-only", action="store_true", help="correctness checks only, no timing")
    p.add_argument("--out", default=None, help="markdown report (default: $OUT/bench.md if $OUT "
                   "is set, else benchmarks/bench_latest.md); .json and .png go next to it")
    p.add_argument("--budget-s", type=float, default=None,
                   help="soft time budget in seconds (default 340, --quick 120); the Triton "
                   "sweeps of later shapes, then the torch.compile peer, are cut first")
    p.add_argument("--groups", default=None,
                   help="comma list of main,fp16,fp32,S,hdim (default: all; --quick: main,fp32)")
    p.add_argument("--sweep", choices=["auto", "none", "small", "full"], default="auto",
                   help="Triton config sweep size (auto: full, --quick: small)")
    p.add_argument("--no-triton", action="store_true")
    p.add_argument("--no-eager", action="store_true")
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--rep-ms", type=float, default=100.0, help="target timed milliseconds per peer")
    p.add_argument("--max-sets", type=int, default=8, help="most rotated input sets")
    p.add_argument("--seed", type=int, default=1234)
    return p.parse_args(argv)


# ----------------------------------------------------------------------------------------------
class Case:
    def __init__(self, group, shape, dtype, sweep, compile_ok):
        self.group = group
        self.B, self.NH, self.S, self.DQ, self.DV, self.L = shape
        self.shape = tuple(shape)
        self.dtype = dtype  # "fp32" / "bf16" / "fp16"
        self.sweep = sweep  # "full" / "small" / "reuse:<key>" / "none"
        self.compile_ok = compile_ok

    @property
    def NC(self):
        return self.S // self.L

    def key(self):
        return f"{self.shape}-{self.dtype}"

    def flops(self):
        L, DQ, DV = self.L, self.DQ, self.DV
        per_chunk = 2 * (L * (L + 1) // 2) * (DQ + DV) + 2 * L * DQ * DV
        return self.B * self.NH * self.NC * per_chunk

    def bytes_floor(self, es, state_es=4, gate_es=4, out_es=4):
        BH, S, DQ, DV, NC = self.B * self.NH, self.S, self.DQ, self.DV, self.NC
        parts = {
            "qkv": BH * S * (2 * DQ + DV) * es,
            "h": BH * S * DV * es,
            "states": BH * NC * (DQ * DV + DQ + 1) * state_es,
            "gates": 2 * BH * S * gate_es,
            "vecNM": 2 * BH * S * out_es,
        }
        parts["total"] = sum(parts.values())
        return parts


def build_cases(args):
    sweep_main = {"auto": "small" if args.quick else "full"}.get(args.sweep, args.sweep)
    if args.groups:
        groups = [g.strip() for g in args.groups.split(",") if g.strip()]
    else:
        groups = ["main", "fp32"] if args.quick else ["main", "fp16", "fp32", "S", "hdim"]
    cases = []
    for g in groups:
        if g == "main":
            for i, shp in enumerate(MAIN_SHAPES):
                cases.append(Case("main", shp, "bf16", sweep_main, not args.quick or i == 0))
        elif g == "fp16":
            for shp in MAIN_SHAPES:
                cases.append(Case("main", shp, "fp16", sweep_main, True))
        elif g == "fp32":
            for i, shp in enumerate(FP32_SHAPES):
                cases.append(Case("main", shp, "fp32", sweep_main, not args.quick))
        elif g == "S":
            ref = f"{(8, 16, 4096, S_SWEEP_D, S_SWEEP_D, S_SWEEP_L)}-bf16"
            for S in S_SWEEP:
                shp = (S_SWEEP_TOKENS // S, S_SWEEP_NH, S, S_SWEEP_D, S_SWEEP_D, S_SWEEP_L)
                sw = "none" if sweep_main == "none" else "reuse:" + ref
                cases.append(Case("S", shp, "bf16", sw, False))
        elif g == "hdim":
            for DQ, DV in HD_SWEEP:
                shp = (HD_SWEEP_B, HD_SWEEP_NH, HD_SWEEP_S, DQ, DV, HD_SWEEP_L)
                same = [c for c in cases if c.group == "main" and c.dtype == "bf16"
                        and (c.DQ, c.DV, c.L) == (DQ, DV, HD_SWEEP_L)]
                if sweep_main == "none":
                    sw = "none"
                elif same:
                    sw = "reuse:" + same[0].key()
                else:
                    sw = "small"
                cases.append(Case("hdim", shp, "bf16", sw, False))
        else:
            raise SystemExit(f"unknown group {g!r} (main, fp16, fp32, S, hdim)")
    return cases


def triton_configs(case, n):
    np2 = lambda x: 1 << (int(x) - 1).bit_length()  # noqa: E731
    out, seen = [], set()
    for lq, lkv, bdq, bdv, w, st in TRITON_CONFIGS:
        if lq > case.L or lkv > lq or lq % lkv:
            continue
        cfg = (lq, lkv, min(bdq, np2(case.DQ)), min(bdv, np2(case.DV)), w, st)
        if cfg in seen:
            continue
        seen.add(cfg)
        out.append(cfg)
        if len(out) >= n:
            break
    return out


def cfg_str(cfg):
    if cfg is None:
        return "-"
    lq, lkv, bdq, bdv, w, st = cfg
    return f"LQ{lq}/LKV{lkv}/DQK{bdq}/DHV{bdv}/w{w}/s{st}"


# ----------------------------------------------------------------------------------------------
class Budget:
    def __init__(self, total_s):
        self.total = total_s
        self.t0 = time.time()
        self.est_case = 6.0  # mandatory work of one case (inputs, checks, ours, default, eager)
        self.est_config = 1.5  # one Triton config: JIT compile + check + timing
        self.est_compile = 40.0  # one torch.compile of the reference

    def elapsed(self):
        return time.time() - self.t0

    def left(self):
        return self.total - self.elapsed()


def main(argv=None):
    args = parse_args(argv)
    out_md = args.out or default_out()
    budget_s = args.budget_s if args.budget_s is not None else (120.0 if args.quick else 340.0)

    import torch

    if not torch.cuda.is_available():
        print("bench_gpu.py: no CUDA device (torch.cuda.is_available() is False); this benchmark "
              "needs a GPU. Nothing was run.", file=sys.stderr)
        return 2
    try:
        import mlstm_ext
    except Exception as e:
        print(f"bench_gpu.py: cannot import mlstm_ext ({type(e).__name__}: {e}); build it first "
              "(pip install --no-build-isolation --no-deps -e .)", file=sys.stderr)
        return 2
    if not mlstm_ext.has_cuda_kernels():
        print("bench_gpu.py: mlstm_ext was built without its CUDA kernels (has_cuda_kernels() is "
              "False); rebuild with MLSTM_EXT_CUDA=1 on a machine with nvcc", file=sys.stderr)
        return 2
    from mlstm_ext.__main__ import load_triton_hintra, make_inputs, triton_default_config
    from mlstm_ext.reference import parallel_fw_hintra_reference

    try:
        import torch._dynamo
        for name, val in (("cache_size_limit", 64), ("recompile_limit", 64),
                          ("accumulated_cache_size_limit", 1024),
                          ("accumulated_recompile_limit", 1024)):
            if hasattr(torch._dynamo.config, name):
                setattr(torch._dynamo.config, name, val)
    except Exception:
        pass

    dev = torch.device(DEVICE)
    props = torch.cuda.get_device_properties(dev)
    l2 = int(getattr(props, "L2_cache_size", 0) or 50 * 2 ** 20)
    cases = build_cases(args)
    budget = Budget(budget_s)

    triton_fn, triton_how = (None, "disabled (--no-triton)")
    if not args.no_triton:
        triton_fn, triton_how = load_triton_hintra()
    try:
        import triton
        triton_ver = triton.__version__
    except Exception:
        triton_ver = "n/a"

    cmd = "python3 " + " ".join(shlex.quote(x) for x in ["benchmarks/bench_gpu.py"] + (
        sys.argv[1:] if argv is None else list(argv)))
    meta = {
        "date": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        "gpu": torch.cuda.get_device_name(dev),
        "sm_count": props.multi_processor_count,
        "gpu_mem_gib": round(props.total_memory / 2 ** 30, 1),
        "l2_mib": round(l2 / 2 ** 20, 1),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton_ver,
        "triton_peer": triton_how,
        "python": platform.python_version(),
        "command": cmd,
        "mode": "check-only" if args.check_only else ("quick" if args.quick else "full"),
        "budget_s": budget_s,
    }
    try:
        meta["tf32_matmul"] = bool(torch.backends.cuda.matmul.allow_tf32)
    except Exception:
        pass
    print(f"GPU: {meta['gpu']} ({meta['sm_count']} SMs, {meta['gpu_mem_gib']} GiB, "
          f"L2 {meta['l2_mib']} MiB); torch {meta['torch']} (CUDA {meta['cuda']}), triton {triton_ver}")
    print(f"Triton peer: {triton_how}")
    print(f"mode: {meta['mode']}, {len(cases)} cases, budget {budget_s:.0f} s", flush=True)

    # ---------------------------------------------------------------- copy bandwidth
    copy_bw = None
    if not args.check_only:
        n = 1 << 28  # 1 GiB of float32 each way
        src = torch.ones(n, device=dev)
        dst = torch.empty_like(src)
        for _ in range(3):
            dst.copy_(src)
        ts = []
        for _ in range(20):
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            e0.record()
            dst.copy_(src)
            e1.record()
            e1.synchronize()
            ts.append(e0.elapsed_time(e1))
        copy_ms = statistics.median(ts)
        copy_bw = 2 * n * 4 / (copy_ms * 1e-3)  # bytes/s, read + write
        meta["copy_bw_GBps"] = copy_bw / 1e9
        meta["copy_desc"] = f"torch copy_ of 1 GiB float32, median of 20: {copy_ms:.3f} ms"
        print(f"copy bandwidth: {copy_bw / 1e9:.0f} GB/s (read + write; {meta['copy_desc']})",
              flush=True)
        del src, dst
        torch.cuda.empty_cache()

    # ---------------------------------------------------------------- helpers
    def sync():
        torch.cuda.synchronize()

    def cuda_time(fn, sets, max_reps=100):
        fn(sets[0])
        sync()
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        fn(sets[1 % len(sets)])
        e1.record()
        sync()
        est = max(e0.elapsed_time(e1), 1e-3)
        reps = int(max(5, min(max_reps, args.rep_ms / est)))
        warm = int(max(len(sets), min(25, 25.0 / est)))
        for r in range(warm):
            fn(sets[r % len(sets)])
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        for r in range(reps):
            starts[r].record()
            fn(sets[(r + 1) % len(sets)])
            ends[r].record()
        sync()
        ts = [s.elapsed_time(e) for s, e in zip(starts, ends)]
        return {"ms": statistics.median(ts), "min_ms": min(ts), "reps": reps}

    def rel(x, r):
        return ((x.double() - r).norm() ** 2).item(), (r.norm() ** 2).item()

    def errors(outs, refs, slices):
        """Relative-norm errors (H, N, M) of outs over the reference slices."""
        res = []
        for j in range(3):
            num = den = 0.0
            finite = True
            for (b, h), ref in zip(slices, refs):
                x = outs[j][b:b + 1, h:h + 1]
                finite &= bool(torch.isfinite(x).all())
                a, d = rel(x, ref[j])
                num += a
                den += d
            res.append(float("inf") if not finite else math.sqrt(num / max(den, 1e-300)))
        return res

    def peer_ok(err, tol):
        return all(e <= tol for e in err)

    def fmt_err(err):
        return "/".join(f"{e:.1e}" for e in err)

    def poisoned():
        try:
            sync()
            return False
        except Exception:
            return True

    def make_sets(case, ci, n_sets):
        dt = getattr(torch, DTYPES[case.dtype])
        sets = []
        for k in range(n_sets):
            g = torch.Generator(device=dev)
            g.manual_seed(args.seed * 1000 + ci * 10 + k)
            sets.append(make_inputs(case.B, case.NH, case.S, case.DQ, case.DV, case.L, dt, dev, g))
        sync()
        return sets

    triton_best_cfg = {}  # case key -> best config (for reuse in the sweeps)
    results = []
    any_fail = False
    aborted = None

    # ---------------------------------------------------------------- cases
    for ci, case in enumerate(cases):
        remaining = cases[ci + 1:]
        dt = getattr(torch, DTYPES[case.dtype])
        es = torch.empty((), dtype=dt).element_size()
        L = case.L
        rec = {"group": case.group, "shape": list(case.shape), "dtype": case.dtype,
               "flops": case.flops(), "bytes": case.bytes_floor(es), "sweep": case.sweep}
        results.append(rec)
        t_case = time.time()
        t_optional = 0.0  # seconds spent in the Triton sweep
        print(f"\n[{ci + 1}/{len(cases)}] {case.group} {case.shape} {case.dtype} "
              f"(t = {budget.elapsed():.0f} s)", flush=True)
        try:
            set_bytes_est = (case.B * case.NH * (case.S * (2 * case.DQ + case.DV) * es
                                                 + (case.NC + 1) * (case.DQ * case.DV + case.DQ + 1) * 4
                                                 + 2 * case.S * 4))
            n_sets = 1
            if not args.check_only:
                n_sets = max(2, min(args.max_sets, math.ceil(2.5 * l2 / set_bytes_est)))
                while n_sets > 1 and n_sets * set_bytes_est > 0.3 * props.total_memory:
                    n_sets -= 1
            rec["n_sets"] = n_sets
            rec["set_MB"] = set_bytes_est / 1e6
            print(f"  {n_sets} input set(s) of {set_bytes_est / 1e6:.0f} MB", flush=True)
            sets = make_sets(case, ci, n_sets)

            # float64 reference on two (b, h) slices of set 0
            slices = sorted({(0, 0), (case.B - 1, case.NH - 1)})
            refs = []
            for b, h in slices:
                a = [t[b:b + 1, h:h + 1] for t in sets[0]]
                refs.append(parallel_fw_hintra_reference(*a, chunk_size=L,
                                                         compute_dtype=torch.float64))
            rec["check_slices"] = [list(s) for s in slices]

            def ours(a):
                return mlstm_ext.parallel_fw_hintra(*a, chunk_size=L)

            def triton_call(cfg):
                if cfg is None:
                    return lambda a: triton_fn(*a, chunk_size=L)
                lq, lkv, bdq, bdv, w, st = cfg
                return lambda a: triton_fn(*a, chunk_size=L, siz_b_LQ=lq, siz_b_LKV=lkv,
                                           siz_b_DHQK=bdq, siz_b_DHHV=bdv, num_warps=w,
                                           num_stages=st)

            # -- correctness of ours
            o = ours(sets[0])
            sync()
            err = errors(o, refs, slices)
            shape_ok = (o[0].dtype == dt and tuple(o[0].shape) == (case.B, case.NH, case.S, case.DV)
                        and o[1].dtype == torch.float32 and o[2].dtype == torch.float32)
            ok = shape_ok and peer_ok(err, TOL_OURS[case.dtype])
            any_fail |= not ok
            rec["ours"] = {"err": err, "ok": ok}
            del o
            print(f"  check ours    H/N/M rel err {fmt_err(err)}  "
                  f"{'PASS' if ok else 'FAIL'} (tol {TOL_OURS[case.dtype]:g})", flush=True)

            # -- correctness of Triton default
            if triton_fn is not None:
                rec["triton_default"] = {"cfg": list(triton_default_config(case.DQ, case.DV))}
                try:
                    o = triton_call(None)(sets[0])
                    sync()
                    terr = errors(o, refs, slices)
                    rec["triton_default"].update(err=terr, ok=peer_ok(terr, TOL_PEER[case.dtype]))
                    del o
                    print(f"  check Triton default {cfg_str(triton_default_config(case.DQ, case.DV))}"
                          f"  H/N/M rel err {fmt_err(terr)}", flush=True)
                except Exception as e:
                    rec["triton_default"]["error"] = f"{type(e).__name__}: {str(e)[:300]}"
                    print(f"  Triton default failed: {rec['triton_default']['error']}")
                    if poisoned():
                        raise RuntimeError("CUDA context lost after a Triton failure") from e

            if args.check_only:
                del sets, refs
                torch.cuda.empty_cache()
                continue

            # -- timing: ours
            rec["ours"].update(cuda_time(ours, sets))
            t_ours = rec["ours"]["ms"]
            print(f"  ours          {t_ours:9.3f} ms", flush=True)

            # -- ours with the sm_80 kernel, where the Hopper kernel is the one dispatched to
            if (dt != torch.float32 and torch.ops.mlstm._built_with_sm90a()
                    and torch.cuda.get_device_capability() == (9, 0)):
                os.environ["MLSTM_EXT_SM90"] = "0"
                try:
                    rec["ours_sm80"] = cuda_time(ours, sets)
                finally:
                    del os.environ["MLSTM_EXT_SM90"]
                print(f"  ours, sm_80 kernel {rec['ours_sm80']['ms']:9.3f} ms", flush=True)

            # -- Triton default
            td = rec.get("triton_default")
            if td is not None and "error" not in td:
                try:
                    td.update(cuda_time(triton_call(None), sets))
                    print(f"  Triton default {td['ms']:8.3f} ms", flush=True)
                except Exception as e:
                    td["error"] = f"{type(e).__name__}: {str(e)[:300]}"

            # -- Triton sweep
            if triton_fn is not None and case.sweep != "none":
                if case.sweep.startswith("reuse:"):
                    cfg0 = triton_best_cfg.get(case.sweep[len("reuse:"):])
                    cfgs = [cfg0] if cfg0 is not None else triton_configs(case, N_CONFIGS["small"])
                else:
                    cfgs = triton_configs(case, N_CONFIGS[case.sweep])
                dflt = tuple(triton_default_config(case.DQ, case.DV))
                t_sweep0 = time.time()
                sweep = []
                rec["triton_sweep"] = sweep
                for cfg in cfgs:
                    if cfg == dflt:
                        continue  # timed above as the default
                    reserve = len(remaining) * budget.est_case
                    if budget.left() - reserve < budget.est_config:
                        sweep.append({"cfg": list(cfg), "skipped": "time budget"})
                        continue
                    t0 = time.time()
                    entry = {"cfg": list(cfg)}
                    sweep.append(entry)
                    try:
                        fn = triton_call(cfg)
                        o = fn(sets[0])
                        sync()
                        terr = errors(o, refs, slices)
                        del o
                        entry["err"] = terr
                        if not peer_ok(terr, TOL_PEER[case.dtype]):
                            entry["rejected"] = f"error {fmt_err(terr)} above {TOL_PEER[case.dtype]:g}"
                        else:
                            entry.update(cuda_time(fn, sets))
                    except Exception as e:
                        entry["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
                        if poisoned():
                            raise RuntimeError("CUDA context lost after a Triton failure") from e
                    budget.est_config = 0.7 * budget.est_config + 0.3 * (time.time() - t0)
                t_optional += time.time() - t_sweep0
                good = [s for s in sweep if "ms" in s]
                n_fail = sum(1 for s in sweep if "error" in s or "rejected" in s)
                n_skip = sum(1 for s in sweep if "skipped" in s)
                print(f"  Triton sweep: {len(good)} timed, {n_fail} failed/rejected, {n_skip} "
                      f"skipped" + (f"; best {min(s['ms'] for s in good):.3f} ms" if good else ""),
                      flush=True)
            # best of default + sweep
            cands = []
            if td is not None and "ms" in td and td.get("ok", False):
                cands.append((td["ms"], tuple(td["cfg"])))
            for s in rec.get("triton_sweep", []):
                if "ms" in s:
                    cands.append((s["ms"], tuple(s["cfg"])))
            if cands:
                ms, cfg = min(cands)
                rec["triton_best"] = {"ms": ms, "cfg": list(cfg),
                                      "n_configs": len(cands)}
                triton_best_cfg[case.key()] = cfg

            # -- eager reference in the input dtype
            if not args.no_eager:
                try:
                    rec["eager"] = cuda_time(
                        lambda a: parallel_fw_hintra_reference(*a, chunk_size=L, compute_dtype=dt),
                        sets, max_reps=20)
                    print(f"  eager         {rec['eager']['ms']:9.3f} ms", flush=True)
                except torch.cuda.OutOfMemoryError:
                    rec["eager"] = {"error": "out of memory"}
                    torch.cuda.empty_cache()
                except Exception as e:
                    rec["eager"] = {"error": f"{type(e).__name__}: {str(e)[:200]}"}

            del sets, refs
        except Exception as e:
            rec["error"] = f"{type(e).__name__}: {e}"
            print(f"  case failed: {rec['error']}")
            traceback.print_exc()
            if "ours" not in rec or "err" not in rec.get("ours", {}):
                any_fail = True
            if poisoned():
                aborted = f"CUDA context lost at case {case.shape} {case.dtype}"
                print(aborted)
                break
        finally:
            torch.cuda.empty_cache()
        case_s = time.time() - t_case
        if not args.check_only:
            budget.est_case = max(2.0, 0.5 * budget.est_case + 0.5 * min(case_s - t_optional, 30.0))
        rec["case_s"] = case_s

    # ---------------------------------------------------------------- torch.compile pass
    # Last, so that it only uses what the budget has left after every case's main measurements.
    if not args.check_only and not args.no_compile and aborted is None:
        for ci, (case, rec) in enumerate(zip(cases, results)):
            if not case.compile_ok or "ms" not in rec.get("ours", {}):
                continue
            if budget.left() < budget.est_compile:
                rec["compile"] = {"skipped": "time budget"}
                print(f"compile {case.shape} {case.dtype}: skipped (time budget)")
                continue
            dt = getattr(torch, DTYPES[case.dtype])
            L = case.L
            try:
                sets = make_sets(case, ci, rec["n_sets"])
                compiled = torch.compile(parallel_fw_hintra_reference, dynamic=False)
                fn = lambda a: compiled(*a, chunk_size=L, compute_dtype=dt)  # noqa: E731
                t0 = time.time()
                fn(sets[0])
                sync()
                compile_s = time.time() - t0
                budget.est_compile = max(0.5 * budget.est_compile, compile_s * 1.2)
                rec["compile"] = cuda_time(fn, sets, max_reps=30)
                rec["compile"]["compile_s"] = compile_s
                print(f"compile {case.shape} {case.dtype}: {rec['compile']['ms']:.3f} ms "
                      f"(compiled in {compile_s:.1f} s)", flush=True)
            except torch.cuda.OutOfMemoryError:
                rec["compile"] = {"error": "out of memory"}
            except Exception as e:
                msg = str(e).splitlines()[0][:200] if str(e) else ""
                rec["compile"] = {"error": f"{type(e).__name__}: {msg}"}
                print(f"compile {case.shape} {case.dtype}: failed: {rec['compile']['error']}")
                if poisoned():
                    break
            finally:
                sets = None
                torch.cuda.empty_cache()

    meta["elapsed_s"] = budget.elapsed()
    meta["aborted"] = aborted
    write_outputs(args, out_md, meta, results, copy_bw)
    print_short(results, args.check_only, copy_bw)
    if any_fail:
        print("\nour op FAILED a correctness check (see above)", file=sys.stderr)
    return 1 if any_fail or aborted else 0


# ----------------------------------------------------------------------------------------------
def _ms(d):
    if not d:
        return "-"
    if "ms" in d:
        return f"{d['ms']:.3f}"
    if "skipped" in d:
        return "skipped"
    if "error" in d:
        return "fail"
    return "-"


def derived(rec, copy_bw):
    o = rec.get("ours", {})
    if "ms" not in o or not copy_bw:
        return None
    t = o["ms"] * 1e-3
    by = rec["bytes"]["total"]
    floor_ms = by / copy_bw * 1e3
    tb = rec.get("triton_best", {}).get("ms")
    return {
        "tflops": rec["flops"] / t / 1e12,
        "GBps": by / t / 1e9,
        "frac_bw": by / t / copy_bw,
        "floor_ms": floor_ms,
        "speedup_vs_triton_best": (tb / o["ms"]) if tb else None,
        "speedup_vs_triton_default": (rec["triton_default"]["ms"] / o["ms"])
        if "ms" in rec.get("triton_default", {}) else None,
        "ours_over_floor": o["ms"] / floor_ms,
    }


def timing_table(rows, copy_bw):
    lines = [
        "| shape (B, NH, S, DHQK, DHHV, L) | dtype | ours ms | ours, sm_80 kernel ms | "
        "Triton best ms (config) | Triton default ms | eager ms | compile ms | TFLOP/s | GB/s | "
        "% copy BW | floor ms | vs Triton best | ours / floor |",
        "| --- | --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        d = derived(r, copy_bw)
        tb = r.get("triton_best")
        tb_s = f"{tb['ms']:.3f} ({cfg_str(tb['cfg'])}, best of {tb['n_configs']})" if tb else "-"
        comp = r.get("compile")
        comp_s = _ms(comp)
        if comp and "compile_s" in comp:
            comp_s += f" ({comp['compile_s']:.0f} s to compile)"
        ours_s = _ms(r.get("ours"))
        if r.get("ours") and not r["ours"].get("ok", True):
            ours_s += " (FAILED check)"
        if d:
            sp = f"{d['speedup_vs_triton_best']:.2f}x" if d["speedup_vs_triton_best"] else "-"
            tail = (f"{d['tflops']:.1f} | {d['GBps']:.0f} | {100 * d['frac_bw']:.0f}% | "
                    f"{d['floor_ms']:.3f} | {sp} | {d['ours_over_floor']:.2f} |")
        else:
            tail = "- | - | - | - | - | - |"
        lines.append(f"| {tuple(r['shape'])} | {r['dtype']} | {ours_s} | {_ms(r.get('ours_sm80'))} | {tb_s} | "
                     f"{_ms(r.get('triton_default'))} | {_ms(r.get('eager'))} | {comp_s} | {tail}")
    return lines


def write_outputs(args, out_md, meta, results, copy_bw):
    base = os.path.splitext(out_md)[0]
    out_json, out_png = base + ".json", base + ".png"
    os.makedirs(os.path.dirname(os.path.abspath(out_md)) or ".", exist_ok=True)
    for r in results:
        d = derived(r, copy_bw)
        if d:
            r["derived"] = d
    with open(out_json, "w") as fh:
        json.dump({"meta": meta, "results": results}, fh, indent=1, default=str)

    L = [
        "# mlstm_ext GPU benchmark: parallel_fw_hintra",
        "",
        f"- date: {meta['date']}; mode: {meta['mode']}; elapsed {meta['elapsed_s']:.0f} s "
        f"(budget {meta['budget_s']:.0f} s)" + (f"; ABORTED: {meta['aborted']}" if meta["aborted"] else ""),
        f"- GPU: {meta['gpu']} ({meta['sm_count']} SMs, {meta['gpu_mem_gib']} GiB, L2 "
        f"{meta['l2_mib']} MiB); torch {meta['torch']} (CUDA {meta['cuda']}); triton {meta['triton']}; "
        f"Python {meta['python']}",
        f"- Triton peer: {meta['triton_peer']}",
        f"- command: `{meta['command']}`",
    ]
    if copy_bw:
        L.append(f"- measured copy bandwidth: {copy_bw / 1e9:.0f} GB/s (bytes read + written; "
                 f"{meta['copy_desc']})")
    L += [
        "- timing: CUDA events per call, median over repeats after warm-up, rotating among "
        "independently drawn input sets (together > 2.5x L2) so inputs are not served from L2; "
        "first call (JIT/compile) untimed; a time includes the peer's host-side work (argument "
        "checks, Triton's launch and its torch.compile'd gate cumsum) where that exceeds the GPU "
        "work. Inputs q, k, v, i ~ N(0,1), f = 3 + N(0,1), states from the recurrent step "
        "(float32).",
        "- peers: ours = `mlstm_ext.parallel_fw_hintra`; Triton = mlstm-kernels "
        "`mlstm_chunkwise__parallel_fw_Hintra` (best = fastest of its default and a fixed config "
        "sweep, configs LQ/LKV/DQK/DHV/warps/stages; its fp32 dot runs in tf32); eager = "
        "`mlstm_ext.reference.parallel_fw_hintra_reference` in the input dtype; compile = the same "
        "under `torch.compile(dynamic=False)`.",
        "- TFLOP/s (ours): matrix-product FLOPs = B*NH*NC * (2*(L(L+1)/2)*(DHQK+DHHV) + "
        "2*L*DHQK*DHHV) (causal halves of QK^T and SV, full QC) over our time.",
        "- bytes floor: Q, K, V read and H written once (input dtype) + NC C/n/m states read "
        "(float32) + vecI/vecF read + vecN/vecM written (float32); floor ms = bytes / copy "
        "bandwidth; GB/s = bytes / our time; ours / floor = our time / floor ms.",
        "",
    ]
    timed = any("ms" in r.get("ours", {}) for r in results)
    if timed:
        for title, grp, note in (
            ("Main shapes", "main", ""),
            ("Sequence-length sweep", "S",
             f"bf16, NH={S_SWEEP_NH}, DHQK=DHHV={S_SWEEP_D}, L={S_SWEEP_L}, B = {S_SWEEP_TOKENS} / S "
             "(total tokens fixed, so work and bytes are the same at every S). Triton best = the "
             "best config of the matching main shape."),
            ("Head-dim sweep", "hdim",
             f"bf16, B={HD_SWEEP_B}, NH={HD_SWEEP_NH}, S={HD_SWEEP_S}, L={HD_SWEEP_L}. Triton "
             "best = the best config of the matching main shape, else a ~6-config sweep."),
        ):
            rows = [r for r in results if r["group"] == grp]
            if not rows:
                continue
            L += [f"## {title}", ""]
            if note:
                L += [note, ""]
            L += timing_table(rows, copy_bw) + [""]
    L += ["## Correctness (relative-norm error vs float64 on slices (0,0) and (B-1,NH-1); "
          "matH / vecN / vecM)", "",
          "| shape | dtype | ours | ours check | Triton default | Triton best config |",
          "| --- | --- | --- | --- | --- | --- |"]
    for r in results:
        o = r.get("ours", {})
        oe = "/".join(f"{e:.1e}" for e in o["err"]) if "err" in o else r.get("error", "-")
        ok = ("PASS" if o.get("ok") else "FAIL") if "err" in o else "FAIL"
        td = r.get("triton_default", {})
        te = "/".join(f"{e:.1e}" for e in td["err"]) if "err" in td else td.get("error", "-")
        tb = r.get("triton_best")
        be = "-"
        if tb:
            if tuple(tb["cfg"]) == tuple(td.get("cfg", ())):
                be = "(default)"
            else:
                for s in r.get("triton_sweep", []):
                    if tuple(s["cfg"]) == tuple(tb["cfg"]) and "err" in s:
                        be = "/".join(f"{e:.1e}" for e in s["err"])
        L.append(f"| {tuple(r['shape'])} | {r['dtype']} | {oe} | {ok} | {te} | {be} |")
    L.append("")
    sweeps = [r for r in results if r.get("triton_sweep")]
    if sweeps:
        L += ["## Triton config sweep (ms; config LQ/LKV/DQK/DHV/warps/stages)", ""]
        for r in sweeps:
            items = []
            n_skipped = 0
            for s in r["triton_sweep"]:
                c = cfg_str(s["cfg"])
                if "ms" in s:
                    items.append(f"{c} {s['ms']:.3f}")
                elif "rejected" in s:
                    items.append(f"{c} rejected ({s['rejected']})")
                elif "error" in s:
                    items.append(f"{c} failed ({s['error'][:80]})")
                else:
                    n_skipped += 1
            if n_skipped:
                items.append(f"{n_skipped} more skipped (time budget)")
            td = r.get("triton_default", {})
            if "ms" in td:
                items.insert(0, f"default {cfg_str(td['cfg'])} {td['ms']:.3f}")
            L.append(f"- {tuple(r['shape'])} {r['dtype']}: " + "; ".join(items))
        L.append("")
    with open(out_md, "w") as fh:
        fh.write("\n".join(L))
    print(f"\nwrote {out_md}, {out_json}", end="")

    # plot
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as e:
        print(f"\n(no plot: matplotlib unavailable: {e})")
        return
    srows = [r for r in results if r["group"] == "S" and "ms" in r.get("ours", {})]
    hrows = [r for r in results if r["group"] == "hdim" and "ms" in r.get("ours", {})]
    mrows = [r for r in results if r["group"] == "main" and "ms" in r.get("ours", {})]
    panels = [(p, n) for p, n in ((srows, "S"), (hrows, "hdim"), (mrows, "main")) if p]
    if not panels:
        print()
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.8), squeeze=False)
    peers = [("ours", lambda r: r.get("ours", {}).get("ms"), "o-"),
             ("Triton best", lambda r: r.get("triton_best", {}).get("ms"), "s-"),
             ("Triton default", lambda r: r.get("triton_default", {}).get("ms"), "s--"),
             ("eager", lambda r: r.get("eager", {}).get("ms"), "^:"),
             ("compile", lambda r: r.get("compile", {}).get("ms"), "v:"),
             ("bytes floor", lambda r: r.get("derived", {}).get("floor_ms"), "k--")]
    for ax, (rows, kind) in zip(axes[0], panels):
        if kind == "S":
            xs = [r["shape"][2] for r in rows]
            ax.set_xscale("log", base=2)
            ax.set_xlabel(f"S (B = {S_SWEEP_TOKENS}/S, NH={S_SWEEP_NH}, D={S_SWEEP_D}, "
                          f"L={S_SWEEP_L}, bf16)")
            ax.set_xticks(xs)
            ax.set_xticklabels([f"{x // 1024}k" if x % 1024 == 0 else str(x) for x in xs])
        else:
            xs = list(range(len(rows)))
            if kind == "hdim":
                ax.set_xlabel(f"DHQK/DHHV (B={HD_SWEEP_B}, NH={HD_SWEEP_NH}, S={HD_SWEEP_S}, "
                              f"L={HD_SWEEP_L}, bf16)")
                labels = [f"{r['shape'][3]}/{r['shape'][4]}" for r in rows]
            else:
                ax.set_xlabel("main shapes (B,NH,S,DHQK,DHHV,L) dtype")
                labels = ["{},{},{}\n{},{},{}\n".format(*r["shape"]) + r["dtype"] for r in rows]
            ax.set_xticks(xs)
            ax.set_xticklabels(labels, fontsize=7 if kind == "main" else 9)
        for name, get, style in peers:
            pts = [(x, get(r)) for x, r in zip(xs, rows) if get(r)]
            if pts:
                if kind == "main":  # unrelated shapes: markers only
                    style = style[0] if name != "bytes floor" else "k_"
                ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=name,
                        markersize=9 if style == "k_" else 6)
        ax.set_yscale("log")
        ax.set_ylabel("ms (median)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"parallel_fw_hintra on {meta['gpu']}")
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    print(f", {out_png}")


def print_short(results, check_only, copy_bw):
    print("\n== summary ==")
    if check_only:
        print(f"{'shape':32} {'dtype':5} {'ours H/N/M err':28} {'':4} {'Triton default':28}")
        for r in results:
            o = r.get("ours", {})
            oe = "/".join(f"{e:.1e}" for e in o["err"]) if "err" in o else r.get("error", "-")[:28]
            td = r.get("triton_default", {})
            te = "/".join(f"{e:.1e}" for e in td["err"]) if "err" in td else "-"
            print(f"{str(tuple(r['shape'])):32} {r['dtype']:5} {oe:28} "
                  f"{('PASS' if o.get('ok') else 'FAIL'):4} {te:28}")
        return
    print(f"{'shape':32} {'dtype':5} {'ours ms':>9} {'Tri best':>9} {'Tri dflt':>9} {'eager':>9} "
          f"{'vs best':>8} {'/floor':>7} {'check':>5}")
    for r in results:
        d = derived(r, copy_bw) or {}
        sp = d.get("speedup_vs_triton_best")
        of = d.get("ours_over_floor")
        o = r.get("ours", {})
        print(f"{str(tuple(r['shape'])):32} {r['dtype']:5} {_ms(o):>9} "
              f"{_ms(r.get('triton_best')):>9} {_ms(r.get('triton_default')):>9} "
              f"{_ms(r.get('eager')):>9} {(f'{sp:.2f}x' if sp else '-'):>8} "
              f"{(f'{of:.2f}' if of else '-'):>7} {('PASS' if o.get('ok') else 'FAIL'):>5}")


if __name__ == "__main__":
    sys.exit(main())
