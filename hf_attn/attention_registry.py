"""The one place that maps ``config.attention_mode`` to its implementation.

Each entry names the kernel (shared signature
``kernel(module, query, key, value, mask, scaling, dropout, **kwargs) -> (output, weights)``),
how to build the mask it takes (once per forward, shared by every layer), and an optional hook that
adds mode-specific parameters to the attention module. The generation cache layer of each mode is
named by ``HfAttnConfig.layer_types`` (see ``cache_hf_attn``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .attention_eager import eager_attention_forward, sdpa_attention_forward
from .attention_local import build_local_block_mask, local_attention_forward, local_dense_weights
from .attention_lowrank import init_lowrank_module, lowrank_attention_forward, lowrank_dense_weights

# build_mask(key_padding_mask (B, past + L) bool or None, query_length, past_length, config, batch, device) -> mask
MaskBuilder = Callable[[torch.Tensor | None, int, int, object, int, torch.device], torch.Tensor | None]


def _local_mask(key_mask, query_length, past_length, config, batch, device):
    if key_mask is None and (query_length == 1 or past_length == 0):
        return None  # no padding and (one token or no cache): the kernel's fast paths need no mask
    cached = min(past_length, config.sliding_window - 1)  # what the window cache holds
    keys = key_mask[:, -(cached + query_length):] if key_mask is not None else None
    if torch.compiler.is_exporting() and isinstance(query_length, torch.SymInt):
        return keys  # torch.export with a dynamic length: the kernel's dense path takes the padding mask
    return build_local_block_mask(keys, query_length, cached, config.sliding_window, config.is_causal, batch, device)


def _new_keys_mask(key_mask, query_length, past_length, config, batch, device):
    return key_mask[:, -query_length:] if key_mask is not None else None  # the state holds the past


@dataclass(frozen=True)
class AttentionSpec:
    """How one attention mode plugs into ``HfAttnAttention``."""

    kernel: Callable
    # None for the full modes: their mask comes from transformers' create_causal_mask
    build_mask: MaskBuilder | None = None
    init_module: Callable | None = None
    # full softmax modes honour any transformers attn_implementation (eager, sdpa, flash, ...)
    full_attention: bool = False
    # dense_weights(module, weights, query, key, value, attention_mask=, position_ids=) -> (B, H, Lq, Lk):
    # the mode's own weights as full attention weights (config.output_attentions_layout="dense");
    # None where the weights already are
    dense_weights: Callable | None = None


ATTENTION_REGISTRY: dict[str, AttentionSpec] = {
    "eager": AttentionSpec(sdpa_attention_forward, full_attention=True),
    "rope": AttentionSpec(sdpa_attention_forward, full_attention=True),
    "local": AttentionSpec(local_attention_forward, _local_mask, dense_weights=local_dense_weights),
    "lowrank": AttentionSpec(lowrank_attention_forward, _new_keys_mask, init_lowrank_module,
                             dense_weights=lowrank_dense_weights),
}

# Kernels of the full modes by HF ``attn_implementation`` name; other names go through
# transformers' AttentionInterface.
FULL_ATTENTION_KERNELS: dict[str, Callable] = {"eager": eager_attention_forward, "sdpa": sdpa_attention_forward}


def get_attention_spec(mode: str) -> AttentionSpec:
    """Look a mode up; unknown names raise ``ValueError`` listing the valid ones."""
    try:
        return ATTENTION_REGISTRY[mode]
    except KeyError:
        raise ValueError(f"attention_mode={mode!r} is not registered; allowed values are {sorted(ATTENTION_REGISTRY)}") from None
