"""Low-rank attention, mode ``lowrank``; k = ``config.lowrank_dim``.

Bidirectional (``is_causal=False``): exact Linformer (Wang et al., "Linformer: Self-Attention with
Linear Complexity", 2020). Keys and values are projected along the sequence axis to k slots,
``K' = E K``, ``V' = F V`` with learned E, F of shape (k, max_position_embeddings), then
``out = softmax(q K'^T * scaling) V'``. E and F are indexed by position id, so left padding does not
shift the projection, and padding tokens are zeroed before projecting. Cost O(n * k).

Causal (the default): plain Linformer mixes future tokens into every slot, so a causal LM cannot use
it. We factorise the attention matrix through a non-negative rank-k feature map instead
(Katharopoulos et al., "Transformers are RNNs", 2020; Choromanski et al., "Performer", 2021):
``out_i = phi(q_i) S_i / (phi(q_i) . z_i)``, ``S_i = sum_{j<=i} phi(k_j) v_j^T``, ``z_i = sum_{j<=i} phi(k_j)``.
The attention matrix ``phi(Q) phi(K)^T`` (masked to j <= i, rows normalised) has rank <= k: each key
writes into k soft slots, each query reads them, like Linformer's k compressed positions but
assigned by content, so a prefix is summarised without seeing the future.
``config.lowrank_feature_map`` picks phi, a distribution over the k slots:
``"softmax"``: ``phi(x) = softmax(x W)`` with learned W (D, k);
``"product"``: the slots form an m1 x m2 grid (k = m1 * m2, 16 x 16 for k = 256) and
``phi(x) = softmax(x W1) (outer) softmax(x W2)`` with W1 (D, m1), W2 (D, m2), as in product-key
memories (Lample et al., "Large Memory Layers with Product Keys", 2019). The product map costs
2 D (m1 + m2) per token instead of 2 D k, and a query-key score factorises,
``phi(q).phi(k) = (a_q.a_k)(b_q.b_k)``, so the in-chunk scores cost C (m1 + m2) instead of C k.
The rank bound is the same; each token's distribution is less free (a product of two).
The prefix sums run in chunks of ``config.lowrank_chunk_size``: exact within a chunk, carried
state across chunks, so time is O(n * k * D). Without a past state (training, full-sequence
inference, a prompt) the chunks are streamed in blocks of rows by ``_StreamedCausalLowRank``, whose
backward recomputes one block's features and chunk states at a time: saved memory is q, k, v, the
output and its normaliser plus one (k, D + 1) state per block, and no step allocates an (n, k)
buffer. Generation steps after the prompt run their chunks at once through the same block code,
from the cached state. Generation keeps only (S, z): a constant (B, Hkv, k, D + 1) state per layer.
Traced graphs (``torch.compile``, ``torch.export``) run every row as one block of plain ops with
autograd's backward (O(n * k) saved features instead of O(block)); a dynamic length in
``torch.export`` makes the whole sequence one chunk (O(n^2) in-chunk scores, see ``_float_inputs``).
Shapes: query (B, H, L, D); key, value (B, Hkv, L, D); output (B, L, H, D).
Weights returned with ``output_attentions``: bidirectional -> (B, H, L, k) softmax over the k slots;
causal -> ``None`` (the n x n matrix is never formed).
Limits: causal mode approximates softmax attention with a rank-k kernel (weaker at exact recall);
with rotary positions the features depend on absolute position (not shift-invariant); the
bidirectional projection covers at most ``max_position_embeddings`` positions.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .attention_eager import eager_attention_forward, sdpa_attention_forward
from .cache_hf_attn import lowrank_state, set_lowrank_state
from .configuration_hf_attn import lowrank_grid

# Keeps the normaliser of a query that has seen only padding away from 0/0.
_EPS = 1e-6


def init_lowrank_module(module: nn.Module, config) -> None:
    """Add the mode's parameters to an attention module."""
    if config.is_causal:
        module.feature_map = nn.Linear(config.head_dim, sum(feature_factors(config)), bias=False)
    else:
        shape, std = (config.lowrank_dim, config.max_position_embeddings), linformer_init_std(config)
        module.linformer_e = nn.Parameter(torch.randn(shape) * std)
        module.linformer_f = nn.Parameter(torch.randn(shape) * std)


def linformer_init_std(config) -> float:
    """Xavier-normal std of a (k, max_positions) projection, as in the Linformer reference code."""
    return math.sqrt(2.0 / (config.lowrank_dim + config.max_position_embeddings))


def lowrank_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    *,
    is_causal: bool = True,
    cache_layer=None,
    position_ids: torch.Tensor | None = None,
    implementation: str = "sdpa",
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Causal feature-map attention or bidirectional Linformer (see the module docstring).

    Args:
        attention_mask: (B, L) bool key padding mask (``True`` = real token) or ``None``.
        cache_layer: causal generation state (a linear-attention cache layer holding the
            (B, Hkv, k, D + 1) state): read before and written after this call.
        position_ids: (B or 1, L) positions indexing the Linformer projections (bidirectional only).
    """
    if not is_causal:
        return _linformer(module, query, key, value, attention_mask, scaling, dropout, position_ids, implementation)
    return _causal_feature_map(module, query, key, value, attention_mask, cache_layer)


def _linformer(module, query, key, value, attention_mask, scaling, dropout, position_ids, implementation):
    length = key.shape[2]
    if position_ids is None:
        position_ids = torch.arange(length, device=key.device)[None]
    if attention_mask is not None:
        keep = attention_mask[:, None, :, None].to(key.dtype)  # (B, 1, L, 1)
        key, value = key * keep, value * keep
    e = module.linformer_e[:, position_ids].permute(1, 0, 2).to(key.dtype)  # (B or 1, k, L)
    f = module.linformer_f[:, position_ids].permute(1, 0, 2).to(value.dtype)
    key = torch.matmul(e[:, None], key)  # (B, Hkv, k, D)
    value = torch.matmul(f[:, None], value)  # (B, Hkv, k, D)
    kernel = eager_attention_forward if implementation == "eager" else sdpa_attention_forward
    return kernel(module, query, key, value, None, scaling, dropout, is_causal=False)


def _causal_feature_map(module, query, key, value, attention_mask, cache_layer):
    # Prefix sums in low precision drift; the whole kernel runs in float32 even under autocast.
    with torch.autocast(device_type=query.device.type, enabled=False):
        q, k, v, mask, chunk, g = _float_inputs(module, query, key, value, attention_mask)
        sizes = feature_factors(module.config)
        past = lowrank_state(cache_layer) if cache_layer is not None else None
        if past is None and not torch.compiler.is_compiling():
            # training, full-sequence inference, a prompt: streamed, O(block) memory
            out, end_state = _StreamedCausalLowRank.apply(q, k, v, mask, chunk, sizes)
        else:
            # generation: this call's chunks at once, from the cached state; and torch.compile /
            # torch.export, which trace this one block with autograd's backward (the streamed
            # Function loops over row blocks in Python, so a graph would exist per length)
            if past is None:
                state = q.new_zeros(*v.shape[:2], math.prod(sizes), v.shape[-1] + 1)  # (B, H, k, D + 1)
            else:
                state = past.repeat_interleave(g, dim=1)
            block = _Block(q, k, v, sizes, mask, chunk, state)
            (out, _), end_state = _normalise(block.y(), q.shape[2]), block.end_state
        if cache_layer is not None:
            # the g heads of a group hold one state
            set_lowrank_state(cache_layer, end_state[:, ::g].contiguous(), query.shape[2])
    return out.transpose(1, 2).to(query.dtype).contiguous(), None


# Rows per block of the streamed path (rounded to whole chunks): each block's feature maps,
# chunk states and their gradients are a few MB, so no step allocates O(n * k) at once.
_STREAM_ROWS = 512


def feature_factors(config) -> tuple[int, ...]:
    """Sizes of the softmax factors whose outer product is the k-slot feature map: ``(k,)`` for
    ``lowrank_feature_map="softmax"``, ``(m1, m2)`` with ``m1 * m2 = k`` and ``m1 <= m2`` as close
    as possible for ``"product"`` (16 x 16 for k = 256)."""
    if config.lowrank_feature_map == "softmax":
        return (config.lowrank_dim,)
    return lowrank_grid(config.lowrank_dim)


def _float_inputs(module, query, key, value, attention_mask):
    """float32 feature logits of the queries (B, H, L, M) and keys (repeated to the query heads),
    values (B, H, L, D), float padding mask or None, chunk length and group size g = H / Hkv.

    The logits come from calling ``module.feature_map`` (an ``nn.Linear`` from D to M = the sum of
    the factor sizes) as a module, so its hooks run (accelerate offload, PEFT adapters) and autograd
    differentiates it; the kernel below only sees logits.
    """
    g = query.shape[1] // key.shape[1]
    dtype = next(module.feature_map.parameters()).dtype  # autocast is off here: inputs in the weight's dtype
    q, k = module.feature_map(query.to(dtype)).float(), module.feature_map(key.to(dtype)).float()
    v = value.float()
    if g > 1:
        k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
    mask = attention_mask.float() if attention_mask is not None else None
    length = query.shape[2]
    # torch.export with a dynamic length: ceil(L / C) chunks give shapes whose divisibility its symbolic
    # shapes cannot prove, so the whole sequence is one chunk (the in-chunk form, O(L^2) scores)
    whole = isinstance(length, torch.SymInt) and torch.compiler.is_exporting()
    chunk = length if whole else min(module.config.lowrank_chunk_size, length)
    return q, k, v, mask, chunk, g


def _factor_softmax(logits, sizes):
    """One softmax per factor of the feature logits: a list of (..., m_f)."""
    return [torch.softmax(part, dim=-1) for part in logits.split(sizes, dim=-1)]


def _outer(factors):
    """The k-slot features: the outer product of the factors, flattened (a product of
    distributions, so non-negative and summing to 1 like a single softmax)."""
    if len(factors) == 1:
        return factors[0]
    a, b = factors
    return (a[..., :, None] * b[..., None, :]).flatten(-2)


def _chunks(t, rows, chunk):
    """(B, H, R, c) -> (B, H, chunks, C, c), zero rows appended up to whole chunks."""
    pad = -rows % chunk
    if pad:
        t = F.pad(t, (0, 0, 0, pad))
    return t.view(t.shape[0], t.shape[1], -1, chunk, t.shape[-1])


class _Block:
    """Causal feature-map attention of one row block that starts from the prefix ``state``
    (B, H, k, D + 1). Holds the tensors the backward reuses, in chunks (B, H, nc, C, .): query and
    key factors (keys' first factor zeroed at padding, so a padded key writes nothing), their k-slot
    features, the values with a ones column, the in-chunk score factors and their masked product,
    the state each chunk starts from, and ``end_state`` after the block."""

    def __init__(self, q, k, v, sizes, mask, chunk, state):
        rows = q.shape[2]
        self.qf_soft = _factor_softmax(q, sizes)  # (B, H, R, m_f) each, from the logits q, k
        self.kf_soft = _factor_softmax(k, sizes)
        kf = list(self.kf_soft)
        if mask is not None:
            kf[0] = kf[0] * mask[:, None, :, None]
        self.qf = [_chunks(t, rows, chunk) for t in self.qf_soft]
        self.kf = [_chunks(t, rows, chunk) for t in kf]
        self.fq, self.fk = _outer(self.qf), _outer(self.kf)  # (B, H, nc, C, k)
        self.v1 = _chunks(F.pad(v, (0, 1), value=1.0), rows, chunk)  # (B, H, nc, C, D + 1)
        writes = self.fk.transpose(-1, -2) @ self.v1  # (B, H, nc, k, D + 1)
        # the state each chunk starts from: the block's start plus every earlier chunk's writes
        self.prefix = _running_sum(state, writes)
        self.end_state = self.prefix[:, :, -1] + writes[:, :, -1]
        # in-chunk scores phi(q_i) . phi(k_j) = prod_f (a_f(q_i) . a_f(k_j)): C x C per factor,
        # never the C x k features (the product map's saving)
        self.factor_scores = [a @ b.transpose(-1, -2) for a, b in zip(self.qf, self.kf)]
        scores = self.factor_scores
        self.scores = (scores[0] * scores[1] if len(scores) == 2 else scores[0]).tril()

    def y(self):
        """Unnormalised result (B, H, nc, C, D + 1): in-chunk part plus the read of the prefix."""
        return self.scores @ self.v1 + self.fq @ self.prefix


def _running_sum(start, terms, reverse=False):
    """Exclusive running sum over the chunk axis: ``out[:, :, c] = start + terms[:, :, :c].sum(2)``
    (with ``reverse``, over the chunks after c), added chunk by chunk into one buffer. A block has
    few chunks, so this beats cumsum + cat, and it never subtracts (inclusive - own would cancel
    large terms in float32). Traced graphs take one cumsum over [start, terms[:-1]] instead: the
    same additions in the same order, without a Python loop over a (possibly symbolic) chunk count."""
    if torch.compiler.is_compiling():
        if reverse:
            return _running_sum(start, terms.flip(2)).flip(2)
        return torch.cat([start[:, :, None], terms[:, :, :-1]], dim=2).cumsum(2)
    out = torch.empty_like(terms)
    order = range(terms.shape[2] - 1, -1, -1) if reverse else range(terms.shape[2])
    tracked = torch.is_grad_enabled() and (start.requires_grad or terms.requires_grad)
    prev = None
    for c in order:
        if prev is None:
            out[:, :, c] = start
        elif tracked:  # generation under autograd: differentiable in-place writes
            out[:, :, c] = out[:, :, prev] + terms[:, :, prev]
        else:
            torch.add(out[:, :, prev], terms[:, :, prev], out=out[:, :, c])
        prev = c
    return out


def _normalise(y: torch.Tensor, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, H, nc, C, D + 1) -> numerator over normaliser (B, H, rows, D), normaliser (B, H, rows)."""
    b, h = y.shape[:2]
    y = y.view(b, h, -1, y.shape[-1])[:, :, :rows]
    z = y[..., -1] + _EPS
    return y[..., :-1] / z[..., None], z


def _factor_grads(dfeatures, factors):
    """Gradient of the flattened outer product w.r.t. each factor."""
    if len(factors) == 1:
        return [dfeatures]
    a, b = factors
    d = dfeatures.unflatten(-1, (a.shape[-1], b.shape[-1]))
    return [(d * b[..., None, :]).sum(-1), (d * a[..., :, None]).sum(-2)]


def _softmax_backward(factors, dfactors, rows):
    """d logits (B, H, rows, sum of m_f) from each factor's softmax (B, H, rows, m_f) and its
    gradient in chunks (B, H, nc, C, m_f)."""
    parts = []
    for a, da in zip(factors, dfactors):
        da = da.flatten(2, 3)[:, :, :rows]
        parts.append(a * (da - (da * a).sum(-1, keepdim=True)))
    return torch.cat(parts, dim=-1)


class _StreamedCausalLowRank(torch.autograd.Function):
    """Causal feature-map attention over row blocks; the backward recomputes one block at a time.

    Inputs: feature logits q, k (B, H, L, M) and values v (B, H, L, D), float32 (k, v already
    repeated to the query heads), mask (B, L) float or None, chunk, factor sizes (summing to M).
    Outputs: (B, H, L, D)
    and the state after the last row (B, H, k, D + 1), for a generation cache (not differentiable).
    Saved: q, k (logits), v, mask, the output and its normaliser (B, H, L), and the (k, D + 1)
    state at the start of each block.
    """

    @staticmethod
    def forward(ctx, q, k, v, mask, chunk, sizes):
        b, h, length, d = v.shape
        rows = max(chunk, _STREAM_ROWS // chunk * chunk)
        state = q.new_zeros(b, h, math.prod(sizes), d + 1)  # (k, D + 1)
        out, z = q.new_empty(b, h, length, d), q.new_empty(b, h, length)
        starts = []
        for r0 in range(0, length, rows):
            r1 = min(r0 + rows, length)
            starts.append(state)
            block = _Block(q[:, :, r0:r1], k[:, :, r0:r1], v[:, :, r0:r1], sizes,
                           mask[:, r0:r1] if mask is not None else None, chunk, state)
            state = block.end_state
            out[:, :, r0:r1], z[:, :, r0:r1] = _normalise(block.y(), r1 - r0)
        ctx.save_for_backward(q, k, v, mask, out, z, torch.stack(starts))
        ctx.args = (chunk, rows, sizes)
        ctx.mark_non_differentiable(state)  # the cache's copy: later calls do not backpropagate into it
        return out, state

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out, _grad_state):
        q, k, v, mask, out, z, starts = ctx.saved_tensors
        chunk, rows, sizes = ctx.args
        length = q.shape[2]
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        carry = torch.zeros_like(starts[0])  # d loss / d (state after this block)
        for index in reversed(range(starts.shape[0])):
            r0 = index * rows
            r1 = min(r0 + rows, length)
            n = r1 - r0
            qb, kb, vb = q[:, :, r0:r1], k[:, :, r0:r1], v[:, :, r0:r1]
            mb = mask[:, r0:r1] if mask is not None else None
            blk = _Block(qb, kb, vb, sizes, mb, chunk, starts[index])
            # out = y[..., :D] / z with z = y[..., D] + eps, so dy = (go / z, -(go . out) / z)
            go, zb = grad_out[:, :, r0:r1], z[:, :, r0:r1, None]
            dy = _chunks(torch.cat([go / zb, -(go * out[:, :, r0:r1]).sum(-1, keepdim=True) / zb], dim=-1), n, chunk)
            dscores = (dy @ blk.v1.transpose(-1, -2)).tril_()
            dv1 = blk.scores.transpose(-1, -2) @ dy
            dprefix = blk.fq.transpose(-1, -2) @ dy  # (B, H, nc, k, D + 1)
            # a chunk's write reaches every later chunk's prefix and the state after the block:
            # dwrites[c] = carry + sum of dprefix over the chunks after c, a reversed running sum
            dwrites = _running_sum(carry, dprefix, reverse=True)
            carry = dwrites[:, :, 0] + dprefix[:, :, 0]
            dv1 += blk.fk @ dwrites
            # through the reads of the prefix and the writes into it, then the in-chunk scores
            dqf = _factor_grads(dy @ blk.prefix.transpose(-1, -2), blk.qf)
            dkf = _factor_grads(blk.v1 @ dwrites.transpose(-1, -2), blk.kf)
            scores = blk.factor_scores
            for f, (aq, ak) in enumerate(zip(blk.qf, blk.kf)):
                dsf = dscores * scores[1 - f] if len(scores) == 2 else dscores  # the other factor's scores
                dqf[f] = dqf[f] + dsf @ ak
                dkf[f] = dkf[f] + dsf.transpose(-1, -2) @ aq
            dv[:, :, r0:r1] = dv1.flatten(2, 3)[:, :, :n, :-1]
            if mb is not None:
                dkf[0] = dkf[0] * _chunks(mb[:, None, :, None], n, chunk)
            for feats, dfeats, dx in ((blk.qf_soft, dqf, dq), (blk.kf_soft, dkf, dk)):
                dx[:, :, r0:r1] = _softmax_backward(feats, dfeats, n)  # d logits
        return dq, dk, dv, None, None, None
