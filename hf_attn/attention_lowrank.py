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
is O(n * k * D) and memory O(n * k + (n / chunk) * k * D). Generation keeps only (S, z): a constant
(B, Hkv, k, D + 1) state per layer.
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
    out_dtype = query.dtype
    b, h, length, d = query.shape
    hkv = key.shape[1]
    g = h // hkv
    chunk = min(module.config.lowrank_chunk_size, length)
    n_chunks = -(-length // chunk)
    pad = n_chunks * chunk - length
    # Prefix sums in low precision drift; do the whole kernel in float32 even under autocast.
    with torch.autocast(device_type=query.device.type, enabled=False):
        weight = module.feature_map.weight.float().t()  # (D, k)
        fq = torch.softmax(query.float() @ weight, dim=-1)  # (B, H, L, k)
        fk = torch.softmax(key.float() @ weight, dim=-1)  # (B, Hkv, L, k)
        # A ones column rides along with the values, so each matmul below yields the numerator
        # (first D channels) and the normaliser phi(q) . z (last channel) together.
        v = F.pad(value.float(), (0, 1), value=1.0)  # (B, Hkv, L, D + 1)
        if attention_mask is not None:
            fk = fk * attention_mask[:, None, :, None].float()  # padding writes nothing
        if pad:
            fq, fk, v = (F.pad(t, (0, 0, 0, pad)) for t in (fq, fk, v))
        rank = fk.shape[-1]
        fq = fq.view(b, hkv, g, n_chunks, chunk, rank)
        fk = fk.view(b, hkv, 1, n_chunks, chunk, rank)
        v = v.view(b, hkv, 1, n_chunks, chunk, d + 1)

        chunk_state = fk.transpose(-1, -2) @ v  # (B, Hkv, 1, nc, k, D + 1): what each chunk writes
        inclusive = chunk_state.cumsum(3)
        before = inclusive - chunk_state  # state at the start of each chunk
        past = cache_layer.state if cache_layer is not None else None
        if past is not None:
            before = before + past[:, :, None, None]

        scores = (fq @ fk.transpose(-1, -2)).tril()  # (B, Hkv, g, nc, C, C), exact inside a chunk
        out = scores @ v + fq @ before  # (B, Hkv, g, nc, C, D + 1)
        out = out[..., :d] / (out[..., d:] + _EPS)

        if cache_layer is not None:
            total = inclusive[:, :, 0, -1]  # (B, Hkv, k, D + 1)
            cache_layer.state = total + past if past is not None else total

    out = out.reshape(b, h, n_chunks * chunk, d)[:, :, :length]
    return out.transpose(1, 2).to(out_dtype).contiguous(), None


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
