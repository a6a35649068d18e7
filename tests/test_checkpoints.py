"""Loading is safetensors-only, and broken or mismatched checkpoints fail with errors naming the
file and the mismatch; switching attention modes on a checkpoint warns or refuses."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_config
from transformers import AutoConfig, AutoModelForCausalLM

from hf_attn import HfAttnForCausalLM


@pytest.fixture()
def ckpt(tmp_path):
    torch.manual_seed(0)
    HfAttnForCausalLM(tiny_config("eager")).save_pretrained(tmp_path)
    return tmp_path


def test_only_safetensors_is_written_and_pickles_are_never_loaded(ckpt, monkeypatch):
    state = {k: v.clone() for k, v in HfAttnForCausalLM(tiny_config("eager")).state_dict().items()}
    (ckpt / "model.safetensors").unlink()
    torch.save(state, ckpt / "pytorch_model.bin")  # a pickle someone dropped in the folder
    unpickled = []
    monkeypatch.setattr(torch, "load", lambda *a, **k: unpickled.append(a))
    with pytest.raises((OSError, ValueError), match="safetensors"):
        AutoModelForCausalLM.from_pretrained(ckpt)
    assert unpickled == []


def test_truncated_weights_name_the_file(ckpt):
    path = ckpt / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="model.safetensors.*truncated or corrupted"):
        AutoModelForCausalLM.from_pretrained(ckpt)


def test_corrupted_header_names_the_file(ckpt):
    path = ckpt / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[8:40] = b"\xff" * 32  # garbage where the JSON header starts
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="model.safetensors"):
        AutoModelForCausalLM.from_pretrained(ckpt)


def test_config_with_unknown_fields_from_a_newer_version(ckpt):
    config = json.loads((ckpt / "config.json").read_text())
    config["hf_attn_version"] = "9.0.0"
    config["attention_sink_tokens"] = 4
    (ckpt / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"unknown fields \['attention_sink_tokens'\].*hf_attn 9\.0\.0"):
        AutoConfig.from_pretrained(ckpt)
    with pytest.raises(ValueError, match="attention_sink_tokens"):
        AutoModelForCausalLM.from_pretrained(ckpt)


def test_lowrank_checkpoint_from_0_1_loads_with_its_softmax_feature_map(tmp_path):
    """A lowrank checkpoint saved by hf_attn 0.1.x has no ``lowrank_feature_map`` in config.json and a
    (k, D) feature weight: it loads as the softmax map and gives the same outputs."""
    torch.manual_seed(0)
    model = HfAttnForCausalLM(tiny_config("lowrank", lowrank_feature_map="softmax")).eval()
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    del config["lowrank_feature_map"]
    config["hf_attn_version"] = "0.1.0"
    (tmp_path / "config.json").write_text(json.dumps(config))
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.config.lowrank_feature_map == "softmax"
    ids = torch.randint(1, 97, (2, 9))
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits)


def test_weights_that_do_not_match_the_config(ckpt):
    config = json.loads((ckpt / "config.json").read_text())
    config["intermediate_size"] = 96  # the saved MLP is 64 wide
    (ckpt / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="shapes that do not match its config"):
        AutoModelForCausalLM.from_pretrained(ckpt)


def test_switch_between_modes_that_share_weights_warns(ckpt):
    x = torch.randint(1, 97, (1, 8))
    with pytest.warns(UserWarning, match="attention_mode: 'eager' -> 'local'"):
        local = AutoModelForCausalLM.from_pretrained(ckpt, attention_mode="local")
    assert local.config.attention_mode == "local" and torch.isfinite(local(x).logits).all()
    with pytest.warns(UserWarning, match="embed_positions.weight.*dropped"):
        rope = AutoModelForCausalLM.from_pretrained(ckpt, attention_mode="rope", position_embedding_type="rope")
    original = AutoModelForCausalLM.from_pretrained(ckpt)
    q_rope = rope.model.layers[0].self_attn.q_proj.weight
    torch.testing.assert_close(q_rope, original.model.layers[0].self_attn.q_proj.weight)


def test_switch_to_a_mode_with_extra_weights_is_refused(ckpt):
    with pytest.raises(ValueError, match="missing .*feature_map"):
        AutoModelForCausalLM.from_pretrained(ckpt, attention_mode="lowrank")


def test_invalid_override_is_refused(ckpt):
    with pytest.raises(ValueError, match="attention_mode='sparse'"):
        AutoModelForCausalLM.from_pretrained(ckpt, attention_mode="sparse")
