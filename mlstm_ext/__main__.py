"""The main job: ``python -m mlstm_ext``.

1. Picks the best device present (CUDA when available and the library has its CUDA kernels, else
   CPU) and prints it with the torch version.
2. Self-check: runs the op on fresh random inputs (q, k, v, i ~ N(0, 1), f = 3 + N(0, 1), border
   states from ``reference.recurrent_fw_states``) for float32, bfloat16 and float16, and compares
   matH, vecN and vecM with ``reference.parallel_fw_hintra_reference(..., compute_dtype=float64)``
   evaluated on the same inputs. Prints the relative-norm errors ||x - x64|| / ||x64|| and
   PASS/FAIL against the tolerances below; exits 1 on any failure (before timing).
3. A small timing table: the op against the PyTorch eager reference (float32 on CPU; on GPU in the
   input dtype) and, on GPU, the mlstm-kernels Triton kernel (its default launch config) when it
   can be imported.

Options: ``--device {auto,cpu,cuda}``, ``--seed N``, ``--no-bench``. The CPU run takes ~10 s.

``load_triton_hintra()`` (the mlstm-kernels peer, imported by its submodule path, with fallbacks
for a missing ``einops`` or package ``__init__`` that pulls in unavailable modules) is also used
by ``benchmarks/bench_gpu.py``.
"""
import argparse
import glob
import importlib
import importlib.util
import os
import platform
import statistics
import sys
import time
import types
from typing import Callable, Dict, List, Optional, Tuple

import torch

import mlstm_ext
from mlstm_ext.reference import parallel_fw_hintra_reference, recurrent_fw_states

# Relative-norm tolerances of the self-check, per input dtype.
TOLERANCES: Dict[torch.dtype, float] = {
    torch.float32: 2e-5,
    torch.bfloat16: 1e-2,
    torch.float16: 2e-3,
}
DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}

TRITON_MODULE = "mlstm_kernels.torch.chunkwise.triton_xl_chunk.fw_parallel"
TRITON_FUNCTION = "mlstm_chunkwise__parallel_fw_Hintra"


# --------------------------------------------------------------------------------------------
# Inputs and errors
# --------------------------------------------------------------------------------------------
def make_inputs(B: int, NH: int, S: int, DHQK: int, DHHV: int, L: int, dtype: torch.dtype,
                device, generator: Optional[torch.Generator] = None) -> Tuple[torch.Tensor, ...]:
    """(matQ, matK, matV, vecI, vecF, matC_all, vecN_all, scaM_all) as SPEC.md's tests make them:
    q, k, v in ``dtype``, gates and states float32, states from the recurrent step."""
    def rn(*shape, dt):
        return torch.randn(*shape, generator=generator, device=device, dtype=torch.float32).to(dt)

    q = rn(B, NH, S, DHQK, dt=dtype)
    k = rn(B, NH, S, DHQK, dt=dtype)
    v = rn(B, NH, S, DHHV, dt=dtype)
    i = rn(B, NH, S, dt=torch.float32)
    f = 3.0 + rn(B, NH, S, dt=torch.float32)
    C, n, m = recurrent_fw_states(k, v, i, f, chunk_size=L, compute_dtype=torch.float32)
    return q, k, v, i, f, C, n, m


def rel_norm_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """||x - ref|| / ||ref|| in float64 (inf when x holds a non-finite value)."""
    x = x.detach().to(torch.float64)
    ref = ref.detach().to(torch.float64)
    if not bool(torch.isfinite(x).all()):
        return float("inf")
    den = ref.norm().item()
    num = (x - ref).norm().item()
    return num / den if den > 0 else num


# --------------------------------------------------------------------------------------------
# The mlstm-kernels Triton peer
# --------------------------------------------------------------------------------------------
def _install_einops_shim() -> None:
    """A minimal stand-in for ``einops.rearrange``, enough for mlstm-kernels' gate helper
    (``"b nh (nc l) -> b nh nc l"``): pure splits of parenthesised groups, no reordering."""
    def rearrange(t, pattern: str, **sizes):
        lhs, rhs = (s.strip() for s in pattern.split("->"))
        # Tokenise the left side into groups; the right side must be the flat list of names.
        groups: List[List[str]] = []
        cur: Optional[List[str]] = None
        for tok in lhs.replace("(", " ( ").replace(")", " ) ").split():
            if tok == "(":
                cur = []
            elif tok == ")":
                groups.append(cur)
                cur = None
            elif cur is not None:
                cur.append(tok)
            else:
                groups.append([tok])
        flat = [n for g in groups for n in g]
        if flat != rhs.split():
            raise NotImplementedError(f"einops shim: only splitting patterns, got {pattern!r}")
        shape = []
        for axis, g in enumerate(groups):
            if len(g) == 1:
                shape.append(sizes.get(g[0], t.shape[axis]))
            else:
                known = [sizes[n] for n in g if n in sizes]
                if len(known) < len(g) - 1:
                    raise NotImplementedError(f"einops shim: sizes missing for {g}")
                for n in g:
                    shape.append(sizes.get(n, -1))
        return t.reshape(shape)

    mod = types.ModuleType("einops")
    mod.rearrange = rearrange
    mod.__mlstm_ext_shim__ = True
    sys.modules["einops"] = mod


def _purge(prefix: str) -> None:
    for name in [n for n in sys.modules if n == prefix or n.startswith(prefix + ".")]:
        del sys.modules[name]


def _add_wheel_to_path() -> Optional[str]:
    """When mlstm_kernels is not installed, put a carried wheel (.whl/mlstm_kernels-*.whl of the
    repository; it is pure Python) on sys.path: zipimport can load it."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for cand in sorted(glob.glob(os.path.join(repo, ".whl", "mlstm_kernels-*.whl")), reverse=True):
        if cand not in sys.path:
            sys.path.append(cand)
        return cand
    return None


def load_triton_hintra() -> Tuple[Optional[Callable], str]:
    """Returns ``(fn, how)``: the mlstm-kernels Triton ``mlstm_chunkwise__parallel_fw_Hintra`` and
    a line saying how it was imported, or ``(None, why_not)``.

    Tries, in order: the plain submodule import; the same with an einops stand-in when einops is
    missing; the submodule with its parent packages' ``__init__`` files skipped (they import the
    whole package)."""
    try:
        import triton  # noqa: F401
    except Exception as e:  # pragma: no cover - depends on the machine
        return None, f"triton not importable ({type(e).__name__}: {e})"
    notes = []
    try:
        found = importlib.util.find_spec("mlstm_kernels") is not None
    except Exception:
        found = False
    if not found:
        whl = _add_wheel_to_path()
        if whl is None:
            return None, "mlstm_kernels is not installed (and no .whl/mlstm_kernels-*.whl)"
        notes.append(f"from wheel {os.path.basename(whl)} on sys.path")

    errors = []
    for attempt in ("plain", "einops-shim", "skip-parent-inits"):
        if attempt == "einops-shim":
            try:
                import einops  # noqa: F401
                if not getattr(einops, "__mlstm_ext_shim__", False):
                    continue  # real einops present: the shim would not help
            except ImportError:
                _install_einops_shim()
                notes.append("einops missing: minimal rearrange shim")
        if attempt == "skip-parent-inits":
            spec = importlib.util.find_spec("mlstm_kernels")
            if spec is None or not spec.submodule_search_locations:
                break
            _purge("mlstm_kernels")
            root = list(spec.submodule_search_locations)[0]
            importlib.import_module("mlstm_kernels")  # its __init__ only sets __version__
            for pkg in ("mlstm_kernels.torch", "mlstm_kernels.torch.chunkwise",
                        "mlstm_kernels.torch.chunkwise.triton_xl_chunk"):
                mod = types.ModuleType(pkg)
                mod.__path__ = [os.path.join(root, *pkg.split(".")[1:])]
                mod.__package__ = pkg
                sys.modules[pkg] = mod
            notes.append("parent package __init__ files skipped")
        try:
            mod = importlib.import_module(TRITON_MODULE)
            fn = getattr(mod, TRITON_FUNCTION)
            how = f"{TRITON_MODULE}.{TRITON_FUNCTION}"
            ver = getattr(sys.modules.get("mlstm_kernels"), "__version__", "?")
            how += f" (mlstm_kernels {ver}" + ("; " + "; ".join(notes) if notes else "") + ")"
            return fn, how
        except Exception as e:
            errors.append(f"{attempt}: {type(e).__name__}: {e}")
            _purge("mlstm_kernels")
    return None, "mlstm-kernels Triton Hintra not importable: " + " | ".join(errors)


def triton_default_config(DHQK: int, DHHV: int) -> Tuple[int, int, int, int, int, int]:
    """The launch config mlstm-kernels' wrapper picks when given no hints:
    (siz_b_LQ, siz_b_LKV, siz_b_DHQK, siz_b_DHHV, num_warps, num_stages)."""
    np2 = lambda x: 1 << (int(x) - 1).bit_length()  # noqa: E731
    bdq = min(64, np2(DHQK))
    bdv = min(128, np2(DHHV))
    return (32, 32, bdq, bdv, 4 if bdq >= 64 else 2, 1)


# --------------------------------------------------------------------------------------------
# Self-check
# --------------------------------------------------------------------------------------------
def self_check(device: torch.device, seed: int) -> bool:
    shapes = [(2, 3, 256, 64, 64, 64), (1, 2, 96, 50, 70, 16)]
    if device.type == "cuda":
        shapes.append((2, 4, 1024, 128, 256, 128))
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    print(f"\n== self-check against the float64 reference (seed {seed}) ==")
    print("relative-norm error ||x - x64|| / ||x64||; tolerance per dtype: "
          + ", ".join(f"{DTYPE_NAMES[d]} {t:g}" for d, t in TOLERANCES.items()))
    hdr = f"{'dtype':5} {'(B, NH, S, DHQK, DHHV, L)':28} {'matH':>10} {'vecN':>10} {'vecM':>10}  result"
    print(hdr)
    print("-" * len(hdr))
    ok_all = True
    for dtype, tol in TOLERANCES.items():
        for shp in shapes:
            B, NH, S, DQ, DV, L = shp
            args = make_inputs(B, NH, S, DQ, DV, L, dtype, device, gen)
            try:
                H, N, M = mlstm_ext.parallel_fw_hintra(*args, chunk_size=L)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                Hr, Nr, Mr = parallel_fw_hintra_reference(*args, chunk_size=L,
                                                          compute_dtype=torch.float64)
                errs = [rel_norm_err(H, Hr), rel_norm_err(N, Nr), rel_norm_err(M, Mr)]
                shape_ok = (H.dtype == dtype and tuple(H.shape) == (B, NH, S, DV)
                            and N.dtype == torch.float32 and M.dtype == torch.float32)
                ok = shape_ok and all(e <= tol for e in errs)
                res = "PASS" if ok else ("FAIL" if shape_ok else "FAIL (output shape/dtype)")
                print(f"{DTYPE_NAMES[dtype]:5} {str(shp):28} {errs[0]:10.2e} {errs[1]:10.2e} "
                      f"{errs[2]:10.2e}  {res}")
            except Exception as e:
                ok = False
                print(f"{DTYPE_NAMES[dtype]:5} {str(shp):28} FAIL: {type(e).__name__}: {e}")
            ok_all &= ok
    print("self-check:", "PASS" if ok_all else "FAIL")
    return ok_all


# --------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------
def _time_cpu(fn: Callable[[], object], budget_s: float = 1.5, max_reps: int = 25) -> float:
    """Median wall time in ms (one warm-up call, then repeats until budget_s or max_reps)."""
    fn()
    times: List[float] = []
    start = time.perf_counter()
    while len(times) < 3 or (len(times) < max_reps and time.perf_counter() - start < budget_s):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _time_cuda(fn: Callable[[object], object], sets: List[object], rep_ms: float = 150.0,
               max_reps: int = 50) -> float:
    """Median CUDA-event time in ms, rotating among ``sets`` so L2 holds no inputs between calls."""
    fn(sets[0])  # JIT / autotune / allocation outside the timing
    torch.cuda.synchronize()
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    e0.record()
    fn(sets[1 % len(sets)])
    e1.record()
    torch.cuda.synchronize()
    est = max(e0.elapsed_time(e1), 1e-3)
    reps = int(max(5, min(max_reps, rep_ms / est)))
    for r in range(min(reps, 10)):  # warm-up
        fn(sets[r % len(sets)])
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for r in range(reps):
        starts[r].record()
        fn(sets[r % len(sets)])
        ends[r].record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends))


def _fmt(x: Optional[float]) -> str:
    return "-" if x is None else f"{x:.3f}"


def bench(device: torch.device, seed: int) -> None:
    gen = torch.Generator(device=device)
    gen.manual_seed(seed + 1)
    print("\n== timing (median) ==")
    if device.type == "cpu":
        print(f"CPU, {torch.get_num_threads()} torch threads; eager reference in float32")
        print(f"{'(B, NH, S, DHQK, DHHV, L)':28} {'dtype':5} {'op ms':>9} {'eager ms':>9} {'speed-up':>9}")
        for shp in [(2, 4, 1024, 64, 64, 64)]:
            B, NH, S, DQ, DV, L = shp
            args = make_inputs(B, NH, S, DQ, DV, L, torch.float32, device, gen)
            t_op = _time_cpu(lambda: mlstm_ext.parallel_fw_hintra(*args, chunk_size=L))
            t_ref = _time_cpu(lambda: parallel_fw_hintra_reference(*args, chunk_size=L))
            print(f"{str(shp):28} {'fp32':5} {t_op:9.3f} {t_ref:9.3f} {t_ref / t_op:8.2f}x")
        return

    triton_fn, how = load_triton_hintra()
    print("Triton peer:", how)
    print("CUDA events, rotating input sets; eager reference in the input dtype; "
          "Triton at its default launch config")
    hdr = (f"{'(B, NH, S, DHQK, DHHV, L)':30} {'dtype':5} {'op ms':>9} {'Triton ms':>10} "
           f"{'eager ms':>9} {'vs Triton':>10} {'vs eager':>9}")
    print(hdr)
    print("-" * len(hdr))
    cases = [((8, 16, 4096, 128, 128, 64), torch.bfloat16),
             ((1, 8, 16384, 256, 512, 128), torch.bfloat16),
             ((8, 16, 4096, 128, 128, 64), torch.float16),
             ((2, 4, 2048, 64, 64, 64), torch.float32)]
    for shp, dtype in cases:
        B, NH, S, DQ, DV, L = shp
        n_sets = 2 if B * NH * S * (DQ + DV) > 2 ** 26 else 4
        sets = [make_inputs(B, NH, S, DQ, DV, L, dtype, device, gen) for _ in range(n_sets)]
        t_op = _time_cuda(lambda a: mlstm_ext.parallel_fw_hintra(*a, chunk_size=L), sets)
        t_tr = None
        if triton_fn is not None:
            try:
                t_tr = _time_cuda(lambda a: triton_fn(*a, chunk_size=L), sets)
            except Exception as e:
                print(f"  (Triton failed at {shp}: {type(e).__name__}: {str(e)[:200]})")
        t_ref = None
        try:
            t_ref = _time_cuda(
                lambda a: parallel_fw_hintra_reference(*a, chunk_size=L, compute_dtype=dtype),
                sets, max_reps=10)
        except torch.cuda.OutOfMemoryError:
            print(f"  (eager reference out of memory at {shp})")
        vs_tr = f"{t_tr / t_op:9.2f}x" if t_tr else "-"
        vs_ref = f"{t_ref / t_op:8.2f}x" if t_ref else "-"
        print(f"{str(shp):30} {DTYPE_NAMES[dtype]:5} {t_op:9.3f} {_fmt(t_tr):>10} "
              f"{_fmt(t_ref):>9} {vs_tr:>10} {vs_ref:>9}")
        del sets
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------------------------
def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mlstm_ext", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--seed", type=int, default=None, help="default: a fresh seed, printed")
    p.add_argument("--no-bench", action="store_true", help="self-check only")
    args = p.parse_args(argv)

    t_start = time.perf_counter()
    cuda_ok = torch.cuda.is_available() and mlstm_ext.has_cuda_kernels()
    if args.device == "cuda" and not cuda_ok:
        print("error: --device cuda, but torch.cuda.is_available() =",
              torch.cuda.is_available(), "and mlstm_ext.has_cuda_kernels() =",
              mlstm_ext.has_cuda_kernels(), file=sys.stderr)
        return 2
    device = torch.device("cuda" if (args.device != "cpu" and cuda_ok) else "cpu")
    seed = args.seed if args.seed is not None else int.from_bytes(os.urandom(4), "little") % (2 ** 31)

    print("mlstm_ext: chunkwise mLSTM intra-chunk H step (torch.ops.mlstm.parallel_fw_hintra)")
    print(f"library: {mlstm_ext.library_path()} (CUDA kernels: {mlstm_ext.has_cuda_kernels()})")
    print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), Python {platform.python_version()}")
    if device.type == "cuda":
        print(f"device: cuda:{torch.cuda.current_device()} {torch.cuda.get_device_name()}")
    else:
        why = "" if args.device == "cpu" else (
            " (no CUDA device)" if not torch.cuda.is_available() else " (library built without CUDA)")
        print(f"device: cpu{why}: {_cpu_name()}, {os.cpu_count()} cores, "
              f"{torch.get_num_threads()} torch threads")

    ok = self_check(device, seed)
    if not ok:
        print("\nself-check FAILED: not timing", file=sys.stderr)
        return 1
    if not args.no_bench:
        bench(device, seed)
    print(f"\ndone in {time.perf_counter() - t_start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
