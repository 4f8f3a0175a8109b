"""One shape, a few launches, for Nsight Compute: ncu -k regex:hintra --launch-skip 2 --launch-count 1."""
import sys, torch, mlstm_ext  # noqa: F401
from mlstm_ext.__main__ import make_inputs

B, NH, S, DQ, DV, L = (int(x) for x in (sys.argv[1:7] if len(sys.argv) > 6 else (8, 16, 4096, 128, 128, 64)))
dt = getattr(torch, sys.argv[7]) if len(sys.argv) > 7 else torch.bfloat16
q, k, v, i, f, C, n, m = make_inputs(B, NH, S, DQ, DV, L, dt, "cuda")
for _ in range(3):
    torch.ops.mlstm.parallel_fw_hintra(q, k, v, i, f, C, n, m, chunk_size=L)
torch.cuda.synchronize()
