"""The size every benchmarked model shares, ours and the Hugging Face references alike."""

from __future__ import annotations

from dataclasses import dataclass

import torch

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _check_sizes(spec: object, names: tuple[str, ...]) -> None:
    """Raise ``ValueError`` naming the field of ``spec`` that is not an integer >= 1, or ``num_heads``
    when it does not divide ``hidden_size``."""
    kind = type(spec).__name__
    for name in names:
        value = getattr(spec, name)
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{kind}.{name}={value!r} is invalid: expected an integer >= 1")
    if spec.hidden_size % spec.num_heads:
        raise ValueError(f"{kind}.num_heads={spec.num_heads} is invalid: must divide hidden_size={spec.hidden_size}")


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
        _check_sizes(self, ("hidden_size", "num_heads", "num_layers", "intermediate_size", "vocab_size", "window",
                            "rank", "max_positions"))


@dataclass(frozen=True)
class SmallSpec:
    """Size of the ``small`` section: the classic character-level baby GPT, where per-step Python
    overhead is a visible share of a training step.

    Attributes:
        num_layers, num_heads, hidden_size: Every model of the section (head_dim = hidden / heads).
        block_size: Sequence length of every step; also the rows of the learned position tables.
        batch: Rows per step.
        vocab_size: Token ids (65: character-level Shakespeare).
        window: Sliding window of the ``ours_local`` case (< block_size: the windowed path); the
            ``ours_local_full`` case uses ``block_size`` (n <= w: plain causal attention).
        threads: torch intra-op threads while the section runs (restored afterwards).
    """

    num_layers: int = 4
    num_heads: int = 4
    hidden_size: int = 128
    block_size: int = 64
    batch: int = 12
    vocab_size: int = 65
    window: int = 32
    threads: int = 1

    @property
    def parity_intermediate_size(self) -> int:
        """SwiGLU width whose three (C, I) matrices hold as many weights as the reference's two
        (C, 4C) GELU matrices: 3 C I = 8 C^2, so I = round(8 C / 3) (341 for C = 128)."""
        return round(8 * self.hidden_size / 3)

    @property
    def intermediate_size(self) -> int:
        """SwiGLU width of our cases: the parity width rounded up to a multiple of 8 (344 for C = 128),
        a width the BLAS kernels tile evenly (and at least the reference's MLP weights); the
        ``ours_eager_parity`` case keeps the odd parity width to show what it costs."""
        return -(-self.parity_intermediate_size // 8) * 8

    def validate(self) -> None:
        """Raise ``ValueError`` naming the field when the sizes cannot build every model."""
        _check_sizes(self, ("num_layers", "num_heads", "hidden_size", "block_size", "batch", "vocab_size", "window",
                            "threads"))
