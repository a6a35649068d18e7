"""Config validation: every bad value raises ValueError naming the field; the registry and config agree."""

from __future__ import annotations

import pytest
from conftest import tiny_config
from transformers import AutoConfig

from hf_attn import ATTENTION_MODES, ATTENTION_REGISTRY, HfAttnConfig, get_attention_spec


def test_registry_and_config_agree():
    assert set(ATTENTION_REGISTRY) == set(ATTENTION_MODES)
    with pytest.raises(ValueError, match=r"allowed values are \['eager', 'local', 'lowrank', 'rope'\]"):
        get_attention_spec("flash")


def test_auto_config_for_model():
    cfg = AutoConfig.for_model("hf_attn", attention_mode="local", sliding_window=128)
    assert isinstance(cfg, HfAttnConfig) and cfg.sliding_window == 128
    assert cfg.position_embedding_type == "absolute"
    assert HfAttnConfig(attention_mode="rope").position_embedding_type == "rope"


def test_round_trip_keeps_every_field(tmp_path):
    cfg = tiny_config("local", "rope", rope_scaling={"type": "linear", "factor": 4.0}, is_causal=False)
    cfg.save_pretrained(tmp_path)
    again = AutoConfig.from_pretrained(tmp_path)
    drop = {"_name_or_path"}  # records where it was loaded from
    assert {k: v for k, v in again.to_dict().items() if k not in drop} == {
        k: v for k, v in cfg.to_dict().items() if k not in drop
    }
    assert again.rope_parameters == {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0}


BAD_VALUES = [
    ({"attention_mode": "flash"}, "attention_mode"),
    ({"attention_mode": None}, "attention_mode"),
    ({"hidden_size": 30, "num_attention_heads": 4}, "num_attention_heads"),
    ({"num_key_value_heads": 3}, "num_key_value_heads"),
    ({"hidden_size": 0}, "hidden_size"),
    ({"vocab_size": -1}, "vocab_size"),
    ({"num_hidden_layers": 1.5}, "num_hidden_layers"),
    ({"sliding_window": 0}, "sliding_window"),
    ({"lowrank_dim": 0}, "lowrank_dim"),
    ({"lowrank_chunk_size": True}, "lowrank_chunk_size"),
    ({"max_position_embeddings": 0}, "max_position_embeddings"),
    ({"attention_dropout": 1.5}, "attention_dropout"),
    ({"hidden_dropout": -0.1}, "hidden_dropout"),
    ({"hidden_act": "swish2"}, "hidden_act"),
    ({"mlp_type": "swiglu"}, r"mlp_type.*\['gated', 'plain'\]"),
    ({"norm_type": "batchnorm"}, r"norm_type.*\['rmsnorm', 'layernorm'\]"),
    ({"rms_norm_eps": 0}, "rms_norm_eps"),
    ({"initializer_range": -1.0}, "initializer_range"),
    ({"position_embedding_type": "alibi"}, "position_embedding_type"),
    ({"attention_mode": "eager", "position_embedding_type": "rope"}, "position_embedding_type"),
    ({"attention_mode": "rope", "position_embedding_type": "absolute"}, "position_embedding_type"),
    ({"attention_mode": "rope", "rope_theta": 0.5}, "rope_theta"),
    ({"attention_mode": "rope", "rope_scaling": {"type": "yarn", "factor": 2.0}}, r"rope_scaling\['type'\]"),
    ({"attention_mode": "rope", "rope_scaling": {"type": "linear", "factor": 0.5}}, r"rope_scaling\['factor'\]"),
    ({"attention_mode": "rope", "rope_scaling": {"type": "linear"}}, r"rope_scaling\['factor'\]"),
    ({"attention_mode": "rope", "rope_scaling": {"type": "linear", "factor": 2, "beta": 1}}, "rope_scaling"),
    ({"attention_mode": "rope", "rope_scaling": "linear"}, "rope_scaling"),
    ({"attention_mode": "eager", "rope_scaling": {"type": "linear", "factor": 2.0}}, "rope_scaling"),
    ({"attention_mode": "rope", "hidden_size": 36, "num_attention_heads": 4, "num_key_value_heads": 4}, "even head_dim"),
    ({"attention_mode": "lowrank", "is_causal": False, "lowrank_dim": 256, "max_position_embeddings": 128}, "lowrank_dim"),
    ({"is_causal": "yes"}, "is_causal"),
    ({"lowrank_feature_map": "relu"}, "lowrank_feature_map"),
    ({"attention_mode": "lowrank", "lowrank_dim": 31, "lowrank_feature_map": "product"}, "lowrank_dim"),
    ({"attention_mode": "lowrank", "lowrank_dim": 1}, "lowrank_dim"),
    ({"pad_token_id": 1000}, "pad_token_id"),
]


@pytest.mark.parametrize("overrides,field", BAD_VALUES, ids=[str(o) for o, _ in BAD_VALUES])
def test_bad_values_name_the_field(overrides, field):
    with pytest.raises(ValueError, match=field) as info:
        tiny_config(**overrides)
    assert "HfAttnConfig." in str(info.value)
    assert "allowed:" in str(info.value)


def test_lowrank_feature_map_default_and_older_configs():
    """New configs default to the product map; a config.json written by hf_attn 0.1.x (before the
    field existed, when the only map was one softmax) keeps meaning that."""
    assert tiny_config("lowrank").lowrank_feature_map == "product"
    assert tiny_config("lowrank", lowrank_dim=31, lowrank_feature_map="softmax").lowrank_dim == 31
    old = tiny_config("lowrank").to_dict()
    old.pop("lowrank_feature_map")
    old["hf_attn_version"] = "0.1.0"
    assert HfAttnConfig.from_dict(old).lowrank_feature_map == "softmax"
    old["hf_attn_version"] = HfAttnConfig().hf_attn_version
    assert HfAttnConfig.from_dict(old).lowrank_feature_map == "product"
