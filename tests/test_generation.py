"""generate() in every mode: cached equals uncached, and the variants transformers offers (sampling,
beams, assisted decoding, prompt lookup, static caches, inputs_embeds, continuing from a cache)."""

from __future__ import annotations

import pytest
import torch
from conftest import CACHE, MODE_IDS, MODE_VARIANTS, cache_of, tiny_config, with_cache
from transformers import DynamicCache, StaticCache
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer, LinearAttentionLayer

from hf_attn import HfAttnForCausalLM

OLD_TRANSFORMERS = CACHE == "past_key_values"  # before 5.24
CROPPABLE = [v for v in MODE_VARIANTS if v[0] != "lowrank"]


def make_lm(mode: str, pos: str | None = None, **kw) -> HfAttnForCausalLM:
    torch.manual_seed(0)
    model = HfAttnForCausalLM(tiny_config(mode, pos, **kw)).eval()
    # peaked logits: greedy choices are far apart, so float noise never flips a token
    torch.nn.init.normal_(model.lm_head.weight, std=2.0)
    return model


def prompt(batch: int = 2, length: int = 7, seed: int = 0) -> torch.Tensor:
    return torch.randint(1, 97, (batch, length), generator=torch.Generator().manual_seed(seed))


def greedy_uncached(model, ids: torch.Tensor, steps: int) -> torch.Tensor:
    for _ in range(steps):
        ids = torch.cat([ids, model(ids, use_cache=False).logits[:, -1:].argmax(-1)], dim=1)
    return ids


@pytest.mark.parametrize("mode,pos", MODE_VARIANTS, ids=MODE_IDS)
@torch.no_grad()
def test_generate_builds_the_mode_cache_layers(mode, pos):
    model = make_lm(mode, pos)
    out = model.generate(prompt(), max_new_tokens=2, do_sample=False, return_dict_in_generate=True)
    cache = getattr(out, CACHE) if hasattr(out, CACHE) else out.past_key_values
    expected = {"local": DynamicSlidingWindowLayer, "lowrank": LinearAttentionLayer}.get(mode, DynamicLayer)
    assert [type(layer) for layer in cache.layers] == [expected] * 2


@pytest.mark.parametrize("mode,pos", MODE_VARIANTS, ids=MODE_IDS)
@torch.no_grad()
def test_sampled_generation_equals_uncached(mode, pos):
    model = make_lm(mode, pos)
    args = dict(max_new_tokens=10, do_sample=True, top_k=20, temperature=1.5)
    torch.manual_seed(3)
    cached = model.generate(prompt(), **args)
    torch.manual_seed(3)
    uncached = model.generate(prompt(), use_cache=False, **args)
    assert torch.equal(cached, uncached)


@pytest.mark.parametrize("mode,pos", CROPPABLE, ids=[f"{m}-{p}" for m, p in CROPPABLE])
@torch.no_grad()
def test_assisted_decoding_and_prompt_lookup_equal_greedy(mode, pos):
    model = make_lm(mode, pos)
    ids = prompt(1, 9)
    expected = greedy_uncached(model, ids, 10)
    assistant = make_lm(mode, pos)
    torch.nn.init.normal_(assistant.lm_head.weight, std=2.0)  # a different draft model
    assisted = model.generate(ids, max_new_tokens=10, do_sample=False, assistant_model=assistant)
    lookup = model.generate(ids, max_new_tokens=10, do_sample=False, prompt_lookup_num_tokens=3)
    assert torch.equal(assisted, expected)
    assert torch.equal(lookup, expected)


@torch.no_grad()
def test_lowrank_refuses_rollback_with_value_error():
    model = make_lm("lowrank")
    with pytest.raises(ValueError, match="crop"):
        model.generate(prompt(1, 9), max_new_tokens=4, do_sample=False, prompt_lookup_num_tokens=3)
    with pytest.raises(ValueError, match="crop"):
        model.generate(prompt(1, 9), max_new_tokens=4, do_sample=False, assistant_model=make_lm("lowrank"))


@pytest.mark.parametrize("mode,pos", MODE_VARIANTS, ids=MODE_IDS)
@torch.no_grad()
def test_static_cache_equals_dynamic_cache(mode, pos):
    if mode == "lowrank" and OLD_TRANSFORMERS:
        pytest.skip("transformers < 5.24 asks a static cache of linear-attention layers for a length it lacks")
    model = make_lm(mode, pos)
    ids = prompt(2, 6)
    dynamic = model.generate(ids, max_new_tokens=9, do_sample=False)
    static = model.generate(ids, max_new_tokens=9, do_sample=False, cache_implementation="static")
    assert torch.equal(static, dynamic)
    assert torch.equal(dynamic, greedy_uncached(model, ids, 9))


@pytest.mark.parametrize("mode,pos", CROPPABLE, ids=[f"{m}-{p}" for m, p in CROPPABLE])
@torch.no_grad()
def test_static_cache_forward_equals_full_forward(mode, pos):
    """A StaticCache passed by hand (prompt, then token by token) gives the full forward's logits."""
    model = make_lm(mode, pos)
    ids = prompt(2, 12)
    full = model(ids, use_cache=False).logits
    cache = StaticCache(config=model.config, max_cache_len=16)
    pieces = [model(ids[:, :5], **with_cache(cache), use_cache=True).logits]
    for t in range(5, 12):
        pieces.append(model(ids[:, t: t + 1], **with_cache(cache), use_cache=True).logits)
    torch.testing.assert_close(torch.cat(pieces, 1), full, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("mode,pos", MODE_VARIANTS, ids=MODE_IDS)
@torch.no_grad()
def test_generation_from_inputs_embeds_equals_from_ids(mode, pos):
    model = make_lm(mode, pos)
    ids = prompt(2, 6)
    from_ids = model.generate(ids, max_new_tokens=6, do_sample=False)
    embeds = model.get_input_embeddings()(ids)
    from_embeds = model.generate(inputs_embeds=embeds, attention_mask=torch.ones_like(ids), max_new_tokens=6,
                                 do_sample=False)
    assert torch.equal(from_embeds, from_ids[:, 6:])  # only the new tokens come back


@pytest.mark.parametrize("mode,pos", MODE_VARIANTS, ids=MODE_IDS)
@torch.no_grad()
def test_generate_continues_from_a_returned_cache(mode, pos):
    model = make_lm(mode, pos)
    ids = prompt(1, 6)
    first = model.generate(ids, max_new_tokens=4, do_sample=False, return_dict_in_generate=True)
    cache = getattr(first, CACHE) if hasattr(first, CACHE) else first.past_key_values
    more = model.generate(first.sequences, max_new_tokens=5, do_sample=False, **with_cache(cache))
    assert torch.equal(more, greedy_uncached(model, ids, 9))


@pytest.mark.parametrize(
    "mode,other,match",
    [
        ("eager", dict(mode="lowrank"), "not built for this attention_mode='eager'"),
        ("lowrank", dict(mode="eager"), "not a linear-attention state"),
        ("eager", dict(mode="local"), "sliding-window layer"),
        ("local", dict(mode="local", sliding_window=6), "sliding window is 6"),
        ("eager", dict(mode="eager", num_key_value_heads=4), "model width"),
        ("lowrank", dict(mode="lowrank", lowrank_dim=16), "model width"),
        ("eager", dict(mode="eager", num_hidden_layers=3), "has 3 layers"),
    ],
)
@torch.no_grad()
def test_foreign_cache_is_refused(mode, other, match):
    model = make_lm(mode)
    kind = other.pop("mode")
    donor = make_lm(kind, **other)
    cache = cache_of(donor(prompt(2, 5), use_cache=True))
    with pytest.raises(ValueError, match=match):
        model(prompt(2, 1), **with_cache(cache), use_cache=True)


@pytest.mark.parametrize("mode", ["eager", "lowrank"])
@torch.no_grad()
def test_cache_of_another_batch_size_is_refused(mode):
    model = make_lm(mode)
    cache = cache_of(model(prompt(3, 5), use_cache=True))
    with pytest.raises(ValueError, match="batch size is 3"):
        model(prompt(2, 1), **with_cache(cache), use_cache=True)


def test_empty_dynamic_cache_for_lowrank_is_refused_and_configured_one_works():
    model = make_lm("lowrank")
    with pytest.raises(ValueError, match="DynamicCache\\(config=model.config\\)"):
        model(prompt(1, 4), **with_cache(DynamicCache()), use_cache=True)
    out = model(prompt(1, 4), **with_cache(DynamicCache(config=model.config)), use_cache=True)
    assert cache_of(out).layers[0].recurrent_states[0].shape == (1, 2, 8, 9)
