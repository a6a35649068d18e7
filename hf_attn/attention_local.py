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

from .attention_eager import FullKVCacheLayer


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
    if attention_mask is None and lq == 1 and implementation != "eager":
        # one new token, no padding: every kept key (at most w - 1 cached + itself) is in its window,
        # so plain attention over them is exact; no blocks, no mask (the decoding fast path)
        out = F.scaled_dot_product_attention(query, key, value, scale=scaling, enable_gqa=h != hkv)
        return out.transpose(1, 2).contiguous(), None
    if attention_mask is None or attention_mask.dim() == 2:
        attention_mask = build_local_block_mask(attention_mask, lq, cached, w, is_causal, b, query.device)
    n_blocks, span_blocks = -(-lq // w), _span_blocks(is_causal)
    span = span_blocks * w
    left = w - cached  # zero key rows before the first key, so query 0 sits at offset w of block 0
    right = (n_blocks + span_blocks - 1) * w - left - lk
    # (B, L, heads, D) layout: how the projections produced q, k, v, so these are free views
    q, k, v = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)

    if implementation != "eager" and not (module.training and dropout > 0):
        # Resolve autocast here, as sdpa would: the function's backward runs outside autocast and
        # needs q, k, v in one dtype.
        device_type = q.device.type
        dtype = (torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type)
                 else torch.promote_types(torch.promote_types(q.dtype, k.dtype), v.dtype))
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
        out = _BlockedLocalAttention.apply(q, k, v, attention_mask, w, span_blocks, left, scaling)
        return out[:, :lq], None

    k = F.pad(k, (0, 0, 0, 0, left, right))  # (B, (nb + sb - 1) * w, Hkv, D)
    v = F.pad(v, (0, 0, 0, 0, left, right))

    # Batched path over all blocks: forms the (B * nb, H, w, span) weights (eager), or runs sdpa with
    # attention dropout, whose random mask cannot be replayed by the recomputing path above.
    n = b * n_blocks
    qb = F.pad(q, (0, 0, 0, 0, 0, n_blocks * w - lq)).reshape(n, w, h, d).transpose(1, 2)  # (B*nb, H, w, D)
    kb = _gather_blocks(k, n_blocks, w, span_blocks).view(n, span, hkv, d).transpose(1, 2)  # (B*nb, Hkv, span, D)
    vb = _gather_blocks(v, n_blocks, w, span_blocks).view(n, span, hkv, d).transpose(1, 2)
    if implementation == "eager":
        g = h // hkv
        kb, vb = kb.contiguous(), vb.contiguous()  # plain strides for the batched matmuls
        scores = torch.matmul(qb.reshape(n, hkv, g * w, d), kb.transpose(-1, -2)) * scaling  # (B*nb, Hkv, g*w, span)
        scores = scores.view(n, h, w, span).masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
        weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)  # (B*nb, H, w, span)
        weights = F.dropout(weights, p=dropout, training=module.training)
        out = torch.matmul(weights.view(n, hkv, g * w, span), vb).view(n, h, w, d)
        weights = weights.view(b, n_blocks, h, w, span).transpose(1, 2)
    else:
        out = F.scaled_dot_product_attention(
            qb, kb, vb, attn_mask=attention_mask, dropout_p=dropout, scale=scaling, enable_gqa=h != hkv
        )  # (B * nb, H, w, D)
        weights = None
    out = out.transpose(1, 2).reshape(b, n_blocks * w, h, d)[:, :lq]  # (B, Lq, H, D)
    return out.contiguous(), weights


# Query rows per group in the recomputing path: big enough that each sdpa call is efficient,
# small enough that a group's temporaries (its key windows, their gradients) stay a few MB.
_GROUP_ROWS = 1024


class _BlockedLocalAttention(torch.autograd.Function):
    """sdpa over groups of query blocks; backward recomputes each group instead of storing it.

    Autograd through one batched sdpa call keeps every gathered key window (2x the keys) and its
    gradient alive; here only q, k, v and the shared block mask are saved, and the zero padding at
    the sequence edges exists only inside the first and last group, so the extra memory is O(group)
    however long the sequence (for about one recomputed forward of extra time).

    Inputs: q (B, Lq, H, D); k, v (B, Lk, Hkv, D), whose row 0 sits at padded row ``left``;
    mask (B * nb, 1, w, span). Output: (B, nb * w, H, D), rows past Lq are padding.
    """

    @staticmethod
    def forward(ctx, q, k, v, mask, window, span_blocks, left, scaling):
        ctx.save_for_backward(q, k, v, mask)
        ctx.args = (window, span_blocks, left, scaling)
        b, lq, h, d = q.shape
        n_blocks = -(-lq // window)
        out = q.new_empty(b, n_blocks * window, h, d)
        for start, stop in _groups(n_blocks, window):
            qg, kg, vg, mg, _ = _group_inputs(q, k, v, mask, start, stop, window, span_blocks, left)
            og = F.scaled_dot_product_attention(qg, kg, vg, attn_mask=mg, scale=scaling, enable_gqa=qg.shape[1] != kg.shape[1])
            out[:, start * window: stop * window] = og.transpose(1, 2).reshape(b, -1, h, d)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, mask = ctx.saved_tensors
        window, span_blocks, left, scaling = ctx.args
        b, lq, h, d = q.shape
        n_blocks = -(-lq // window)
        dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
        for start, stop in _groups(n_blocks, window):
            qg, kg, vg, mg, (lo, hi, skip) = _group_inputs(q, k, v, mask, start, stop, window, span_blocks, left)
            qg, kg, vg = (t.detach().requires_grad_(True) for t in (qg, kg, vg))
            with torch.enable_grad():
                og = F.scaled_dot_product_attention(qg, kg, vg, attn_mask=mg, scale=scaling, enable_gqa=qg.shape[1] != kg.shape[1])
            go = grad_out[:, start * window: stop * window].reshape(-1, window, h, d).transpose(1, 2)
            gq, gk, gv = torch.autograd.grad(og, (qg, kg, vg), go)
            rows = min(stop * window, lq) - start * window
            dq[:, start * window: start * window + rows] = gq.transpose(1, 2).reshape(b, -1, h, d)[:, :rows]
            for grad, total in ((gk, dk), (gv, dv)):
                # fold the overlapping windows back onto the group's key rows (window block i of
                # query block j is key block j + i), then add the rows that exist into the total
                blocks = stop - start
                grad = grad.transpose(1, 2).reshape(b, blocks, span_blocks, window, *grad.shape[1:2], d)
                folded = grad.new_zeros(b, blocks + span_blocks - 1, window, *grad.shape[4:])
                for i in range(span_blocks):
                    folded[:, i: i + blocks] += grad[:, :, i]
                total[:, lo:hi] += folded.flatten(1, 2)[:, skip: skip + hi - lo]
        return dq, dk, dv, None, None, None, None, None


def _groups(n_blocks: int, window: int) -> list[tuple[int, int]]:
    per_group = max(1, _GROUP_ROWS // window)
    return [(s, min(s + per_group, n_blocks)) for s in range(0, n_blocks, per_group)]


def _group_inputs(q, k, v, mask, start, stop, window, span_blocks, left):
    """Blocks ``start:stop`` as sdpa inputs: q (B*G, H, w, D), k/v windows (B*G, Hkv, span, D),
    mask (B*G, 1, w, span), and where the group's key rows lie in k: (first, end, offset in the group)."""
    b, lq, h, d = q.shape
    blocks = stop - start
    qg = q[:, start * window: stop * window]
    if qg.shape[1] < blocks * window:  # the last group of a length that is not a multiple of w
        qg = F.pad(qg, (0, 0, 0, 0, 0, blocks * window - qg.shape[1]))
    qg = qg.reshape(b * blocks, window, h, d).transpose(1, 2)
    # padded rows [start * w, (stop + sb - 1) * w) are k rows shifted by ``left``; outside k: zeros
    first, end = start * window - left, (stop + span_blocks - 1) * window - left
    lo, hi = max(first, 0), min(end, k.shape[1])
    pad = (0, 0, 0, 0, lo - first, end - hi)
    kg = _gather_blocks(F.pad(k[:, lo:hi], pad), blocks, window, span_blocks)  # (B, G, span, Hkv, D)
    vg = _gather_blocks(F.pad(v[:, lo:hi], pad), blocks, window, span_blocks)
    kg = kg.view(b * blocks, span_blocks * window, *k.shape[2:]).transpose(1, 2)
    vg = vg.view(b * blocks, span_blocks * window, *v.shape[2:]).transpose(1, 2)
    n_blocks = mask.shape[0] // b
    mg = mask.view(b, n_blocks, 1, window, -1)[:, start:stop].reshape(b * blocks, 1, window, -1)
    return qg, kg, vg, mg, (lo, hi, lo - first)


class SlidingWindowCacheLayer(FullKVCacheLayer):
    """Keeps the last ``window - 1`` keys and values: bounded memory however long generation runs."""

    def __init__(self, window: int) -> None:
        super().__init__()
        self.window = window

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
