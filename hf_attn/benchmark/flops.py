"""Model FLOP counting for training-throughput MFU (model FLOPs utilisation).

Convention (Kaplan et al. 2020; Chowdhery et al., "PaLM", 2022, appendix B): a training step costs
``6 * N`` FLOPs per token for the weight matmuls (2 forward + 4 backward per multiply-add), plus an
attention term ``12 * L * d_attn * c`` per token, where ``d_attn = heads * head_dim`` and ``c`` is the
number of keys each query is scored against: the sequence length for full attention (PaLM's
convention, no discount for the causal mask), the window for sliding-window attention and the rank
``k`` for low-rank attention. ``N`` counts only the weights that take part in a matmul (linear
layers and the LM head, each shared weight once): norm gains, biases and position tables are
excluded, and tied input embeddings are a lookup whose matmul is the LM head's.
MFU = model FLOPs per second / the machine's measured matmul peak (``measure.matmul_peak_flops``).
Overheads (recomputation, masking, padding) are not model FLOPs, so they lower MFU, as they should.
"""

from __future__ import annotations

import torch
from torch import nn


def matmul_param_count(model: nn.Module) -> int:
    """Parameters used in matmuls: 2-D weights of linear layers (GPT-2's ``Conv1D`` too) and the LM head.

    A weight shared by several modules (tied embeddings) counts once; an embedding table that is not
    also the LM head does no matmul and is excluded.
    """
    weights: dict[int, torch.Tensor] = {}
    for module in model.modules():
        weight = getattr(module, "weight", None)
        is_linear = isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"
        if is_linear and isinstance(weight, torch.Tensor) and weight.dim() == 2:
            weights[id(weight)] = weight
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None:
        weights[id(head.weight)] = head.weight
    return sum(w.numel() for w in weights.values())


def training_flops_per_token(n_params: int, num_layers: int, attn_dim: int, context: int) -> float:
    """``6 * N + 12 * L * d_attn * c`` FLOPs per trained token (see the module docstring)."""
    return 6.0 * n_params + 12.0 * num_layers * attn_dim * context


def attention_context(mode: str, seq_len: int, window: int, rank: int) -> int:
    """Keys scored per query, ``c``, for a mode at a sequence length (see the module docstring).

    ``mode`` is an hf_attn attention mode; references with full attention use ``"eager"`` and
    sliding-window references ``"local"``.
    """
    if mode == "local":
        return min(window, seq_len)
    if mode == "lowrank":
        return min(rank, seq_len)
    return seq_len
