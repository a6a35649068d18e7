"""hf_attn: a Hugging Face-native transformer whose attention is switched by ``config.attention_mode``.

Importing the package registers the model type ``"hf_attn"`` with ``AutoConfig``, ``AutoModel``,
``AutoModelForCausalLM`` and ``AutoModelForSequenceClassification``, and marks the classes for
``register_for_auto_class`` so saved folders carry ``auto_map`` and the modeling code.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from .attention_registry import ATTENTION_REGISTRY, get_attention_spec
from .cache_hf_attn import HfAttnCache
from .configuration_hf_attn import ATTENTION_MODES, HfAttnConfig
from .lend_local import register_local_attention
from .modeling_hf_attn import (
    HfAttnForCausalLM,
    HfAttnForSequenceClassification,
    HfAttnModel,
    HfAttnPreTrainedModel,
)

__version__ = "0.7.0"

AutoConfig.register(HfAttnConfig.model_type, HfAttnConfig, exist_ok=True)
AutoModel.register(HfAttnConfig, HfAttnModel, exist_ok=True)
AutoModelForCausalLM.register(HfAttnConfig, HfAttnForCausalLM, exist_ok=True)
AutoModelForSequenceClassification.register(HfAttnConfig, HfAttnForSequenceClassification, exist_ok=True)

# Trainer reads this table to know a model is a causal LM (label smoothing then shifts the labels).
MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.setdefault(HfAttnConfig.model_type, HfAttnForCausalLM.__name__)

# attn_implementation="hf_attn_local": the O(n * w) local kernel for stock sliding-window models
# (Mistral, Qwen2, Gemma 3 ...). Registered here, not in the modeling code a checkpoint carries.
register_local_attention()

HfAttnConfig.register_for_auto_class()
HfAttnModel.register_for_auto_class("AutoModel")
HfAttnForCausalLM.register_for_auto_class("AutoModelForCausalLM")
HfAttnForSequenceClassification.register_for_auto_class("AutoModelForSequenceClassification")

__all__ = [
    "ATTENTION_MODES",
    "ATTENTION_REGISTRY",
    "HfAttnCache",
    "HfAttnConfig",
    "HfAttnForCausalLM",
    "HfAttnForSequenceClassification",
    "HfAttnModel",
    "HfAttnPreTrainedModel",
    "get_attention_spec",
    "register_local_attention",
]
