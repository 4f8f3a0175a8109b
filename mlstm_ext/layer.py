"""A small mLSTM layer built on ``torch.ops.mlstm.chunkwise_fw``, for TorchScript, torch.export
and AOTInductor deployment (see examples/cpp/).

Plain PyTorch does the projections; the compiled forward op does the mLSTM (chunk-border states,
then the H step). The whole module scripts with ``torch.jit.script`` (the scripted graph calls
``mlstm::chunkwise_fw`` by name, so a C++ program that loaded the op library can run it) and
exports with ``torch.export.export`` (the fake kernels in ``mlstm_ext/ops.py`` give the op's
output shapes). The op is differentiable, so the layer also trains.
"""
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn


class MLSTMLayer(nn.Module):
    """mLSTM cell over a sequence: x (B, S, d_model) -> (B, S, d_model).

    Per head: q, k, v projections, scalar input and forget gate pre-activations (one each per
    head and position), the chunkwise mLSTM (``torch.ops.mlstm.chunkwise_fw``),
    then an output projection of the concatenated heads. S need not be a multiple of
    ``chunk_size``: the sequence is zero-padded at the end and the padding cut off (the mLSTM is
    causal, so padding changes no real output).

    ``d_model``, ``num_heads``, ``chunk_size``, ``qk_dim``, ``v_dim`` stay plain int attributes, so
    they survive scripting and a C++ program can read them (``module.attr("d_model")``).
    """

    def __init__(
        self,
        d_model: int,
        num_heads: int = 4,
        chunk_size: int = 64,
        qk_dim: Optional[int] = None,
        v_dim: Optional[int] = None,
    ) -> None:
        super().__init__()
        if chunk_size <= 0 or chunk_size & (chunk_size - 1):
            raise ValueError(f"chunk_size must be a power of 2, got {chunk_size}")
        self.d_model = d_model
        self.num_heads = num_heads
        self.chunk_size = chunk_size
        self.qk_dim = qk_dim if qk_dim is not None else d_model // num_heads
        self.v_dim = v_dim if v_dim is not None else d_model // num_heads
        self.q_proj = nn.Linear(d_model, num_heads * self.qk_dim, bias=False)
        self.k_proj = nn.Linear(d_model, num_heads * self.qk_dim, bias=False)
        self.v_proj = nn.Linear(d_model, num_heads * self.v_dim, bias=False)
        self.igate = nn.Linear(d_model, num_heads)
        self.fgate = nn.Linear(d_model, num_heads)
        self.out_proj = nn.Linear(num_heads * self.v_dim, d_model, bias=False)
        with torch.no_grad():
            # xLSTM's initialisation: forget gates start mostly open, input gates small.
            self.fgate.bias.copy_(torch.linspace(3.0, 6.0, num_heads))
            self.igate.bias.fill_(-10.0 / num_heads)
            self.igate.weight.mul_(0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, S, _ = x.shape
        NH, L = self.num_heads, self.chunk_size
        pad = (L - S % L) % L
        if pad > 0:
            x = F.pad(x, [0, 0, 0, pad])  # zeros after the last position
        SP = S + pad

        # (B, SP, NH * D) -> (B, NH, SP, D)
        q = self.q_proj(x).view(B, SP, NH, self.qk_dim).transpose(1, 2).contiguous()
        k = self.k_proj(x).view(B, SP, NH, self.qk_dim).transpose(1, 2).contiguous()
        v = self.v_proj(x).view(B, SP, NH, self.v_dim).transpose(1, 2).contiguous()
        # gate pre-activations, (B, SP, NH) -> (B, NH, SP), float32 as the op wants
        i = self.igate(x).transpose(1, 2).float().contiguous()
        f = self.fgate(x).transpose(1, 2).float().contiguous()

        matH = torch.ops.mlstm.chunkwise_fw(q, k, v, i, f, chunk_size=L)[0]
        h = matH.transpose(1, 2).reshape(B, SP, NH * self.v_dim)[:, :S]
        return self.out_proj(h)

    def extra_repr(self) -> str:
        return (
            f"d_model={self.d_model}, num_heads={self.num_heads}, chunk_size={self.chunk_size}, "
            f"qk_dim={self.qk_dim}, v_dim={self.v_dim}"
        )
