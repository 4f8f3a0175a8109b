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
    B, NH, S, _ = matQ.shape
    DHHV = matV.shape[-1]
    out_dt = torch.float32 if output_dtype is None else output_dtype
    matH = matQ.new_empty((B, NH, S, DHHV))
    vecN = matQ.new_empty((B, NH, S), dtype=out_dt)
    vecM = matQ.new_empty((B, NH, S), dtype=out_dt)
    return matH, vecN, vecM
