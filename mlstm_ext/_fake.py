"""Fake (meta) kernel: output shapes and dtypes only, for torch.compile and torch.export.

Shape checks stay in the C++ validation routine; here we only describe the outputs.
"""
import torch


@torch.library.register_fake("mlstm::parallel_fw_hintra")
def _parallel_fw_hintra_fake(
    matQ, matK, matV, vecI, vecF, matC_all, vecN_all, scaM_all,
    qk_scale=None, chunk_size=64, siz_b_LQ=32, siz_b_LKV=32, siz_b_DHQK=None, siz_b_DHHV=None,
    num_warps=None, num_stages=None, eps=1e-6, output_dtype=None,
):
    # The dispatcher sends a call here when any input is on "meta", skipping the C++ validation:
    # refuse mixed devices so a real tensor never comes back uninitialised.
    for name, t in (("matK", matK), ("matV", matV), ("vecI", vecI), ("vecF", vecF),
                    ("matC_all", matC_all), ("vecN_all", vecN_all), ("scaM_all", scaM_all)):
        torch._check(
            t.device == matQ.device,
            lambda: f"parallel_fw_hintra: {name} must be on the same device as matQ "
            f"({matQ.device}), got {t.device}",
        )
    torch._check(matQ.dim() == 4 and matV.dim() == 4,
                 lambda: "parallel_fw_hintra: matQ and matV must have 4 dims (B, NH, S, D)")
    B, NH, S, _ = matQ.shape
    DHHV = matV.shape[-1]
    out_dt = torch.float32 if output_dtype is None else output_dtype
    matH = matQ.new_empty((B, NH, S, DHHV))
    vecN = matQ.new_empty((B, NH, S), dtype=out_dt)
    vecM = matQ.new_empty((B, NH, S), dtype=out_dt)
    return matH, vecN, vecM
