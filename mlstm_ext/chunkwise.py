"""``mlstm_chunkwise``: the whole chunkwise mLSTM, differentiable, with the calling convention of
mlstm_kernels' chunkwise kernels (``mlstm_chunkwise__xl_chunk``, ``mlstm_chunkwise__native_autograd``).

Forward: the compiled op ``torch.ops.mlstm.chunkwise_fw`` (recurrent step, then the H step).
Backward: its registered autograd formula (``mlstm_ext.autograd``).
"""
import contextlib
from typing import Optional, Tuple, Union

import torch

__all__ = ["mlstm_chunkwise"]

# Tuning arguments of mlstm_kernels' Triton chunkwise kernels: accepted so that calls written for
# them work unchanged, and ignored (the compiled kernels choose their own tiles).
_IGNORED_KWARGS = frozenset({
    "chunk_size_inter", "chunk_size_intra", "siz_b_L_parallel", "siz_b_L_loop",
    "siz_b_DH_parallel", "siz_b_DH_loop", "num_warps_intra", "num_warps_inter",
    "num_stages_intra", "num_stages_inter", "recompute_states_in_bw",
})

_GRAD_MODES = ("exact", "normaliser_constant")


def mlstm_chunkwise(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    i: torch.Tensor,
    f: torch.Tensor,
    c_initial: Optional[torch.Tensor] = None,
    n_initial: Optional[torch.Tensor] = None,
    m_initial: Optional[torch.Tensor] = None,
    return_last_states: bool = False,
    eps: float = 1e-6,
    chunk_size: int = 64,
    autocast_kernel_dtype: torch.dtype = torch.bfloat16,
    grad_mode: str = "exact",
    qk_scale: Optional[float] = None,
    **kwargs,
) -> Union[torch.Tensor, Tuple[torch.Tensor, Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]]:
    """The chunkwise-parallel mLSTM (SPEC.md, "The whole forward"), differentiable.

    Arguments (as mlstm_kernels' chunkwise kernels):
        q, k: (B, NH, S, DHQK); v: (B, NH, S, DHHV), float32, bfloat16 or float16 (float64 on CPU),
            all three alike.
        i, f: (B, NH, S) input- and forget-gate pre-activations, any float dtype (computed in
            float32, float64 for float64 inputs).
        c_initial (B, NH, DHQK, DHHV), n_initial (B, NH, DHQK), m_initial (B, NH, 1) or (B, NH):
            initial states (zeros when None).
        return_last_states: also return the states after the last position.
        eps: added to the denominator.
        chunk_size: L; S must be a multiple of it (pad the sequence otherwise: xlstm's
            "train_with_padding" and "inference" modes do).
        autocast_kernel_dtype: when autocast is enabled for q's device, q, k and v are cast to this
            dtype and the kernel runs outside autocast (mlstm_kernels' ``custom_fwd(cast_inputs=)``
            behaviour). Gates and states are not cast: they are computed in float32 anyway.
        grad_mode: "exact" (default; what torch.autograd gives through a PyTorch evaluation with the
            stabiliser m held constant) or "normaliser_constant" (the denominator is held constant
            as well: the gradients of mlstm_kernels' ``native_custbw`` and Triton ``xl_chunk``
            backwards). SPEC.md, "Gradients".
        qk_scale: scale of q . k (None: DHQK**-0.5).
        **kwargs: the Triton tuning arguments of ``mlstm_chunkwise__xl_chunk`` (``siz_b_*``,
            ``num_warps_*``, ``chunk_size_inter`` ...) are accepted and ignored; any other name is a
            TypeError.

    Returns:
        H (B, NH, S, DHHV) in q's dtype (after the autocast cast), or, with return_last_states,
        ``(H, (C_last (B, NH, DHQK, DHHV), n_last (B, NH, DHQK), m_last (B, NH, 1)))`` with the
        states in float32 (float64 for float64 inputs), contiguous, as ``mlstm_chunkwise__xl_chunk``
        returns them. m_last carries no gradient (it is a stabiliser).
    """
    unknown = sorted(set(kwargs) - _IGNORED_KWARGS)
    if unknown:
        raise TypeError(f"mlstm_chunkwise: unexpected keyword argument(s) {', '.join(unknown)}")
    if grad_mode not in _GRAD_MODES:
        raise ValueError(f'mlstm_chunkwise: grad_mode must be "exact" or "normaliser_constant", got {grad_mode!r}')
    if not isinstance(q, torch.Tensor) or q.dim() != 4:
        raise ValueError("mlstm_chunkwise: q must be a 4-dim tensor (B, NH, S, DHQK), got "
                         + (f"shape {tuple(q.shape)}" if isinstance(q, torch.Tensor) else type(q).__name__))
    if not isinstance(chunk_size, int) or chunk_size <= 0:
        raise ValueError(f"mlstm_chunkwise: chunk_size must be a positive int, got {chunk_size!r}")
    S = q.shape[2]
    if S % chunk_size != 0:
        raise ValueError(
            f"mlstm_chunkwise: the sequence length S = {S} (q.size(2)) must be a multiple of "
            f"chunk_size = {chunk_size}; pad the sequence (e.g. xlstm's mode='train_with_padding' "
            f"or mode='inference', which pad before calling the kernel) or pick another chunk_size")

    device_type = q.device.type
    autocast = torch.is_autocast_enabled(device_type)
    if autocast:
        # As mlstm_kernels' custom_fwd(cast_inputs=autocast_kernel_dtype): the kernel sees the
        # autocast dtype and runs with autocast off. float64 is left alone, as custom_fwd does.
        q, k, v = (t.to(autocast_kernel_dtype) if t.is_floating_point() and t.dtype != torch.float64 else t
                   for t in (q, k, v))
    with torch.autocast(device_type, enabled=False) if autocast else contextlib.nullcontext():
        # vecN_signed: the forward saves nsum for the backward (its sign spares the backward a
        # Q K^T); vecN is not returned here.
        outs = torch.ops.mlstm.chunkwise_fw(q, k, v, i, f, c_initial, n_initial, m_initial,
                                            qk_scale, chunk_size, eps, grad_mode, vecN_signed=True)
    matH, matC_last, vecN_last, scaM_last = outs[0], outs[1], outs[2], outs[3]
    if not return_last_states:
        return matH
    return matH, (matC_last, vecN_last, scaM_last.unsqueeze(-1))
