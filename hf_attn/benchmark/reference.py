"""The Hugging Face side of the comparison, built from configs with random weights (no downloads).

Whole models, all sized by one :class:`~hf_attn.benchmark.spec.BenchSpec`:

- ``gpt2_eager`` / ``gpt2_sdpa``: ``GPT2LMHeadModel`` (learned absolute positions, GELU MLP of width
  ``intermediate_size``), the classic reference for our ``eager`` mode;
- ``llama_sdpa``: ``LlamaForCausalLM`` (rotary positions, SwiGLU, RMSNorm), the reference for ``rope``;
- ``mistral_eager`` / ``mistral_sdpa``: ``MistralForCausalLM`` with ``sliding_window = window``, the
  reference for ``local``. Both build an (n, n) mask in ``create_sliding_window_causal_mask``;
- ``mistral_hf_attn_local``: the same model with ``attn_implementation="hf_attn_local"``
  (``hf_attn.lend_local``), i.e. our local kernel lent to stock Mistral: no (n, n) mask. It is a
  stock model but runs our code, so its rows are on the ``ours`` side (``LENT_CASES``).

Attention layers (one layer, projections included, forward + backward; ``kernel(q, k, v)`` is the
attention math alone, without projections, for the ``kernel`` section):

- ``sdpa_causal``: q/k/v/o projections around ``F.scaled_dot_product_attention(is_causal=True)``,
  i.e. the best full causal attention PyTorch offers at the same n, heads and head_dim;
- ``mistral_eager`` / ``mistral_sdpa`` / ``mistral_hf_attn_local``: ``MistralAttention`` called the way
  ``MistralModel`` calls it, with the mask built *inside the step* by the model's own
  ``create_sliding_window_causal_mask`` and the rotary table by ``MistralRotaryEmbedding``, so the
  layer pays for the (n, n) mask as the model does (``hf_attn_local``: a key-padding mask or none).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedModel,
)
from transformers.masking_utils import create_sliding_window_causal_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.mistral.modeling_mistral import (
    MistralAttention,
    MistralRotaryEmbedding,
    eager_attention_forward,
)

from .spec import BenchSpec

# name -> (model class, attention implementation)
REFERENCE_MODELS: dict[str, tuple[type[PreTrainedModel], str]] = {
    "gpt2_eager": (GPT2LMHeadModel, "eager"),
    "gpt2_sdpa": (GPT2LMHeadModel, "sdpa"),
    "llama_sdpa": (LlamaForCausalLM, "sdpa"),
    "mistral_eager": (MistralForCausalLM, "eager"),
    "mistral_sdpa": (MistralForCausalLM, "sdpa"),
    "mistral_hf_attn_local": (MistralForCausalLM, "hf_attn_local"),
}
# attention layer name -> the Mistral attention implementation it runs
MISTRAL_LAYERS = {"mistral_eager": "eager", "mistral_sdpa": "sdpa", "mistral_hf_attn_local": "hf_attn_local"}
REFERENCE_LAYERS = ("sdpa_causal", *MISTRAL_LAYERS)
# Stock models running hf_attn's kernel (attn_implementation="hf_attn_local"): reported as ours.
LENT_CASES = ("mistral_hf_attn_local",)

# What kind of attention each reference computes, for the FLOP count (hf_attn mode names).
REFERENCE_ATTENTION_KIND: dict[str, str] = {
    "gpt2_eager": "eager", "gpt2_sdpa": "eager", "llama_sdpa": "eager",
    "mistral_eager": "local", "mistral_sdpa": "local", "mistral_hf_attn_local": "local", "sdpa_causal": "eager",
    "refgpt_sdpa": "eager",  # reference_gpt.RefGPT, the yardstick of the small section
}


def _registered(implementation: str) -> str:
    """``implementation``, after registering it with transformers when it is hf_attn's."""
    if implementation == "hf_attn_local":
        from hf_attn.lend_local import register_local_attention

        register_local_attention()
    return implementation


def _mistral_config(spec: BenchSpec, num_layers: int) -> MistralConfig:
    return MistralConfig(
        vocab_size=spec.vocab_size, hidden_size=spec.hidden_size, intermediate_size=spec.intermediate_size,
        num_hidden_layers=num_layers, num_attention_heads=spec.num_heads, num_key_value_heads=spec.num_heads,
        max_position_embeddings=spec.max_positions, sliding_window=spec.window, rms_norm_eps=1e-6,
        tie_word_embeddings=True, attention_dropout=0.0, bos_token_id=0, eos_token_id=0, pad_token_id=0,
    )


def reference_config(name: str, spec: BenchSpec):
    """The transformers config of reference model ``name`` at the size of ``spec``."""
    if name.startswith("gpt2"):
        return GPT2Config(
            vocab_size=spec.vocab_size, n_positions=spec.max_positions, n_embd=spec.hidden_size,
            n_layer=spec.num_layers, n_head=spec.num_heads, n_inner=spec.intermediate_size,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=True,
            bos_token_id=0, eos_token_id=0, pad_token_id=0,
        )
    if name.startswith("llama"):
        return LlamaConfig(
            vocab_size=spec.vocab_size, hidden_size=spec.hidden_size, intermediate_size=spec.intermediate_size,
            num_hidden_layers=spec.num_layers, num_attention_heads=spec.num_heads,
            num_key_value_heads=spec.num_heads, max_position_embeddings=spec.max_positions, rms_norm_eps=1e-6,
            tie_word_embeddings=True, attention_dropout=0.0, bos_token_id=0, eos_token_id=0, pad_token_id=0,
        )
    if name.startswith("mistral"):
        return _mistral_config(spec, spec.num_layers)
    raise ValueError(f"reference model {name!r} is unknown: allowed values are {sorted(REFERENCE_MODELS)}")


def build_reference_model(name: str, spec: BenchSpec) -> PreTrainedModel:
    """A randomly initialised reference causal LM ``name`` (see ``REFERENCE_MODELS``) in ``spec.dtype``."""
    if name not in REFERENCE_MODELS:
        raise ValueError(f"reference model {name!r} is unknown: allowed values are {sorted(REFERENCE_MODELS)}")
    cls, impl = REFERENCE_MODELS[name]
    model = cls._from_config(reference_config(name, spec), attn_implementation=_registered(impl))
    return model.to(spec.dtype)


class CausalSdpaAttention(nn.Module):
    """Baseline attention layer: q/k/v/o projections around ``F.scaled_dot_product_attention(is_causal=True)``."""

    def __init__(self, spec: BenchSpec) -> None:
        super().__init__()
        self.num_heads, self.head_dim = spec.num_heads, spec.head_dim
        self.q_proj = nn.Linear(spec.hidden_size, spec.hidden_size, bias=False)
        self.k_proj = nn.Linear(spec.hidden_size, spec.hidden_size, bias=False)
        self.v_proj = nn.Linear(spec.hidden_size, spec.hidden_size, bias=False)
        self.o_proj = nn.Linear(spec.hidden_size, spec.hidden_size, bias=False)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """(B, n, hidden) -> (B, n, hidden)."""
        b, n, _ = hidden.shape
        shape = (b, n, self.num_heads, self.head_dim)
        q = self.q_proj(hidden).view(shape).transpose(1, 2)  # (B, H, n, D)
        k = self.k_proj(hidden).view(shape).transpose(1, 2)
        v = self.v_proj(hidden).view(shape).transpose(1, 2)
        out = self.kernel(q, k, v)  # (B, H, n, D)
        return self.o_proj(out.transpose(1, 2).reshape(b, n, -1))

    def kernel(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """The attention math alone: (B, H, n, D) q, k, v -> (B, H, n, D)."""
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)


class MistralAttentionAsInModel(nn.Module):
    """``MistralAttention`` plus what ``MistralModel.forward`` does for it: sliding-window mask and rotary table."""

    def __init__(self, spec: BenchSpec, implementation: str) -> None:
        super().__init__()
        self.config = _mistral_config(spec, num_layers=1)
        self.config._attn_implementation = _registered(implementation)
        self.attn = MistralAttention(self.config, layer_idx=0)
        self.rotary = MistralRotaryEmbedding(self.config)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """(B, n, hidden) -> (B, n, hidden), building the mask exactly as the model does."""
        position_ids = torch.arange(hidden.shape[1], device=hidden.device)[None]
        mask = create_sliding_window_causal_mask(
            config=self.config, inputs_embeds=hidden, attention_mask=None, cache=None,
            position_ids=position_ids,
        )
        out, _ = self.attn(hidden, self.rotary(hidden, position_ids), mask)
        return out

    def kernel(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """The attention math alone, mask creation included: (B, H, n, D) q, k, v -> (B, n, H, D)."""
        b, _, n, _ = q.shape
        # masking_utils reads only the shape, dtype and device of inputs_embeds: a stride-0 stand-in
        embeds = q.new_zeros(()).expand(b, n, self.config.hidden_size)
        mask = create_sliding_window_causal_mask(
            config=self.config, inputs_embeds=embeds, attention_mask=None, cache=None,
            position_ids=torch.arange(n, device=q.device)[None],
        )
        interface = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention_forward)
        out, _ = interface(self.attn, q, k, v, mask, dropout=0.0, scaling=self.attn.scaling,
                           sliding_window=self.config.sliding_window)
        return out


def build_reference_layer(name: str, spec: BenchSpec) -> nn.Module:
    """Reference attention layer ``name`` (see ``REFERENCE_LAYERS``) mapping (B, n, hidden) -> (B, n, hidden);
    its ``kernel(q, k, v)`` method runs the attention math alone."""
    if name == "sdpa_causal":
        layer: nn.Module = CausalSdpaAttention(spec)
    elif name in MISTRAL_LAYERS:
        layer = MistralAttentionAsInModel(spec, MISTRAL_LAYERS[name])
    else:
        raise ValueError(f"reference layer {name!r} is unknown: allowed values are {list(REFERENCE_LAYERS)}")
    return layer.to(spec.dtype)
