"""Full softmax attention (modes ``eager`` and ``rope``).

Paper: Vaswani et al., "Attention Is All You Need" (2017).
Math: ``out = softmax(q k^T * scaling + mask) v``; every query sees every (allowed) key.
Shapes: query (B, H, Lq, D); key, value (B, Hkv, Lk, D) with H % Hkv == 0 (grouped-query attention);
output (B, Lq, H, D).
Cost: O(Lq * Lk) time; the ``"eager"`` implementation also holds the (B, H, Lq, Lk) weights, the
``"sdpa"`` implementation hands the work to ``torch.nn.functional.scaled_dot_product_attention``
(flash / memory-efficient kernels where the device has them).
Limits: quadratic in the sequence length; use ``local`` or ``lowrank`` for long inputs.

The mask is boolean, ``True`` = may attend, shaped (B, 1, Lq, Lk), or transformers' additive float
mask of that shape, or ``None`` for "no padding" (then causality is handled by the kernel's ``is_causal``
flag). The model builds it with transformers' ``create_causal_mask``, which covers padding, packed
sequences and static caches.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def build_full_attention_mask(
    key_padding_mask: torch.Tensor | None,
    query_length: int,
    key_length: int,
    is_causal: bool,
) -> torch.Tensor | None:
    """Boolean (B or 1, 1, Lq, Lk) mask for full attention, or ``None`` when the kernel's flags suffice.

    Args:
        key_padding_mask: (B, Lk) bool, ``True`` for real tokens, or ``None`` for no padding.
        query_length: Lq; the queries are the last Lq of the Lk keys.
        key_length: Lk.
        is_causal: Whether query i may only see keys up to its own position.
    """
    past = key_length - query_length
    needs_causal_mask = is_causal and query_length > 1 and past > 0
    if key_padding_mask is None and not needs_causal_mask:
        return None
    device = key_padding_mask.device if key_padding_mask is not None else None
    q_pos = torch.arange(past, key_length, device=device)[:, None]  # (Lq, 1)
    k_pos = torch.arange(key_length, device=device)[None, :]  # (1, Lk)
    allowed = (k_pos <= q_pos) if is_causal else torch.ones(query_length, key_length, dtype=torch.bool, device=device)
    mask = allowed[None, None]  # (1, 1, Lq, Lk)
    if key_padding_mask is not None:
        mask = mask & key_padding_mask[:, None, None, :].bool()
    # A query always sees its own key, so rows of padding tokens are never empty: their outputs stay
    # finite (softmax over nothing is NaN) and real tokens never look at them anyway.
    return mask | (k_pos == q_pos)[None, None]


def repeat_kv(hidden: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(B, Hkv, L, D) -> (B, Hkv * n_rep, L, D) for grouped-query attention."""
    if n_rep == 1:
        return hidden
    b, h, length, d = hidden.shape
    return hidden[:, :, None].expand(b, h, n_rep, length, d).reshape(b, h * n_rep, length, d)


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    *,
    is_causal: bool = True,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference math: explicit scores, float32 softmax, returns the (B, H, Lq, Lk) weights."""
    n_rep = query.shape[1] // key.shape[1]
    key, value = repeat_kv(key, n_rep), repeat_kv(value, n_rep)
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling  # (B, H, Lq, Lk)
    lq, lk = scores.shape[-2:]
    if attention_mask is None and is_causal and lq > 1:
        # top-left aligned, as sdpa's is_causal: transformers' mask functions return None only when
        # that is right (no cache, or a static cache filled from position 0)
        attention_mask = torch.ones(lq, lk, dtype=torch.bool, device=query.device).tril()
    if attention_mask is not None and attention_mask.dtype == torch.bool:
        scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
    elif attention_mask is not None:  # transformers' additive float mask (0 or the dtype's minimum)
        scores = scores + attention_mask.to(scores.dtype)
    # float32 softmax (float64 for float64 scores: their masked minimum would overflow float32 to -inf
    # and turn fully masked padding rows into NaN)
    weights = torch.softmax(scores, dim=-1, dtype=torch.promote_types(scores.dtype, torch.float32)).to(query.dtype)
    weights = F.dropout(weights, p=dropout, training=module.training)
    out = torch.matmul(weights, value)  # (B, H, Lq, D)
    return out.transpose(1, 2).contiguous(), weights


def sdpa_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    *,
    is_causal: bool = True,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """PyTorch's fused kernel; no weights are formed, so none are returned."""
    # without a mask, causality is sdpa's top-left aligned flag (see eager_attention_forward)
    # (a branch, not a value: with a symbolic length the comparison is a SymBool, which sdpa does not take)
    use_causal_flag = True if attention_mask is None and is_causal and query.shape[2] > 1 else False
    out = F.scaled_dot_product_attention(
        query,
        key,
        value,
        attn_mask=attention_mask,
        dropout_p=dropout if module.training else 0.0,
        is_causal=use_causal_flag,
        scale=scaling,
        enable_gqa=query.shape[1] != key.shape[1],
    )  # (B, H, Lq, D)
    return out.transpose(1, 2).contiguous(), None
