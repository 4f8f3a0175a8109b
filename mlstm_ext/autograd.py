"""Autograd formula of ``torch.ops.mlstm.chunkwise_fw`` (SPEC.md, "Gradients").

Registered with ``torch.library.register_autograd``, so eager autograd, torch.compile (AOTAutograd)
and ``torch.library.opcheck`` all see the same backward. The forward stays the compiled kernel.

The backward (for now in PyTorch; custom kernels may replace it later) recomputes the forward with
``reference.chunkwise_fw_reference`` (every m detached; den too for "normaliser_constant") under
``torch.enable_grad()`` and hands the incoming gradients
of matH, matC_last and vecN_last to ``torch.autograd.grad``:

- Differentiated: matQ, matK, matV, vecI, vecF, matC_initial, vecN_initial. scaM_initial gets a
  zero gradient (m is a stabiliser and carries none); scaM_last, vecN and vecM are marked
  non-differentiable outputs (using them in a loss that is backpropagated raises, rather than
  silently contributing nothing).
- Convention: ``grad_mode="exact"`` differentiates everything but the stabilisers m;
  ``"normaliser_constant"`` also holds the denominator den constant (the gradients of
  mlstm_kernels' custom and Triton backwards).
- Last states: their gradients are taken with m_last held fixed. (C_last, n_last, m_last) is a
  stabilised representation of C_last * exp(m_last), so this is what composes: a next call that
  takes them as initial states holds m_initial fixed too, and the chained gradients equal those
  of one call over the whole sequence (tests/test_autograd.py::test_chained_calls_match_one_call).
- Compute dtype: float32 (float64 for float64 inputs); the gradients come back in each input's
  dtype.

Memory: the forward saves only its inputs (no outputs, no states). The backward recomputes, for
all (batch, head) pairs and chunks at once (a Python loop only over the chunks of the state
recurrence), in the compute dtype; the graph of that recompute keeps (measured with saved-tensor
hooks, tests/test_autograd.py::test_backward_saved_memory)

    B*NH * ( S*(4*L + 3*DHQK + 3*DHHV + ~25) + (2*NC + 1)*DHQK*DHHV )   values

that is four (B, NH, NC, L, L) gate/score/weight matrices, compute-dtype q, k (twice: k and the
gated keys) and v-sized tensors (v, the numerator, q C), and the NC+1 chunk-border states twice
(the loop's C_k and their stacked copy). Running backward through it adds the gradients and
their temporaries; the peak of all tensors alive during the backward (measured on the CPU by
tracking every allocation, tests/test_autograd.py::test_backward_peak_memory) stays under

    B*NH * ( S*(6*L + 6*DHQK + 8*DHHV + 200) + 3*(NC + 1)*DHQK*DHHV )   values

(float32: 4 bytes each), e.g. B=1, NH=8, S=8192, DHQK=256, DHHV=512, L=64 (xLSTM-7B-like): at
most 3.3 GB, all freed when the backward of this op returns. The states term dominates for large
head dims; a larger chunk_size trades it for the L term.
"""
from typing import Any, Tuple

import torch

from .ops import _compute_dtype
from .reference import chunkwise_fw_reference

__all__ = []

# The differentiable inputs of chunkwise_fw, in schema order (the rest are scalars).
_N_TENSOR_INPUTS = 8


def _setup_context(ctx, inputs: Tuple[Any, ...], output: Tuple[torch.Tensor, ...]) -> None:
    (matQ, matK, matV, vecI, vecF, matC_initial, vecN_initial, scaM_initial,
     qk_scale, chunk_size, eps, grad_mode) = inputs
    # Only the inputs: the backward recomputes states and gate matrices.
    ctx.save_for_backward(matQ, matK, matV, vecI, vecF, matC_initial, vecN_initial, scaM_initial)
    ctx.qk_scale, ctx.chunk_size, ctx.eps, ctx.grad_mode = qk_scale, chunk_size, eps, grad_mode
    # scaM_last, vecN, vecM: stabiliser and normaliser outputs, no gradient flows through them.
    ctx.mark_non_differentiable(output[3], output[4], output[5])


def _backward(ctx, dH, dC_last, dN_last, _dM_last, _dvecN, _dvecM):
    saved = ctx.saved_tensors
    matQ = saved[0]
    # needs_input_grad covers the arguments as passed: trailing defaults (chunk_size=64, ...) may
    # be left out of it, so pad.
    needs = (tuple(ctx.needs_input_grad) + (False,) * _N_TENSOR_INPUTS)[:_N_TENSOR_INPUTS]
    dt = _compute_dtype(matQ)

    # Recompute in the compute dtype, with fresh leaves for the inputs whose gradient is wanted.
    # scaM_initial (index 7) is a stabiliser: never a leaf.
    leaves = []
    args = []
    for idx, t in enumerate(saved):
        if t is None:
            args.append(None)
            continue
        x = t.detach().to(dt)
        if needs[idx] and idx != 7:
            x.requires_grad_(True)
            leaves.append((idx, x))
        args.append(x)

    grads: list = [None] * _N_TENSOR_INPUTS
    if leaves:
        # Autocast off: the recompute is the compute-dtype reference, whatever the caller's context.
        with torch.enable_grad(), torch.autocast(matQ.device.type, enabled=False):
            matH, matC_last, vecN_last = chunkwise_fw_reference(
                *args, qk_scale=ctx.qk_scale, chunk_size=ctx.chunk_size, eps=ctx.eps,
                compute_dtype=dt, detach_m=True,
                detach_den=ctx.grad_mode == "normaliser_constant")[:3]
            outs, douts = [], []
            for o, d in ((matH, dH), (matC_last, dC_last), (vecN_last, dN_last)):
                if d is not None:
                    outs.append(o)
                    douts.append(d.to(o.dtype))
            if outs:
                got = torch.autograd.grad(outs, [x for _, x in leaves], douts, allow_unused=True)
            else:
                got = [None] * len(leaves)
        for (idx, x), g in zip(leaves, got):
            # An input that reaches no differentiated output (e.g. q when only the last states are
            # used) has a zero gradient, not None.
            grads[idx] = torch.zeros_like(saved[idx]) if g is None else g.to(saved[idx].dtype)
    for idx in range(_N_TENSOR_INPUTS):
        if needs[idx] and grads[idx] is None:
            grads[idx] = torch.zeros_like(saved[idx])
    # qk_scale, chunk_size, eps, grad_mode: no gradient.
    return (*grads, None, None, None, None)


torch.library.register_autograd("mlstm::chunkwise_fw", _backward, setup_context=_setup_context)
