"""Generation caches for hf_attn, built from transformers' cache-layer classes.

A cache is a standard ``transformers.Cache`` whose layers are chosen by ``config.layer_types`` (see
``HfAttnConfig.layer_types``), so ``DynamicCache(config=model.config)``, ``StaticCache`` and the caches
that ``generate()`` creates all hold the right layer for each mode:

- ``eager`` / ``rope``: ``DynamicLayer`` (``StaticLayer``), every key and value;
- ``local``: ``DynamicSlidingWindowLayer`` (``StaticSlidingWindowLayer``), the last ``sliding_window - 1``;
- causal ``lowrank``: ``LinearAttentionLayer``, whose recurrent state holds the constant (B, Hkv, k, D + 1)
  prefix state (S and z); it cannot be cropped (a running sum cannot forget its last terms), so
  assisted decoding and prompt lookup raise ``ValueError`` for this mode.

``check_cache`` refuses a cache built for another mode, batch size or model width with a ``ValueError``.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable

import torch
from transformers.cache_utils import (
    Cache,
    CacheLayerMixin,
    DynamicCache,
    DynamicSlidingWindowLayer,
    LinearAttentionCacheLayerMixin,
    StaticSlidingWindowLayer,
)


def lowrank_state(layer: LinearAttentionCacheLayerMixin) -> torch.Tensor | None:
    """The (B, Hkv, k, D + 1) low-rank state held by a cache layer, or None before its first call."""
    return layer.recurrent_states[0] if layer.is_recurrent_states_initialized[0] else None


def set_lowrank_state(layer: LinearAttentionCacheLayerMixin, state: torch.Tensor, new_tokens: int) -> None:
    """Store a layer's state after a call that saw ``new_tokens`` more tokens."""
    current = layer.recurrent_states[0]
    if current is not None and current.shape != state.shape:  # another batch size: a new buffer
        layer.recurrent_states[0], layer.is_recurrent_states_initialized[0] = None, False
    layer.update_recurrent_state(state.detach())
    layer.has_previous_state[0] = True
    layer.device, layer.dtype = state.device, state.dtype  # read by reorder_cache / offload
    layer.hf_attn_seen_tokens = seen_tokens(layer) + new_tokens


def seen_tokens(layer: LinearAttentionCacheLayerMixin) -> int:
    """Tokens a low-rank state layer has folded in (``set_lowrank_state`` counts them)."""
    return getattr(layer, "hf_attn_seen_tokens", 0)


def past_length(cache: Cache | None):
    """Tokens the cache has seen: an int, or a tensor for static caches. A low-rank cache holds only
    linear-attention layers, for which ``Cache.get_seq_length`` is undefined: each layer counts."""
    if cache is None or not cache.layers:
        return 0
    if all(cache.is_linear):
        return seen_tokens(cache.layers[0])
    return cache.get_seq_length()


class HfAttnCache(DynamicCache):
    """``DynamicCache(config=config)``: the per-mode layers of an hf_attn model, plus a byte count and a
    sequence length for low-rank caches. The model and ``generate()`` create this one."""

    def __init__(self, config) -> None:
        super().__init__(config=config)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Tokens seen so far. transformers leaves this undefined for a cache of linear-attention layers
        only (5.23's generate still asks): a low-rank layer counts its tokens itself."""
        if self.layers and all(self.is_linear):
            return seen_tokens(self.layers[layer_idx])
        return super().get_seq_length(layer_idx)

    def nbytes(self) -> int:
        """Bytes held by the cache tensors."""
        return cache_nbytes(self)


def cache_tensors(cache: Cache) -> list[torch.Tensor]:
    """Every tensor a cache holds (for memory accounting)."""
    out = []
    for layer in cache.layers:
        if isinstance(layer, LinearAttentionCacheLayerMixin) and not isinstance(layer, CacheLayerMixin):
            out += [t for t in layer.recurrent_states.values() if t is not None]
        else:
            out += [t for t in (getattr(layer, "keys", None), getattr(layer, "values", None)) if t is not None]
    return out


def cache_nbytes(cache: Cache) -> int:
    return sum(t.numel() * t.element_size() for t in cache_tensors(cache))


def _layer_problem(layer, config, batch: int) -> str | None:
    """Why ``layer`` cannot serve one layer of this model (None when it can)."""
    mode = config.attention_mode
    name = type(layer).__name__
    if mode == "lowrank":
        if not isinstance(layer, LinearAttentionCacheLayerMixin) or isinstance(layer, CacheLayerMixin):
            return f"it holds {name}, not a linear-attention state layer"
        state = layer.recurrent_states.get(0)
        width = (config.num_key_value_heads, config.lowrank_dim, config.head_dim + 1)
        if state is not None and tuple(state.shape[1:]) != width:
            return f"its state is {tuple(state.shape[1:])}, this model needs (Hkv, k, D + 1) = {width} (model width)"
        if state is not None and state.shape[0] != batch:
            return f"its batch size is {state.shape[0]}, the input's is {batch}"
        return None
    if not isinstance(layer, CacheLayerMixin):
        return f"it holds {name}, a layer of another attention mode"
    if getattr(layer, "is_sliding", False):
        if mode != "local":
            return f"it holds a sliding-window layer ({name}); attention_mode={mode!r} sees every past token"
        window = layer.sliding_window if isinstance(layer, DynamicSlidingWindowLayer) else None
        if isinstance(layer, StaticSlidingWindowLayer):
            window = config.sliding_window if layer.max_cache_len <= config.sliding_window else layer.max_cache_len
        if window != config.sliding_window:
            return f"its sliding window is {window}, this model's is sliding_window={config.sliding_window}"
    keys = layer.keys
    if getattr(layer, "is_initialized", False) and keys is not None and keys.dim() == 4 and keys.numel():
        if keys.shape[0] != batch:
            return f"its batch size is {keys.shape[0]}, the input's is {batch}"
        if (keys.shape[1], keys.shape[-1]) != (config.num_key_value_heads, config.head_dim):
            return (f"it holds {keys.shape[1]} heads of dim {keys.shape[-1]}, this model has "
                    f"num_key_value_heads={config.num_key_value_heads}, head_dim={config.head_dim} (model width)")
    return None


def check_cache(cache, config, batch: int) -> None:
    """Refuse a cache this model cannot continue from, with a ``ValueError`` naming the mismatch."""
    if not isinstance(cache, Cache):
        raise ValueError(
            f"cache must be a transformers Cache (e.g. DynamicCache(config=model.config)), got {type(cache).__name__}"
        )
    if not cache.layers:
        if config.attention_mode == "lowrank":
            raise ValueError(
                "cache: attention_mode='lowrank' keeps a per-layer state that an empty DynamicCache() cannot hold; "
                "build it with DynamicCache(config=model.config)"
            )
        return
    if len(cache.layers) != config.num_hidden_layers:
        raise ValueError(f"cache has {len(cache.layers)} layers, this model has num_hidden_layers={config.num_hidden_layers}")
    for index, layer in enumerate(cache.layers):
        problem = _layer_problem(layer, config, batch)
        if problem:
            raise ValueError(
                f"cache layer {index} was not built for this attention_mode={config.attention_mode!r} model: {problem}. "
                "Build the cache with DynamicCache(config=model.config), or let generate() create it."
            )


class BoundedTensorCache:
    """Keeps recently built tensors up to ``max_bytes`` in total; the oldest go first. Owned by a model
    (not module-level), so its memory is released with the model."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._items: OrderedDict[Hashable, torch.Tensor] = OrderedDict()

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._items.values() if t is not None)

    def get(self, key: Hashable, build: Callable[[], torch.Tensor | None]) -> torch.Tensor | None:
        """The tensor stored under ``key``, built with ``build()`` on a miss."""
        if key in self._items:
            self._items.move_to_end(key)
            return self._items[key]
        value = build()
        size = value.numel() * value.element_size() if value is not None else 0
        if size <= self.max_bytes and not torch.compiler.is_compiling():
            self._items[key] = value
            while self.nbytes > self.max_bytes:
                self._items.popitem(last=False)
        return value



__all__ = ["BoundedTensorCache", "HfAttnCache", "cache_nbytes", "cache_tensors", "check_cache", "lowrank_state", "past_length",
           "set_lowrank_state"]
