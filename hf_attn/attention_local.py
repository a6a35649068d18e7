"""Local (sliding-window) attention, mode ``local``.

Papers: Beltagy et al., "Longformer" (2020); Jiang et al., "Mistral 7B" (2023).
Math: ``out_i = softmax_j(q_i k_j * scaling) v_j`` over ``i - w < j <= i`` (causal) or
``|i - j| < w`` (bidirectional), w = ``config.sliding_window``.
Blocking: queries are cut into blocks of w; query block b only needs key blocks b-1 and b
(and b+1 when bidirectional), gathered with ``unfold`` as a strided view, so the score tensor is
(B, H, n/w, w, 2w): O(n * w) time and memory. No n x n score matrix or mask exists anywhere,
padding masks included: the padding mask is unfolded the same way, (B, n/w, 2w).
Shapes: query (B, H, Lq, D); key, value (B, Hkv, Lk, D) where the queries are the last Lq of the
Lk keys (Lk - Lq cached keys come first); output (B, Lq, H, D).
Limits: information travels at most w - 1 positions per layer (receptive field L * (w - 1)).
During generation the cache keeps only the last w - 1 keys and values per layer.
"""

from __future__ import annotations

from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import nn


def _span_blocks(is_causal: bool) -> int:
    """Key blocks each query block sees: the previous and its own (+ the next when bidirectional)."""
    return 2 if is_causal else 3


def _gather_blocks(x: torch.Tensor, n_blocks: int, window: int, span_blocks: int) -> torch.Tensor:
    """(B, (n_blocks + span_blocks - 1) * w, ...) -> (B, n_blocks, span_blocks * w, ...): block b gets blocks b .. b + span_blocks - 1."""
    x = x.view(x.shape[0], n_blocks + span_blocks - 1, window, *x.shape[2:])
    return torch.cat([x[:, i: i + n_blocks] for i in range(span_blocks)], dim=2)


def build_local_block_mask(
    key_padding_mask: torch.Tensor | None,
    query_length: int,
    cached: int,
    window: int,
    is_causal: bool,
    batch: int,
    device: torch.device | None = None,
) -> torch.Tensor:
    """Blocked boolean mask (B * n_blocks, 1, w, span), ``True`` = may attend; O(n * w) bytes.

    In padded key coordinates the query at offset r of a block sits at key offset r + w of its
    span, so causal attention allows s in [r + 1, r + w] and bidirectional s in [r + 1, r + 2w - 1];
    keys that are padding (or the zero blocks added at the edges) are masked. A query may always see
    itself, so rows of padding never softmax over an empty set.

    Args:
        key_padding_mask: (B, cached + query_length) bool, ``True`` = real token, or ``None``.
        cached: keys before the first query (0 <= cached < w).
    """
    if key_padding_mask is None:  # depends on sizes only: reuse it across layers, steps and calls
        return _unpadded_block_mask(query_length, cached, window, is_causal, batch, device)
    return _block_mask(key_padding_mask, query_length, cached, window, is_causal, batch, key_padding_mask.device)


@lru_cache(maxsize=16)
def _unpadded_block_mask(query_length, cached, window, is_causal, batch, device) -> torch.Tensor:
    return _block_mask(None, query_length, cached, window, is_causal, batch, device)


def _block_mask(key_padding_mask, query_length, cached, window, is_causal, batch, device) -> torch.Tensor:
    n_blocks, span_blocks = -(-query_length // window), _span_blocks(is_causal)
    span = span_blocks * window
    r = torch.arange(window, device=device)[:, None]
    s = torch.arange(span, device=device)[None, :]
    band = (s > r) & (s <= (r + window if is_causal else r + 2 * window - 1))  # (w, span)
    itself = s == r + window
    valid = torch.ones(1, cached + query_length, dtype=torch.bool, device=device)
    if key_padding_mask is not None:
        valid = key_padding_mask.bool()
    left = window - cached
    right = (n_blocks + span_blocks - 1) * window - left - valid.shape[1]
    valid = _gather_blocks(F.pad(valid, (left, right)), n_blocks, window, span_blocks)  # (B or 1, nb, span)
    mask = (band & valid[:, :, None, :]) | itself  # (B or 1, nb, w, span)
    return mask.expand(batch, n_blocks, window, span).reshape(batch * n_blocks, 1, window, span)


def local_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    *,
    is_causal: bool = True,
    implementation: str = "sdpa",
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Blocked sliding-window attention.

    Args:
        attention_mask: a block mask from ``build_local_block_mask`` (built once per forward by the
            model and shared by all layers), or a (B, Lk) bool key padding mask / ``None``, from
            which it is built here.
        implementation: ``"eager"`` forms the blocked weights and returns them, shaped
            (B, H, n_blocks, w, span) with span = 2w (3w bidirectional); ``"sdpa"`` runs
            ``scaled_dot_product_attention`` on the blocks and returns ``None``.
    """
    w = module.config.sliding_window
    b, h, lq, d = query.shape
    hkv, lk = key.shape[1], key.shape[2]
    cached = lk - lq
    if cached >= w:  # keys older than w - 1 positions before the first query are never seen
        key, value = key[:, :, cached - w + 1:], value[:, :, cached - w + 1:]
        if attention_mask is not None and attention_mask.dim() == 2:
            attention_mask = attention_mask[:, cached - w + 1:]
        cached, lk = w - 1, w - 1 + lq
    if attention_mask is None or attention_mask.dim() == 2:
        attention_mask = build_local_block_mask(attention_mask, lq, cached, w, is_causal, b, query.device)
    n_blocks, span_blocks = -(-lq // w), _span_blocks(is_causal)
    span = span_blocks * w
    n = b * n_blocks

    # Work in (B, L, heads, D) layout, which is how the projections produced q, k, v, so the
    # block views below are strided views of one padded copy; sdpa accepts the strides as they are.
    q = F.pad(query.transpose(1, 2), (0, 0, 0, 0, 0, n_blocks * w - lq))  # (B, nb * w, H, D)
    q = q.reshape(n, w, h, d).transpose(1, 2)  # (B * nb, H, w, D)
    left = w - cached
    right = (n_blocks + span_blocks - 1) * w - left - lk

    def blocks(x: torch.Tensor) -> torch.Tensor:  # (B, Hkv, Lk, D) -> (B * nb, Hkv, span, D)
        x = F.pad(x.transpose(1, 2), (0, 0, 0, 0, left, right))
        return _gather_blocks(x, n_blocks, w, span_blocks).view(n, span, hkv, d).transpose(1, 2)

    k, v = blocks(key), blocks(value)
    if implementation == "eager":
        g = h // hkv
        k, v = k.contiguous(), v.contiguous()  # plain strides for the batched matmuls
        scores = torch.matmul(q.reshape(n, hkv, g * w, d), k.transpose(-1, -2)) * scaling  # (B*nb, Hkv, g*w, span)
        scores = scores.view(n, h, w, span).masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
        weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)  # (B*nb, H, w, span)
        weights = F.dropout(weights, p=dropout, training=module.training)
        out = torch.matmul(weights.view(n, hkv, g * w, span), v).view(n, h, w, d)
        weights = weights.view(b, n_blocks, h, w, span).transpose(1, 2)
    else:
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attention_mask, dropout_p=dropout if module.training else 0.0,
            scale=scaling, enable_gqa=h != hkv,
        )  # (B * nb, H, w, D)
        weights = None
    out = out.transpose(1, 2).reshape(b, n_blocks * w, h, d)[:, :lq]  # (B, Lq, H, D)
    return out.contiguous(), weights


class SlidingWindowCacheLayer:
    """Keeps the last ``window - 1`` keys and values: bounded memory however long generation runs."""

    def __init__(self, window: int) -> None:
        self.window = window
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None

    def update(self, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return cached + new keys/values for this call; keep only the last ``window - 1``."""
        if self.keys is not None:
            key = torch.cat([self.keys, key], dim=2)
            value = torch.cat([self.values, value], dim=2)
        keep = self.window - 1
        # clone so the stored window does not pin the whole prompt's key tensor in memory
        self.keys = key[:, :, -keep:].clone() if keep > 0 else key[:, :, :0]
        self.values = value[:, :, -keep:].clone() if keep > 0 else value[:, :, :0]
        return key, value

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.keys, self.values) if t is not None]

    def reorder(self, index: torch.Tensor) -> None:
        if self.keys is not None:
            self.keys = self.keys.index_select(0, index.to(self.keys.device))
            self.values = self.values.index_select(0, index.to(self.values.device))
