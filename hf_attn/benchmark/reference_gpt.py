"""A minimal reference GPT, the yardstick of the ``small`` benchmark section.

The classic decoder of GPT-2 (Radford et al., 2019) at its plainest, written out here so that the
per-step overhead of hf_attn can be compared with a model that has none: pre-norm blocks
(LayerNorm -> attention -> residual, LayerNorm -> MLP -> residual), a learned absolute position
table, a 4x GELU MLP, one fused q/k/v projection and ``F.scaled_dot_product_attention(is_causal=True)``,
and an LM head tied to the token embedding. No masks, caches, input checks or output classes:
``forward(ids, targets) -> (logits, loss)``.

Shapes: B batch, T tokens (<= block_size), C hidden, H heads, D = C / H head dim, V vocabulary.
Classes in dependency order: config -> attention -> MLP -> block -> model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class RefGPTConfig:
    """Size of a :class:`RefGPT`.

    Attributes:
        vocab_size: Token ids (65 for the character-level Shakespeare of the classic baby GPT).
        block_size: Longest sequence; rows of the learned position table.
        num_layers: Decoder blocks.
        num_heads: Attention heads; must divide ``hidden_size``.
        hidden_size: Width C of the residual stream.
        mlp_ratio: MLP width / C (4 in GPT-2).
        bias: Biases in the linear layers and LayerNorms (off here, as in hf_attn).
        dropout: Dropout on embeddings, attention probabilities and residual branches.
    """

    vocab_size: int = 65
    block_size: int = 64
    num_layers: int = 4
    num_heads: int = 4
    hidden_size: int = 128
    mlp_ratio: int = 4
    bias: bool = False
    dropout: float = 0.0

    def __post_init__(self) -> None:
        for name in ("vocab_size", "block_size", "num_layers", "num_heads", "hidden_size", "mlp_ratio"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"RefGPTConfig.{name}={value!r} is invalid: expected an integer >= 1")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"RefGPTConfig.num_heads={self.num_heads} is invalid: must divide "
                             f"hidden_size={self.hidden_size}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"RefGPTConfig.dropout={self.dropout} is invalid: expected a value in [0, 1)")


class RefGPTAttention(nn.Module):
    """Causal multi-head self-attention: one (C, 3C) projection, sdpa's causal flag, one output projection."""

    def __init__(self, config: RefGPTConfig) -> None:
        super().__init__()
        self.num_heads = config.num_heads
        self.dropout = config.dropout
        self.qkv_proj = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=config.bias)
        self.out_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv_proj(x).split(c, dim=2)  # (B, T, C) each
        q = q.view(b, t, self.num_heads, c // self.num_heads).transpose(1, 2)  # (B, H, T, D)
        k = k.view(b, t, self.num_heads, c // self.num_heads).transpose(1, 2)
        v = v.view(b, t, self.num_heads, c // self.num_heads).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0,
                                           is_causal=True)  # (B, H, T, D)
        y = y.transpose(1, 2).contiguous().view(b, t, c)  # heads side by side again
        return self.resid_dropout(self.out_proj(y))


class RefGPTMLP(nn.Module):
    """C -> ratio * C -> GELU -> C."""

    def __init__(self, config: RefGPTConfig) -> None:
        super().__init__()
        self.up_proj = nn.Linear(config.hidden_size, config.mlp_ratio * config.hidden_size, bias=config.bias)
        self.down_proj = nn.Linear(config.mlp_ratio * config.hidden_size, config.hidden_size, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.down_proj(F.gelu(self.up_proj(x))))


class RefGPTBlock(nn.Module):
    """Pre-norm block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, config: RefGPTConfig) -> None:
        super().__init__()
        self.attn_norm = nn.LayerNorm(config.hidden_size, bias=config.bias)
        self.attn = RefGPTAttention(config)
        self.mlp_norm = nn.LayerNorm(config.hidden_size, bias=config.bias)
        self.mlp = RefGPTMLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x))
        return x + self.mlp(self.mlp_norm(x))


class RefGPT(nn.Module):
    """Token + position embeddings, ``num_layers`` blocks, final LayerNorm, LM head tied to the embedding."""

    def __init__(self, config: RefGPTConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.embed_positions = nn.Embedding(config.block_size, config.hidden_size)
        self.dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(RefGPTBlock(config) for _ in range(config.num_layers))
        self.norm = nn.LayerNorm(config.hidden_size, bias=config.bias)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.lm_head.weight = self.embed_tokens.weight  # tied: one (V, C) matrix
        self.apply(self._init_weights)
        # GPT-2: residual projections scaled down by sqrt(2 * layers), the number of sums into the stream
        for name, param in self.named_parameters():
            if name.endswith(("out_proj.weight", "down_proj.weight")):
                nn.init.normal_(param, mean=0.0, std=0.02 / math.sqrt(2 * config.num_layers))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def num_parameters(self) -> int:
        """Parameters, the tied embedding counted once (``parameters()`` yields a shared tensor once)."""
        return sum(p.numel() for p in self.parameters())

    def forward(self, ids: torch.Tensor, targets: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """ids (B, T) -> logits (B, T, V) and, with ``targets`` (B, T) (-100 = ignored), the mean
        cross-entropy of predicting ``targets[:, t]`` from the logits at t."""
        b, t = ids.shape
        if t > self.config.block_size:
            raise ValueError(f"ids: sequence length {t} exceeds block_size={self.config.block_size}")
        positions = torch.arange(t, device=ids.device)  # (T,)
        x = self.dropout(self.embed_tokens(ids) + self.embed_positions(positions))  # (B, T, C)
        for block in self.blocks:
            x = block(x)
        logits = self.lm_head(self.norm(x))  # (B, T, V)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(b * t, -1), targets.reshape(b * t), ignore_index=-100)
        return logits, loss


__all__ = ["RefGPT", "RefGPTConfig"]
