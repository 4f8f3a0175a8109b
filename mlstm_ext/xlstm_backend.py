"""A drop-in chunkwise kernel for the ``xlstm`` package (through ``mlstm_kernels``' registry).

``xlstm``'s ``xLSTMLarge`` builds an ``mlstm_kernels.torch.backend_module.mLSTMBackend`` per layer,
which finds its chunkwise kernel with ``mlstm_kernels.torch.get_mlstm_kernel("chunkwise--NAME")``:
a lookup of NAME in the dict ``mlstm_kernels.torch.chunkwise.registry``. ``register_backend()``
adds our kernels there, so that::

    import mlstm_ext
    mlstm_ext.register_backend()
    cfg = xLSTMLargeConfig(..., chunkwise_kernel="chunkwise--mlstm_ext", step_kernel="mlstm_ext")

runs every mLSTM layer on ``torch.ops.mlstm.chunkwise_fw``:

- mode "train": the backend calls the kernel with S a multiple of chunk_size (and
  ``autocast_kernel_dtype``, ``eps``, ``chunk_size`` from the config);
- mode "train_with_padding" and "inference": mlstm_kernels' wrappers pad the sequence to a multiple
  of chunk_size themselves (f = +25, i = -25 on the padding, so the states barely move) and call
  the kernel; in "inference", a sequence of length 1 goes to the step kernel: ours with
  ``step_kernel="mlstm_ext"`` (``mlstm_ext.mlstm_step`` on ``torch.ops.mlstm.recurrent_step``, the
  H step at chunk_size 1, so generation continues the chunkwise prefill exactly), or
  mlstm_kernels' "native" / "triton".

Registered names: chunkwise "mlstm_ext" (exact gradients, SPEC.md "Gradients") and
"mlstm_ext_custbw" (the normaliser-constant convention, the gradients of "native_custbw" and
"triton_xl_chunk"); step "mlstm_ext".

``xlstm`` and ``mlstm_kernels`` are optional: importing ``mlstm_ext`` never imports them; only
``register_backend()`` does. Install them without letting pip touch torch::

    pip install --no-deps xlstm==2.0.6 mlstm-kernels==2.0.6 einops==0.8.2
"""
from typing import Dict

import torch

from .chunkwise import mlstm_chunkwise
from .step import mlstm_step

__all__ = ["register_backend", "mlstm_chunkwise__mlstm_ext", "mlstm_chunkwise__mlstm_ext_custbw",
           "BACKEND_NAME", "BACKEND_NAME_CUSTBW"]

BACKEND_NAME = "mlstm_ext"
BACKEND_NAME_CUSTBW = "mlstm_ext_custbw"


def mlstm_chunkwise__mlstm_ext(q, k, v, i, f, c_initial=None, n_initial=None, m_initial=None,
                               return_last_states=False, eps=1e-6, chunk_size=64,
                               autocast_kernel_dtype=torch.bfloat16, **kwargs):
    """``mlstm_chunkwise`` with exact gradients, under the registry's calling convention."""
    return mlstm_chunkwise(q, k, v, i, f, c_initial, n_initial, m_initial, return_last_states, eps,
                           chunk_size, autocast_kernel_dtype, grad_mode="exact", **kwargs)


def mlstm_chunkwise__mlstm_ext_custbw(q, k, v, i, f, c_initial=None, n_initial=None, m_initial=None,
                                      return_last_states=False, eps=1e-6, chunk_size=64,
                                      autocast_kernel_dtype=torch.bfloat16, **kwargs):
    """``mlstm_chunkwise`` with the normaliser-constant gradients (as mlstm_kernels' custom
    backwards), under the registry's calling convention."""
    return mlstm_chunkwise(q, k, v, i, f, c_initial, n_initial, m_initial, return_last_states, eps,
                           chunk_size, autocast_kernel_dtype, grad_mode="normaliser_constant", **kwargs)


def register_backend() -> Dict[str, str]:
    """Add "mlstm_ext" and "mlstm_ext_custbw" to ``mlstm_kernels.torch.chunkwise.registry`` and
    "mlstm_ext" (``mlstm_step``) to ``mlstm_kernels.torch.recurrent.registry_step`` (idempotent).
    Returns the kernel names to put in ``chunkwise_kernel`` and ``step_kernel``:
    ``{"exact": "chunkwise--mlstm_ext", "normaliser_constant": "chunkwise--mlstm_ext_custbw",
    "step": "mlstm_ext"}``.

    Raises ImportError when mlstm_kernels (which xlstm uses to find its kernels) is not installed.
    """
    try:
        from mlstm_kernels.torch.chunkwise import registry
        from mlstm_kernels.torch.recurrent import registry_step
    except ImportError as e:
        raise ImportError(
            "mlstm_ext.register_backend() needs the optional package mlstm-kernels (xlstm finds its "
            "chunkwise kernels through mlstm_kernels' registry), and xlstm to run xLSTMLarge. Install "
            "them without touching torch: pip install --no-deps xlstm==2.0.6 mlstm-kernels==2.0.6 "
            f"einops==0.8.2  (import failed: {e})"
        ) from e
    registry[BACKEND_NAME] = mlstm_chunkwise__mlstm_ext
    registry[BACKEND_NAME_CUSTBW] = mlstm_chunkwise__mlstm_ext_custbw
    registry_step[BACKEND_NAME] = mlstm_step
    return {"exact": "chunkwise--" + BACKEND_NAME, "normaliser_constant": "chunkwise--" + BACKEND_NAME_CUSTBW,
            "step": BACKEND_NAME}
