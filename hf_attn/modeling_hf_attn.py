"""The hf_attn transformer: a pre-norm decoder (RMSNorm, SwiGLU MLP) whose attention is chosen by
``config.attention_mode`` through the attention registry.

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
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import (
    BaseModelOutputWithPast,
    CausalLMOutputWithPast,
    SequenceClassifierOutputWithPast,
)
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .attention_lowrank import linformer_init_std
from .attention_registry import FULL_ATTENTION_KERNELS, get_attention_spec
from .attention_rope import HfAttnRotary, apply_rotary
from .cache_hf_attn import HfAttnCache
from .configuration_hf_attn import HfAttnConfig

# Auto classes written into every saved config, so any of them loads a saved folder with remote code.
AUTO_MAP = {
    "AutoConfig": "configuration_hf_attn.HfAttnConfig",
    "AutoModel": "modeling_hf_attn.HfAttnModel",
    "AutoModelForCausalLM": "modeling_hf_attn.HfAttnForCausalLM",
    "AutoModelForSequenceClassification": "modeling_hf_attn.HfAttnForSequenceClassification",
}


class HfAttnRMSNorm(nn.Module):
    """Root-mean-square layer norm (Zhang & Sennrich, 2019), computed in float32."""

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        dtype = hidden_states.dtype
        out = F.rms_norm(hidden_states.float(), (hidden_states.shape[-1],), eps=self.eps)
        return (out * self.weight.float()).to(dtype)


class HfAttnMLP(nn.Module):
    """SwiGLU feed-forward (Shazeer, 2020); gate and up projections stored as one weight.

    The forward runs two matmuls on the weight's halves (views) rather than one on the whole: the
    halves of one fused output are strided, which made the activation and its backward slower and
    the backward needed a gradient ``cat`` (profiled against Llama's separate projections).
    """

    def __init__(self, config: HfAttnConfig) -> None:
        super().__init__()
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_weight, up_weight = self.gate_up_proj.weight.chunk(2, dim=0)  # (I, hidden) views
        return self.down_proj(self.act_fn(F.linear(x, gate_weight)) * F.linear(x, up_weight))


class HfAttnAttention(nn.Module):
    """Multi-head (grouped-query) attention: projections, rotary positions and the cache live here;
    the attention math is the registry kernel of ``config.attention_mode``."""

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

    def _kernel(self, output_attentions: bool) -> tuple:
        """(kernel, implementation name) for this call; weights need the explicit ("eager") math."""
        impl = self.config._attn_implementation or "sdpa"
        if output_attentions:
            impl = "eager"
        if self.spec.full_attention:
            if impl in FULL_ATTENTION_KERNELS:
                return FULL_ATTENTION_KERNELS[impl], impl
            return ALL_ATTENTION_FUNCTIONS.get_interface(impl, FULL_ATTENTION_KERNELS["sdpa"]), impl
        return self.spec.kernel, "eager" if impl == "eager" else "sdpa"

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None,
        position_ids: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        past_key_values: HfAttnCache | None = None,
        output_attentions: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        b, length, _ = hidden_states.shape
        query = self.q_proj(hidden_states).view(b, length, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, L, D)
        key = self.k_proj(hidden_states).view(b, length, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, L, D)
        value = self.v_proj(hidden_states).view(b, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
        if position_embeddings is not None:
            query, key = apply_rotary(query, key, *position_embeddings)

        cache_layer = None
        if past_key_values is not None:
            cache_layer = past_key_values.layer(self.layer_idx, self.spec.make_cache_layer)
            key, value = cache_layer.update(key, value)  # (B, Hkv, T', D): what this mode keeps + new

        kernel, impl = self._kernel(output_attentions)
        out, weights = kernel(
            self,
            query,
            key,
            value,
            attention_mask,
            self.scaling,
            self.config.attention_dropout if self.training else 0.0,
            is_causal=self.is_causal,
            cache_layer=cache_layer,
            position_ids=position_ids,
            implementation=impl,
            scratch_output=True,  # out only feeds o_proj: its backward may reuse out's memory
        )  # out (B, L, H, D)
        return self.o_proj(out.reshape(b, length, -1)), weights


class HfAttnDecoderLayer(GradientCheckpointingLayer):
    """Pre-norm block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: HfAttnConfig, layer_idx: int) -> None:
        super().__init__()
        self.input_layernorm = HfAttnRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = HfAttnAttention(config, layer_idx)
        self.post_attention_layernorm = HfAttnRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = HfAttnMLP(config)
        self.dropout = nn.Dropout(config.hidden_dropout)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        past_key_values: HfAttnCache | None = None,
        output_attentions: bool = False,
        use_cache: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        attn_out, weights = self.self_attn(
            self.input_layernorm(hidden_states),
            attention_mask,
            position_ids,
            position_embeddings,
            past_key_values,
            output_attentions,
        )
        hidden_states = hidden_states + self.dropout(attn_out)
        hidden_states = hidden_states + self.dropout(self.mlp(self.post_attention_layernorm(hidden_states)))
        return hidden_states, weights


class HfAttnPreTrainedModel(PreTrainedModel):
    """Weight init, save/load plumbing and capability flags shared by every hf_attn model."""

    config_class = HfAttnConfig
    config: HfAttnConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["HfAttnDecoderLayer"]
    _skip_keys_device_placement = ["past_key_values"]
    _supports_sdpa = True
    _supports_attention_backend = True

    def __init__(self, config: HfAttnConfig, *args, **kwargs) -> None:
        # Fields may have been changed after the config was built (from_pretrained overrides, setattr).
        config.validate_hf_attn()
        super().__init__(config, *args, **kwargs)
        # Free-form facts for the model card (datasets, eval results); set by training scripts.
        self.model_card_data: dict | None = None

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        # generate() must not create a DynamicCache: each mode keeps its own state (see HfAttnCache)
        return False

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
        if missing or info.get("mismatched_keys"):
            raise ValueError(
                f"the weights in {pretrained_model_name_or_path} do not match this {model.config.attention_mode!r} "
                f"model: missing {sorted(missing)}, shape mismatches {sorted(info.get('mismatched_keys') or [])}. "
                "Modes share weights only where shapes agree (eager, rope and local attention layers); "
                "lowrank adds parameters that other checkpoints do not have."
            )
        saved = cls.config_class.get_config_dict(pretrained_model_name_or_path)[0]
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
                                                  "create_pr", "private", "revision") if k in kwargs}
        if self._auto_class is not None:
            self.config.auto_map = dict(AUTO_MAP)
        super().save_pretrained(save_directory, *args, **kwargs)
        if kwargs.get("is_main_process", True):
            from .modelcard_hf_attn import write_model_card

            write_model_card(save_directory, self.config, self.model_card_data)
            if push_to_hub:
                from .hub_hf_attn import upload_checkpoint

                repo_id = hub_kwargs.pop("repo_id", os.path.basename(os.path.normpath(save_directory)))
                upload_checkpoint(save_directory, repo_id, token=kwargs.get("token"), **hub_kwargs)

    def push_to_hub(self, repo_id: str, **kwargs):
        """Upload safetensors, config, code and the hf_attn model card in one commit (transformers'
        version replaces README.md with a generic card). Same keyword arguments as
        ``PreTrainedModel.push_to_hub``."""
        from .hub_hf_attn import push_model_to_hub

        return push_model_to_hub(self, repo_id, **kwargs)


def _check_inputs(
    config: HfAttnConfig,
    input_ids: torch.Tensor | None,
    inputs_embeds: torch.Tensor | None,
    attention_mask: torch.Tensor | None,
    position_ids: torch.Tensor | None,
    past_length: int,
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
        if input_ids.numel():
            low, high = int(input_ids.min()), int(input_ids.max())
            if low < 0 or high >= config.vocab_size:
                bad = low if low < 0 else high
                raise ValueError(f"input_ids contains token id {bad}; allowed ids are 0..{config.vocab_size - 1} (vocab_size)")
    else:
        if inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != config.hidden_size:
            raise ValueError(
                f"inputs_embeds must be (batch, seq_len, hidden_size={config.hidden_size}), got {tuple(inputs_embeds.shape)}"
            )
        batch, length = inputs_embeds.shape[:2]
    if batch == 0 or length == 0:
        raise ValueError(f"empty input: batch={batch}, seq_len={length}; need at least one token per row")
    if attention_mask is not None:
        if attention_mask.dim() != 2 or attention_mask.shape != (batch, past_length + length):
            raise ValueError(
                f"attention_mask must be 2-D (batch={batch}, past+seq_len={past_length + length}), "
                f"got shape {tuple(attention_mask.shape)}"
            )
        if attention_mask.dtype.is_floating_point and not bool(((attention_mask == 0) | (attention_mask == 1)).all()):
            raise ValueError("attention_mask values must be 0 (padding) or 1 (real token)")
    if position_ids is not None:
        if position_ids.dim() != 2 or position_ids.shape[-1] != length or position_ids.shape[0] not in (1, batch):
            raise ValueError(f"position_ids must be (batch or 1, seq_len={length}), got shape {tuple(position_ids.shape)}")
        if int(position_ids.min()) < 0:
            raise ValueError("position_ids must be >= 0")


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
        self.norm = HfAttnRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout)
        self.gradient_checkpointing = False
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

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: HfAttnCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast | tuple:
        """Run the decoder.

        Args:
            input_ids: (B, L) token ids in ``[0, vocab_size)``.
            attention_mask: (B, past + L), 1 for real tokens, 0 for padding (left or right).
            position_ids: (B, L); by default positions count from each row's first real token.
            past_key_values: an ``HfAttnCache`` from a previous call (causal models only).
            output_attentions: return per-layer weights where the mode forms them (see README).

        Raises:
            ValueError: malformed inputs, positions beyond what the weights cover, or a cache on a
                bidirectional model.
        """
        config = self.config
        output_attentions = bool(output_attentions if output_attentions is not None else config.output_attentions)
        output_hidden_states = bool(
            output_hidden_states if output_hidden_states is not None else config.output_hidden_states
        )
        return_dict = return_dict if return_dict is not None else getattr(config, "return_dict", True)
        use_cache = use_cache if use_cache is not None else config.use_cache
        if not config.is_causal:
            if past_key_values is not None:
                raise ValueError("past_key_values: a bidirectional model (is_causal=False) has no generation cache")
            use_cache = False
        if self.gradient_checkpointing and self.training:
            use_cache = False
        if past_key_values is not None and not isinstance(past_key_values, HfAttnCache):
            raise ValueError(f"past_key_values must be an HfAttnCache, got {type(past_key_values).__name__}")
        past_length = past_key_values.get_seq_length() if past_key_values is not None else 0
        _check_inputs(config, input_ids, inputs_embeds, attention_mask, position_ids, past_length)
        if use_cache and past_key_values is None:
            past_key_values = HfAttnCache(config)

        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        batch, length = inputs_embeds.shape[:2]
        device = inputs_embeds.device

        key_mask = None  # (B, T) bool, None when nothing is padded
        if attention_mask is not None and not bool(attention_mask.all()):
            key_mask = attention_mask.bool()
        if position_ids is None:
            if key_mask is not None:
                # count from each row's first real token, so padding never shifts real positions
                position_ids = (key_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -length:]
            else:
                position_ids = torch.arange(past_length, past_length + length, device=device)[None]
        limit = self._position_limit()
        if limit is not None and int(position_ids.max()) >= limit:
            raise ValueError(
                f"position {int(position_ids.max())} is beyond max_position_embeddings={limit} of this "
                f"{config.attention_mode!r} model ({config.position_embedding_type} positions); "
                "shorten the input or use rotary positions"
            )

        hidden_states = inputs_embeds
        if self.embed_positions is not None:
            hidden_states = hidden_states + self.embed_positions(position_ids)
        hidden_states = self.dropout(hidden_states)
        position_embeddings = self.rotary(position_ids, hidden_states.dtype) if self.rotary is not None else None

        # one mask per forward, in the form this mode's kernel takes, shared by every layer
        mask = self.layers[0].self_attn.spec.build_mask(key_mask, length, past_length, config, batch, device)

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
                past_key_values=past_key_values if use_cache else None,
                output_attentions=output_attentions,
                use_cache=use_cache,
            )
            if output_attentions:
                all_weights.append(weights)
        hidden_states = self.norm(hidden_states)
        if output_hidden_states:
            all_hidden.append(hidden_states)
        if use_cache:
            past_key_values.advance(length)

        out = BaseModelOutputWithPast(
            last_hidden_state=hidden_states,
            past_key_values=past_key_values if use_cache else None,
            hidden_states=tuple(all_hidden) if output_hidden_states else None,
            attentions=tuple(all_weights) if output_attentions else None,
        )
        return out if return_dict else out.to_tuple()


def causal_lm_loss(
    logits: torch.Tensor, labels: torch.Tensor, num_items_in_batch: int | torch.Tensor | None = None
) -> torch.Tensor:
    """Next-token cross-entropy: logits at t predict labels at t + 1; label -100 is ignored.

    With ``num_items_in_batch`` (passed by ``Trainer`` under gradient accumulation) the summed loss
    is divided by that count, so accumulated steps average over tokens, not over micro-batches.
    """
    shifted = F.pad(labels, (0, 1), value=-100)[:, 1:].to(logits.device)  # (B, L)
    loss = F.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]),
        shifted.reshape(-1),
        ignore_index=-100,
        reduction="sum" if num_items_in_batch is not None else "mean",
    )
    if num_items_in_batch is not None:
        loss = loss / num_items_in_batch
    return loss


class HfAttnForCausalLM(HfAttnPreTrainedModel, GenerationMixin):
    """Decoder with a language-modelling head (tied to the input embedding by default)."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: HfAttnConfig) -> None:
        super().__init__(config)
        self.model = HfAttnModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: HfAttnCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        logits_to_keep: int = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast | tuple:
        """Logits (B, L, vocab); with ``labels`` (B, L) also the shifted cross-entropy loss."""
        if labels is not None and not self.config.is_causal:
            raise ValueError("labels: next-token loss needs a causal model (config.is_causal=True)")
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=True,
        )
        hidden_states = outputs.last_hidden_state
        if logits_to_keep:  # generate() only needs the last position
            hidden_states = hidden_states[:, -logits_to_keep:]
        logits = self.lm_head(hidden_states)
        loss = None
        if labels is not None:
            loss = causal_lm_loss(logits, labels, kwargs.get("num_items_in_batch"))
        out = CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
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
        if attention_mask is not None:
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
        past_key_values: HfAttnCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> SequenceClassifierOutputWithPast | tuple:
        """Logits (B, num_labels); with ``labels`` also the loss (cross-entropy, MSE if num_labels == 1,
        BCE for float multi-label targets)."""
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=True,
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
            past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
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
