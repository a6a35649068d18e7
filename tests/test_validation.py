"""Bad inputs raise ValueError naming what is wrong and what is allowed, before any compute."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_config, with_cache

from hf_attn import HfAttnCache, HfAttnForCausalLM


@pytest.fixture(scope="module")
def model() -> HfAttnForCausalLM:
    return HfAttnForCausalLM(tiny_config("eager", max_position_embeddings=32)).eval()


OK = torch.ones(2, 5, dtype=torch.long)

BAD_CALLS = [
    (dict(input_ids=torch.full((2, 5), 97)), r"token id 97; allowed ids are 0\.\.96"),
    (dict(input_ids=torch.full((2, 5), -3)), "token id -3"),
    (dict(input_ids=OK.float()), "integer tensor"),
    (dict(input_ids=OK.bool()), "integer tensor"),
    (dict(input_ids=OK[0]), "2-D"),
    (dict(input_ids=OK[None]), "2-D"),
    (dict(input_ids=torch.ones(0, 5, dtype=torch.long)), "empty input"),
    (dict(input_ids=torch.ones(2, 0, dtype=torch.long)), "empty input"),
    (dict(input_ids=OK, attention_mask=torch.ones(2, 4)), r"attention_mask must be \(batch=2, past\+seq_len=5\)"),
    (dict(input_ids=OK, attention_mask=torch.ones(3, 5)), "attention_mask"),
    (dict(input_ids=OK, attention_mask=torch.full((2, 5), 0.5)), "0 \\(padding\\) or 1"),
    (dict(input_ids=OK, position_ids=torch.arange(4)[None]), "position_ids must be"),
    (dict(input_ids=OK, position_ids=-torch.arange(5)[None]), "position_ids must be >= 0"),
    (dict(input_ids=torch.ones(1, 40, dtype=torch.long)), "beyond max_position_embeddings=32"),
    (dict(input_ids=OK, position_ids=torch.arange(30, 35)[None]), "position 34 is beyond"),
    (dict(inputs_embeds=torch.randn(2, 5, 31)), "hidden_size=32"),
    (dict(input_ids=OK, inputs_embeds=torch.randn(2, 5, 32)), "exactly one of input_ids or inputs_embeds"),
    (dict(), "exactly one of input_ids or inputs_embeds"),
    (dict(input_ids=OK, past_key_values=((torch.zeros(1), torch.zeros(1)),)), "must be a transformers Cache"),
]


@pytest.mark.parametrize("kwargs,message", BAD_CALLS, ids=[m for _, m in BAD_CALLS])
def test_bad_input_raises_value_error(model, kwargs, message):
    with pytest.raises(ValueError, match=message):
        model(**kwargs)


def test_lowrank_bidirectional_length_limit():
    model = HfAttnForCausalLM(tiny_config("lowrank", is_causal=False, max_position_embeddings=16))
    with pytest.raises(ValueError, match="beyond max_position_embeddings=16"):
        model.model(torch.ones(1, 17, dtype=torch.long))


def test_rotary_models_have_no_length_limit():
    model = HfAttnForCausalLM(tiny_config("local", "rope", max_position_embeddings=16)).eval()
    with torch.no_grad():
        assert torch.isfinite(model(torch.ones(1, 40, dtype=torch.long)).logits).all()


def test_cache_on_bidirectional_model_is_refused():
    model = HfAttnForCausalLM(tiny_config("eager", is_causal=False))
    with pytest.raises(ValueError, match="bidirectional"):
        model.model(OK, **with_cache(HfAttnCache(model.config)))


def test_checks_run_before_any_compute(model, monkeypatch):
    """The embedding is never reached with an out-of-vocabulary id (no IndexError deep inside)."""
    calls = []
    monkeypatch.setattr(model.model.embed_tokens, "forward", lambda *a: calls.append(a))
    with pytest.raises(ValueError):
        model(torch.full((1, 3), 500))
    assert calls == []
