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

import torch
import torch.nn.functional as F
from torch import nn


def _band(window: int, span: int, is_causal: bool, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(w, span) bool masks: which key offsets s of its span query r of a block may see, and itself.

    In padded key coordinates a query at block offset r sits at key offset r + w, so causal
    attention allows s in [r + 1, r + w] and bidirectional attention s in [r + 1, r + 2w - 1].
    """
    r = torch.arange(window, device=device)[:, None]
    s = torch.arange(span, device=device)[None, :]
    upper = r + window if is_causal else r + 2 * window - 1
    return (s > r) & (s <= upper), s == r + window


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
        attention_mask: (B, Lk) bool key padding mask (``True`` = real token) or ``None``.
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
        attention_mask = attention_mask[:, cached - w + 1:] if attention_mask is not None else None
        cached = w - 1
    n_blocks = -(-lq // w)
    span = 2 * w if is_causal else 3 * w
    left = w - cached  # put the first query at key offset w of block 0
    right = n_blocks * w - lq + (0 if is_causal else w)

    key_blocks = F.pad(key, (0, 0, left, right)).unfold(2, span, w)  # (B, Hkv, nb, D, span)
    value_blocks = F.pad(value, (0, 0, left, right)).unfold(2, span, w)  # (B, Hkv, nb, D, span)
    band, itself = _band(w, span, is_causal, query.device)  # (w, span) each
    if attention_mask is None:
        valid = F.pad(torch.ones(1, lq + cached, dtype=torch.bool, device=query.device), (left, right))
    else:
        valid = F.pad(attention_mask.bool(), (left, right))
    valid = valid.unfold(1, span, w)  # (B or 1, nb, span)
    mask = band & valid[:, None, :, None, :]  # (B or 1, 1, nb, w, span)
    # Each query may always see itself, so padding rows never softmax over an empty set.
    mask = mask | itself

    q = F.pad(query, (0, 0, 0, n_blocks * w - lq))  # (B, H, nb * w, D)
    if implementation == "eager":
        g = h // hkv
        q = q.view(b, hkv, g, n_blocks, w, d)
        scores = torch.matmul(q, key_blocks.unsqueeze(2)) * scaling  # (B, Hkv, g, nb, w, span)
        scores = scores.masked_fill(~mask.unsqueeze(1), torch.finfo(scores.dtype).min)
        weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
        weights = F.dropout(weights, p=dropout, training=module.training)
        out = torch.matmul(weights, value_blocks.unsqueeze(2).transpose(-1, -2))  # (B, Hkv, g, nb, w, D)
        out = out.reshape(b, h, n_blocks * w, d)[:, :, :lq]
        return out.transpose(1, 2).contiguous(), weights.reshape(b, h, n_blocks, w, span)

    # sdpa: fold the blocks into the batch axis -> (B * nb, heads, w, D) against (B * nb, Hkv, span, D)
    q = q.view(b, h, n_blocks, w, d).transpose(1, 2).reshape(b * n_blocks, h, w, d)
    k = key_blocks.permute(0, 2, 1, 4, 3).reshape(b * n_blocks, hkv, span, d)
    v = value_blocks.permute(0, 2, 1, 4, 3).reshape(b * n_blocks, hkv, span, d)
    m = mask.expand(b, 1, n_blocks, w, span).transpose(1, 2).reshape(b * n_blocks, 1, w, span)
    out = F.scaled_dot_product_attention(
        q, k, v, attn_mask=m, dropout_p=dropout if module.training else 0.0, scale=scaling, enable_gqa=h != hkv
    )  # (B * nb, H, w, D)
    out = out.view(b, n_blocks, h, w, d).permute(0, 1, 3, 2, 4).reshape(b, n_blocks * w, h, d)
    return out[:, :lq].contiguous(), None


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
