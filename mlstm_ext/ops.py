"""The library's ops, each with its Python wrapper and its fake kernel side by side.

The op schemas in ``csrc/ops.cpp`` are the one source of every signature: the wrappers take their
parameter names and defaults from them, and the fake kernels take ``*args, **kwargs``.

A fake kernel (what torch.compile and torch.export trace with) does two things:
1. runs the op's C++ validation, through its Meta kernel, on meta tensors of the example sizes,
   so that a traced program rejects exactly what eager rejects, with the same message;
2. returns outputs whose sizes are expressions of the (possibly symbolic) input sizes.
Fake tensors have no data, so a fake kernel can neither fail on values nor produce them.
"""
import functools
import inspect
from typing import Any, Callable, Dict, Sequence

import torch
from torch._subclasses.fake_tensor import unset_fake_temporarily

__all__ = ["parallel_fw_hintra", "recurrent_fw_states", "chunkwise_fw", "chunkwise_bw", "recurrent_step"]


# ---------------------------------------------------------------------------------------------
# Shared machinery


@functools.lru_cache(maxsize=None)
def _signature(op: torch._ops.OpOverload) -> inspect.Signature:
    params = []
    for a in op._schema.arguments:
        default = a.default_value if a.has_default_value() else inspect.Parameter.empty
        params.append(inspect.Parameter(a.name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=default))
    return inspect.Signature(params)


def _wrapper(op: torch._ops.OpOverload, doc: str) -> Callable:
    """A plain function calling ``op``, with the schema's signature (for help() and inspect)."""
    def call(*args, **kwargs):
        return op(*args, **kwargs)

    call.__name__ = call.__qualname__ = op._schema.name.split("::")[-1]
    call.__signature__ = _signature(op)
    call.__doc__ = doc
    return call


class _NoHint(Exception):
    """A size without a concrete example value (an unbacked symbol): nothing to validate with."""


def _concrete(x) -> int:
    if isinstance(x, int):
        return x
    hint = getattr(getattr(x, "node", None), "hint", None)
    if hint is None:
        raise _NoHint()
    return int(hint)


def _as_meta(t: torch.Tensor) -> torch.Tensor:
    return torch.empty_strided([_concrete(s) for s in t.shape], [_concrete(s) for s in t.stride()],
                               dtype=t.dtype, device="meta")


def _validate(op: torch._ops.OpOverload, args: Sequence[Any], kwargs: Dict[str, Any]) -> None:
    """The op's own validation (csrc/validate.cpp) on meta copies of the inputs, through the
    Meta kernel of its "_check_" twin (csrc/ops.cpp)."""
    name = op._schema.name.split("::")[-1]
    names = [a.name for a in op._schema.arguments]
    bound = dict(zip(names, args), **kwargs)
    tensors = [(n, t) for n, t in bound.items() if isinstance(t, torch.Tensor)]
    # Devices first: the meta copies below no longer carry them.
    first_name, first = tensors[0]
    for arg, t in tensors[1:]:
        torch._check(t.device == first.device,
                     lambda: f"{name}: {arg} must be on the same device "
                     f"as {first_name} ({first.device}), got {t.device}")
    with unset_fake_temporarily():
        try:
            meta = {n: _as_meta(t) if isinstance(t, torch.Tensor) else t for n, t in bound.items()}
        except _NoHint:
            return
        getattr(torch.ops.mlstm, "_check_" + name).default(**meta)


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _bind(op: torch._ops.OpOverload, args, kwargs) -> Dict[str, Any]:
    """Every argument by name, defaults filled in."""
    b = _signature(op).bind(*args, **kwargs)
    b.apply_defaults()
    return b.arguments


def _checked_args(name: str, args, kwargs) -> Dict[str, Any]:
    """A fake kernel's start: the op's validation (_validate), then its arguments by name."""
    op = getattr(torch.ops.mlstm, name).default
    _validate(op, args, kwargs)
    return _bind(op, args, kwargs)


# ---------------------------------------------------------------------------------------------
# parallel_fw_hintra: the H step

parallel_fw_hintra = _wrapper(torch.ops.mlstm.parallel_fw_hintra.default, """\
The intra-chunk H step of the chunkwise mLSTM forward (SPEC.md).

Same signature and defaults as mlstm_kernels' ``mlstm_chunkwise__parallel_fw_Hintra``.
Returns ``(matH (B, NH, S, DHHV) in matQ's dtype, vecN (B, NH, S), vecM (B, NH, S))``, the last
two in ``output_dtype`` (float32 by default).""")


@torch.library.register_fake("mlstm::parallel_fw_hintra")
def _parallel_fw_hintra_fake(*args, **kwargs):
    a = _checked_args("parallel_fw_hintra", args, kwargs)
    matQ, matV = a["matQ"], a["matV"]
    B, NH, S, _ = matQ.shape
    out = a["output_dtype"] or torch.float32
    return (matQ.new_empty((B, NH, S, matV.shape[-1])), matQ.new_empty((B, NH, S), dtype=out),
            matQ.new_empty((B, NH, S), dtype=out))


# ---------------------------------------------------------------------------------------------
# recurrent_fw_states: the chunk-border states

recurrent_fw_states = _wrapper(torch.ops.mlstm.recurrent_fw_states.default, """\
The chunk-border memory states of the chunkwise mLSTM (SPEC.md, "How the states are made").

Returns ``(matC_all (B, NH, (NC+1)*DHQK, DHHV), vecN_all (B, NH, (NC+1)*DHQK), scaM_all
(B, NH, NC+1))`` in float32 (float64 for float64 inputs): slot 0 is the initial state (zeros when
not given), slot k the state entering chunk k, slot NC the state after the last chunk; exactly
what ``parallel_fw_hintra`` reads. ``scaM_initial`` may be (B, NH) or (B, NH, 1).""")


@torch.library.register_fake("mlstm::recurrent_fw_states")
def _recurrent_fw_states_fake(*args, **kwargs):
    a = _checked_args("recurrent_fw_states", args, kwargs)
    matK, matV = a["matK"], a["matV"]
    B, NH, S, DHQK = matK.shape
    slots = S // a["chunk_size"] + 1
    dt = _compute_dtype(matK)
    return (matK.new_empty((B, NH, slots * DHQK, matV.shape[-1]), dtype=dt),
            matK.new_empty((B, NH, slots * DHQK), dtype=dt), matK.new_empty((B, NH, slots), dtype=dt))


# ---------------------------------------------------------------------------------------------
# chunkwise_fw: the whole forward

chunkwise_fw = _wrapper(torch.ops.mlstm.chunkwise_fw.default, """\
The whole chunkwise mLSTM forward: the recurrent step, then the H step (SPEC.md, "The whole
forward").

Returns ``(matH (B, NH, S, DHHV) in matQ's dtype, matC_last (B, NH, DHQK, DHHV), vecN_last
(B, NH, DHQK), scaM_last (B, NH), vecN (B, NH, S), vecM (B, NH, S))``: the last five in float32
(float64 for float64 inputs); vecN and vecM are the H step's normaliser and max state.
``grad_mode`` picks the backward's convention (SPEC.md, "Gradients"): ``"exact"`` (default) or
``"normaliser_constant"`` (the gradients of mlstm_kernels' custom and Triton backwards); the
forward is the same for both. ``vecN_signed=True`` makes vecN the signed sum nsum (SPEC.md step 6,
before ``|.|`` and the floor; den = max(|vecN|, exp(-vecM))); pass the same flag to
``chunkwise_bw``, which then reads nsum's sign instead of forming nsum again (``mlstm_chunkwise``
does this).""")


@torch.library.register_fake("mlstm::chunkwise_fw")
def _chunkwise_fw_fake(*args, **kwargs):
    a = _checked_args("chunkwise_fw", args, kwargs)
    matQ, matV = a["matQ"], a["matV"]
    B, NH, S, DHQK = matQ.shape
    DHHV = matV.shape[-1]
    dt = _compute_dtype(matQ)
    return (matQ.new_empty((B, NH, S, DHHV)), matQ.new_empty((B, NH, DHQK, DHHV), dtype=dt),
            matQ.new_empty((B, NH, DHQK), dtype=dt), matQ.new_empty((B, NH), dtype=dt),
            matQ.new_empty((B, NH, S), dtype=dt), matQ.new_empty((B, NH, S), dtype=dt))


# ---------------------------------------------------------------------------------------------
# chunkwise_bw: the backward of the whole forward

chunkwise_bw = _wrapper(torch.ops.mlstm.chunkwise_bw.default, """\
The backward of ``chunkwise_fw`` (SPEC.md, "Gradients" and "The backward"); autograd calls it
(mlstm_ext/autograd.py), and it can be called directly.

Takes the forward's inputs, its outputs ``matH``, ``vecN``, ``vecM``, the incoming gradients of
matH, matC_last and vecN_last (None for zero) and the forward's scalars (``vecN_signed`` as given
to ``chunkwise_fw``). Returns the gradients
``(dQ, dK, dV, dI, dF, dC_initial, dN_initial)``: the first three in matQ's dtype, the rest in
float32 (float64 for float64 inputs); the initial states' are those of zero states when none
were given.""")


@torch.library.register_fake("mlstm::chunkwise_bw")
def _chunkwise_bw_fake(*args, **kwargs):
    a = _checked_args("chunkwise_bw", args, kwargs)
    matQ, matV = a["matQ"], a["matV"]
    B, NH, S, DHQK = matQ.shape
    DHHV = matV.shape[-1]
    dt = _compute_dtype(matQ)
    return (matQ.new_empty((B, NH, S, DHQK)), matQ.new_empty((B, NH, S, DHQK)),
            matQ.new_empty((B, NH, S, DHHV)), matQ.new_empty((B, NH, S), dtype=dt),
            matQ.new_empty((B, NH, S), dtype=dt), matQ.new_empty((B, NH, DHQK, DHHV), dtype=dt),
            matQ.new_empty((B, NH, DHQK), dtype=dt))


# ---------------------------------------------------------------------------------------------
# recurrent_step: one position, for generation. No fake kernel: the op is a composite
# (CompositeImplicitAutograd, csrc/step.cpp) that torch.compile and torch.export trace through (its
# checks work on symbolic sizes); the fused-kernel op it calls when no gradient is wanted,
# _recurrent_step_fused, has a C++ Meta kernel.

recurrent_step = _wrapper(torch.ops.mlstm.recurrent_step.default, """\
One position of the mLSTM recurrence (SPEC.md, "The inference step"): the states entering it, one
token's ``vecQ``, ``vecK`` (B, NH, DHQK), ``vecV`` (B, NH, DHHV) and gate pre-activations ``scaI``,
``scaF`` ((B, NH) or (B, NH, 1)); absent states are zeros. Returns ``(vecH (B, NH, DHHV) in vecQ's
dtype, matC_next (B, NH, DHQK, DHHV), vecN_next (B, NH, DHQK), scaM_next)``, the states in
float32 (float64 for float64 inputs), scaM_next shaped like ``scaM`` ((B, NH) when absent).
vecH is the H step at chunk_size 1, so steps continue a ``chunkwise_fw`` prefill exactly.
Differentiable (autograd through its ATen ops; the stabilisers are constants); without gradients
it runs one fused kernel on the CPU and on CUDA.""")
