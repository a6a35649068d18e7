"""Lend the ``local`` kernel to stock transformers models: ``attn_implementation="hf_attn_local"``.

After :func:`register_local_attention`, any transformers model whose attention layers take a
``sliding_window`` (Mistral, Qwen2, Gemma 3, Ministral, ...) runs its sliding-window layers on
``attention_local.local_attention_forward`` (O(n * w) time and memory) instead of sdpa over an n x n
mask, and its full-attention layers on transformers' own sdpa:

    register_local_attention()
    model = MistralForCausalLM.from_pretrained(path, attn_implementation="hf_attn_local")

Two functions are registered under one name:

- mask (``AttentionMaskInterface``): instead of the (B, 1, q, kv) mask, ``create_causal_mask`` and
  ``create_sliding_window_causal_mask`` return the (B, kv) key-padding mask, or ``None`` when nothing
  is padded. Only masks whose pattern that loses nothing take this path: plain causal or
  sliding-window causal with the queries the last ``q_length`` of the keys (dynamic caches, no
  cache). Anything else (static caches, packed sequences, bidirectional or custom overlays) is
  handed to transformers' ``sdpa_mask`` and comes back 4-D.
- attention (``AttentionInterface``): per layer, the window is the ``sliding_window`` keyword the
  model's attention passes (``None`` for full layers), else the module's ``sliding_window``
  attribute, else ``config.layer_types[layer_idx]``. A sliding layer with a 2-D or no mask runs the
  local kernel; a full layer, or any 4-D mask, runs ``sdpa_attention_forward``.

Window convention: transformers' ``sliding_window_overlay`` lets query i see keys
``i - w < j <= i`` (w keys, itself included) and the dynamic sliding cache keeps ``w - 1`` keys;
``local_attention_forward`` computes exactly that band with ``w = config.sliding_window``, so the
model's window is passed unchanged.
Limits: no ``softcap`` (Gemma 2) or attention sinks (``s_aux``); ``output_attentions`` returns
``None`` weights, as sdpa does.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, causal_mask_function, sdpa_mask

from .attention_local import local_attention_forward

ATTN_IMPLEMENTATION = "hf_attn_local"

_UNSET = object()


def hf_attn_local_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int | torch.Tensor = 0,
    kv_offset: int = 0,
    mask_function=causal_mask_function,
    attention_mask: torch.Tensor | None = None,
    allow_is_causal_skip: bool = True,
    **kwargs,
) -> torch.Tensor | None:
    """Mask function of ``hf_attn_local``: the (B, kv_length) bool key-padding mask (``True`` = real
    token), ``None`` without padding, or transformers' 4-D sdpa mask where the pattern is not plain.

    The 2-D form is exact when two things hold, and only then is it returned: the pattern is the
    plain causal or causal sliding-window one (``create_causal_mask`` and
    ``create_sliding_window_causal_mask`` clear ``allow_is_causal_skip`` whenever they add anything
    to it: packed sequences, or/and overlays, compiled decoding), and the keys end where the queries
    end (dynamic caches and uncached calls; not static caches, whose keys are a fixed-size buffer).
    The attention function then applies the band itself.
    """
    plain = (allow_is_causal_skip and isinstance(q_offset, int) and isinstance(kv_offset, int)
             and kv_offset + kv_length == q_offset + q_length)
    if not plain:
        return sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                         kv_offset=kv_offset, mask_function=mask_function, attention_mask=attention_mask,
                         allow_is_causal_skip=False, **kwargs)
    if attention_mask is None:
        return None
    padding = attention_mask[:, kv_offset: kv_offset + kv_length].bool()  # (B, <= kv_length)
    if padding.shape[-1] < kv_length:  # as transformers' prepare_padding_mask: keys past the mask are padding
        padding = torch.nn.functional.pad(padding, (0, kv_length - padding.shape[-1]), value=False)
    return None if bool(padding.all()) else padding


def layer_sliding_window(module: nn.Module, kwargs: dict) -> int | None:
    """The sliding window of the layer ``module`` is in, or ``None`` for a full-attention layer."""
    window = kwargs.get("sliding_window", _UNSET)  # what Mistral, Qwen2, Gemma pass per layer
    if window is _UNSET:
        window = getattr(module, "sliding_window", _UNSET)
    if window is _UNSET:
        config = getattr(module, "config", None)
        layer_types = getattr(config, "layer_types", None)
        layer_idx = getattr(module, "layer_idx", None)
        window = None
        if layer_types is not None and layer_idx is not None and layer_types[layer_idx] == "sliding_attention":
            window = config.sliding_window
    return window


def hf_attn_local_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Attention function of ``hf_attn_local``: query (B, H, Lq, D), key/value (B, Hkv, Lk, D), the
    queries being the last Lq of the keys -> ((B, Lq, H, D), None).

    Args:
        attention_mask: what :func:`hf_attn_local_mask` returned: ``None``, a (B, Lk) key-padding
            mask, or a 4-D mask (handed to sdpa as is).

    Raises:
        ValueError: on ``softcap`` / ``s_aux``, or a 2-D mask narrower than the keys.
    """
    for name in ("softcap", "s_aux"):
        if kwargs.get(name) is not None:
            raise ValueError(f"attn_implementation={ATTN_IMPLEMENTATION!r} does not support {name}={kwargs[name]!r}; "
                             "use 'eager' for this model")
    if attention_mask is not None and attention_mask.dim() == 4:  # a pattern only the dense mask describes
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    lq, lk = query.shape[2], key.shape[2]
    if attention_mask is not None:
        if attention_mask.shape[-1] < lk:
            raise ValueError(f"the key-padding mask covers {attention_mask.shape[-1]} keys but the layer has {lk}")
        attention_mask = attention_mask[:, attention_mask.shape[-1] - lk:]  # (B, Lk): the keys are the last ones
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    window = layer_sliding_window(module, kwargs)
    kwargs.pop("sliding_window", None)
    is_causal = kwargs.pop("is_causal", None)
    # A 2-D mask stands for create_causal_mask's / create_sliding_window_causal_mask's causal pattern
    # plus padding; with no mask at all, sdpa would follow the module's is_causal.
    is_causal = True if attention_mask is not None else (getattr(module, "is_causal", True) if is_causal is None
                                                         else is_causal)
    if window is not None and is_causal:
        # the kernel reads the window from module.config and dropout's switch from module.training
        view = SimpleNamespace(config=SimpleNamespace(sliding_window=window), training=module.training)
        # Stock attention modules send our output only through o_proj (a reshape, then a Linear),
        # whose backward runs before ours and hands us a fresh gradient: the kernel's backward may
        # then write its gradients into those two buffers (two (B, Lq, H, D) tensors less at the peak).
        # Not when anyone else can still read that output afterwards: a hook on o_proj (it sees the
        # output as its input) or saved-tensor hooks (they may keep o_proj's saved input).
        o_proj = getattr(module, "o_proj", None)
        scratch = (isinstance(o_proj, nn.Linear) and not o_proj._forward_hooks and not o_proj._forward_pre_hooks
                   and torch._C._autograd._top_saved_tensors_default_hooks(False) is None)
        return local_attention_forward(view, query, key, value, attention_mask, scaling, dropout,
                                       is_causal=True, implementation="sdpa", scratch_output=scratch, **kwargs)
    if is_causal and (attention_mask is not None or 1 < lq < lk):
        # a full layer with padding or cached keys: sdpa's is_causal would align the queries with the
        # first keys, so the causal band (query i is key Lk - Lq + i) and the padding go into a mask
        attention_mask = sdpa_mask(batch_size=query.shape[0], q_length=lq, kv_length=lk, q_offset=lk - lq,
                                   attention_mask=attention_mask, allow_is_causal_skip=False, device=query.device)
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  is_causal=is_causal, **kwargs)


def register_local_attention() -> str:
    """Register ``hf_attn_local`` with ``AttentionInterface`` and ``AttentionMaskInterface``
    (idempotent). Returns the name to pass as ``attn_implementation``."""
    AttentionInterface.register(ATTN_IMPLEMENTATION, hf_attn_local_attention_forward)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, hf_attn_local_mask)
    return ATTN_IMPLEMENTATION


__all__ = [
    "ATTN_IMPLEMENTATION",
    "hf_attn_local_attention_forward",
    "hf_attn_local_mask",
    "layer_sliding_window",
    "register_local_attention",
]
