#!/usr/bin/env python3
"""GPU timing of ``torch.ops.mlstm.recurrent_fw_states`` (the CUDA kernels) against mlstm-kernels'
Triton ``mlstm_chunkwise__recurrent_fw_C`` and against the bytes floor. Builds nothing.

    python3 benchmarks/bench_states.py [--dtype bf16] [--shapes "8,16,4096,128,128,64;..."]

From Python: ``from bench_states import bench; rows = bench(shapes, dtype)`` prints a markdown
table and returns its rows as dicts.

- bytes floor: K and V read once in the input dtype, vecI and vecF read once (float32), and the
  NC+1 slots of matC_all, vecN_all, scaM_all written once (float32). floor ms = bytes / copy
  bandwidth, the copy bandwidth measured in the same run (a 1 GiB device-to-device copy, bytes
  read + written over its time). Not in the floor: the gate scratch of our first kernel
  (a[s] written and read: 8 bytes per position) and K/V re-reads by the blocks of other tiles.
- times: CUDA events around each call, median of the repeats after a warm-up, calls rotating
  between two input sets. Both ops allocate their outputs in every call (as a caller sees them).
- check: before timing, our states vs the Triton states (relative-norm error of C, n, m) and two
  (b, h) slices of ours vs the float64 reference (mlstm_ext.reference) on the same inputs.
Exit code 0; 1 when our op misses the float64 reference; 2 without a CUDA device / kernels.
"""
import argparse
import importlib
import os
import statistics
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
if REPO not in sys.path:
    sys.path.insert(0, REPO)

import torch  # noqa: E402

SHAPES = [
    (8, 16, 4096, 128, 128, 64),
    (8, 16, 4096, 128, 128, 128),
    (1, 8, 16384, 256, 512, 128),
    (4, 8, 8192, 256, 512, 64),
]
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
TRITON_MODULE = "mlstm_kernels.torch.chunkwise.triton_xl_chunk.fw_recurrent"
TRITON_FUNCTION = "mlstm_chunkwise__recurrent_fw_C"
# Relative-norm error of ours vs float64 that fails the run (C / n / m).
TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-5, torch.float16: 2e-5}


def bytes_floor(B, NH, S, DHQK, DHHV, L, elem_size):
    NC = S // L
    read = B * NH * S * (DHQK + DHHV) * elem_size + 2 * B * NH * S * 4
    written = B * NH * (NC + 1) * (DHQK * DHHV + DHQK + 1) * 4
    return read + written


def load_triton_states():
    """(fn, how) for mlstm-kernels' Triton recurrent step, or (None, why not). The H-step peer's
    loader (mlstm_ext.__main__) makes the package importable first (installed, or the wheel in
    .whl/, with its einops stand-in and parent-package workarounds); its sibling module follows."""
    try:
        from mlstm_ext.__main__ import load_triton_hintra
    except Exception as e:  # pragma: no cover - depends on the checkout
        return None, f"mlstm_ext.__main__ not importable: {type(e).__name__}: {e}"
    _, how = load_triton_hintra()
    try:
        mod = importlib.import_module(TRITON_MODULE)
        return getattr(mod, TRITON_FUNCTION), f"{TRITON_MODULE}.{TRITON_FUNCTION} (package: {how})"
    except Exception as e:
        return None, f"{TRITON_MODULE} not importable ({type(e).__name__}: {e}); H-step peer: {how}"


def copy_bandwidth(nbytes=1 << 30, reps=10):
    """Bytes read + written per second of a large device-to-device copy (median of reps)."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device="cuda").normal_()
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = []
    for _ in range(reps):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        dst.copy_(src)
        e1.record()
        e1.synchronize()
        times.append(e0.elapsed_time(e1) * 1e-3)
    del src, dst
    return 2 * nbytes / statistics.median(times)


def cuda_time_ms(fn, sets, reps=20, warmup=3):
    for r in range(warmup):
        fn(sets[r % len(sets)])
    torch.cuda.synchronize()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for r in range(reps):
        starts[r].record()
        fn(sets[r % len(sets)])
        ends[r].record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends))


def rel(x, ref):
    x, ref = x.double(), ref.double()
    if not torch.isfinite(x).all():
        return float("inf")
    d = ref.norm().item()
    return (x - ref).norm().item() / d if d > 0 else (x - ref).norm().item()


def make_set(B, NH, S, DHQK, DHHV, dtype, gen):
    def rn(*shape):
        return torch.randn(*shape, generator=gen, device="cuda")

    return (rn(B, NH, S, DHQK).to(dtype), rn(B, NH, S, DHHV).to(dtype), rn(B, NH, S), 3.0 + rn(B, NH, S))


def bench(shapes=SHAPES, dtype=torch.bfloat16, reps=20, seed=0, out=print):
    """Times the op (and the Triton peer when importable) at each (B, NH, S, DHQK, DHHV, L);
    prints a markdown table through `out` and returns its rows as dicts."""
    import mlstm_ext  # noqa: F401  (loads the op library)
    from mlstm_ext.reference import recurrent_fw_states as reference_states

    op = torch.ops.mlstm.recurrent_fw_states
    triton_fn, how = load_triton_states()
    bw = copy_bandwidth()
    dev = torch.cuda.get_device_name()
    out(f"device: {dev}; copy bandwidth {bw / 1e12:.2f} TB/s (read + written); torch {torch.__version__}")
    out(f"Triton peer: {how if triton_fn is not None else 'none: ' + how}")
    out("")
    out("| (B, NH, S, DHQK, DHHV, L) | dtype | ours ms | Triton ms | floor ms | ours / floor | "
        "Triton / ours | ours % copy BW | C/n/m vs Triton | C/n/m vs float64 (2 heads) |")
    out("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- |")
    gen = torch.Generator(device="cuda").manual_seed(seed)
    rows = []
    for shape in shapes:
        B, NH, S, DHQK, DHHV, L = shape
        sets = [make_set(B, NH, S, DHQK, DHHV, dtype, gen) for _ in range(2)]
        ours = op(*sets[0], chunk_size=L)
        torch.cuda.synchronize()
        # float64 check on two heads (the first and the last: the last catches offset bugs)
        err64 = []
        for b, h in [(0, 0), (B - 1, NH - 1)]:
            sl = [t[b : b + 1, h : h + 1].cpu() for t in sets[0]]
            refs = reference_states(*sl, L, compute_dtype=torch.float64)
            err64.append([rel(o[b : b + 1, h : h + 1].cpu(), r) for o, r in zip(ours, refs)])
        err64 = [max(e[j] for e in err64) for j in range(3)]
        err_tr, t_tr = None, None
        if triton_fn is not None:
            try:
                k, v, i, f = sets[0]
                tr = triton_fn(matK=k, matV=v, vecF=f, vecI=i, chunk_size=L)
                torch.cuda.synchronize()
                err_tr = [rel(o, t.reshape(o.shape)) for o, t in zip(ours, tr)]
                del tr
                t_tr = cuda_time_ms(lambda a: triton_fn(matK=a[0], matV=a[1], vecF=a[3], vecI=a[2],
                                                        chunk_size=L), sets, reps)
            except Exception as e:  # pragma: no cover - depends on the Triton version
                out(f"<!-- Triton failed at {shape}: {type(e).__name__}: {e} -->")
        del ours
        t_ours = cuda_time_ms(lambda a: op(*a, chunk_size=L), sets, reps)
        floor_ms = bytes_floor(*shape, torch.empty((), dtype=dtype).element_size()) / bw * 1e3
        row = dict(shape=shape, dtype=str(dtype).replace("torch.", ""), ours_ms=t_ours, triton_ms=t_tr,
                   floor_ms=floor_ms, err_vs_triton=err_tr, err_vs_f64=err64, copy_bw=bw, device=dev)
        rows.append(row)

        def f3(x):
            return "-" if x is None else f"{x:.3f}"

        def errs(e):
            return "-" if e is None else "/".join(f"{x:.1e}" for x in e)

        out(f"| {shape} | {row['dtype']} | {t_ours:.3f} | {f3(t_tr)} | {floor_ms:.3f} | "
            f"{t_ours / floor_ms:.2f} | {'-' if t_tr is None else f'{t_tr / t_ours:.2f}'} | "
            f"{100 * floor_ms / t_ours:.0f}% | {errs(err_tr)} | {errs(err64)} |")
        del sets
        torch.cuda.empty_cache()
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    p.add_argument("--shapes", default=None, help='";"-separated B,NH,S,DHQK,DHHV,L (default: the four main shapes)')
    p.add_argument("--reps", type=int, default=20)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_states.py: needs a CUDA device", file=sys.stderr)
        return 2
    import mlstm_ext

    if not mlstm_ext.has_cuda_kernels():
        print("bench_states.py: the library was built without its CUDA kernels", file=sys.stderr)
        return 2
    shapes = SHAPES if args.shapes is None else [tuple(int(x) for x in s.split(",")) for s in args.shapes.split(";")]
    dtype = DTYPES[args.dtype]
    rows = bench(shapes, dtype, reps=args.reps)
    bad = [r["shape"] for r in rows if max(r["err_vs_f64"]) > TOL[dtype]]
    if bad:
        print(f"FAIL: float64 check missed at {bad}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
