"""Configuration of the hf_attn transformer.

One field, ``attention_mode``, switches the attention between the four implementations listed in
``ATTENTION_MODES``. Every other field keeps its usual Hugging Face name so that tooling written for
Llama-style configs (``num_key_value_heads``, ``rope_theta``, ``sliding_window`` ...) reads it unchanged.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

from transformers import GenerationConfig, PretrainedConfig

# Version of the config format this code writes; a config written by a newer hf_attn may carry
# fields this code does not know, and loading it raises instead of silently ignoring them.
HF_ATTN_VERSION = "0.7.0"

# The single source of truth for the modes; the registry test checks this equals the registry keys.
ATTENTION_MODES = ("eager", "local", "lowrank", "rope")
POSITION_EMBEDDING_TYPES = ("absolute", "rope")
ROPE_TYPES = ("default", "linear", "dynamic")
HIDDEN_ACTS = ("silu", "gelu", "gelu_new", "relu")
NORM_TYPES = ("rmsnorm", "layernorm")
MLP_TYPES = ("gated", "plain")
LOWRANK_FEATURE_MAPS = ("product", "softmax")
ATTENTIONS_LAYOUTS = ("native", "dense")


def _fail(field: str, value: Any, allowed: str) -> None:
    raise ValueError(f"HfAttnConfig.{field}={value!r} is invalid; allowed: {allowed}.")


def _check_int(field: str, value: Any, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        _fail(field, value, f"an integer >= {minimum}")


def _check_prob(field: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        _fail(field, value, "a float in [0, 1]")


def lowrank_grid(rank: int) -> tuple[int, int]:
    """The m1 x m2 slot grid of the ``"product"`` feature map: ``m1 * m2 = rank`` with ``m1 <= m2``
    as close as possible (16 x 16 for 256; m1 = 1 when rank has no such factorisation)."""
    m1 = max(m for m in range(1, math.isqrt(rank) + 1) if rank % m == 0)
    return m1, rank // m1


def _base_config_fields() -> set[str]:
    """Keys transformers itself may put in any config.json (its own fields and popped generation keys)."""
    known = set(PretrainedConfig().to_dict()) | set(GenerationConfig._get_default_generation_params())
    known |= {"num_labels", "auto_map", "torch_dtype", "name_or_path", "attn_implementation",
              "experts_implementation", "tokenizer_class", "prefix", "task_specific_params",
              "finetuning_task", "decoder_start_token_id", "sep_token_id", "per_layer_config", "use_return_dict"}
    return known


def _version_tuple(version: str | None) -> tuple[int, ...]:
    parts = []
    for piece in str(version or "0").split(".")[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


def _reject_unknown_fields(kwargs: dict, written_by: str | None) -> None:
    """Extra attributes are kept, as every transformers config does (``config.note = "x"`` saves and
    reloads). Only a config written by a *newer* hf_attn that carries fields this version does not
    know is refused: those fields may change what the model computes, so ignoring them is unsafe."""
    if written_by is None or _version_tuple(written_by) <= _version_tuple(HF_ATTN_VERSION):
        return
    unknown = sorted(k for k in kwargs if not k.startswith("_") and k not in _base_config_fields())
    if unknown:
        raise ValueError(
            f"HfAttnConfig got unknown fields {unknown} (config written by hf_attn {written_by}; this is hf_attn "
            f"{HF_ATTN_VERSION}). Upgrade hf_attn to load it."
        )


class HfAttnConfig(PretrainedConfig):
    r"""Configuration for [`HfAttnModel`] and its heads.

    Args:
        vocab_size: Number of token ids.
        hidden_size: Width of the residual stream.
        num_hidden_layers: Number of decoder blocks.
        num_attention_heads: Query heads; must divide ``hidden_size``.
        num_key_value_heads: Key/value heads for grouped-query attention; must divide
            ``num_attention_heads``. ``None`` means multi-head attention (same as query heads).
        intermediate_size: Width of the MLP. ``None`` means ``4 * hidden_size``.
        hidden_act: Activation of the MLP (of its gate when ``mlp_type="gated"``), one of ``HIDDEN_ACTS``.
        mlp_type: ``"gated"`` (default): ``down(act(gate(x)) * up(x))``, SwiGLU with ``hidden_act="silu"``,
            gate and up stored as one ``gate_up_proj``; ``"plain"``: ``down(act(up(x)))``, the classic
            GPT-2 feed-forward (``up_proj``, ``down_proj``).
        norm_type: ``"rmsnorm"`` (default) or ``"layernorm"`` (bias-free LayerNorm, as in a GPT with
            ``bias=False``); both computed in float32.
        max_position_embeddings: Longest sequence the absolute position table (and the bidirectional
            Linformer projection) covers; for rotary positions it is the trained context length that
            rope scaling extends.
        rms_norm_eps: Epsilon of the norm layers (RMSNorm or LayerNorm, see ``norm_type``).
        initializer_range: Std of the normal weight initialisation.
        hidden_dropout: Dropout on the residual branches.
        attention_dropout: Dropout on attention probabilities (modes that form them).
        attention_mode: ``"eager"`` full softmax attention with learned absolute positions,
            ``"local"`` sliding-window attention, ``"lowrank"`` low-rank attention, ``"rope"`` full
            softmax attention with rotary positions.
        sliding_window: ``local`` mode: a token sees itself and the previous ``sliding_window - 1``
            tokens (both sides when bidirectional).
        lowrank_dim: ``lowrank`` mode: the rank ``k`` (feature dimension / Linformer projection size).
        lowrank_chunk_size: ``lowrank`` causal mode: chunk length of the blocked prefix-sum computation
            (a speed knob; the result does not depend on it).
        lowrank_feature_map: ``lowrank`` causal mode: how a query or key is spread over the k slots.
            ``"product"`` (default): the outer product of two softmaxes of sizes m1 x m2 = k (16 x 16
            for k = 256); ``"softmax"``: one softmax over all k slots (a D x k projection, several
            times the arithmetic). ``None`` means ``"product"``, except for configs written by
            hf_attn 0.1.x, which only had ``"softmax"``.
        position_embedding_type: ``"absolute"`` (learned table) or ``"rope"``. ``None`` picks
            ``"rope"`` for ``attention_mode="rope"`` and ``"absolute"`` otherwise; ``local`` and
            ``lowrank`` accept either (Mistral-style local + rope).
        rope_theta: Base of the rotary frequencies.
        rope_scaling: ``None`` or ``{"type": "linear" | "dynamic", "factor": float >= 1}``; a shorthand
            merged into ``rope_parameters``.
        rope_parameters: transformers 5 spelling of the same facts, stored in config.json:
            ``{"rope_type": "default" | "linear" | "dynamic", "rope_theta": float, "factor": float}``.
        is_causal: ``True`` for a decoder (default); ``False`` makes attention bidirectional.
        output_attentions_layout: What ``output_attentions=True`` returns per layer. ``"native"``
            (default): each mode's own form (full modes (B, H, Lq, Lk); ``local`` its blocked
            (B, H, n/w, w, span) weights; causal ``lowrank`` ``None``; bidirectional ``lowrank`` its
            (B, H, L, k) slot weights). ``"dense"``: (B, H, Lq, Lk) for every mode, the form tools
            such as bertviz read: ``local``'s band placed in (Lq x Lk), zeros outside; causal
            ``lowrank`` the attention its feature map implies, phi(q_i).phi(k_j) over j <= i with
            rows normalised; bidirectional ``lowrank`` the token weights its k slots imply. O(L^2)
            memory per layer, formed only when weights are asked for.
        fused_ops: ``True`` (default): while gradients are recorded, RMSNorm, the SwiGLU gate with
            ``down_proj``, and q/k/v (one stacked matmul) run as fused autograd functions that keep
            fewer tensors and record fewer nodes (same values and gradients; hooked or adapted
            projections are always called as modules); on the CPU, RMSNorm and the SwiGLU gate run
            as compiled C++ kernels (``cpu_kernels.py``, switch ``HF_ATTN_CPU_KERNELS``). ``False``:
            plain PyTorch ops throughout, for forward-mode AD and ``torch.func`` transforms. Double
            backward works either way (the chunked loss refuses it: use ``loss_chunk_size=0``).
        loss_chunk_size: Tokens per chunk of the LM loss while gradients are recorded: the logits of
            ``loss_chunk_size`` tokens are formed at a time and never all (tokens x vocab) at once, so
            such a forward returns ``loss`` with ``logits=None``. ``0`` turns chunking off (logits are
            returned, at their full memory cost). Without labels or without gradients the logits are
            always returned.
        tie_word_embeddings: Share the input embedding with the LM head.
        use_cache: Whether forward returns a cache by default.
        pad_token_id, bos_token_id, eos_token_id: Special token ids (padding rows are pooled past by
            the classifier when no attention mask is given).
    """

    model_type = "hf_attn"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(
        self,
        vocab_size: int = 32000,
        hidden_size: int = 512,
        num_hidden_layers: int = 8,
        num_attention_heads: int = 8,
        num_key_value_heads: int | None = None,
        intermediate_size: int | None = None,
        hidden_act: str = "silu",
        mlp_type: str = "gated",
        norm_type: str = "rmsnorm",
        max_position_embeddings: int = 2048,
        rms_norm_eps: float = 1e-6,
        initializer_range: float = 0.02,
        hidden_dropout: float = 0.0,
        attention_dropout: float = 0.0,
        attention_mode: str = "eager",
        sliding_window: int = 256,
        lowrank_dim: int = 64,
        lowrank_chunk_size: int = 128,
        lowrank_feature_map: str | None = None,
        position_embedding_type: str | None = None,
        rope_theta: float = 10000.0,
        rope_scaling: dict | None = None,
        rope_parameters: dict | None = None,
        is_causal: bool = True,
        fused_ops: bool = True,
        loss_chunk_size: int = 1024,
        output_attentions_layout: str = "native",
        tie_word_embeddings: bool = True,
        use_cache: bool = True,
        pad_token_id: int | None = None,
        bos_token_id: int | None = None,
        eos_token_id: int | list[int] | None = None,
        hf_attn_version: str | None = None,
        **kwargs: Any,
    ) -> None:
        _reject_unknown_fields(kwargs, hf_attn_version)
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_attention_heads if num_key_value_heads is None else num_key_value_heads
        self.intermediate_size = 4 * hidden_size if intermediate_size is None else intermediate_size
        self.hidden_act = hidden_act
        self.mlp_type = mlp_type
        self.norm_type = norm_type
        self.max_position_embeddings = max_position_embeddings
        self.rms_norm_eps = rms_norm_eps
        self.initializer_range = initializer_range
        self.hidden_dropout = hidden_dropout
        self.attention_dropout = attention_dropout
        self.attention_mode = attention_mode
        self.sliding_window = sliding_window
        self.lowrank_dim = lowrank_dim
        self.lowrank_chunk_size = lowrank_chunk_size
        if lowrank_feature_map is None:  # 0.1.x configs predate the field and meant one softmax
            lowrank_feature_map = "softmax" if str(hf_attn_version).startswith("0.1.") else "product"
        self.lowrank_feature_map = lowrank_feature_map
        if position_embedding_type is None:
            position_embedding_type = "rope" if attention_mode == "rope" else "absolute"
        self.position_embedding_type = position_embedding_type
        # One dict holds every rotary fact (transformers 5 convention); "type" is the older key name.
        params = dict(rope_parameters or {})
        if rope_scaling is not None:
            if not isinstance(rope_scaling, dict):
                _fail("rope_scaling", rope_scaling, "None or a dict {'type': 'linear'|'dynamic', 'factor': float}")
            params.update(rope_scaling)
        if "type" in params:
            params["rope_type"] = params.pop("type")
        params.setdefault("rope_type", "default")
        params.setdefault("rope_theta", rope_theta)
        self.rope_parameters = params
        self.is_causal = is_causal
        self.fused_ops = fused_ops
        self.loss_chunk_size = loss_chunk_size
        self.output_attentions_layout = output_attentions_layout
        self.use_cache = use_cache
        self.pad_token_id = pad_token_id
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id
        self.hf_attn_version = HF_ATTN_VERSION
        # Validate before the base class runs its own (Llama-oriented) checks, so errors name our fields.
        self.validate_hf_attn()
        with self._rope_checks_only_where_used():
            super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)

    @contextlib.contextmanager
    def _rope_checks_only_where_used(self):
        """transformers validates ``rope_parameters`` of every config, rotary or not (e.g. it refuses an
        odd head_dim); with absolute positions no rotation happens, so its rope checks are skipped."""
        params = self.__dict__.get("rope_parameters")
        if self.position_embedding_type != "rope":
            self.__dict__["rope_parameters"] = None
        try:
            yield
        finally:
            self.__dict__["rope_parameters"] = params

    def convert_rope_params_to_dict(self, **kwargs):
        """transformers' base ``__init__`` fills in default rope parameters; while they are hidden (see
        above) there is nothing to fill."""
        if self.__dict__.get("rope_parameters") is None and self.position_embedding_type != "rope":
            return kwargs
        return super().convert_rope_params_to_dict(**kwargs)

    def validate(self) -> None:
        """transformers' checks (run again by ``save_pretrained``), with rope checks where rope is used."""
        self.validate_hf_attn()
        with self._rope_checks_only_where_used():
            super().validate()

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def layer_types(self) -> list[str]:
        """Cache-layer type of every decoder layer, as transformers' ``DynamicCache(config=...)`` and
        ``StaticCache`` read it: full modes keep every key ("full_attention"), ``local`` the last
        ``sliding_window - 1`` ("sliding_attention"), causal ``lowrank`` a constant-size recurrent
        state ("linear_attention"). Derived from ``attention_mode``, never stored, so it cannot
        disagree with it."""
        kind = {"local": "sliding_attention", "lowrank": "linear_attention"}.get(self.attention_mode, "full_attention")
        return [kind] * self.num_hidden_layers

    @property
    def rope_theta(self) -> float:
        """Base of the rotary frequencies (stored in ``rope_parameters``)."""
        # (while transformers' base __init__ runs, the dict may not be in place yet)
        return (self.__dict__.get("rope_parameters") or {}).get("rope_theta", 10000.0)

    @rope_theta.setter
    def rope_theta(self, value: float) -> None:
        self.rope_parameters["rope_theta"] = value

    def validate_hf_attn(self) -> None:
        """Check every field; raise ``ValueError`` naming the field, the value and what is allowed."""
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "intermediate_size", "max_position_embeddings",
                     "sliding_window", "lowrank_dim", "lowrank_chunk_size"):
            _check_int(name, getattr(self, name))
        _check_int("loss_chunk_size", self.loss_chunk_size, minimum=0)
        if self.output_attentions_layout not in ATTENTIONS_LAYOUTS:
            _fail("output_attentions_layout", self.output_attentions_layout, f"one of {list(ATTENTIONS_LAYOUTS)}")
        if self.hidden_size % self.num_attention_heads:
            _fail("num_attention_heads", self.num_attention_heads,
                  f"a divisor of hidden_size={self.hidden_size}")
        if self.num_attention_heads % self.num_key_value_heads:
            _fail("num_key_value_heads", self.num_key_value_heads,
                  f"a divisor of num_attention_heads={self.num_attention_heads}")
        if self.attention_mode not in ATTENTION_MODES:
            _fail("attention_mode", self.attention_mode, f"one of {list(ATTENTION_MODES)}")
        if self.position_embedding_type not in POSITION_EMBEDDING_TYPES:
            _fail("position_embedding_type", self.position_embedding_type,
                  f"one of {list(POSITION_EMBEDDING_TYPES)} or None")
        if self.attention_mode == "eager" and self.position_embedding_type == "rope":
            _fail("position_embedding_type", "rope",
                  "'absolute' with attention_mode='eager' (full attention with rotary positions "
                  "is attention_mode='rope')")
        if self.attention_mode == "rope" and self.position_embedding_type != "rope":
            _fail("position_embedding_type", self.position_embedding_type,
                  "'rope' or None with attention_mode='rope'")
        if self.hidden_act not in HIDDEN_ACTS:
            _fail("hidden_act", self.hidden_act, f"one of {list(HIDDEN_ACTS)}")
        if self.mlp_type not in MLP_TYPES:
            _fail("mlp_type", self.mlp_type, f"one of {list(MLP_TYPES)}")
        if self.norm_type not in NORM_TYPES:
            _fail("norm_type", self.norm_type, f"one of {list(NORM_TYPES)}")
        for name in ("hidden_dropout", "attention_dropout"):
            _check_prob(name, getattr(self, name))
        if isinstance(self.rms_norm_eps, bool) or not isinstance(self.rms_norm_eps, (int, float)) \
                or not math.isfinite(self.rms_norm_eps) or self.rms_norm_eps <= 0:
            _fail("rms_norm_eps", self.rms_norm_eps, "a finite float > 0")
        if not isinstance(self.initializer_range, (int, float)) or not self.initializer_range > 0:
            _fail("initializer_range", self.initializer_range, "a float > 0")
        if self.position_embedding_type == "rope" and self.head_dim % 2:
            _fail("num_attention_heads", self.num_attention_heads,
                  f"a head count giving an even head_dim for rotary positions (hidden_size/heads={self.head_dim})")
        for name in ("pad_token_id", "bos_token_id"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < self.vocab_size):
                _fail(name, value, f"None or an id in [0, vocab_size={self.vocab_size})")
        if not isinstance(self.is_causal, bool):
            _fail("is_causal", self.is_causal, "True or False")
        if not isinstance(self.fused_ops, bool):
            _fail("fused_ops", self.fused_ops, "True or False")
        if self.lowrank_feature_map not in LOWRANK_FEATURE_MAPS:
            _fail("lowrank_feature_map", self.lowrank_feature_map, f"one of {list(LOWRANK_FEATURE_MAPS)} or None")
        if (self.attention_mode == "lowrank" and self.is_causal and self.lowrank_feature_map == "product"
                and lowrank_grid(self.lowrank_dim)[0] < 2):
            _fail("lowrank_dim", self.lowrank_dim,
                  "a product of two integers >= 2 with lowrank_feature_map='product' (e.g. 256 = 16 x 16), "
                  "or lowrank_feature_map='softmax'")
        if self.attention_mode == "lowrank" and not self.is_causal and self.lowrank_dim > self.max_position_embeddings:
            _fail("lowrank_dim", self.lowrank_dim,
                  f"lowrank_dim <= max_position_embeddings={self.max_position_embeddings} "
                  "for the bidirectional Linformer projection")
        self._validate_rope_scaling()

    def validate_rope(self) -> None:
        """Replaces transformers' generic rope check (which assumes every config uses rope)."""
        self._validate_rope_scaling()

    def _validate_rope_scaling(self) -> None:
        params = self.rope_parameters
        if not isinstance(params, dict):
            _fail("rope_parameters", params, "a dict with rope_type, rope_theta and (for scaling) factor")
        if "type" in params:  # rope_scaling={"type": ...} set after construction (from_pretrained overrides)
            params["rope_type"] = params.pop("type")
        unknown = set(params) - {"rope_type", "rope_theta", "factor"}
        if unknown:
            _fail("rope_scaling", params, f"the keys 'type' and 'factor' (unknown: {sorted(unknown)})")
        theta = params.get("rope_theta")
        if isinstance(theta, bool) or not isinstance(theta, (int, float)) or not math.isfinite(theta) or theta <= 1:
            _fail("rope_theta", theta, "a finite float > 1")
        kind = params.get("rope_type")
        if kind not in ROPE_TYPES:
            _fail("rope_scaling['type']", kind, f"one of {list(ROPE_TYPES[1:])} (or rope_scaling=None for no scaling)")
        if kind == "default":
            return
        factor = params.get("factor")
        if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not math.isfinite(factor) or factor < 1:
            _fail("rope_scaling['factor']", factor, "a finite float >= 1")
        if self.position_embedding_type != "rope":
            _fail("rope_scaling", params, "None unless position_embedding_type='rope'")


__all__ = ["HfAttnConfig", "ATTENTION_MODES"]
