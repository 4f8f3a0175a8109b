"""``mlstm_step``: one generation step under ``mlstm-kernels``' step-kernel calling convention.

``mlstm_kernels.torch.recurrent.registry_step`` kernels take ``q, k`` (B, NH, DHQK), ``v``
(B, NH, DHHV), gates ``i, f`` (B, NH, 1) and the states ``c`` (B, NH, DHQK, DHHV), ``n``
(B, NH, DHQK), ``m`` (B, NH, 1), and return ``(h, (c, n, m))``. ``register_backend()`` adds this
function there as "mlstm_ext", so ``xLSTMLargeConfig(step_kernel="mlstm_ext")`` generates with it.
"""
from typing import Optional, Tuple

import torch

__all__ = ["mlstm_step"]


def mlstm_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    i: torch.Tensor,
    f: torch.Tensor,
    c: Optional[torch.Tensor] = None,
    n: Optional[torch.Tensor] = None,
    m: Optional[torch.Tensor] = None,
    eps: float = 1e-6,
    qk_scale: Optional[float] = None,
    dtype_state: torch.dtype = torch.float32,
    **kwargs,
) -> Tuple[torch.Tensor, Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """One position of the mLSTM on ``torch.ops.mlstm.recurrent_step``: returns ``h`` (B, NH,
    DHHV) in q's dtype and the next states ``(c, n, m)``, m as (B, NH, 1), in ``dtype_state``.
    Absent states are zeros; ``qk_scale`` None means DHQK^-1/2. Extra keyword arguments (other
    kernels' options) are ignored."""
    h, c_next, n_next, m_next = torch.ops.mlstm.recurrent_step(q, k, v, i, f, c, n, m, qk_scale, eps)
    B, NH = m_next.shape[0], m_next.shape[1]
    m_next = m_next.reshape(B, NH, 1)
    return h, (c_next.to(dtype_state), n_next.to(dtype_state), m_next.to(dtype_state))
