"""Property-based tests (hypothesis) over random small configs, batch shapes, padding patterns and
modes: output shapes, finiteness, causality, padding invariance, cache == no cache.

Each property runs ``EXAMPLES`` random cases (see the README's Guarantees section); run
``pytest tests/test_properties.py --hypothesis-show-statistics`` to see the counts.
"""

from __future__ import annotations

import torch
from conftest import MODE_VARIANTS, cache_of, with_cache
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hf_attn import HfAttnConfig, HfAttnForCausalLM

EXAMPLES = 40
SETTINGS = settings(
    max_examples=EXAMPLES, deadline=None, derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@st.composite
def configs(draw) -> HfAttnConfig:
    mode, pos = draw(st.sampled_from(MODE_VARIANTS))
    kv_heads = draw(st.sampled_from([1, 2]))
    heads = kv_heads * draw(st.sampled_from([1, 2]))
    feature_map = draw(st.sampled_from(["product", "softmax"]))
    # the product map needs k = m1 * m2 with both factors >= 2
    rank = draw(st.sampled_from([4, 6, 8, 9]) if feature_map == "product" else st.integers(1, 6))
    return HfAttnConfig(
        vocab_size=31,
        hidden_size=heads * 4,
        num_hidden_layers=draw(st.integers(1, 2)),
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        intermediate_size=16,
        max_position_embeddings=64,
        attention_mode=mode,
        position_embedding_type=pos,
        sliding_window=draw(st.integers(1, 6)),
        lowrank_dim=rank,
        lowrank_feature_map=feature_map,
        lowrank_chunk_size=draw(st.integers(1, 5)),
        pad_token_id=0,
    )


@st.composite
def padded_batches(draw) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, mask): each row has 1..L real tokens, padded on its left or right side."""
    batch, length = draw(st.integers(1, 3)), draw(st.integers(1, 14))
    ids = torch.tensor(draw(st.lists(st.lists(st.integers(1, 30), min_size=length, max_size=length),
                                     min_size=batch, max_size=batch)))
    mask = torch.zeros(batch, length, dtype=torch.long)
    for row in range(batch):
        real = draw(st.integers(1, length))
        if draw(st.booleans()):
            mask[row, length - real:] = 1
        else:
            mask[row, :real] = 1
    return ids, mask


def build(config: HfAttnConfig) -> HfAttnForCausalLM:
    torch.manual_seed(0)
    return HfAttnForCausalLM(config).eval()


@SETTINGS
@given(configs(), padded_batches())
@torch.no_grad()
def test_shapes_finiteness_and_padding_invariance(config, batch):
    ids, mask = batch
    model = build(config)
    logits = model(ids, attention_mask=mask).logits
    assert logits.shape == (*ids.shape, config.vocab_size)
    assert torch.isfinite(logits).all()
    for row in range(ids.shape[0]):
        real = mask[row].bool()
        alone = model(ids[row][real][None]).logits[0]
        torch.testing.assert_close(logits[row][real], alone, rtol=1e-4, atol=1e-4)


@SETTINGS
@given(configs(), st.integers(2, 14), st.data())
@torch.no_grad()
def test_causality(config, length, data):
    model = build(config)
    ids = torch.randint(1, 31, (2, length))
    t = data.draw(st.integers(0, length - 2))
    changed = ids.clone()
    changed[:, t + 1:] = (ids[:, t + 1:] % 30) + 1
    torch.testing.assert_close(model(ids).logits[:, : t + 1], model(changed).logits[:, : t + 1], rtol=0, atol=1e-5)


@SETTINGS
@given(configs(), st.integers(1, 8), st.integers(1, 8))
@torch.no_grad()
def test_cache_equals_no_cache(config, prefix, steps):
    model = build(config)
    ids = torch.randint(1, 31, (2, prefix + steps))
    full = model(ids, use_cache=False).logits
    out = model(ids[:, :prefix], use_cache=True)
    pieces = [out.logits]
    for t in range(prefix, prefix + steps):
        out = model(ids[:, t: t + 1], **with_cache(cache_of(out)), use_cache=True)
        pieces.append(out.logits)
    torch.testing.assert_close(torch.cat(pieces, 1), full, rtol=1e-4, atol=1e-4)
