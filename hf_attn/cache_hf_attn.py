"""Generation cache for hf_attn: one mode-specific layer object per decoder layer.

The layer objects come from the attention registry (full KV, sliding window, low-rank state), so
each mode keeps exactly what it needs: full modes every key/value, ``local`` the last w - 1, ``lowrank``
a constant-size prefix state. Subclasses ``transformers.Cache`` so ``generate`` treats it as a cache.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache


class HfAttnCache(Cache):
    """Per-layer generation state plus the count of tokens seen."""

    is_compileable = False

    def __init__(self, config) -> None:
        # the base class wants layers; ours are created lazily by ``layer`` below
        super().__init__(layers=[])
        self.config = config
        self.hf_attn_layers: dict[int, object] = {}
        self.seen_tokens = 0

    def layer(self, layer_idx: int, factory) -> object:
        """The cache layer of ``layer_idx``, created with ``factory(config)`` on first use."""
        if layer_idx not in self.hf_attn_layers:
            self.hf_attn_layers[layer_idx] = factory(self.config)
        return self.hf_attn_layers[layer_idx]

    def advance(self, num_tokens: int) -> None:
        """Called once per forward, after every layer has updated."""
        self.seen_tokens += num_tokens

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Tokens processed so far (not the number stored, which is bounded for local/lowrank)."""
        return self.seen_tokens

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return -1

    def __len__(self) -> int:
        return len(self.hf_attn_layers)

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor the cache holds (for memory accounting)."""
        return [t for layer in self.hf_attn_layers.values() for t in layer.tensors()]

    def nbytes(self) -> int:
        """Bytes held by the cache tensors."""
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: keep the rows of the selected beams."""
        for layer in self.hf_attn_layers.values():
            layer.reorder(beam_idx)

    def crop(self, max_length: int) -> None:
        raise NotImplementedError("HfAttnCache cannot be cropped (local and lowrank states forget the past)")

    def __repr__(self) -> str:
        return f"HfAttnCache(mode={self.config.attention_mode!r}, seen_tokens={self.seen_tokens}, bytes={self.nbytes()})"
