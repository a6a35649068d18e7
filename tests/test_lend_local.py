"""attn_implementation="hf_attn_local": stock transformers models on the local kernel equal sdpa, with
no n x n mask, and their full-attention layers stay full attention."""

from __future__ import annotations

import pytest
import torch
from shape_probe import ShapeProbe
from transformers import (
    AttentionInterface,
    DynamicCache,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)
from transformers.masking_utils import (
    AttentionMaskInterface,
    create_causal_mask,
    create_sliding_window_causal_mask,
)

import hf_attn.lend_local as lend
from hf_attn.lend_local import ATTN_IMPLEMENTATION, register_local_attention

register_local_attention()

SIZES = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0)

# name -> (model class, config, the layers that have a sliding window)
FAMILIES = {
    "mistral": (MistralForCausalLM, lambda: MistralConfig(**SIZES, sliding_window=6), (0, 1)),
    "mistral_no_window": (MistralForCausalLM, lambda: MistralConfig(**SIZES, sliding_window=None), ()),
    "qwen2": (Qwen2ForCausalLM, lambda: Qwen2Config(**SIZES, use_sliding_window=True, sliding_window=5,
                                                    max_window_layers=0), (0, 1)),
    # max_window_layers=1: layer 0 full, layer 1 sliding
    "qwen2_mixed": (Qwen2ForCausalLM, lambda: Qwen2Config(**SIZES, use_sliding_window=True, sliding_window=5,
                                                          max_window_layers=1), (1,)),
    "gemma3_alternating": (Gemma3ForCausalLM, lambda: Gemma3TextConfig(
        **SIZES, head_dim=8, sliding_window=6, layer_types=["sliding_attention", "full_attention"]), (0,)),
}
PADDINGS = ["none", "left", "right"]


def model_pair(family: str):
    """(sdpa model, hf_attn_local model) with the same random weights, in eval mode."""
    cls, make_config, _ = FAMILIES[family]
    torch.manual_seed(0)
    ref = cls._from_config(make_config(), attn_implementation="sdpa").eval()
    ours = cls._from_config(make_config(), attn_implementation=ATTN_IMPLEMENTATION).eval()
    ours.load_state_dict(ref.state_dict())
    assert ref.config._attn_implementation == "sdpa" and ours.config._attn_implementation == ATTN_IMPLEMENTATION
    return ref, ours


def batch(n: int, padding: str, pad: int = 5, seed: int = 1):
    """(2, n) token ids and a 0/1 mask whose row 1 has ``pad`` padding tokens on the given side."""
    ids = torch.randint(1, 64, (2, n), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones(2, n, dtype=torch.long)
    if padding == "left":
        mask[1, :pad] = 0
    elif padding == "right":
        mask[1, -pad:] = 0
    return ids.masked_fill(mask == 0, 0), mask


@pytest.fixture
def kernel_calls(monkeypatch):
    """The (query, key, mask) shapes of every call of the local kernel (the mask's shape or None)."""
    calls = []
    real = lend.local_attention_forward

    def spy(module, query, key, value, attention_mask, *args, **kwargs):
        calls.append((tuple(query.shape), tuple(key.shape), None if attention_mask is None else tuple(attention_mask.shape)))
        return real(module, query, key, value, attention_mask, *args, **kwargs)

    monkeypatch.setattr(lend, "local_attention_forward", spy)
    return calls


def test_registration_is_idempotent():
    assert register_local_attention() == register_local_attention() == "hf_attn_local"
    assert AttentionInterface._global_mapping[ATTN_IMPLEMENTATION] is lend.hf_attn_local_attention_forward
    assert AttentionMaskInterface._global_mapping[ATTN_IMPLEMENTATION] is lend.hf_attn_local_mask


def test_model_loads_by_name_and_by_config(tmp_path):
    ref, _ = model_pair("mistral")
    ref.save_pretrained(tmp_path)
    loaded = MistralForCausalLM.from_pretrained(tmp_path, attn_implementation=ATTN_IMPLEMENTATION)
    assert loaded.config._attn_implementation == ATTN_IMPLEMENTATION
    config = FAMILIES["mistral"][1]()
    config._attn_implementation = ATTN_IMPLEMENTATION
    assert MistralForCausalLM(config).model.layers[1].self_attn.config._attn_implementation == ATTN_IMPLEMENTATION


@pytest.mark.parametrize("padding", PADDINGS)
@pytest.mark.parametrize("family", list(FAMILIES))
def test_logits_and_gradients_equal_sdpa(family, padding, kernel_calls):
    ref, ours = model_pair(family)
    ids, mask = batch(30, padding)
    # the loss reads only real rows: no padded label, and no label predicted from a padded row
    # (left padding: the row before the first real token)
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, 1:] = labels[:, 1:].masked_fill(mask[:, :-1] == 0, -100)
    outputs = []
    for model in (ref, ours):
        out = model(ids, attention_mask=mask, labels=labels)
        out.loss.backward()
        outputs.append((out.logits.detach(), {k: p.grad for k, p in model.named_parameters()}))
    (logits_ref, grads_ref), (logits, grads) = outputs
    real = mask.bool()  # padding rows are free to differ (sdpa gives them no keys, the kernel itself)
    torch.testing.assert_close(logits[real], logits_ref[real])
    assert grads.keys() == grads_ref.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], grads_ref[name], msg=lambda m, name=name: f"{name}: {m}")
    # the kernel ran once per sliding layer, on a key-padding mask or none
    sliding = FAMILIES[family][2]
    assert len(kernel_calls) == len(sliding)
    assert all(m == (None if padding == "none" else (2, 30)) for _, _, m in kernel_calls)


@pytest.mark.parametrize("padding", ["none", "left"])
@pytest.mark.parametrize("family", ["mistral", "qwen2_mixed", "gemma3_alternating"])
def test_cached_greedy_generation_equals_sdpa(family, padding, kernel_calls):
    ref, ours = model_pair(family)
    ids, mask = batch(14, padding)  # 14 + 12 tokens: well past the windows of 5-6
    kw = dict(attention_mask=mask, max_new_tokens=12, min_new_tokens=12, do_sample=False, pad_token_id=0,
              output_logits=True, return_dict_in_generate=True)
    expected, got = ref.generate(ids, **kw), ours.generate(ids, **kw)
    assert torch.equal(got.sequences, expected.sequences)
    torch.testing.assert_close(torch.stack(got.logits), torch.stack(expected.logits))
    decode = [c for c in kernel_calls if c[0][2] == 1]
    assert decode and all(k[2] <= FAMILIES[family][1]().sliding_window for _, k, _ in decode)  # cache holds w - 1 keys


@pytest.mark.parametrize("padding", ["none", "left"])
@pytest.mark.parametrize("family", ["mistral", "qwen2_mixed", "gemma3_alternating"])
def test_chunked_prefill_with_cache_equals_sdpa(family, padding):
    """Several new tokens on top of a cache (queries at the end of longer keys) in both layer kinds."""
    ref, ours = model_pair(family)
    ids, mask = batch(27, padding, pad=3)
    logits = []
    for model in (ref, ours):
        cache = DynamicCache(config=model.config)
        with torch.no_grad():
            first = model(ids[:, :20], attention_mask=mask[:, :20], cache=cache, use_cache=True).logits
            second = model(ids[:, 20:], attention_mask=mask, cache=cache, use_cache=True).logits
        logits.append(torch.cat([first, second], dim=1))
    real = mask.bool()
    torch.testing.assert_close(logits[1][real], logits[0][real])


def test_mask_functions_return_no_square_mask():
    config = FAMILIES["mistral"][1]()
    config._attn_implementation = ATTN_IMPLEMENTATION
    embeds = torch.zeros(2, 30, config.hidden_size)
    _, mask = batch(30, "left")
    for create in (create_causal_mask, create_sliding_window_causal_mask):
        assert create(config=config, inputs_embeds=embeds, attention_mask=None, cache=None) is None
        assert create(config=config, inputs_embeds=embeds, attention_mask=torch.ones(2, 30), cache=None) is None
        padding = create(config=config, inputs_embeds=embeds, attention_mask=mask, cache=None)
        assert padding.shape == (2, 30) and padding.dtype == torch.bool and torch.equal(padding, mask.bool())


def test_no_n_by_n_tensor_in_forward_and_backward():
    """Every tensor the padded forward + backward creates has at most one axis as long as n."""
    n = 96  # longer than every model dimension (hidden 32, MLP 64, vocabulary 64)
    ref, ours = model_pair("mistral")
    ids, mask = batch(n, "left")
    for model, square_expected in ((ref, True), (ours, False)):  # the probe does see sdpa's (n, n) mask
        with ShapeProbe() as probe:
            model(ids, attention_mask=mask, labels=ids).loss.backward()
        assert probe.has_square(n) == square_expected


def test_packed_sequences_take_the_dense_fallback(kernel_calls):
    """Position ids restarting inside a row (packing) need a block-diagonal mask: sdpa's, 4-D."""
    ref, ours = model_pair("mistral")
    ids, _ = batch(30, "none")
    position_ids = torch.cat([torch.arange(12), torch.arange(18)])[None].expand(2, -1)
    with torch.no_grad():
        expected = ref(ids, position_ids=position_ids, use_cache=False).logits
        got = ours(ids, position_ids=position_ids, use_cache=False).logits
    torch.testing.assert_close(got, expected)
    assert kernel_calls == []


def test_layer_window_lookup_and_unsupported_options():
    ref, _ = model_pair("qwen2_mixed")
    full, sliding = (layer.self_attn for layer in ref.model.layers)
    assert lend.layer_sliding_window(full, {}) is None and lend.layer_sliding_window(sliding, {}) == 5
    assert lend.layer_sliding_window(full, {"sliding_window": 7}) == 7  # what the model passes wins
    bare = torch.nn.Module()
    bare.config, bare.layer_idx = ref.config, 1
    assert lend.layer_sliding_window(bare, {}) == 5  # config.layer_types
    q = torch.randn(1, 4, 3, 8)
    with pytest.raises(ValueError, match="softcap"):
        lend.hf_attn_local_attention_forward(sliding, q, q, q, None, scaling=1.0, softcap=50.0)


def test_hooked_activations_and_saved_tensors_survive_backward():
    """The kernel's backward reuses the output's memory only when nothing else can read it: a forward
    hook on o_proj (which sees that output) or saved-tensor hooks turn the reuse off."""
    _, ours = model_pair("mistral")
    ours.train()
    ids, mask = batch(30, "none")
    captured = []
    ours.model.layers[0].self_attn.o_proj.register_forward_hook(lambda m, args, out: captured.append(args[0]))
    loss = ours(ids, labels=ids).loss
    before = captured[-1].detach().clone()
    loss.backward()
    torch.testing.assert_close(captured[-1].detach(), before, rtol=0, atol=0)
    packed = []

    def pack(t):
        packed.append((t, t.detach().clone()))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = ours(ids, labels=ids).loss
    loss.backward()
    for tensor, copy in packed:
        torch.testing.assert_close(tensor.detach(), copy, rtol=0, atol=0)
