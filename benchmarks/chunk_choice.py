"""Which chunk size each pass runs fastest at, per shape. The chunkwise forward and backward are the
same function of their inputs at every chunk size (SPEC.md, "Chunk size"), so a pass may run at
another chunk size than the caller's; this times, on the same inputs and alternated:

- the forward at chunk 64 and 128: the default plan (the fused kernel runs chunk 128 as 64) and
  the two kernels (MLSTM_EXT_FUSED_FW=0);
- the backward (fused path, nsum from the forward, as mlstm_chunkwise runs it) at chunk 64 and
  128 (MLSTM_EXT_BW_CHUNK=keep), each reading the outputs of the forward at chunk 64 or at 128,
  and at the backward's own plan; the relative difference of the gradients at 128 and at 64.

    python3 benchmarks/chunk_choice.py [--shapes "B,NH,S,DHQK,DHHV;..."] [--rounds 2]
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import mlstm_ext  # noqa: E402,F401  (loads the ops)
from timing import cuda_time, md_table  # noqa: E402

SHAPES = "8,16,4096,128,128;1,8,16384,256,512;4,8,8192,256,512;2,8,8192,256,512"


def fused_env(value):
    if value is None:
        os.environ.pop("MLSTM_EXT_FUSED_FW", None)
    else:
        os.environ["MLSTM_EXT_FUSED_FW"] = value


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default=SHAPES)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device")
        return 1
    gpu = torch.cuda.get_device_name()
    print(f"{gpu}; torch {torch.__version__}")
    fw_rows, bw_rows = [], []
    for spec in args.shapes.split(";"):
        B, NH, S, DQ, DV = (int(x) for x in spec.split(","))
        g = torch.Generator(device="cuda").manual_seed(0)
        q, k = (torch.randn(B, NH, S, DQ, device="cuda", generator=g).bfloat16() for _ in range(2))
        v = torch.randn(B, NH, S, DV, device="cuda", generator=g).bfloat16()
        i = torch.randn(B, NH, S, device="cuda", generator=g)
        f = 3 + torch.randn(B, NH, S, device="cuda", generator=g)
        dH = torch.randn(B, NH, S, DV, device="cuda", generator=g).bfloat16()
        sets = [None]

        def fw(L, env):
            def call(_):
                fused_env(env)
                try:
                    return torch.ops.mlstm.chunkwise_fw(q, k, v, i, f, chunk_size=L, vecN_signed=True)
                finally:
                    fused_env(None)
            return call

        fws = {"plan 64": fw(64, None), "plan 128": fw(128, None), "two 64": fw(64, "0"), "two 128": fw(128, "0")}
        out = {L: torch.ops.mlstm.chunkwise_fw(q, k, v, i, f, chunk_size=L, vecN_signed=True) for L in (64, 128)}

        def bw(L_fw, L, plan=False):
            o = out[L_fw]

            def call(_):
                if not plan:
                    os.environ["MLSTM_EXT_BW_CHUNK"] = "keep"
                try:
                    return torch.ops.mlstm.chunkwise_bw(q, k, v, i, f, None, None, None, o[0], o[4], o[5], dH,
                                                        None, None, chunk_size=L, vecN_signed=True)
                finally:
                    os.environ.pop("MLSTM_EXT_BW_CHUNK", None)
            return call

        bws = {f"fw {a} bw {b}": bw(a, b) for a in (64, 128) for b in (64, 128)}
        bws.update({f"fw {a} bw plan": bw(a, a, True) for a in (64, 128)})
        ms = {n: [] for n in list(fws) + list(bws)}
        for _ in range(args.rounds):
            for n, fn in list(fws.items()) + list(bws.items()):
                ms[n].append(cuda_time(fn, sets, rep_ms=60.0, max_reps=30)["ms"])
        best = {n: min(t) for n, t in ms.items()}
        g64 = bws["fw 64 bw 64"](None)
        g128 = bws["fw 64 bw 128"](None)
        rel = "/".join(f"{((a.float() - b.float()).norm() / b.float().norm()).item():.1e}"
                       for a, b in zip(g128[:5], g64[:5]))
        shape = f"({B}, {NH}, {S}, {DQ}, {DV})"
        fw_rows.append([shape] + [f"{best[n]:.3f}" for n in fws] + [gpu])
        bw_rows.append([shape] + [f"{best[n]:.3f}" for n in bws] + [rel, gpu])
        print(shape, {n: round(t, 3) for n, t in best.items()}, rel, flush=True)
        del q, k, v, i, f, dH, out, g64, g128
        torch.cuda.empty_cache()
    print()
    print("\n".join(md_table(["(B, NH, S, DHQK, DHHV)"] + [f"fw {n} ms" for n in fws] + ["GPU"], fw_rows, 1)))
    print()
    print("\n".join(md_table(["(B, NH, S, DHQK, DHHV)"] + [f"{n} ms" for n in bws]
                             + ["rel dQ/dK/dV/dI/dF, bw 128 vs 64", "GPU"], bw_rows, 1)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
