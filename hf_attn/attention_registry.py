"""The one place that maps ``config.attention_mode`` to its implementation.

Each entry names the kernel (shared signature
``kernel(module, query, key, value, mask, scaling, dropout, **kwargs) -> (output, weights)``),
the kind of mask it takes (``"full"``: (B, 1, Lq, Lk) bool or None; ``"keys"``: (B, Lk) bool key
padding mask or None, the kernel applies its own structure), the generation cache layer it keeps,
and an optional hook that adds mode-specific parameters to the attention module.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from .attention_eager import FullKVCacheLayer, eager_attention_forward, sdpa_attention_forward
from .attention_local import SlidingWindowCacheLayer, local_attention_forward
from .attention_lowrank import LowRankStateCacheLayer, init_lowrank_module, lowrank_attention_forward


@dataclass(frozen=True)
class AttentionSpec:
    """How one attention mode plugs into ``HfAttnAttention``."""

    kernel: Callable
    mask_kind: str
    make_cache_layer: Callable  # config -> cache layer with update(key, value), tensors(), reorder(index)
    init_module: Callable | None = None


ATTENTION_REGISTRY: dict[str, AttentionSpec] = {
    # full softmax; the "eager"/"sdpa" attn_implementation picks the kernel at call time
    "eager": AttentionSpec(sdpa_attention_forward, "full", lambda config: FullKVCacheLayer()),
    "rope": AttentionSpec(sdpa_attention_forward, "full", lambda config: FullKVCacheLayer()),
    "local": AttentionSpec(
        local_attention_forward, "keys", lambda config: SlidingWindowCacheLayer(config.sliding_window)
    ),
    "lowrank": AttentionSpec(
        lowrank_attention_forward, "keys", lambda config: LowRankStateCacheLayer(), init_lowrank_module
    ),
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
