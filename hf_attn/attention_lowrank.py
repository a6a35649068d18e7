"""Low-rank attention, mode ``lowrank``; k = ``config.lowrank_dim``.

Bidirectional (``is_causal=False``): exact Linformer (Wang et al., "Linformer: Self-Attention with
Linear Complexity", 2020). Keys and values are projected along the sequence axis to k slots,
``K' = E K``, ``V' = F V`` with learned E, F of shape (k, max_position_embeddings), then
``out = softmax(q K'^T * scaling) V'``. E and F are indexed by position id, so left padding does not
shift the projection, and padding tokens are zeroed before projecting. Cost O(n * k).

Causal (the default): plain Linformer mixes future tokens into every slot, so a causal LM cannot use
it. We factorise the attention matrix through a non-negative rank-k feature map instead
(Katharopoulos et al., "Transformers are RNNs", 2020; Choromanski et al., "Performer", 2021):
``phi(x) = softmax(x W)`` with learned W (D, k), and
``out_i = phi(q_i) S_i / (phi(q_i) . z_i)``, ``S_i = sum_{j<=i} phi(k_j) v_j^T``, ``z_i = sum_{j<=i} phi(k_j)``.
The attention matrix ``phi(Q) phi(K)^T`` (masked to j <= i, rows normalised) has rank <= k: each key
writes into k soft slots, each query reads them, like Linformer's k compressed positions but
assigned by content, so a prefix is summarised without seeing the future. The prefix sums run in
chunks of ``config.lowrank_chunk_size``: exact within a chunk, carried state across chunks, so time
is O(n * k * D). Without a cache (training, full-sequence inference) the chunks are streamed in
blocks of rows by ``_StreamedCausalLowRank``, whose backward recomputes one block at a time: saved
memory is q, k, v plus one (k, D + 1) state per block, and no step allocates an (n, k) buffer (the
batched autograd version kept the (n, k) feature maps and every chunk state, several times the size
of q, k and v at k = 256, and its page faults grew faster than n). With a cache (generation) the
call's chunks run at once through the same block function, from the cached state. Generation keeps only (S, z): a
constant (B, Hkv, k, D + 1) state per layer.
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

# Keeps the normaliser of a query that has seen only padding away from 0/0.
_EPS = 1e-6


def init_lowrank_module(module: nn.Module, config) -> None:
    """Add the mode's parameters to an attention module."""
    if config.is_causal:
        module.feature_map = nn.Linear(config.head_dim, config.lowrank_dim, bias=False)
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
    cache_layer: LowRankStateCacheLayer | None = None,
    position_ids: torch.Tensor | None = None,
    implementation: str = "sdpa",
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Causal feature-map attention or bidirectional Linformer (see the module docstring).

    Args:
        attention_mask: (B, L) bool key padding mask (``True`` = real token) or ``None``.
        cache_layer: causal generation state; read before and written after this call.
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
        q, k, v, weight, mask, chunk, g = _float_inputs(module, query, key, value, attention_mask)
        if cache_layer is None:  # training and full-sequence inference: streamed, O(block) memory
            out = _StreamedCausalLowRank.apply(q, k, v, weight, mask, chunk)
        else:  # generation: this call's chunks at once, from and back into the cached state
            b, h, _, d = q.shape
            past = cache_layer.state
            state = past.repeat_interleave(g, dim=1) if past is not None else q.new_zeros(b, h, weight.shape[0], d + 1)
            parts, end_state = _block_forward(q, k, v, weight, mask, chunk, state)
            cache_layer.state = end_state[:, ::g].contiguous()  # the g heads of a group hold one state
            out = _normalise(parts[-1], q.shape[2])
    return out.transpose(1, 2).to(query.dtype).contiguous(), None


# Rows per block of the streamed path (rounded to whole chunks): each block's feature maps,
# chunk states and their gradients are a few MB, so no step allocates O(n * k) at once.
_STREAM_ROWS = 512


def _float_inputs(module, query, key, value, attention_mask):
    """float32 q (B, H, L, D), k and v repeated to the query heads, feature weight (k, D), float
    padding mask or None, chunk length and group size g = H / Hkv (features of a shared key are
    recomputed per query head: simple and exact)."""
    g = query.shape[1] // key.shape[1]
    q, k, v = query.float(), key.float(), value.float()
    if g > 1:
        k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
    mask = attention_mask.float() if attention_mask is not None else None
    chunk = min(module.config.lowrank_chunk_size, query.shape[2])
    return q, k, v, module.feature_map.weight.float(), mask, chunk, g


def _block_forward(q, k, v, weight, mask, chunk, state):
    """Causal feature-map attention of one row block that starts with prefix ``state`` (B, H, k, D + 1).

    Returns the tensors the backward reuses: the features (fk before and after the padding mask),
    values with the ones column, masked in-chunk scores, each chunk's starting state, the
    unnormalised result y (B, H, chunks, C, D + 1) and the state after the block.
    """
    pad = -q.shape[2] % chunk
    fq = torch.softmax(q @ weight.t(), dim=-1)  # (B, H, R, k)
    fk_soft = torch.softmax(k @ weight.t(), dim=-1)
    fk = fk_soft * mask[:, None, :, None] if mask is not None else fk_soft  # padding writes nothing
    v1 = F.pad(v, (0, 1), value=1.0)  # (B, H, R, D + 1)
    if pad:  # zero rows at the end: no features, so they write nothing and are cut from the output
        fq, fk, v1 = (F.pad(t, (0, 0, 0, pad)) for t in (fq, fk, v1))
    b, h, padded, rank = fq.shape
    n_chunks = padded // chunk
    fq, fk, v1 = (t.view(b, h, n_chunks, chunk, t.shape[-1]) for t in (fq, fk, v1))
    writes = fk.transpose(-1, -2) @ v1  # (B, H, nc, k, D + 1)
    inclusive = writes.cumsum(2)
    end_state = state + inclusive[:, :, -1]
    # the state each chunk starts from: the block's start plus every earlier chunk's writes (a
    # shifted scan, not inclusive - writes, which would cancel large terms in float32)
    prefix = torch.cat([state[:, :, None], inclusive[:, :, :-1] + state[:, :, None]], dim=2)
    scores = (fq @ fk.transpose(-1, -2)).tril_()  # (B, H, nc, C, C)
    y = scores @ v1 + fq @ prefix
    return (fq, fk_soft, fk, v1, scores, prefix, y), end_state


def _normalise(y: torch.Tensor, rows: int) -> torch.Tensor:
    """(B, H, nc, C, D + 1) -> (B, H, rows, D): numerator over normaliser."""
    b, h = y.shape[:2]
    y = y.view(b, h, -1, y.shape[-1])[:, :, :rows]
    return y[..., :-1] / (y[..., -1:] + _EPS)


class _StreamedCausalLowRank(torch.autograd.Function):
    """Causal feature-map attention over row blocks; the backward recomputes one block at a time.

    Inputs: q, k, v (B, H, L, D) float32 (k, v already repeated to the query heads), weight (k, D),
    mask (B, L) float or None, chunk. Output (B, H, L, D). Saved: q, k, v, weight, mask and the
    (k, D + 1) state at the start of each block.
    """

    @staticmethod
    def forward(ctx, q, k, v, weight, mask, chunk):
        b, h, length, d = q.shape
        rows = max(chunk, _STREAM_ROWS // chunk * chunk)
        state = q.new_zeros(b, h, weight.shape[0], d + 1)
        out = q.new_empty(b, h, length, d)
        starts = []
        for r0 in range(0, length, rows):
            r1 = min(r0 + rows, length)
            starts.append(state)
            parts, state = _block_forward(q[:, :, r0:r1], k[:, :, r0:r1], v[:, :, r0:r1], weight,
                                          mask[:, r0:r1] if mask is not None else None, chunk, state)
            out[:, :, r0:r1] = _normalise(parts[-1], r1 - r0)
        ctx.save_for_backward(q, k, v, weight, mask, torch.stack(starts))
        ctx.args = (chunk, rows)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        q, k, v, weight, mask, starts = ctx.saved_tensors
        chunk, rows = ctx.args
        length = q.shape[2]
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        dweight = torch.zeros_like(weight)
        carry = torch.zeros_like(starts[0])  # d loss / d (state after this block)
        for index in reversed(range(starts.shape[0])):
            r0 = index * rows
            r1 = min(r0 + rows, length)
            qb, kb, vb = q[:, :, r0:r1], k[:, :, r0:r1], v[:, :, r0:r1]
            mb = mask[:, r0:r1] if mask is not None else None
            (fq, fk_soft, fk, v1, scores, prefix, y), _ = _block_forward(qb, kb, vb, weight, mb, chunk, starts[index])
            b, h, n_chunks, size, width = y.shape
            # out = y[..., :D] / z, z = y[..., D] + eps
            go = F.pad(grad_out[:, :, r0:r1], (0, 0, 0, n_chunks * size - (r1 - r0))).view(b, h, n_chunks, size, -1)
            z = y[..., -1:] + _EPS
            out = y[..., :-1] / z
            dy = torch.cat([go / z, -(go * out).sum(-1, keepdim=True) / z], dim=-1)  # (B, H, nc, C, D + 1)
            dscores = (dy @ v1.transpose(-1, -2)).tril_()
            dfq = dscores @ fk + dy @ prefix.transpose(-1, -2)
            dfk = dscores.transpose(-1, -2) @ fq
            dv1 = scores.transpose(-1, -2) @ dy
            dprefix = fq.transpose(-1, -2) @ dy  # (B, H, nc, k, D + 1)
            # a chunk's write reaches every later chunk's prefix and the state after the block:
            # a reversed exclusive scan (shifted, so no large term is added and subtracted)
            later = dprefix.flip(2).cumsum(2).flip(2)  # sum over chunks >= c
            dwrites = torch.cat([later[:, :, 1:], torch.zeros_like(later[:, :, :1])], dim=2) + carry[:, :, None]
            carry = carry + later[:, :, 0]
            dfk += v1 @ dwrites.transpose(-1, -2)
            dv1 += fk @ dwrites
            n = r1 - r0
            dfq, dfk, dv1 = (t.view(b, h, -1, t.shape[-1])[:, :, :n] for t in (dfq, dfk, dv1))
            fq = fq.view(b, h, -1, fq.shape[-1])[:, :, :n]
            if mb is not None:
                dfk = dfk * mb[:, None, :, None]
            dv[:, :, r0:r1] = dv1[..., :-1]
            for feats, dfeats, x, dx in ((fq, dfq, qb, dq), (fk_soft, dfk, kb, dk)):
                dlogits = feats * (dfeats - (dfeats * feats).sum(-1, keepdim=True))  # softmax backward
                dx[:, :, r0:r1] = dlogits @ weight
                dweight += dlogits.reshape(-1, dlogits.shape[-1]).t() @ x.reshape(-1, x.shape[-1])
        return dq, dk, dv, dweight, None, None


class LowRankStateCacheLayer:
    """Causal low-rank generation state: (B, Hkv, k, D + 1) holding S (first D channels) and z
    (last channel); constant size, whatever the generated length."""

    def __init__(self) -> None:
        self.state: torch.Tensor | None = None

    def update(self, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values are folded into the state by the kernel, never stored."""
        return key, value

    def tensors(self) -> list[torch.Tensor]:
        return [self.state] if self.state is not None else []

    def reorder(self, index: torch.Tensor) -> None:
        if self.state is not None:
            self.state = self.state.index_select(0, index.to(self.state.device))
