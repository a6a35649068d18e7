"""Local (sliding-window) attention, mode ``local``.

Papers: Beltagy et al., "Longformer" (2020); Jiang et al., "Mistral 7B" (2023).
Math: ``out_i = softmax_j(q_i k_j * scaling) v_j`` over ``i - w < j <= i`` (causal) or
``|i - j| < w`` (bidirectional), w = ``config.sliding_window``.
Three paths, all O(n * w) time and memory, with no n x n score matrix or mask beyond n = 128 (one
exception below):
- banded (CPU, causal, no padding, no cache: pretraining and the benchmark): queries in chunks of
  c = min(w, 64) rows, each chunk running PyTorch's CPU flash kernel over its own overlapping
  window of w + c keys (strided views, one shared (c, w + c) band mask), softmax statistics saved
  so the backward is the kernel's own backward, not a recomputation; the first w queries are one
  plain causal call, and a sequence of at most two chunks one call with its (n, n) band mask
  (n <= 128). A call takes several chunks of one batch row, or one chunk (or the whole short
  sequence) of several batch rows, whichever makes fewer calls.
- blocked (padding masks, caches, bidirectional, GPU): queries in blocks of w; block b needs key
  blocks b-1 and b (and b+1 when bidirectional), with a (B * n/w, 1, w, span) mask built once per
  forward; the sdpa version recomputes each group of blocks in backward instead of storing it.
- batched (``output_attentions``, attention dropout, ``torch.compile`` / ``torch.export``): the
  blocked math over all blocks at once, either written out (returning the (B, H, n/w, w, span)
  weights) or as one sdpa call; plain differentiable ops, so compilers and exporters trace it.
The exception: ``torch.export`` with a dynamic length cannot express ceil(n / w) blocks, so the
exported graph masks the full (n, n) scores to the window (``_dense_local_attention``, O(n^2)).
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
    # without padding it depends on sizes only: the model keeps it for reuse (a bounded cache of its own)
    if key_padding_mask is not None:
        device = key_padding_mask.device
    return _block_mask(key_padding_mask, query_length, cached, window, is_causal, batch, device)


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
    scratch_output: bool = False,
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
    if torch.compiler.is_exporting() and isinstance(lq, torch.SymInt):
        # torch.export with a dynamic length: ceil(L / w) blocks give shapes whose divisibility its
        # symbolic shapes cannot prove (export fails), so the exported graph masks the full scores
        return _dense_local_attention(query, key, value, attention_mask, w, scaling, is_causal, implementation)
    if attention_mask is None and cached == 0 and is_causal and lq <= w and implementation != "eager":
        # no longer than the window, no padding, no cache: every earlier key is in the window, so plain
        # causal attention is exact (one fused call instead of the band machinery)
        out = F.scaled_dot_product_attention(query, key, value, dropout_p=dropout if module.training else 0.0,
                                             is_causal=True, scale=scaling, enable_gqa=h != hkv)
        return out.transpose(1, 2).contiguous(), None
    # torch.compile / torch.export trace the batched path below: the banded and recomputing paths are
    # autograd Functions whose Python loops follow the sequence length (a graph per length, none for a
    # symbolic one) and whose in-place strided writes and private flash ops export cannot express
    traced = torch.compiler.is_compiling()
    if (attention_mask is None and cached == 0 and is_causal and implementation != "eager"
            and not (module.training and dropout > 0) and query.device.type == "cpu" and not traced):
        return _banded_local_attention(query, key, value, w, scaling, scratch_output), None
    if attention_mask is None or attention_mask.dim() == 2:
        attention_mask = build_local_block_mask(attention_mask, lq, cached, w, is_causal, b, query.device)
    n_blocks, span_blocks = -(-lq // w), _span_blocks(is_causal)
    span = span_blocks * w
    left = w - cached  # zero key rows before the first key, so query 0 sits at offset w of block 0
    right = (n_blocks + span_blocks - 1) * w - left - lk
    # (B, L, heads, D) layout: how the projections produced q, k, v, so these are free views
    q, k, v = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)

    if implementation != "eager" and not (module.training and dropout > 0) and not traced:
        q, k, v = _in_kernel_dtype(q, k, v)
        out = _BlockedLocalAttention.apply(q, k, v, attention_mask, w, span_blocks, left, scaling)
        return out[:, :lq], None

    k = F.pad(k, (0, 0, 0, 0, left, right))  # (B, (nb + sb - 1) * w, Hkv, D)
    v = F.pad(v, (0, 0, 0, 0, left, right))

    # Batched path over all blocks: forms the (B * nb, H, w, span) weights (eager), or runs sdpa with
    # attention dropout, whose random mask cannot be replayed by the recomputing path above, or in a
    # traced graph (autograd keeps the gathered (B * nb, Hkv, span, D) windows: about 2x the keys).
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


def local_blocks_to_dense(weights: torch.Tensor, query_length: int, cached: int = 0) -> torch.Tensor:
    """Blocked local weights (B, H, n_blocks, w, span) -> dense (B, H, Lq, cached + Lq), zeros off the band.

    ``span`` is 2w (causal) or 3w (bidirectional); both lay keys out the same way: query r of block
    b is query ``b * w + r`` and span offset s is key ``b * w + s - w + cached``. Offsets that fall
    on the zero keys padded around the sequence, and rows past ``query_length``, are dropped.

    Raises:
        ValueError: if ``weights`` is not 5-D with span a multiple (2 or 3) of the block size, or the
            blocks do not cover ``query_length`` queries.
    """
    if weights.dim() != 5:
        raise ValueError(f"weights: expected blocked local weights (B, H, n_blocks, w, span), got {tuple(weights.shape)}")
    b, h, n_blocks, w, span = weights.shape
    if span not in (2 * w, 3 * w):
        raise ValueError(f"weights: span {span} is neither 2w nor 3w for block size w={w}")
    if not (n_blocks - 1) * w < query_length <= n_blocks * w:
        raise ValueError(f"query_length={query_length} does not fit {n_blocks} blocks of {w} queries")
    if not 0 <= cached < w:
        raise ValueError(f"cached={cached}: expected 0 <= cached < w={w}")
    key_length = cached + query_length
    device = weights.device
    block = torch.arange(n_blocks, device=device)[:, None, None]
    query = (block * w + torch.arange(w, device=device)[None, :, None]).expand(n_blocks, w, span)
    key = (block * w + torch.arange(span, device=device)[None, None, :] - w + cached).expand(n_blocks, w, span)
    valid = (query < query_length) & (key >= 0) & (key < key_length)  # (n_blocks, w, span)
    dense = weights.new_zeros(b, h, query_length, key_length)
    dense[:, :, query[valid], key[valid]] = weights[:, :, valid]
    return dense


def local_dense_weights(module: nn.Module, weights: torch.Tensor, query: torch.Tensor, key: torch.Tensor,
                        value: torch.Tensor, **kwargs) -> torch.Tensor:
    """``config.output_attentions_layout="dense"``: the blocked weights of this call as (B, H, Lq, Lk)
    over the keys the kernel attended (at most w - 1 cached ones, then the Lq new ones)."""
    lq = query.shape[2]
    cached = min(key.shape[2] - lq, module.config.sliding_window - 1)
    return local_blocks_to_dense(weights, lq, cached)


def _dense_local_attention(query, key, value, key_padding_mask, window, scaling, is_causal, implementation):
    """The window as a dense (B or 1, 1, Lq, Lk) mask over full sdpa: O(Lq * Lk), for exported graphs
    whose length is symbolic. Same allowed keys as ``build_local_block_mask`` (a query always sees
    itself). Shapes as ``local_attention_forward``; no weights."""
    if implementation == "eager":
        raise ValueError("output_attentions: attention_mode='local' forms its blocked weights only for a "
                         "fixed sequence length, not in torch.export with a dynamic length")
    if key_padding_mask is not None and key_padding_mask.dim() != 2:
        raise ValueError("attention_mask: torch.export of attention_mode='local' with a dynamic length takes "
                         "a 2-D (batch, keys) padding mask")
    lq, lk = query.shape[2], key.shape[2]
    q_pos = torch.arange(lk - lq, lk, device=query.device)[:, None]  # (Lq, 1): queries are the last Lq keys
    k_pos = torch.arange(lk, device=query.device)[None, :]  # (1, Lk)
    if is_causal:
        allowed = (k_pos <= q_pos) & (k_pos > q_pos - window)
    else:
        allowed = (k_pos - q_pos).abs() < window
    mask = allowed[None, None]  # (1, 1, Lq, Lk)
    if key_padding_mask is not None:
        mask = (mask & key_padding_mask.bool()[:, None, None, :]) | (k_pos == q_pos)
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling,
                                         enable_gqa=query.shape[1] != key.shape[1])  # (B, H, Lq, D)
    return out.transpose(1, 2).contiguous(), None


def _banded_local_attention(query, key, value, window, scaling, scratch_output=False):
    """The banded path: (B, H, L, D) q, (B, Hkv, L, D) k, v -> (B, L, H, D).

    ``scratch_output``: the caller keeps neither the output nor the gradient it will send back
    (``HfAttnAttention`` only feeds the output to o_proj), so the backward may store gradients in
    their memory; see ``_BandedLocalAttention.backward``.
    """
    h, hkv = query.shape[1], key.shape[1]
    if h != hkv:  # the flash kernel takes equal head counts
        key, value = key.repeat_interleave(h // hkv, dim=1), value.repeat_interleave(h // hkv, dim=1)
    q, k, v = _in_kernel_dtype(*(t.transpose(1, 2) for t in (query, key, value)))  # (B, L, H, D) views
    return _BandedLocalAttention.apply(q, k, v, window, scaling, scratch_output)


def _in_kernel_dtype(q, k, v):
    """q, k, v in the one dtype sdpa would compute in (autocast's when enabled, else the promoted
    dtype): resolved before the autograd functions, whose backward runs outside autocast."""
    device_type = q.device.type
    dtype = (torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type)
             else torch.promote_types(torch.promote_types(q.dtype, k.dtype), v.dtype))
    return q.to(dtype), k.to(dtype), v.to(dtype)


# Query rows per chunk of the banded path: each chunk attends to its own rows and the ``window``
# rows before them (span = window + chunk keys, a fixed band mask shared by every chunk), so the
# work is (window + chunk) / window of the exact band. The backward needs only each row's output
# and log-sum-exp, so it may chunk differently from the forward. Chosen by timing w=256, n=16384 on
# the 2-core CPU: the forward was fastest at 32 rows, the backward at 48-64; below that the kernel
# loses efficiency, above it the span grows.
_BAND_CHUNK_FORWARD = 32
_BAND_CHUNK_BACKWARD = 64
# Query rows per call of the flash kernel in the banded path: bounds the backward's temporaries
# (the gradient of each chunk's key window) to a few MB however long the sequence.
_BAND_GROUP_ROWS = 512
# The forward keeps no per-call gradients, so it takes bigger calls (fewer kernel launches); its
# temporary is one call's output, well below the backward's peak.
_BAND_GROUP_ROWS_FORWARD = 4096
# A sequence short enough for one head call (see _band_calls) goes in calls of up to this many query
# rows (batch rows x length), so a small batch is one call each way: the backward then returns the
# kernel's gradients as they are (no per-call copies) instead of reusing the output's memory; the
# buffers it keeps apart hold at most this many rows.
_BAND_WHOLE_ROWS = 4096

_flash_cpu = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default
_flash_cpu_backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward.default


@lru_cache(maxsize=16)
def _band_bias(chunk: int, window: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(1, 1, chunk, window + chunk) additive mask: query r of a chunk sees window offsets s in (r, r + window]."""
    r = torch.arange(chunk, device=device)[:, None]
    s = torch.arange(window + chunk, device=device)[None, :]
    allowed = (s > r) & (s <= r + window)
    return torch.zeros(chunk, window + chunk, dtype=dtype, device=device).masked_fill(~allowed, float("-inf"))[None, None]


@lru_cache(maxsize=16)
def _short_band_bias(length: int, window: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(1, 1, length, length) additive mask of a whole short sequence: query r sees keys s in
    (r - window, r]."""
    return _band_bias(length, window, dtype, device)[..., window:].contiguous()


def _call_mask(call: tuple, window: int, chunk: int, dtype: torch.dtype,
               device: torch.device) -> torch.Tensor | None:
    """The additive mask of a call of ``_band_calls``; None for plain causal attention."""
    chunks, rows = call[3:]
    if chunks:
        return _band_bias(chunk, window, dtype, device)[:, :, :rows, : window + rows]
    return _short_band_bias(rows, window, dtype, device) if rows > window else None


def _band_calls(batch: int, length: int, window: int, chunk: int, group_rows: int):
    """The flash calls covering queries [0, length) of every batch row: (first batch row, end batch
    row, query start, chunks, rows per chunk), in increasing query start for each batch row.

    Queries [0, min(length, window)) see every earlier key: plain causal calls, ``chunks=0``, over
    slices of batch rows. A sequence of at most two chunks is one such call over all its rows with a
    (length, length) band mask instead (one kernel call for about the work of the two it replaces;
    the mask is at most 2 * 64 rows square). Later queries go in chunks of ``chunk`` rows; chunk
    rows [a, a + rows) use keys [a - window, a + rows). The kernel takes one batch axis, so a call
    holds either several chunks of one batch row (their windows one strided view) or one chunk of
    several batch rows (a plain slice); whichever makes fewer calls (a short sequence in a big
    batch: one call per chunk across the batch, not one per row). Each call holds at most ``group_rows`` query rows (at least
    one chunk), which bounds the backward's temporaries.
    """
    head = length if length <= max(window, 2 * chunk) else window
    # a sequence that is all head: batch rows together up to _BAND_WHOLE_ROWS query rows
    per_head = max(1, (max(group_rows, _BAND_WHOLE_ROWS) if head == length else group_rows) // head)
    calls = [(b0, min(b0 + per_head, batch), 0, 0, head) for b0 in range(0, batch, per_head)]
    full, tail = divmod(length - head, chunk)
    per_group = max(1, group_rows // chunk)
    batch_slices = -(-batch // per_group)
    if (full + (tail > 0)) * batch_slices < batch * (-(-full // per_group) + (tail > 0)):
        starts = [(head + c * chunk, chunk) for c in range(full)]
        starts += [(head + full * chunk, tail)] if tail else []
        for start, rows in starts:
            calls += [(b0, min(b0 + per_group, batch), start, 1, rows) for b0 in range(0, batch, per_group)]
        return calls
    for bi in range(batch):
        start = head
        while length - start >= chunk:
            chunks = min(per_group, (length - start) // chunk)
            calls.append((bi, bi + 1, start, chunks, chunk))
            start += chunks * chunk
        if start < length:
            calls.append((bi, bi + 1, start, 1, length - start))
    return calls


def _band_views(t: torch.Tensor, call: tuple, window: int = 0):
    """Strided views of t (B, L, H, D) for one call of ``_band_calls``, as the kernel takes them (no
    copies, any strides): query rows (N, H, rows, D), or with ``window > 0`` each chunk's overlapping
    key window (N, H, window + rows, D), chunk c seeing rows
    [start + c * rows - window, start + (c + 1) * rows); N is the call's batch rows times its chunks."""
    b0, b1, start, chunks, rows = call
    if chunks == 0:  # the head call: rows [0, rows), which see keys [0, rows)
        return t[b0:b1, :rows].transpose(1, 2)
    if chunks == 1:  # one chunk of batch rows b0 .. b1 - 1
        return t[b0:b1, start - window: start + rows].transpose(1, 2)
    s_l, s_h, s_d = t.stride(1), t.stride(2), t.stride(3)
    first = t[b0, start - window:]  # several chunks of one batch row
    return first.as_strided((chunks, t.shape[2], window + rows, t.shape[3]), (rows * s_l, s_h, s_l, s_d))


class _BandedLocalAttention(torch.autograd.Function):
    """Causal sliding-window attention on the CPU flash kernel, with its softmax statistics kept.

    Each chunk of queries runs flash attention over its overlapping key window with one shared band
    mask (views, no copies), and the log-sum-exp of every row is saved, so the backward calls the
    kernel's own backward once per group instead of recomputing the forward. Saved: q, k, v, the
    output (which the output projection keeps anyway) and (B, L, H) statistics; the backward's extra
    memory is one group's key-window gradients. Inputs: (B, L, H, D) with any strides (the
    projections' transposed layout is used as is); output: (B, L, H, D) contiguous.
    """

    @staticmethod
    def forward(ctx, q, k, v, window, scaling, scratch):
        b, length, h, _ = q.shape
        chunk = min(window, _BAND_CHUNK_FORWARD)
        calls = _band_calls(b, length, window, chunk, _BAND_GROUP_ROWS_FORWARD)
        out = lse = None
        for call in calls:
            kv, vv = (_band_views(t, call, window) for t in (k, v))
            mask = _call_mask(call, window, chunk, q.dtype, q.device)
            o, stats = _flash_cpu(_band_views(q, call), kv, vv, 0.0, mask is None, attn_mask=mask,
                                  scale=scaling)
            if len(calls) == 1:  # one call over every row: the kernel's own output and statistics
                out, lse = o.transpose(1, 2).contiguous(), stats.transpose(1, 2)
                break
            if lse is None:
                out = q.new_empty(q.shape)  # (B, L, H, D) contiguous, whatever the strides of q
                lse = q.new_empty(b, length, h, dtype=stats.dtype)
            _band_views(out, call).copy_(o)
            _band_views(lse[..., None], call)[..., 0].copy_(stats)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.args = (window, scaling, scratch)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        q, k, v, out, lse = ctx.saved_tensors
        window, scaling, scratch = ctx.args
        b, length, h, d = q.shape
        chunk = min(window, _BAND_CHUNK_BACKWARD)
        if grad_out.shape != q.shape or not grad_out.is_contiguous():
            grad_out = grad_out.contiguous()
        calls = _band_calls(b, length, window, chunk, _BAND_GROUP_ROWS)
        if len(calls) == 1:  # one call over every row: its gradients are the whole gradients
            views = [t.transpose(1, 2) for t in (grad_out, q, k, v, out, lse)]
            gq, gk, gv = _flash_cpu_backward(*views, 0.0, calls[0][4] <= window, scale=scaling,
                                             attn_mask=_call_mask(calls[0], window, chunk, q.dtype, q.device))
            return gq.transpose(1, 2), gk.transpose(1, 2), gv.transpose(1, 2), None, None, None
        # Where the gradients go. Rows of grad_out and out are read only by the call that holds
        # their queries, so once a call is done its rows are free: when the caller does not keep
        # either (``scratch_output``) and the graph is not retained, dq takes grad_out's rows and
        # dk accumulates in the output's, which saves two (B, L, H, D) buffers at the peak. Calls
        # run in increasing query start for each batch row, so a call's key window reaches only
        # rows whose queries are done, and every key row is first written by the call that holds it
        # as a query (see _fold_windows): the gradients need no zero fill.
        reuse = scratch and not torch._C._autograd._get_current_graph_task_keep_graph()
        dq = grad_out if reuse else q.new_empty(q.shape)
        dk = out.detach() if reuse else k.new_empty(k.shape)
        dv = v.new_empty(v.shape)
        for call in calls:
            b0, b1, start, chunks, rows = call
            views = [_band_views(t, call) for t in (grad_out, q, out)]
            kv, vv = (_band_views(t, call, window) for t in (k, v))
            stats = _band_views(lse[..., None], call)[..., 0]
            mask = _call_mask(call, window, chunk, q.dtype, q.device)
            gq, gk, gv = _flash_cpu_backward(views[0], views[1], kv, vv, views[2], stats, 0.0, mask is None,
                                             attn_mask=mask, scale=scaling)
            first = start - window if chunks else 0  # the first key row of this call
            end = start + chunks * rows if chunks else rows
            _band_views(dq, call).copy_(gq)
            # key rows [first, start) hold the sums of earlier calls; rows [start, end) are this call's
            # queries, not written yet (with ``reuse``, their output rows were read by this call)
            _fold_windows(dk[b0:b1, first:end], gk, chunks, rows, start - first)
            _fold_windows(dv[b0:b1, first:end], gv, chunks, rows, start - first)
        return dq, dk, dv, None, None, None


def _fold_windows(acc: torch.Tensor, grad: torch.Tensor, chunks: int, rows: int, fresh: int) -> None:
    """Fold a call's key-window gradients (N, H, span, D) into rows of acc (batch rows, L', H, D) that
    start at the first window's first row: with ``chunks <= 1`` one window per batch row, else the
    chunks of one batch row (chunk c's window starts ``c * rows`` later). Rows of acc before
    ``fresh`` hold earlier calls' sums (added to); the rest are unwritten (overwritten)."""
    if chunks <= 1:  # the head call (keys [0, rows), all fresh) or one chunk per batch row
        grad = grad.transpose(1, 2)
        if fresh:
            acc[:, :fresh] += grad[:, :fresh]
        acc[:, fresh:].copy_(grad[:, fresh:])
        return
    acc = acc[0]
    acc[fresh:].zero_()
    span = grad.shape[2]
    if span % rows == 0:  # windows overlap in whole chunks: one add per chunk offset
        blocks = acc[: (chunks - 1) * rows + span].view(-1, rows, *acc.shape[1:])
        for j in range(span // rows):
            blocks[j: j + chunks] += grad[:, :, j * rows: (j + 1) * rows].transpose(1, 2)
        return
    for c in range(chunks):
        acc[c * rows: c * rows + span] += grad[c].transpose(0, 1)


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
