"""The size every benchmarked model shares, ours and the Hugging Face references alike."""

from __future__ import annotations

from dataclasses import dataclass

import torch

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class BenchSpec:
    """Shared model size and attention settings.

    Attributes:
        hidden_size: Width of the residual stream (every model).
        num_heads: Attention heads (every model; multi-head, no grouped KV).
        num_layers: Decoder blocks of the whole-model benchmarks.
        intermediate_size: MLP width (SwiGLU for ours/Llama/Mistral, GELU ``n_inner`` for GPT-2).
        vocab_size: Token ids; kept small so that the LM head does not drown the attention cost.
        window: Sliding window of ``local`` mode and of Mistral.
        rank: ``k`` of ``lowrank`` mode.
        max_positions: Longest sequence any model must accept (absolute position tables).
        dtype: Parameter and activation dtype.
    """

    hidden_size: int = 256
    num_heads: int = 4
    num_layers: int = 2
    intermediate_size: int = 1024
    vocab_size: int = 4096
    window: int = 256
    rank: int = 256
    max_positions: int = 16384
    dtype: torch.dtype = torch.float32

    @property
    def head_dim(self) -> int:
        """Channels per head."""
        return self.hidden_size // self.num_heads

    def validate(self) -> None:
        """Raise ``ValueError`` naming the field when the sizes cannot build every model."""
        for name in ("hidden_size", "num_heads", "num_layers", "intermediate_size", "vocab_size", "window",
                     "rank", "max_positions"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"BenchSpec.{name}={value!r} is invalid: expected an integer >= 1")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"BenchSpec.num_heads={self.num_heads} is invalid: must divide "
                             f"hidden_size={self.hidden_size}")
