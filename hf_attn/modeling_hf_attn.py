"""The hf_attn transformer: a pre-norm decoder (RMSNorm and SwiGLU MLP by default; LayerNorm and the
plain GPT MLP on request) whose attention is chosen by ``config.attention_mode`` through the
attention registry.

Classes in dependency order: norm -> MLP -> attention -> block -> pretrained base -> model -> heads.
Tensor shapes: B batch, L new tokens, T = past + L tokens, H query heads, Hkv key/value heads, D head dim.
"""

from __future__ import annotations

import os
import warnings

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicCache
from transformers.generation.configuration_utils import GenerationMode
from transformers.loss.loss_utils import ForCausalLMLoss
from transformers.masking_utils import (
    create_bidirectional_mask,
    create_causal_mask,
    create_sliding_window_causal_mask,
)
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import (
    BaseModelOutputWithPast,
    CausalLMOutputWithPast,
    SequenceClassifierOutputWithPast,
)
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .attention_lowrank import linformer_init_std
from .attention_registry import FULL_ATTENTION_KERNELS, get_attention_spec
from .attention_rope import HfAttnRotary, apply_rotary, rotary_head_tables, rotary_kernels, split_rotate
from .cache_hf_attn import BoundedTensorCache, HfAttnCache, check_cache, past_length
from .configuration_hf_attn import HfAttnConfig
from .fused_ops import chunked_lm_loss, norm_in_float32, plain_linear, rms_norm, silu_mul_linear

# Bytes of size-only masks one model keeps for reuse (local mode's blocked mask is O(n * w) bytes).
_MASK_CACHE_BYTES = 64 * 2**20

# Auto classes written into every saved config, so any of them loads a saved folder with remote code.
AUTO_MAP = {
    "AutoConfig": "configuration_hf_attn.HfAttnConfig",
    "AutoModel": "modeling_hf_attn.HfAttnModel",
    "AutoModelForCausalLM": "modeling_hf_attn.HfAttnForCausalLM",
    "AutoModelForSequenceClassification": "modeling_hf_attn.HfAttnForSequenceClassification",
}


def _fused(config: HfAttnConfig | None) -> bool:
    """Whether the fused training ops (``fused_ops.py``) may run: ``config.fused_ops`` and not while
    ``torch.compile`` / ``torch.export`` trace the model (the compiler fuses the plain ops itself).
    Read at every call (the field may be switched on a built model) with ``object.__getattribute__``:
    the config's own attribute lookup (its ``attribute_map`` aliases, which do not name this field)
    costs more than the read on this per-layer path. Tracing is asked first: dynamo cannot trace
    ``object.__getattribute__``, and traced graphs take the plain ops anyway."""
    return not _tracing() and (config is None or object.__getattribute__(config, "fused_ops"))


class HfAttnRMSNorm(nn.Module):
    """Root-mean-square layer norm (Zhang & Sennrich, 2019), computed in float32."""

    def __init__(self, hidden_size: int, eps: float = 1e-6, config: HfAttnConfig | None = None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps
        self.config = config  # read for ``fused_ops`` at every call

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return rms_norm(hidden_states, self.weight, self.eps, fused=_fused(self.config))


class HfAttnLayerNorm(nn.Module):
    """Bias-free layer norm (``norm_type="layernorm"``), computed in float32 by torch's fused kernel.
    Takes the same arguments as ``HfAttnRMSNorm`` (``config`` unused: it has no fused-ops switch)."""

    def __init__(self, hidden_size: int, eps: float = 1e-6, config: HfAttnConfig | None = None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return norm_in_float32(self._norm, hidden_states, self.weight)

    def _norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, (x.shape[-1],), weight, None, self.eps)


NORMS = {"rmsnorm": HfAttnRMSNorm, "layernorm": HfAttnLayerNorm}


def build_norm(config: HfAttnConfig) -> nn.Module:
    """The norm layer ``config.norm_type`` names, over ``hidden_size``."""
    return NORMS[config.norm_type](config.hidden_size, config.rms_norm_eps, config)


class HfAttnMLP(nn.Module):
    """Gated feed-forward (``mlp_type="gated"``; SwiGLU with ``hidden_act="silu"``, Shazeer 2020); gate
    and up projections stored as one ``gate_up_proj`` module (its output's two halves), so hooks and
    adapters (LoRA) on it see every call."""

    def __init__(self, config: HfAttnConfig) -> None:
        super().__init__()
        self.config = config
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.act_fn = ACT2FN[config.hidden_act]
        self.is_silu = config.hidden_act == "silu"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)  # (B, L, 2I): [gate | up]
        if self.is_silu:  # down_proj(silu(gate) * up), fused while training (see fused_ops)
            return silu_mul_linear(gate_up, self.down_proj, fused=_fused(self.config))
        gate, up = gate_up.chunk(2, dim=-1)
        return self.down_proj(self.act_fn(gate) * up)


class HfAttnPlainMLP(nn.Module):
    """The classic GPT feed-forward (``mlp_type="plain"``): ``down_proj(act(up_proj(x)))``."""

    def __init__(self, config: HfAttnConfig) -> None:
        super().__init__()
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.up_proj(x)))


MLPS = {"gated": HfAttnMLP, "plain": HfAttnPlainMLP}


class HfAttnAttention(nn.Module):
    """Multi-head (grouped-query) attention: projections, rotary positions and the cache update live
    here; the attention math is the registry kernel of ``config.attention_mode``."""

    def __init__(self, config: HfAttnConfig, layer_idx: int) -> None:
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.scaling = self.head_dim**-0.5
        self.is_causal = config.is_causal
        self.spec = get_attention_spec(config.attention_mode)
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=False)
        if self.spec.init_module is not None:
            self.spec.init_module(self, config)

    def _kernel(self, output_attentions: bool, dense_mask: bool) -> tuple:
        """(kernel, implementation name) for this call; weights need the explicit ("eager") math.
        ``dense_mask``: the model built a full (B, 1, Lq, Lk) mask (static caches of local attention),
        so the full-attention kernels apply to any mode that takes it."""
        impl = self.config._attn_implementation or "sdpa"
        if output_attentions:
            impl = "eager"
        if self.spec.full_attention or dense_mask:
            if impl in FULL_ATTENTION_KERNELS:
                return FULL_ATTENTION_KERNELS[impl], impl
            return ALL_ATTENTION_FUNCTIONS.get_interface(impl, FULL_ATTENTION_KERNELS["sdpa"]), impl
        return self.spec.kernel, "eager" if impl == "eager" else "sdpa"

    def _project(self, hidden_states: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v projections: (B, L, H*D), (B, L, Hkv*D) x 2, or the three side by side in one
        (B, L, (H + 2 Hkv) D) tensor. Stacked while training (gradients recorded) with three plain
        bias-free ``nn.Linear`` modules (no hooks, adapters or offload: ``plain_linear``): one matmul
        with their weights stacked (one node, one weight-gradient matmul). Otherwise, and always in
        inference (where stacking would copy the weights for every decoded token), each module is
        called, so hooks and adapters see every call."""
        projections = (self.q_proj, self.k_proj, self.v_proj)
        if torch.is_grad_enabled() and _fused(self.config) and all(plain_linear(p) for p in projections):
            return F.linear(hidden_states, torch.cat([p.weight for p in projections]))
        return tuple(p(hidden_states) for p in projections)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None,
        position_ids: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        cache: Cache | None = None,
        output_attentions: bool = False,
        dense_mask: bool = False,
        **attention_kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``attention_kwargs``: what transformers passes on to attention functions (e.g. flash
        attention's ``cu_seq_lens_q``); the model only lets them through for the full modes."""
        b, length, _ = hidden_states.shape
        projected = self._project(hidden_states)
        heads = None
        if position_embeddings is not None and isinstance(projected, torch.Tensor):
            # one C++ node splits the heads and rotates q and k, both ways (CPU kernels), or None
            heads = split_rotate(projected, *position_embeddings, self.num_heads, self.num_kv_heads)
        if heads is not None:
            query, key, value = heads
        else:
            if isinstance(projected, torch.Tensor):
                width = self.head_dim * self.num_kv_heads
                projected = projected.split_with_sizes([self.head_dim * self.num_heads, width, width], dim=-1)
            query, key, value = projected
            query = query.view(b, length, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, L, D)
            key = key.view(b, length, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, L, D)
            value = value.view(b, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
            if position_embeddings is not None:
                query, key = apply_rotary(query, key, *position_embeddings)

        cache_layer = None
        if cache is not None:
            cache_layer = cache.layers[self.layer_idx]
            if isinstance(cache_layer, CacheLayerMixin):  # key/value layers (a low-rank state is the kernel's)
                key, value = cache.update(key, value, self.layer_idx)  # (B, Hkv, T', D): kept + new

        kernel, impl = self._kernel(output_attentions, dense_mask)
        out, weights = kernel(
            self,
            query,
            key,
            value,
            attention_mask,
            # by keyword: transformers' AttentionInterface kernels take (..., mask, dropout, scaling)
            scaling=self.scaling,
            dropout=self.config.attention_dropout if self.training else 0.0,
            is_causal=self.is_causal,
            cache_layer=cache_layer,
            position_ids=position_ids,
            implementation=impl,
            **attention_kwargs,
        )  # out (B, L, H, D)
        if (output_attentions and not dense_mask and self.spec.dense_weights is not None
                and self.config.output_attentions_layout == "dense"):
            weights = self.spec.dense_weights(self, weights, query, key, value, attention_mask=attention_mask,
                                              position_ids=position_ids)  # (B, H, Lq, Lk)
        return self.o_proj(out.reshape(b, length, -1)), weights


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


class HfAttnDecoderLayer(GradientCheckpointingLayer):
    """Pre-norm block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: HfAttnConfig, layer_idx: int) -> None:
        super().__init__()
        self.input_layernorm = build_norm(config)
        self.self_attn = HfAttnAttention(config, layer_idx)
        self.post_attention_layernorm = build_norm(config)
        self.mlp = MLPS[config.mlp_type](config)
        self.dropout = nn.Dropout(config.hidden_dropout)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        cache: Cache | None = None,
        output_attentions: bool = False,
        use_cache: bool = False,
        **attention_kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        attn_out, weights = self.self_attn(
            self.input_layernorm(hidden_states),
            attention_mask,
            position_ids,
            position_embeddings,
            cache,
            output_attentions,
            **attention_kwargs,
        )
        dropout = self.dropout if self.dropout.p and self.training else _identity  # p = 0: no call
        hidden_states = hidden_states + dropout(attn_out)
        hidden_states = hidden_states + dropout(self.mlp(self.post_attention_layernorm(hidden_states)))
        return hidden_states, weights


class HfAttnPreTrainedModel(PreTrainedModel):
    """Weight init, save/load plumbing and capability flags shared by every hf_attn model."""

    config_class = HfAttnConfig
    config: HfAttnConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["HfAttnDecoderLayer"]
    _skip_keys_device_placement = ["past_key_values", "cache"]
    _supports_sdpa = True
    _supports_attention_backend = True
    # torch.compile(fullgraph=True) traces every mode with no graph break (tests/test_compile.py), so
    # generate() may compile the decoding step of static caches
    _can_compile_fullgraph = True

    def __init__(self, config: HfAttnConfig, *args, **kwargs) -> None:
        # Fields may have been changed after the config was built (from_pretrained overrides, setattr).
        config.validate_hf_attn()
        super().__init__(config, *args, **kwargs)
        # Free-form facts for the model card (datasets, eval results); set by training scripts.
        self.model_card_data: dict | None = None
        # What the modules were built for; forward and save_pretrained refuse a config changed since.
        self._built_for = _structural_fields(config)

    def check_config_unchanged(self) -> None:
        """Raise ``ValueError`` if a field that shaped the modules was changed on ``self.config`` after
        construction (the weights and modules would compute one function, the saved config name another)."""
        now = _structural_fields(self.config)
        changed = [k for k in now if now[k] != self._built_for.get(k)]
        if changed:
            detail = ", ".join(f"{k}: {self._built_for.get(k)!r} -> {now[k]!r}" for k in changed)
            raise ValueError(
                f"config fields {changed} were changed after the model was built ({detail}); they fix the modules, "
                "so the change would not take effect. Build a new model instead, e.g. "
                "AutoModelForCausalLM.from_pretrained(path, attention_mode=...) or HfAttnForCausalLM(config)."
            )

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, HfAttnAttention) and hasattr(module, "linformer_e"):
            std = linformer_init_std(self.config)
            init.normal_(module.linformer_e, mean=0.0, std=std)
            init.normal_(module.linformer_f, mean=0.0, std=std)

    # Weights a model may legitimately lack in a checkpoint: a new classification head on a
    # pretrained body (fine-tuning), or the LM head when it is tied to the input embedding.
    _allowed_missing_prefixes: tuple[str, ...] = ()

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        """``PreTrainedModel.from_pretrained`` with safety rails.

        Loads safetensors only (never unpickles), turns an unreadable weights file into a
        ``ValueError`` naming the file, refuses weights that leave parameters of this model
        uninitialised (e.g. switching ``attention_mode`` to one with extra parameters), and warns
        when checkpoint weights go unused (e.g. switching from ``eager`` to ``rope`` drops the
        absolute position table).
        """
        kwargs.setdefault("use_safetensors", True)
        return_info = kwargs.pop("output_loading_info", False)
        reheading = kwargs.get("ignore_mismatched_sizes", False)
        try:
            model, info = super().from_pretrained(
                pretrained_model_name_or_path, *model_args, output_loading_info=True, **kwargs
            )
        except SafetensorError as err:
            raise ValueError(
                f"cannot read the weights in {os.path.join(str(pretrained_model_name_or_path), 'model.safetensors')}: "
                f"{err} (truncated or corrupted file?)"
            ) from err
        except RuntimeError as err:
            if "ignore_mismatched_sizes" not in str(err):
                raise
            raise ValueError(
                f"the weights in {pretrained_model_name_or_path} have shapes that do not match its config "
                "(see the size-mismatch report above): the checkpoint and config.json disagree"
            ) from err
        missing = [k for k in info["missing_keys"] if not k.startswith(cls._allowed_missing_prefixes)]
        # ignore_mismatched_sizes=True asks for re-initialised weights where shapes differ (a new head)
        if missing or (info.get("mismatched_keys") and not reheading):
            raise ValueError(
                f"the weights in {pretrained_model_name_or_path} do not match this {model.config.attention_mode!r} "
                f"model: missing {sorted(missing)}, shape mismatches {sorted(info.get('mismatched_keys') or [])}. "
                "Modes share weights only where shapes agree (eager, rope and local attention layers); "
                "lowrank adds parameters that other checkpoints do not have."
            )
        # from_pretrained(None, config=..., state_dict=...) has no saved config to compare with
        saved = {} if pretrained_model_name_or_path is None else cls.config_class.get_config_dict(
            pretrained_model_name_or_path, **{k: kwargs[k] for k in ("revision", "token", "local_files_only") if k in kwargs}
        )[0]
        switched = {
            key: (saved.get(key), getattr(model.config, key))
            for key in ("attention_mode", "position_embedding_type", "is_causal")
            if key in saved and saved[key] != getattr(model.config, key)
        }
        if switched:
            warnings.warn(
                f"{pretrained_model_name_or_path} was trained with a different attention setup; loading it as "
                + ", ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in switched.items())
                + ". The weights fit, but the model computes a different function until fine-tuned.",
                stacklevel=2,
            )
        if info["unexpected_keys"]:
            warnings.warn(
                f"{pretrained_model_name_or_path}: weights {sorted(info['unexpected_keys'])} are not used by this "
                f"{model.config.attention_mode!r} / {model.config.position_embedding_type!r} model and were dropped "
                "(expected when switching attention_mode or position_embedding_type on a checkpoint)",
                stacklevel=2,
            )
        return (model, info) if return_info else model

    def save_pretrained(self, save_directory, *args, push_to_hub: bool = False, **kwargs) -> None:
        """Save weights (safetensors), config (with ``auto_map`` for every Auto class), code and model card.

        With ``push_to_hub=True`` the folder is uploaded after the card is written, through the same
        allow-list as ``push_to_hub`` (transformers' own push would upload before the card exists).
        """
        hub_kwargs = {k: kwargs.pop(k) for k in ("repo_id", "commit_message", "commit_description",
                                                  "create_pr", "private", "revision", "max_file_size")
                      if k in kwargs}
        self.check_config_unchanged()
        if self._auto_class is not None:
            self.config.auto_map = dict(AUTO_MAP)
        super().save_pretrained(save_directory, *args, **kwargs)
        if kwargs.get("is_main_process", True):
            from .modelcard_hf_attn import write_model_card

            write_model_card(save_directory, self.config, self.model_card_data)
            if push_to_hub:
                from .hub_hf_attn import upload_checkpoint
                from .modelcard_hf_attn import folder_model_name

                # an atomic save writes into a temporary folder: name the repo after the final one
                repo_id = hub_kwargs.pop("repo_id", folder_model_name(save_directory))
                upload_checkpoint(save_directory, repo_id, token=kwargs.get("token"), **hub_kwargs)

    def push_to_hub(self, repo_id: str, **kwargs):
        """Upload safetensors, config, code and the hf_attn model card in one commit (transformers'
        version replaces README.md with a generic card). Same keyword arguments as
        ``PreTrainedModel.push_to_hub``."""
        from .hub_hf_attn import push_model_to_hub

        return push_model_to_hub(self, repo_id, **kwargs)


def _structural_fields(config: HfAttnConfig) -> dict:
    """Config fields that decide which modules and kernels a model builds."""
    # (vocab_size is left out: resize_token_embeddings changes it together with the modules)
    fields = ("attention_mode", "sliding_window", "position_embedding_type", "is_causal", "lowrank_dim",
              "lowrank_feature_map", "max_position_embeddings", "hidden_size", "num_hidden_layers",
              "num_attention_heads", "num_key_value_heads", "intermediate_size", "mlp_type", "norm_type")
    stored = vars(config)  # the fields as set (no attribute machinery: this runs on every forward)
    out = {k: stored.get(k) for k in fields}
    out["rope_parameters"] = dict(stored.get("rope_parameters") or {})
    return out


# Name under which the installed transformers passes the cache to forward and reads it from outputs:
# ``cache`` from 5.24, ``past_key_values`` before.
CACHE_KWARG = "cache" if "cache" in BaseModelOutputWithPast.__dataclass_fields__ else "past_key_values"
# Keywords transformers hands to a model for its attention functions (packed / flash attention).
_ATTENTION_KWARGS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")


def _resolve_cache(cache, past_key_values):
    """The cache, whichever name it came under; the other name is a deprecated alias."""
    if past_key_values is None:
        return cache
    if cache is not None:
        raise ValueError("pass the cache once, as cache= or as past_key_values=, not both")
    if CACHE_KWARG == "cache":
        warnings.warn("past_key_values= is deprecated since transformers 5.24; pass cache=", FutureWarning, stacklevel=3)
    return past_key_values


def _split_kwargs(config: HfAttnConfig, kwargs: dict) -> dict:
    """The attention keywords among ``kwargs``; any other keyword is a ``TypeError`` naming it."""
    unknown = sorted(k for k in kwargs if k not in _ATTENTION_KWARGS and k != "is_causal")
    if unknown:
        raise TypeError(f"HfAttnModel.forward() got unexpected keyword arguments {unknown}")
    if "is_causal" in kwargs and kwargs["is_causal"] is not None and kwargs["is_causal"] != config.is_causal:
        raise ValueError(f"is_causal={kwargs['is_causal']}: this model was built with is_causal={config.is_causal}; "
                         "set it in the config and build a new model")
    attention = {k: v for k, v in kwargs.items() if k in _ATTENTION_KWARGS and v is not None}
    if attention and not get_attention_spec(config.attention_mode).full_attention:
        raise ValueError(f"{sorted(attention)}: flash-attention packing keywords need a full attention mode "
                         f"('eager' or 'rope'), not attention_mode={config.attention_mode!r}")
    return attention


def _tracing() -> bool:
    """Whether this call is being traced into a graph: ``torch.compile`` (dynamo sets the flag while it
    traces), ``torch.export`` and ``torch.onnx.export(dynamo=True)`` (export sets it too),
    ``torch.jit.trace`` or ``torch.fx.symbolic_trace``. Tensor values are unknown there."""
    return (torch.compiler.is_compiling() or torch.jit.is_tracing()
            or torch.fx._symbolic_trace.is_fx_symbolic_tracing())


def _checking() -> bool:
    """Value checks that read tensors on the host (token range, mask values, position limit, packed
    rows) run only in eager execution: a traced graph would stop at each read (a graph break, or an
    error under ``fullgraph=True`` and in export) and a GPU would wait for every one of them."""
    return not _tracing()


def _check_inputs(
    config: HfAttnConfig,
    input_ids: torch.Tensor | None,
    inputs_embeds: torch.Tensor | None,
    attention_mask: torch.Tensor | None,
    position_ids: torch.Tensor | None,
    past_length,
) -> None:
    """Reject malformed inputs with a ValueError before any compute (no IndexError deep inside)."""
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("pass exactly one of input_ids or inputs_embeds")
    if input_ids is not None:
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be 2-D (batch, seq_len), got shape {tuple(input_ids.shape)}")
        if input_ids.dtype.is_floating_point or input_ids.dtype == torch.bool or input_ids.is_complex():
            raise ValueError(f"input_ids must be an integer tensor, got dtype {input_ids.dtype}")
        batch, length = input_ids.shape
        if input_ids.numel() and _checking():
            low, high = (int(v) for v in torch.aminmax(input_ids))
            if low < 0 or high >= config.vocab_size:
                bad = low if low < 0 else high
                raise ValueError(f"input_ids contains token id {bad}; allowed ids are 0..{config.vocab_size - 1} (vocab_size)")
    else:
        if inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != config.hidden_size:
            raise ValueError(
                f"inputs_embeds must be (batch, seq_len, hidden_size={config.hidden_size}), got {tuple(inputs_embeds.shape)}"
            )
        if not inputs_embeds.dtype.is_floating_point:
            raise ValueError(f"inputs_embeds must be a floating-point tensor, got dtype {inputs_embeds.dtype}")
        batch, length = inputs_embeds.shape[:2]
    if batch == 0 or length == 0:
        raise ValueError(f"empty input: batch={batch}, seq_len={length}; need at least one token per row")
    if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2:
        past = int(past_length) if _checking() else None
        if attention_mask.shape[0] != batch or (past is not None and attention_mask.shape[1] != past + length):
            raise ValueError(
                f"attention_mask must be (batch={batch}, past+seq_len={past + length if past is not None else '?'}), "
                f"got shape {tuple(attention_mask.shape)}"
            )
        if _checking() and not bool(((attention_mask == 0) | (attention_mask == 1)).all()):
            raise ValueError("attention_mask values must be 0 (padding) or 1 (real token)")
    elif isinstance(attention_mask, torch.Tensor) and attention_mask.dim() != 4:
        raise ValueError(
            "attention_mask must be 2-D (batch, past+seq_len) of 0/1, or a prepared 4-D (batch, 1, seq_len, keys) "
            f"mask, got shape {tuple(attention_mask.shape)}"
        )
    if position_ids is not None:
        if position_ids.dtype.is_floating_point or position_ids.dtype == torch.bool or position_ids.is_complex():
            raise ValueError(f"position_ids must be an integer tensor, got dtype {position_ids.dtype}")
        if position_ids.dim() != 2 or position_ids.shape[-1] != length or position_ids.shape[0] not in (1, batch):
            raise ValueError(f"position_ids must be (batch or 1, seq_len={length}), got shape {tuple(position_ids.shape)}")
        if _checking() and int(position_ids.min()) < 0:
            raise ValueError("position_ids must be >= 0")


def _is_packed(position_ids: torch.Tensor) -> bool:
    """Whether a row holds several sequences (positions that do not step by one, e.g. restart at 0)."""
    return position_ids.shape[-1] > 1 and bool((position_ids.diff(dim=-1) != 1).any())


class HfAttnModel(HfAttnPreTrainedModel):
    """The bare decoder stack: embeddings, blocks and final norm; returns hidden states."""

    def __init__(self, config: HfAttnConfig) -> None:
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        # A learned table only for absolute positions; rotary positions need no weights.
        self.embed_positions = (
            nn.Embedding(config.max_position_embeddings, config.hidden_size)
            if config.position_embedding_type == "absolute"
            else None
        )
        self.rotary = HfAttnRotary(config) if config.position_embedding_type == "rope" else None
        self.layers = nn.ModuleList([HfAttnDecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = build_norm(config)
        self.dropout = nn.Dropout(config.hidden_dropout)
        self.gradient_checkpointing = False
        self.spec = get_attention_spec(config.attention_mode)
        # Masks that depend on sizes only (local mode, no padding), reused across layers, steps and
        # calls; bounded in bytes and owned by this model, so they go when the model goes.
        self._mask_cache = BoundedTensorCache(_MASK_CACHE_BYTES)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    def _position_limit(self) -> int | None:
        """Largest position id + 1 the weights cover, or None when positions are unbounded."""
        needs_table = self.embed_positions is not None or (
            self.config.attention_mode == "lowrank" and not self.config.is_causal
        )
        return self.config.max_position_embeddings if needs_table else None

    def _build_mask(self, attention_mask, padded, inputs_embeds, cache, position_ids, user_position_ids, past_length):
        """The mask every layer shares, in the form this mode's kernel takes, and whether it is a dense
        (B, 1, Lq, Lk) mask for the full-attention kernels. ``padded``: a 2-D mask with padding in it.

        Full modes: transformers' ``create_causal_mask`` (padding, packed rows, static caches, every
        attn_implementation). Local: the O(n * w) blocked mask, or a dense sliding-window mask for a
        static cache or a prepared 4-D mask. Low-rank: the key padding mask.
        """
        config, spec = self.config, self.spec
        batch, length = inputs_embeds.shape[:2]
        if isinstance(attention_mask, dict):  # generate() with a compileable cache: one mask per layer type
            attention_mask = attention_mask[config.layer_types[0]]
        if spec.full_attention:
            if not config.is_causal:
                return create_bidirectional_mask(config, inputs_embeds, attention_mask), True
            # positions are passed only when the caller gave them: they are how packed rows are found
            return create_causal_mask(config, inputs_embeds, attention_mask, cache, user_position_ids), True
        prepared = isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 4
        static = cache is not None and cache.layers and getattr(cache.layers[0], "is_compileable", False)
        if config.attention_mode == "local" and (prepared or static):
            if prepared:
                return attention_mask, True
            return create_sliding_window_causal_mask(config, inputs_embeds, attention_mask, cache, position_ids), True
        if prepared:
            raise ValueError(f"attention_mask: attention_mode={config.attention_mode!r} takes a 2-D (batch, keys) "
                             "padding mask, not a prepared 4-D mask")
        if (user_position_ids is not None and attention_mask is None and cache is None and _checking()
                and _is_packed(user_position_ids)):
            raise ValueError(
                f"position_ids restart inside a row (packed sequences, e.g. DataCollatorWithFlattening): "
                f"attention_mode={config.attention_mode!r} cannot keep packed sequences apart; pad the batch instead, "
                "or use attention_mode 'eager' or 'rope', which support packing"
            )
        key_mask = attention_mask.bool() if padded else None  # (B, T) bool, None when nothing is padded
        if key_mask is None and config.attention_mode == "local" and not _tracing():
            # (a traced graph builds the mask in the graph: no host-side store to read or fill)
            key = ("local", length, int(past_length), batch, inputs_embeds.device)
            return self._mask_cache.get(key, lambda: spec.build_mask(None, length, int(past_length), config, batch,
                                                                     inputs_embeds.device)), False
        return spec.build_mask(key_mask, length, int(past_length), config, batch, inputs_embeds.device), False

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        past_key_values: Cache | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast | tuple:
        """Run the decoder.

        Args:
            input_ids: (B, L) token ids in ``[0, vocab_size)``.
            attention_mask: (B, past + L), 1 for real tokens, 0 for padding (left or right); or a
                prepared 4-D mask (full modes, local).
            position_ids: (B, L); by default positions count from each row's first real token. Rows
                whose positions restart at 0 hold packed sequences (full modes keep them apart, the
                others refuse them).
            cache: a transformers ``Cache`` (``DynamicCache(config=model.config)``, ``StaticCache``,
                or one returned by an earlier call); ``past_key_values`` is its name before
                transformers 5.24.
            output_attentions: return per-layer weights where the mode forms them (see README).
            **kwargs: flash-attention packing keywords (``cu_seq_lens_q`` ...), passed to the kernel
                of a full mode; anything else is a ``TypeError``.

        Raises:
            ValueError: malformed inputs, positions beyond what the weights cover, a cache built for
                another mode, batch or width, or a cache on a bidirectional model.
        """
        config = self.config
        self.check_config_unchanged()
        cache = _resolve_cache(cache, past_key_values)
        attention_kwargs = _split_kwargs(config, kwargs)
        output_attentions = bool(output_attentions if output_attentions is not None else config.output_attentions)
        output_hidden_states = bool(
            output_hidden_states if output_hidden_states is not None else config.output_hidden_states
        )
        return_dict = return_dict if return_dict is not None else getattr(config, "return_dict", True)
        use_cache = use_cache if use_cache is not None else config.use_cache
        if not config.is_causal:
            if cache is not None:
                raise ValueError("cache: a bidirectional model (is_causal=False) has no generation cache")
            use_cache = False
        if self.gradient_checkpointing and self.training:
            use_cache = False
        if cache is not None and (input_ids is not None or inputs_embeds is not None):
            check_cache(cache, config, (input_ids if input_ids is not None else inputs_embeds).shape[0])
        past = past_length(cache)  # an int, or a tensor for static caches
        _check_inputs(config, input_ids, inputs_embeds, attention_mask, position_ids, past)
        if (output_attentions and config.output_attentions_layout == "dense" and config.attention_mode == "lowrank"
                and _checking() and int(past) > 0):
            raise ValueError("output_attentions with output_attentions_layout='dense': attention_mode='lowrank' keeps "
                             "a running sum of the past, not its keys, so its (L x L) weights need the whole "
                             "sequence in one call (no cache with a past); use output_attentions_layout='native'")
        given_cache = cache  # the caller's: a fresh one below has no past (packed rows are found without it)
        if use_cache and cache is None:
            cache = HfAttnCache(config)

        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        else:  # documented: embeddings are cast to the model's dtype (e.g. float64 -> float32)
            inputs_embeds = inputs_embeds.to(self.embed_tokens.weight.dtype)
        length = inputs_embeds.shape[1]
        device = inputs_embeds.device

        # a 2-D mask with padding in it (one host read, shared by the positions and the mask); while
        # tracing, any 2-D mask counts as padded
        padded = (isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2
                  and not (_checking() and bool(attention_mask.all())))
        user_position_ids = position_ids
        if position_ids is None:
            if padded:
                # count from each row's first real token, so padding never shifts real positions
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -length:]
            else:
                position_ids = (torch.arange(length, device=device) + past)[None]
        limit = self._position_limit()
        if limit is not None and _checking():
            # positions counted here without padding end at past + length - 1: no tensor read for them
            counted = user_position_ids is None and not padded and isinstance(past, int)
            last = past + length - 1 if counted else int(position_ids.max())
            if last >= limit:
                raise ValueError(
                    f"position {last} is beyond max_position_embeddings={limit} of this "
                    f"{config.attention_mode!r} model ({config.position_embedding_type} positions); "
                    "shorten the input or use rotary positions"
                )

        hidden_states = inputs_embeds
        if self.embed_positions is not None:
            hidden_states = hidden_states + self.embed_positions(position_ids)
        if self.dropout.p and self.training:
            hidden_states = self.dropout(hidden_states)
        position_embeddings = None
        if self.rotary is not None:
            # past + length: a Python int (a tensor for static caches), never read from the ids
            position_embeddings = self.rotary(position_ids, hidden_states.dtype, seq_len=past + length,
                                              own_positions=user_position_ids is None)
            if not _tracing() and rotary_kernels(hidden_states, *position_embeddings) is None:
                # the per-head tables every layer's rotation reads, built once here (the CPU kernels
                # read cos/sin as they are)
                position_embeddings = rotary_head_tables(*position_embeddings, config.num_attention_heads)
        mask, dense = self._build_mask(attention_mask, padded, inputs_embeds, given_cache, position_ids,
                                       user_position_ids, past)

        all_hidden = [] if output_hidden_states else None
        all_weights = [] if output_attentions else None
        for layer in self.layers:
            if output_hidden_states:
                all_hidden.append(hidden_states)
            hidden_states, weights = layer(
                hidden_states,
                attention_mask=mask,
                position_ids=position_ids,
                position_embeddings=position_embeddings,
                cache=cache,
                output_attentions=output_attentions,
                use_cache=use_cache,
                dense_mask=dense,
                **attention_kwargs,
            )
            if output_attentions:
                all_weights.append(weights)
        hidden_states = self.norm(hidden_states)
        if output_hidden_states:
            all_hidden.append(hidden_states)

        out = BaseModelOutputWithPast(
            last_hidden_state=hidden_states,
            hidden_states=tuple(all_hidden) if output_hidden_states else None,
            attentions=tuple(all_weights) if output_attentions else None,
            **{CACHE_KWARG: cache},
        )
        return out if return_dict else out.to_tuple()


def causal_lm_loss(
    logits: torch.Tensor, labels: torch.Tensor, num_items_in_batch: int | torch.Tensor | None = None
) -> torch.Tensor:
    """Next-token cross-entropy: logits at t predict labels at t + 1; label -100 is ignored.

    transformers' ``ForCausalLMLoss`` (what ``HfAttnForCausalLM.loss_function`` is); with
    ``num_items_in_batch`` (passed by ``Trainer`` under gradient accumulation) the summed loss is
    divided by that count, so accumulated steps average over tokens, not over micro-batches.
    """
    return ForCausalLMLoss(logits, labels, logits.shape[-1], num_items_in_batch=num_items_in_batch)


def _keeps_all(logits_to_keep: int | torch.Tensor) -> bool:
    return isinstance(logits_to_keep, int) and logits_to_keep == 0


def _keep_last(hidden_states: torch.Tensor, logits_to_keep: int | torch.Tensor) -> torch.Tensor:
    """``logits_to_keep``: 0 keeps every position, n > 0 the last n, a tensor the listed positions."""
    if isinstance(logits_to_keep, int):
        return hidden_states[:, -logits_to_keep:] if logits_to_keep else hidden_states
    return hidden_states[:, logits_to_keep]


class HfAttnForCausalLM(HfAttnPreTrainedModel, GenerationMixin):
    """Decoder with a language-modelling head (tied to the input embedding by default)."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    loss_type = "ForCausalLM"  # transformers' shifted next-token loss (honours shift_labels)

    def __init__(self, config: HfAttnConfig) -> None:
        super().__init__(config)
        self.model = HfAttnModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def _prepare_cache_for_generation(self, generation_config, model_kwargs: dict, *args, **kwargs):
        """transformers' cache choice; for ``lowrank`` its default ``DynamicCache`` is swapped for
        ``HfAttnCache`` (the same layers, plus the token count that transformers < 5.24 asks a cache of
        linear-attention layers for)."""
        mode = kwargs.get("generation_mode", args[0] if args else None)
        if self.config.attention_mode == "lowrank" and mode == GenerationMode.ASSISTED_GENERATION:
            raise ValueError(
                "assisted decoding and prompt lookup roll the cache back after each draft, but "
                "attention_mode='lowrank' keeps a running sum of the past, which cannot be cropped; "
                "use attention_mode 'eager', 'rope' or 'local' for them"
            )
        super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)
        cache = model_kwargs.get(CACHE_KWARG)
        if self.config.attention_mode == "lowrank" and type(cache) is DynamicCache and not cache.offloading:
            model_kwargs[CACHE_KWARG] = HfAttnCache(self.config)

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        past_key_values: Cache | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast | tuple:
        """Logits (B, L, vocab); with ``labels`` (B, L) also the shifted cross-entropy loss.

        While gradients are recorded, a forward with labels computes the loss ``config.loss_chunk_size``
        tokens at a time and returns ``logits=None`` (the full logits would dominate training memory at
        long lengths); ``loss_chunk_size=0`` returns them. Without gradients (evaluation) the logits
        are always returned.

        Loss keywords (from ``Trainer`` and padding-free collators): ``num_items_in_batch``,
        ``shift_labels`` (labels already aligned with the logits: not shifted again) and
        ``ignore_index``. Other keywords go to ``HfAttnModel.forward``.
        """
        loss_kwargs = {k: kwargs.pop(k) for k in ("num_items_in_batch", "shift_labels", "ignore_index") if k in kwargs}
        if loss_kwargs.get("shift_labels") is not None:
            loss_kwargs["shift_labels"] = loss_kwargs["shift_labels"].contiguous()
        wants_loss = labels is not None or loss_kwargs.get("shift_labels") is not None
        if wants_loss and not self.config.is_causal:
            raise ValueError("labels: next-token loss needs a causal model (config.is_causal=True)")
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=_resolve_cache(cache, past_key_values),
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=True,
            **kwargs,
        )
        hidden = outputs.last_hidden_state
        chunk = self.config.loss_chunk_size
        if (wants_loss and chunk and torch.is_grad_enabled() and _keeps_all(logits_to_keep) and not _tracing()
                and self.loss_function is ForCausalLMLoss):  # a loss set by the user gets the logits
            # training: the loss chunk by chunk, never the (B, L, vocab) logits (config.loss_chunk_size)
            logits = None
            loss = chunked_lm_loss(self.lm_head, hidden, labels, chunk, **loss_kwargs)
        else:
            logits = self.lm_head(_keep_last(hidden, logits_to_keep))
            loss = None
            if wants_loss:
                loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **loss_kwargs)
        out = CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            **{CACHE_KWARG: getattr(outputs, CACHE_KWARG)},
        )
        return_dict = return_dict if return_dict is not None else getattr(self.config, "return_dict", True)
        return out if return_dict else out.to_tuple()


class HfAttnForSequenceClassification(HfAttnPreTrainedModel):
    """Decoder + linear head on the last real (non-padding) token of each row."""

    _allowed_missing_prefixes = ("score.",)  # a new head on a pretrained body
    # forward ignores Trainer's num_items_in_batch (its loss is a per-example mean), so Trainer
    # must not rescale it by the number of processes
    accepts_loss_kwargs = False

    def __init__(self, config: HfAttnConfig) -> None:
        super().__init__(config)
        self.num_labels = config.num_labels
        self.model = HfAttnModel(config)
        self.score = nn.Linear(config.hidden_size, config.num_labels, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def _last_token_index(self, input_ids: torch.Tensor | None, attention_mask: torch.Tensor | None, length: int):
        """(B,) index of each row's last real token; works for left and right padding."""
        if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2:
            real = attention_mask[:, -length:].bool()
        elif input_ids is not None and self.config.pad_token_id is not None:
            real = input_ids != self.config.pad_token_id
        else:
            return None
        positions = torch.arange(length, device=real.device)
        return torch.where(real, positions, -1).amax(-1).clamp(min=0)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        past_key_values: Cache | None = None,
        **kwargs,
    ) -> SequenceClassifierOutputWithPast | tuple:
        """Logits (B, num_labels); with ``labels`` also the loss (cross-entropy, MSE if num_labels == 1,
        BCE for float multi-label targets)."""
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=_resolve_cache(cache, past_key_values),
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=True,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state  # (B, L, hidden)
        batch, length = hidden_states.shape[:2]
        last = self._last_token_index(input_ids, attention_mask, length)
        if last is None:
            last = torch.full((batch,), length - 1, device=hidden_states.device)
        pooled = hidden_states[torch.arange(batch, device=hidden_states.device), last.to(hidden_states.device)]
        logits = self.score(pooled)  # (B, num_labels)

        loss = None
        if labels is not None:
            labels = labels.to(logits.device)
            if self.num_labels == 1:
                loss = F.mse_loss(logits.squeeze(-1).float(), labels.float())
            elif labels.dtype in (torch.long, torch.int) and labels.dim() == 1:
                loss = F.cross_entropy(logits.float(), labels)
            else:
                loss = F.binary_cross_entropy_with_logits(logits.float(), labels.float())
        out = SequenceClassifierOutputWithPast(
            loss=loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            **{CACHE_KWARG: getattr(outputs, CACHE_KWARG)},
        )
        return_dict = return_dict if return_dict is not None else getattr(self.config, "return_dict", True)
        return out if return_dict else out.to_tuple()


__all__ = [
    "HfAttnPreTrainedModel",
    "HfAttnModel",
    "HfAttnForCausalLM",
    "HfAttnForSequenceClassification",
    "HfAttnCache",
]
