"""Issue 12's float16 accuracy case on the GPU: input gates spread widely (i ~ N(0, 8^2)), forget
gates near 0 or near 1, S = 512. Relative-norm H error against float64 (the worst of 3 seeds) of
both 16-bit CUDA kernels (sm_90a on / off), the CPU kernel, a float64 emulation with only the P V
weights rounded (emulate_weight_rounding.py) and, where installed, mlstm-kernels' Triton H step;
states from the float64 recurrence rounded to float32. TAG labels the lines (e.g. the build, when
MLSTM_EXT_LIBRARY picks another one).

    python3 benchmarks/accuracy_wide_gates.py [TAG]
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import mlstm_ext  # noqa: E402,F401  (loads the ops)
from emulate_weight_rounding import h_step as emulated  # noqa: E402
from mlstm_ext.reference import parallel_fw_hintra_reference, recurrent_fw_states  # noqa: E402

F64 = torch.float64
CASES = [(64, 64, 0.0), (128, 64, 0.0), (128, 128, 0.0), (256, 64, 0.0), (128, 64, 3.0), (64, 64, 3.0)]


def main():
    tag = sys.argv[1] if len(sys.argv) > 1 else "ours"
    try:
        from mlstm_kernels.torch.chunkwise.triton_xl_chunk.fw_parallel import (
            mlstm_chunkwise__parallel_fw_Hintra as triton_h)
    except ImportError:
        triton_h = None
    op = torch.ops.mlstm.parallel_fw_hintra
    for dt in (torch.float16, torch.bfloat16):
        for D, L, f_mean in CASES:
            errs = {"sm90a": [], "sm80": [], "cpu": [], "P_emulated": [], "triton": []}
            for seed in range(3):
                g = torch.Generator(device="cuda").manual_seed(seed)
                B, NH, S = 2, 4, 512
                q, k, v = (torch.randn(B, NH, S, D, generator=g, device="cuda").to(dt) for _ in range(3))
                i = 8 * torch.randn(B, NH, S, generator=g, device="cuda")
                f = f_mean + torch.randn(B, NH, S, generator=g, device="cuda")
                C, n, m = (t.float() for t in recurrent_fw_states(k, v, i, f, L, compute_dtype=F64))
                ref = parallel_fw_hintra_reference(q, k, v, i, f, C, n, m, chunk_size=L, compute_dtype=F64)[0]

                def rel(H):
                    return ((H.to(ref.device, F64) - ref).norm() / ref.norm()).item()
                try:
                    for name, on in (("sm90a", True), ("sm80", False)):
                        torch.ops.mlstm._set_sm90_enabled(on)
                        errs[name].append(rel(op(q, k, v, i, f, C, n, m, chunk_size=L)[0]))
                finally:
                    torch.ops.mlstm._set_sm90_enabled(True)
                cpu = [t.cpu() for t in (q, k, v, i, f, C, n, m)]
                errs["cpu"].append(rel(op(*cpu, chunk_size=L)[0]))
                errs["P_emulated"].append(rel(emulated(*cpu, L, round_w=dt).to(dt)))
                if triton_h is not None:
                    errs["triton"].append(rel(triton_h(q, k, v, i, f, C, n, m, chunk_size=L)[0]))
            print(tag, str(dt)[6:], f"D={D} L={L} f_mean={f_mean}:",
                  " ".join(f"{k}={max(v):.2e}" for k, v in errs.items() if v), flush=True)


if __name__ == "__main__":
    main()
