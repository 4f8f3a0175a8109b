"""Quick GPU smoke: accuracy of the op (and Triton's, when importable) vs float64, and timings,
for both CUDA kernels of 16-bit inputs (Hopper wgmma kernel and the sm_80 one, picked with
MLSTM_EXT_SM90). Dev tool for one device call; the full benchmark is bench_gpu.py."""
import os, sys, time, torch
import mlstm_ext
from mlstm_ext.reference import parallel_fw_hintra_reference as ref

from mlstm_ext.__main__ import load_triton_hintra, make_inputs

triton_hintra, why = load_triton_hintra()
if triton_hintra is None:
    print("triton peer not importable:", why)

dev = "cuda"
def make(B, NH, S, DQ, DV, L, dt, seed):
    return make_inputs(B, NH, S, DQ, DV, L, dt, dev, torch.Generator(device=dev).manual_seed(seed))

fails = 0
print(torch.cuda.get_device_name(), torch.__version__)
for (B, NH, S, DQ, DV, L) in [(2, 3, 256, 64, 64, 64), (1, 2, 512, 128, 128, 128), (1, 2, 256, 48, 80, 16), (1, 1, 96, 50, 70, 32),
                              (1, 2, 512, 256, 512, 128), (2, 2, 256, 128, 128, 256), (1, 1, 64, 3, 5, 64), (1, 2, 192, 100, 96, 24)]:
    for dt, kern in [(torch.float32, "1"), (torch.bfloat16, "1"), (torch.bfloat16, "0"), (torch.float16, "1"), (torch.float16, "0")]:
        os.environ["MLSTM_EXT_SM90"] = kern
        x = make(B, NH, S, DQ, DV, L, dt, seed=B * S + DQ + DV + L)
        Hr, Nr, Mr = ref(*x, chunk_size=L, compute_dtype=torch.float64)
        H, N, M = torch.ops.mlstm.parallel_fw_hintra(*x, chunk_size=L)
        torch.cuda.synchronize()
        e = ((H.double() - Hr).norm() / Hr.norm()).item()
        en = ((N.double() - Nr).abs() / Nr.abs()).max().item()
        em = (M.double() - Mr).abs().max().item()
        tol = {torch.float32: 2e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}[dt]
        ok = e < tol and en < 1e-4 and em < 1e-4 and torch.isfinite(H).all()
        fails += not ok
        et = ""
        if triton_hintra is not None and L >= 32 and (L & (L - 1)) == 0:
            try:
                Ht, Nt, Mt = triton_hintra(*x, chunk_size=L)
                et = f" triton {((Ht.double() - Hr).norm() / Hr.norm()).item():.2e}"
            except Exception as ex:  # noqa
                et = f" triton err {type(ex).__name__}"
        print(f"{'OK ' if ok else 'BAD'} sm90={kern} {dt} {(B, NH, S, DQ, DV, L)} H {e:.2e} N {en:.2e} M {em:.2e}{et}")

def bench(fn, n=20):
    for _ in range(3): fn()
    torch.cuda.synchronize()
    st, en = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    ts = []
    for _ in range(n):
        st.record(); fn(); en.record(); torch.cuda.synchronize(); ts.append(st.elapsed_time(en))
    return sorted(ts)[len(ts) // 2]

x = torch.empty(2 * 1024**3 // 4, device=dev); y = torch.empty_like(x)
tc = bench(lambda: y.copy_(x)); bw = 2 * x.numel() * 4 / (tc * 1e-3) / 1e9
print(f"copy bandwidth {bw:.0f} GB/s"); del x, y
os.environ["MLSTM_EXT_SM90"] = "1"
print("| shape | dtype | ours ms | sm80 kernel ms | triton default ms | triton/ours | ours/floor |")
for (B, NH, S, DQ, DV, L) in [(8, 16, 4096, 128, 128, 64), (8, 16, 4096, 128, 128, 128), (1, 8, 16384, 256, 512, 128), (4, 8, 8192, 256, 512, 64)]:
    for dt in (torch.bfloat16, torch.float16, torch.float32):
        if dt == torch.float32 and DQ > 128: continue
        sets = [make(B, NH, S, DQ, DV, L, dt, seed=s) for s in range(2)]
        it = iter(range(10**9))
        ours = bench(lambda: torch.ops.mlstm.parallel_fw_hintra(*sets[next(it) % 2], chunk_size=L))
        os.environ["MLSTM_EXT_SM90"] = "0"
        old = bench(lambda: torch.ops.mlstm.parallel_fw_hintra(*sets[next(it) % 2], chunk_size=L))
        os.environ["MLSTM_EXT_SM90"] = "1"
        tri = float("nan")
        if triton_hintra is not None:
            try:
                tri = bench(lambda: triton_hintra(*sets[next(it) % 2], chunk_size=L))
            except Exception as ex:  # noqa
                print("triton failed", ex)
        NC = S // L; es = torch.finfo(dt).bits // 8
        byts = B * NH * (S * (2 * DQ + 2 * DV) * es + NC * DQ * DV * 4 + NC * DQ * 4 + S * 4 * 4)
        fl = byts / bw / 1e6
        print(f"| {(B, NH, S, DQ, DV, L)} | {dt} | {ours:.3f} | {old:.3f} | {tri:.3f} | {tri / ours:.2f} | {ours / fl:.2f} |")
        del sets
sys.exit(1 if fails else 0)
