"""Autograd formula of ``torch.ops.mlstm.chunkwise_fw`` (SPEC.md, "Gradients").

Registered as ``torch.library.register_autograd`` does it (one Python kernel on the Autograd
key), so eager autograd, torch.compile (AOTAutograd) and ``torch.library.opcheck`` all see the same
backward: the compiled op ``torch.ops.mlstm.chunkwise_bw`` (csrc/backward.cpp), on the device of
the inputs. The kernel first refuses forward-mode tangents (reverse mode only).

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
- The gradients come back in each input's dtype.

Memory: the forward saves its inputs and three of its outputs (matH, the same tensor the caller
holds; vecN and vecM, S floats per head each), never the chunk-border states. The backward
recomputes the states and works through the (batch, head) pairs in groups whose workspace stays
under 512 MiB (csrc/backward.cpp), so its peak is the gradients it returns plus at most that
(plus one pair's workspace when a single pair needs more).
"""
from typing import Any, Tuple

import torch

__all__ = []

# The differentiable inputs of chunkwise_fw, in schema order (the rest are scalars).
_N_TENSOR_INPUTS = 8


def _setup_context(ctx, inputs: Tuple[Any, ...], output: Tuple[torch.Tensor, ...]) -> None:
    (matQ, matK, matV, vecI, vecF, matC_initial, vecN_initial, scaM_initial,
     qk_scale, chunk_size, eps, grad_mode, vecN_signed) = inputs
    matH, vecN, vecM = output[0], output[4], output[5]
    ctx.save_for_backward(matQ, matK, matV, vecI, vecF, matC_initial, vecN_initial, scaM_initial,
                          matH, vecN, vecM)
    ctx.qk_scale, ctx.chunk_size, ctx.eps, ctx.grad_mode = qk_scale, chunk_size, eps, grad_mode
    ctx.vecN_signed = vecN_signed  # the backward reads vecN as the forward wrote it
    # scaM_last, vecN, vecM: stabiliser and normaliser outputs, no gradient flows through them.
    ctx.mark_non_differentiable(output[3], output[4], output[5])


def _backward(ctx, dH, dC_last, dN_last, _dM_last, _dvecN, _dvecM):
    saved = ctx.saved_tensors
    inputs = saved[:_N_TENSOR_INPUTS]
    # needs_input_grad covers the arguments as passed: trailing defaults (chunk_size=64, ...) may
    # be left out of it, so pad.
    needs = (tuple(ctx.needs_input_grad) + (False,) * _N_TENSOR_INPUTS)[:_N_TENSOR_INPUTS]
    grads: list = [None] * _N_TENSOR_INPUTS
    if any(needs[:7]):
        got = torch.ops.mlstm.chunkwise_bw(
            *inputs, *saved[_N_TENSOR_INPUTS:], dH, dC_last, dN_last, ctx.qk_scale, ctx.chunk_size,
            ctx.eps, ctx.grad_mode, ctx.vecN_signed)
        for idx in range(7):
            if needs[idx]:
                grads[idx] = got[idx].to(inputs[idx].dtype)
    if needs[7]:  # scaM_initial: a stabiliser, zero gradient by convention
        grads[7] = torch.zeros_like(inputs[7])
    # qk_scale, chunk_size, eps, grad_mode, vecN_signed: no gradient.
    return (*grads, None, None, None, None, None)


_TENSOR_NAMES = ("matQ", "matK", "matV", "vecI", "vecF", "matC_initial", "vecN_initial", "scaM_initial")


def _refuse_tangents(args) -> None:
    """Forward-mode AD (torch.func.jvp, torch.autograd.forward_ad): the formula here is reverse
    mode only, and without this check the op would return zero tangents silently."""
    names = [n for n, a in zip(_TENSOR_NAMES, args)
             if isinstance(a, torch.Tensor) and torch._VF._unpack_dual(a, 0)[1] is not None]
    if names:
        raise RuntimeError(
            f"chunkwise_fw: forward-mode AD (torch.func.jvp, torch.autograd.forward_ad) is not "
            f"supported, but {', '.join(names)} carry a tangent. Use reverse mode (backward(), "
            f"torch.func.vjp or torch.func.grad)")


# What torch.library.register_autograd registers, behind the tangent check (its own kernel lets
# forward-mode tangents through as zeros). Older or newer torch without these internals: the plain
# registration.
try:
    _kernel = torch._library.autograd.make_autograd_impl(
        torch.ops.mlstm.chunkwise_fw.default, torch._library.autograd.Info(_backward, _setup_context))

    def _autograd_kernel(keyset, *args, **kwargs):
        _refuse_tangents(args)
        return _kernel(keyset, *args, **kwargs)

    _lib = torch.library.Library("mlstm", "IMPL")
    _lib.impl("chunkwise_fw", _autograd_kernel, "Autograd", with_keyset=True)
except (AttributeError, TypeError):
    torch.library.register_autograd("mlstm::chunkwise_fw", _backward, setup_context=_setup_context)
