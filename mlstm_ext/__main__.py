"""The main job: ``python -m mlstm_ext``.

1. Picks the device: CUDA when a GPU is present and the library has its CUDA kernels, else the CPU.
2. Self-check: every op on fresh random inputs (``reference.random_inputs``) in float32, bfloat16
   and float16 against its float64 reference on the same inputs (``mlstm_ext.reference``):
   parallel_fw_hintra, recurrent_fw_states, chunkwise_fw, chunkwise_bw (against float64
   autograd through the reference) and recurrent_step (eight generation steps from the states
   entering chunk 1, against the float64 chain at chunk size 1), every output. Prints the
   relative-norm errors ||x - x64|| / ||x64|| and PASS/FAIL against ``reference.TOLERANCES``;
   exits 1 on any failure, before timing.
3. A short timing table: each op against its PyTorch eager reference (the same reference
   functions, in the input dtype on the GPU and in float32 on the CPU).

Options: ``--device {auto,cpu,cuda}``, ``--seed N``, ``--no-bench``. Comparisons with other
kernels (Triton) are in ``benchmarks/``.
"""
import argparse
import os
import platform
import statistics
import sys
import time
from typing import Callable, List, Optional

import torch

import mlstm_ext
from mlstm_ext import reference as ref

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# Each op and its reference, on the inputs of ref.random_inputs (q, k, v, i, f, C_all, n_all, m_all).
def _hintra(x, L):
    return mlstm_ext.parallel_fw_hintra(*x, chunk_size=L)


def _hintra_ref(x, L, dt):
    return ref.parallel_fw_hintra_reference(*x, chunk_size=L, compute_dtype=dt)


def _states(x, L):
    return mlstm_ext.recurrent_fw_states(*x[1:5], chunk_size=L)


def _states_ref(x, L, dt):
    return ref.recurrent_fw_states(*x[1:5], chunk_size=L, compute_dtype=dt)


def _forward(x, L):
    return mlstm_ext.chunkwise_fw(*x[:5], chunk_size=L)


def _forward_ref(x, L, dt):
    return ref.chunkwise_fw_reference(*x[:5], chunk_size=L, compute_dtype=dt)


def _incoming(x):
    """Incoming gradients of the backward, from the random inputs: dH = V reversed along S, and
    the first state slot as the last states' gradients."""
    DHQK = x[0].shape[-1]
    return x[2].flip(2), x[5][:, :, :DHQK].float(), x[6][:, :, :DHQK].float()


def _backward(x, L):
    out = mlstm_ext.chunkwise_fw(*x[:5], chunk_size=L)
    return mlstm_ext.chunkwise_bw(*x[:5], None, None, None, out[0], out[4], out[5], *_incoming(x),
                                  chunk_size=L)


def _backward_ref(x, L, dt):
    B, NH, _, DHQK = x[0].shape
    leaves = [t.detach().to(dt).requires_grad_() for t in x[:5]]
    C0 = torch.zeros(B, NH, DHQK, x[2].shape[-1], dtype=dt, device=x[0].device, requires_grad=True)
    n0 = torch.zeros(B, NH, DHQK, dtype=dt, device=x[0].device, requires_grad=True)
    with torch.enable_grad():
        H, C, n = ref.chunkwise_fw_reference(*leaves, C0, n0, chunk_size=L, compute_dtype=dt,
                                             detach_m=True)[:3]
        return torch.autograd.grad([H, C, n], leaves + [C0, n0], [d.to(dt) for d in _incoming(x)])


STEPS = 8  # generation steps the recurrent_step check walks


def _step(x, L):
    """recurrent_step over positions L .. L+STEPS-1 from the states entering chunk 1."""
    q, k, v, i, f, C_all, n_all, m_all = x
    DHQK = q.shape[-1]
    C, n, m = C_all[:, :, DHQK:2 * DHQK], n_all[:, :, DHQK:2 * DHQK], m_all[:, :, 1]
    hs = []
    for t in range(L, L + STEPS):
        h, C, n, m = mlstm_ext.recurrent_step(q[:, :, t], k[:, :, t], v[:, :, t], i[:, :, t], f[:, :, t],
                                              C, n, m)
        hs.append(h)
    return torch.stack(hs, 2), C, n, m


def _step_ref(x, L, dt):
    q, k, v, i, f, C_all, n_all, m_all = x
    DHQK = q.shape[-1]
    window = [t[:, :, L:L + STEPS] for t in (q, k, v, i, f)]
    return ref.chunkwise_fw_reference(*window, C_all[:, :, DHQK:2 * DHQK], n_all[:, :, DHQK:2 * DHQK],
                                      m_all[:, :, 1], chunk_size=1, compute_dtype=dt)[:4]


# name: (op, reference, output names)
OPS = {
    "parallel_fw_hintra": (_hintra, _hintra_ref, ("matH", "vecN", "vecM")),
    "recurrent_fw_states": (_states, _states_ref, ("matC_all", "vecN_all", "scaM_all")),
    "chunkwise_fw": (_forward, _forward_ref,
                     ("matH", "matC_last", "vecN_last", "scaM_last", "vecN", "vecM")),
    "chunkwise_bw": (_backward, _backward_ref, ("dQ", "dK", "dV", "dI", "dF", "dC0", "dN0")),
    "recurrent_step": (_step, _step_ref, ("vecH", "matC_next", "vecN_next", "scaM_next")),
}
IN_DTYPE_OUTPUTS = ("matH", "vecH", "dQ", "dK", "dV")


# ---------------------------------------------------------------------------------------------
# Self-check


def check_one(op_name: str, x, L: int, device: torch.device) -> List[str]:
    """Runs one op on x and compares every output with the float64 reference. Returns the
    problems found (empty: PASS) after printing the errors."""
    op, reference, names = OPS[op_name]
    in_dtype = x[0].dtype
    tol_h, tol_f32 = ref.TOLERANCES[device.type][in_dtype]
    outs = op(x, L)
    refs = reference(x, L, torch.float64)
    problems, cells = [], []
    if len(outs) != len(names):
        problems.append(f"{len(outs)} outputs, expected {len(names)}")
    for name, out, r in zip(names, outs, refs):
        want_dtype = in_dtype if name in IN_DTYPE_OUTPUTS else torch.float32
        tol = tol_h if name in ("matH", "vecH") else tol_f32
        if op_name == "chunkwise_bw":
            tol = ref.BACKWARD_TOLERANCES[in_dtype]
        err = ref.rel_norm_err(out, r)
        cells.append(f"{name} {err:.1e}")
        if out.dtype != want_dtype or out.shape != r.shape:
            problems.append(f"{name}: {out.dtype} {tuple(out.shape)}, expected {want_dtype} "
                            f"{tuple(r.shape)}")
        elif not err <= tol:
            problems.append(f"{name} error {err:.1e} > {tol:g}")
    print("  ".join(cells), end="  ")
    return problems


def self_check(device: torch.device, seed: int) -> bool:
    shapes = [(2, 3, 256, 64, 64, 64), (1, 2, 96, 50, 70, 16)]
    if device.type == "cuda":
        shapes.append((2, 4, 1024, 128, 256, 128))
    gen = torch.Generator(device=device).manual_seed(seed)
    print(f"\n== self-check against the float64 reference (seed {seed}) ==")
    print("relative-norm error ||x - x64|| / ||x64||; tolerances (matH, float32 outputs): "
          + ", ".join(f"{n} {ref.TOLERANCES[device.type][d]}" for n, d in DTYPES.items()))
    ok_all = True
    for op_name in OPS:
        for dname, dtype in DTYPES.items():
            for shape in shapes:
                x = ref.random_inputs(*shape, dtype, device, gen)
                print(f"{op_name:19} {dname} {str(shape):26}", end=" ", flush=True)
                try:
                    problems = check_one(op_name, x, shape[-1], device)
                except Exception as e:  # an op that raises fails its check; the others still run
                    problems = [f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"]
                print("PASS" if not problems else "FAIL: " + "; ".join(problems))
                ok_all &= not problems
    print("self-check:", "PASS" if ok_all else "FAIL")
    return ok_all


# ---------------------------------------------------------------------------------------------
# Timing


def median_ms(fn: Callable[[], object], device: torch.device, budget_s: float = 1.0) -> float:
    """Median time of fn() in ms: CUDA events on the GPU, perf_counter on the CPU; one warm-up
    call, then 3..50 repeats within about budget_s."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    t0 = time.perf_counter()
    fn()
    sync()
    reps = int(min(50, max(3, budget_s / max(time.perf_counter() - t0, 1e-6))))
    if device.type == "cuda":
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                  for _ in range(reps)]
        for start, end in events:
            start.record()
            fn()
            end.record()
        sync()
        return statistics.median(s.elapsed_time(e) for s, e in events)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def bench(device: torch.device, seed: int) -> None:
    if device.type == "cuda":
        cases = [((8, 16, 4096, 128, 128, 64), "bf16"), ((1, 8, 16384, 256, 512, 128), "bf16"),
                 ((8, 16, 4096, 128, 128, 64), "fp16"), ((2, 4, 2048, 64, 64, 64), "fp32")]
        note = "CUDA events; eager reference in the input dtype"
    else:
        cases = [((2, 4, 1024, 64, 64, 64), "fp32")]
        note = f"{torch.get_num_threads()} torch threads; eager reference in float32"
    gen = torch.Generator(device=device).manual_seed(seed + 1)
    print(f"\n== timing (median ms; {note}) ==")
    print(f"{'op':19} {'(B, NH, S, DHQK, DHHV, L)':30} {'dtype':5} {'op':>9} {'eager':>9} "
          f"{'speed-up':>9}")
    for shape, dname in cases:
        dtype = DTYPES[dname]
        eager_dtype = dtype if device.type == "cuda" else torch.float32
        x = ref.random_inputs(*shape, dtype, device, gen)
        L = shape[-1]
        for op_name, (op, reference, _) in OPS.items():
            t_op = median_ms(lambda: op(x, L), device)
            try:
                t_ref: Optional[float] = median_ms(lambda: reference(x, L, eager_dtype), device)
                ratio = f"{t_ref / t_op:8.2f}x"
            except torch.cuda.OutOfMemoryError:
                t_ref, ratio = None, "-"
            t_ref_s = "OOM" if t_ref is None else f"{t_ref:.3f}"
            print(f"{op_name:19} {str(shape):30} {dname:5} {t_op:9.3f} {t_ref_s:>9} {ratio:>9}")
        x = None  # frees the inputs before the next shape's
        if device.type == "cuda":
            torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------


def pick_device(choice: str) -> Optional[torch.device]:
    cuda_ok = torch.cuda.is_available() and mlstm_ext.has_cuda_kernels()
    if choice == "cuda" and not cuda_ok:
        return None
    return torch.device("cuda" if choice != "cpu" and cuda_ok else "cpu")


def describe(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda:{torch.cuda.current_device()} {torch.cuda.get_device_name()}"
    why = ""
    if not torch.cuda.is_available():
        why = " (no CUDA device)"
    elif not mlstm_ext.has_cuda_kernels():
        why = " (library built without CUDA)"
    return f"cpu{why}: {cpu_name()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"


def cpu_name() -> str:
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
    device = pick_device(args.device)
    if device is None:
        print(f"error: --device cuda, but torch.cuda.is_available() = {torch.cuda.is_available()} "
              f"and mlstm_ext.has_cuda_kernels() = {mlstm_ext.has_cuda_kernels()}", file=sys.stderr)
        return 2
    seed = args.seed if args.seed is not None else int.from_bytes(os.urandom(4), "little") % 2**31
    print("mlstm_ext: the chunkwise mLSTM forward and backward (torch.ops.mlstm: " + ", ".join(OPS) + ")")
    print(f"library: {mlstm_ext.library_path()} (CUDA kernels: {mlstm_ext.has_cuda_kernels()})")
    print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), Python {platform.python_version()}")
    print("device:", describe(device))

    if not self_check(device, seed):
        print("\nself-check FAILED: not timing", file=sys.stderr)
        return 1
    if not args.no_bench:
        bench(device, seed)
    print(f"\ndone in {time.perf_counter() - t_start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
