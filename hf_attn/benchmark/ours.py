"""Our side of the comparison: hf_attn models and one hf_attn attention layer, sized by a ``BenchSpec``.

The package is imported lazily, so the reference side of the suite works on its own.
"""

from __future__ import annotations

import torch
from torch import nn

from .spec import BenchSpec, SmallSpec

# Benchmark cases that are a mode with a non-default setting: case name -> (mode, config overrides).
MODE_VARIANTS: dict[str, tuple[str, dict]] = {
    "lowrank_softmax": ("lowrank", {"lowrank_feature_map": "softmax"}),  # the default is "product"
    # the LM loss over the full (n x vocab) logits and plain (unfused) ops: what hf_attn 0.3 ran
    # (default since 0.4: the loss in chunks of 1024 tokens, fused RMSNorm / SwiGLU / q,k,v)
    "local_unfused": ("local", {"loss_chunk_size": 0, "fused_ops": False}),
    "lowrank_unfused": ("lowrank", {"loss_chunk_size": 0, "fused_ops": False}),
}


def base_mode(mode: str) -> str:
    """The attention mode of a benchmark mode name (``lowrank_softmax`` -> ``lowrank``)."""
    return MODE_VARIANTS.get(mode, (mode, {}))[0]


def our_config(mode: str, spec: BenchSpec, num_layers: int | None = None):
    """``HfAttnConfig`` of attention mode ``mode`` (or a ``MODE_VARIANTS`` name) at the size of
    ``spec`` (window/rank from ``spec``)."""
    from hf_attn import HfAttnConfig

    mode, overrides = MODE_VARIANTS.get(mode, (mode, {}))
    return HfAttnConfig(
        vocab_size=spec.vocab_size, hidden_size=spec.hidden_size,
        num_hidden_layers=spec.num_layers if num_layers is None else num_layers,
        num_attention_heads=spec.num_heads, intermediate_size=spec.intermediate_size,
        max_position_embeddings=spec.max_positions, attention_mode=mode, sliding_window=spec.window,
        lowrank_dim=spec.rank, hidden_dropout=0.0, attention_dropout=0.0, tie_word_embeddings=True,
        bos_token_id=0, eos_token_id=0, pad_token_id=0, **overrides,
    )


def build_our_model(mode: str, spec: BenchSpec) -> nn.Module:
    """A randomly initialised ``HfAttnForCausalLM`` of mode ``mode`` in ``spec.dtype``."""
    from hf_attn import HfAttnForCausalLM

    return HfAttnForCausalLM(our_config(mode, spec)).to(spec.dtype)


def small_config(mode: str, small: SmallSpec, **overrides):
    """``HfAttnConfig`` of mode ``mode`` at the baby-GPT size of the ``small`` section: SwiGLU of width
    ``small.intermediate_size`` (at least as many MLP weights as a 4x GELU MLP), tied embeddings, positions up
    to ``block_size``, no dropout; every other field (window, rank, chunk) at the config's default;
    ``overrides`` replace any of these."""
    from hf_attn import HfAttnConfig

    fields = dict(
        vocab_size=small.vocab_size, hidden_size=small.hidden_size, num_hidden_layers=small.num_layers,
        num_attention_heads=small.num_heads, intermediate_size=small.intermediate_size,
        max_position_embeddings=small.block_size, attention_mode=mode, hidden_dropout=0.0,
        attention_dropout=0.0, tie_word_embeddings=True, bos_token_id=0, eos_token_id=0, pad_token_id=0,
    )
    return HfAttnConfig(**{**fields, **overrides})


def build_small_model(mode: str, small: SmallSpec, **overrides) -> nn.Module:
    """A randomly initialised float32 ``HfAttnForCausalLM`` of ``small_config(mode, small, **overrides)``."""
    from hf_attn import HfAttnForCausalLM

    return HfAttnForCausalLM(small_config(mode, small, **overrides))


class OurAttentionAsInModel(nn.Module):
    """Layer 0's ``HfAttnAttention`` called exactly as ``HfAttnModel.forward`` calls it (no padding):
    position ids, rotary table (rope positions) and the mode's mask are built inside the step."""

    def __init__(self, mode: str, spec: BenchSpec) -> None:
        super().__init__()
        from hf_attn import HfAttnModel

        # A one-layer model, so the layer sees the config (attention implementation included) that
        # the model resolved for it; only layer 0's attention and the rotary helper are used.
        self.model = HfAttnModel(our_config(mode, spec, num_layers=1))
        self.attn = self.model.layers[0].self_attn

    @property
    def implementation(self) -> str:
        """The attention implementation the model resolved (e.g. ``"sdpa"``)."""
        return str(self.model.config._attn_implementation)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """(B, n, hidden) -> (B, n, hidden)."""
        b, n, _ = hidden.shape
        position_ids = torch.arange(n, device=hidden.device)[None]
        rotary = self.model.rotary
        # as HfAttnModel.forward calls it for positions it made itself: the table lookup
        position_embeddings = None
        if rotary is not None:
            position_embeddings = rotary(position_ids, hidden.dtype, seq_len=n, own_positions=True)
        # the mask in the form this mode's kernel takes, built as HfAttnModel.forward builds it
        mask = self._mask(n, b, hidden.device)
        out, _ = self.attn(hidden, mask, position_ids, position_embeddings)
        return out

    def _mask(self, n: int, b: int, device: torch.device) -> torch.Tensor | None:
        """The mask HfAttnModel.forward builds for n unpadded tokens: none for the full modes (sdpa's
        causal flag; transformers' create_causal_mask returns None there), the mode's own otherwise."""
        build = self.attn.spec.build_mask
        return build(None, n, 0, self.model.config, b, device) if build is not None else None

    def kernel(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """The mode's attention math alone, mask creation included: (B, H, n, D) q, k, v -> (B, n, H, D)."""
        b, _, n, _ = q.shape
        position_ids = torch.arange(n, device=q.device)[None]
        mask = self._mask(n, b, q.device)
        kernel, impl = self.attn._kernel(False, False)  # the kernel HfAttnAttention.forward would pick
        out, _ = kernel(self.attn, q, k, v, mask, scaling=self.attn.scaling, dropout=0.0, is_causal=True,
                        cache_layer=None, position_ids=position_ids, implementation=impl)
        return out


def build_our_layer(mode: str, spec: BenchSpec) -> OurAttentionAsInModel:
    """One hf_attn attention layer of mode ``mode`` (projections included) in ``spec.dtype``."""
    return OurAttentionAsInModel(mode, spec).to(spec.dtype)
