"""The backward op alone on CUDA: the fused kernels against the batched-GEMM path
(MLSTM_EXT_FUSED_BACKWARD=0), alternated in one process, with the relative difference of every
gradient between the two and, with --profile N[,N...], a kernel profile of the fused path at
those shape indices (as mlstm_chunkwise runs it: nsum from the forward). Timed beside them: the
fused path given the forward's signed nsum (vecN_signed, what mlstm_chunkwise runs: bw_pre skips
S = Q K^T and q . n_k) and the fused path in the normaliser-constant convention (skips bw_pre's
whole exact-mode half).

    python3 benchmarks/bench_backward.py [--profile 0,2]
"""
import argparse
import os

import torch

import mlstm_ext  # noqa: F401  (loads the ops)

SHAPES = [(8, 16, 4096, 128, 128, 64), (8, 16, 4096, 128, 128, 128), (1, 8, 16384, 256, 512, 128),
          (4, 8, 8192, 256, 512, 64)]


def time_ms(fn, reps=7):
    start, end = torch.cuda.Event(True), torch.cuda.Event(True)
    ts = []
    for _ in range(reps):
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        ts.append(start.elapsed_time(end))
    return sorted(ts)[reps // 2]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profile", default="", help="profile the fused path at these shape indices (comma list)")
    args = p.parse_args()
    profile_at = {int(x) for x in args.profile.split(",") if x.strip()}
    print(f"{torch.cuda.get_device_name()}; torch {torch.__version__}")
    print("| (B, NH, S, DHQK, DHHV, L) | dtype | batched-GEMM path ms | fused ms | speed-up | fused, nsum from the "
          "forward ms | fused, normaliser constant ms | rel dQ/dK/dV/dI/dF | nsum vs den, rel |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | --- | --- |")
    for si, (B, NH, S, DQ, DV, L) in enumerate(SHAPES):
        g = torch.Generator(device="cuda").manual_seed(0)
        q, k = (torch.randn(B, NH, S, DQ, device="cuda", generator=g).bfloat16() for _ in range(2))
        v = torch.randn(B, NH, S, DV, device="cuda", generator=g).bfloat16()
        i = torch.randn(B, NH, S, device="cuda", generator=g)
        f = 3 + torch.randn(B, NH, S, device="cuda", generator=g)
        out = torch.ops.mlstm.chunkwise_fw(q, k, v, i, f, chunk_size=L)
        out_s = torch.ops.mlstm.chunkwise_fw(q, k, v, i, f, chunk_size=L, vecN_signed=True)
        dH = torch.randn_like(out[0])

        def bwd(grad_mode="exact", signed=False):
            o = out_s if signed else out
            return torch.ops.mlstm.chunkwise_bw(q, k, v, i, f, None, None, None, o[0], o[4], o[5],
                                                dH, None, None, chunk_size=L, grad_mode=grad_mode,
                                                vecN_signed=signed)

        fns = {"0": bwd, "1": bwd, "s": lambda: bwd(signed=True), "nc": lambda: bwd("normaliser_constant")}
        ms, grads = {m: [] for m in fns}, {}
        for mode in list(fns) * 2:  # alternated: drifts of the card hit all
            os.environ["MLSTM_EXT_FUSED_BACKWARD"] = "0" if mode == "0" else "1"
            grads[mode] = fns[mode]()
            fns[mode]()
            ms[mode].append(time_ms(fns[mode]))
        os.environ.pop("MLSTM_EXT_FUSED_BACKWARD")

        def rel(x, y):
            return "/".join(f"{((a.float() - b.float()).norm() / b.float().norm()).item():.1e}"
                            for a, b in zip(x[:5], y[:5]))
        old, new, sg, nc = (min(ms[m]) for m in ("0", "1", "s", "nc"))
        print(f"| {(B, NH, S, DQ, DV, L)} | bf16 | {old:.3f} | {new:.3f} | {old / new:.1f}x | {sg:.3f} | {nc:.3f} | "
              f"{rel(grads['1'], grads['0'])} | {rel(grads['s'], grads['1'])} |", flush=True)
        if si in profile_at:
            from torch.profiler import ProfilerActivity, profile
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                bwd(signed=True)
                torch.cuda.synchronize()
            print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12, max_name_column_width=60))
        del q, k, v, i, f, out, out_s, dH, grads
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
