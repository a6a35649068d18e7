"""Model-level behaviour, parametrized over every attention mode (and rope with local / lowrank)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import MODE_IDS, MODE_VARIANTS, cache_of, tiny_config, with_cache
from remote_code import run_without_hf_attn
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification

from hf_attn import HfAttnCache, HfAttnForCausalLM, HfAttnForSequenceClassification, HfAttnModel

EXPECTED_CODE_FILES = {
    "configuration_hf_attn.py",
    "modeling_hf_attn.py",
    "attention_registry.py",
    "attention_eager.py",
    "attention_local.py",
    "attention_lowrank.py",
    "attention_rope.py",
    "cache_hf_attn.py",
    "fused_ops.py",
    "cpu_kernels.py",
    "modelcard_hf_attn.py",
    "hub_hf_attn.py",
}


def make_lm(mode: str, pos: str, **overrides) -> HfAttnForCausalLM:
    torch.manual_seed(0)
    return HfAttnForCausalLM(tiny_config(mode, pos, **overrides)).eval()


def ids(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, 97, (batch, length), generator=g)


@torch.no_grad()
def test_causality(mode_variant):
    model = make_lm(*mode_variant)
    x = ids(2, 19)
    t = 9
    changed = x.clone()
    changed[:, t + 1:] = ids(2, 19 - t - 1, seed=5)
    a, b = model(x).logits, model(changed).logits
    torch.testing.assert_close(a[:, : t + 1], b[:, : t + 1], rtol=0, atol=1e-5)
    assert not torch.allclose(a[:, t + 1:], b[:, t + 1:], atol=1e-4)


@pytest.mark.parametrize("pos", ["absolute", "rope"])
@torch.no_grad()
def test_local_receptive_field(pos):
    layers, window = 2, 4
    model = make_lm("local", pos, num_hidden_layers=layers, sliding_window=window)
    x = ids(1, 24)
    t = 20
    edge = t - layers * (window - 1)  # the farthest position that still reaches t
    base = model(x).logits[:, t]
    outside = x.clone()
    outside[:, : edge] = (x[:, : edge] % 96) + 1  # change every token before the receptive field
    torch.testing.assert_close(model(outside).logits[:, t], base, rtol=0, atol=1e-5)
    inside = x.clone()
    inside[:, edge] = (x[:, edge] % 96) + 1
    assert not torch.allclose(model(inside).logits[:, t], base, atol=1e-4)


@pytest.mark.parametrize("mode", ["rope", "local"])
@torch.no_grad()
def test_rope_shift_invariance(mode):
    model = make_lm(mode, "rope")
    x = ids(2, 12)
    pos = torch.arange(12)[None].expand(2, -1)
    a = model(x, position_ids=pos).logits
    b = model(x, position_ids=pos + 37).logits
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@torch.no_grad()
def test_absolute_positions_are_not_shift_invariant():
    """The control for the test above: learned absolute positions do change with a shift."""
    model = make_lm("eager", "absolute")
    x = ids(1, 12)
    pos = torch.arange(12)[None]
    assert not torch.allclose(model(x, position_ids=pos).logits, model(x, position_ids=pos + 37).logits, atol=1e-4)


def greedy_without_cache(model, prompt: torch.Tensor, steps: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    seq, all_logits = prompt, []
    for _ in range(steps):
        logits = model(seq, use_cache=False).logits[:, -1]
        all_logits.append(logits)
        seq = torch.cat([seq, logits.argmax(-1, keepdim=True)], dim=1)
    return seq, all_logits


@torch.no_grad()
def test_cached_generation_matches_recomputation(mode_variant):
    model = make_lm(*mode_variant)
    prompt = ids(2, 7)
    steps = 12  # past the window (4) and several low-rank chunks (4)
    expected, ref_logits = greedy_without_cache(model, prompt, steps)

    # step-by-step with the cache: every step's logits equal the full recomputation
    out = model(prompt, use_cache=True)
    cache = cache_of(out)
    assert isinstance(cache, HfAttnCache) and len(cache.layers) == model.config.num_hidden_layers
    logits = out.logits[:, -1]
    for i in range(steps):
        torch.testing.assert_close(logits, ref_logits[i], rtol=1e-4, atol=1e-4)
        token = logits.argmax(-1, keepdim=True)
        out = model(token, **with_cache(cache), use_cache=True)
        logits = out.logits[:, -1]

    generated = model.generate(prompt, max_new_tokens=steps, do_sample=False)
    assert torch.equal(generated, expected)


@pytest.mark.parametrize("mode,pos", MODE_VARIANTS, ids=MODE_IDS)
@torch.no_grad()
def test_left_padded_batch_equals_each_alone(mode, pos):
    model = make_lm(mode, pos)
    lengths = [11, 6, 1]
    width = max(lengths)
    seqs = [ids(1, n, seed=n)[0] for n in lengths]
    batch = torch.zeros(len(seqs), width, dtype=torch.long)
    mask = torch.zeros(len(seqs), width, dtype=torch.long)
    for row, s in enumerate(seqs):
        batch[row, width - len(s):] = s
        mask[row, width - len(s):] = 1
    padded = model(batch, attention_mask=mask).logits
    assert torch.isfinite(padded).all()
    for row, s in enumerate(seqs):
        alone = model(s[None]).logits[0]
        torch.testing.assert_close(padded[row, width - len(s):], alone, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("mode,pos", MODE_VARIANTS, ids=MODE_IDS)
@torch.no_grad()
def test_right_padding_and_fully_padded_row(mode, pos):
    model = make_lm(mode, pos)
    x = ids(3, 9)
    mask = torch.ones_like(x)
    mask[0, 5:] = 0
    mask[2] = 0  # a row of nothing but padding must not produce NaN
    out = model(x, attention_mask=mask).logits
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[0, :5], model(x[:1, :5]).logits[0], rtol=1e-4, atol=1e-4)


@torch.no_grad()
def test_left_padded_generation_equals_unpadded(mode_variant):
    model = make_lm(*mode_variant)
    short = ids(1, 4, seed=3)
    long = ids(1, 8, seed=4)
    batch = torch.cat([torch.cat([torch.zeros(1, 4, dtype=torch.long), short], 1), long])
    mask = torch.cat([torch.cat([torch.zeros(1, 4, dtype=torch.long), torch.ones(1, 4, dtype=torch.long)], 1),
                      torch.ones(1, 8, dtype=torch.long)])
    both = model.generate(batch, attention_mask=mask, max_new_tokens=6, do_sample=False)
    alone = model.generate(short, max_new_tokens=6, do_sample=False)
    assert torch.equal(both[0, 8:], alone[0, 4:])


def test_save_and_auto_load(tmp_path, mode_variant):
    model = make_lm(*mode_variant)
    x = ids(2, 10)
    with torch.no_grad():
        expected = model(x).logits
    model.save_pretrained(tmp_path)
    files = {p.name for p in tmp_path.iterdir()}
    assert "model.safetensors" in files and "config.json" in files
    assert not any(name.endswith((".bin", ".pt", ".pkl")) for name in files)
    assert {n for n in files if n.endswith(".py")} == EXPECTED_CODE_FILES
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "hf_attn"
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_hf_attn.HfAttnForCausalLM"
    assert set(config["auto_map"]) == {"AutoConfig", "AutoModel", "AutoModelForCausalLM", "AutoModelForSequenceClassification"}

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, HfAttnForCausalLM)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, expected, rtol=0, atol=0)
    base = AutoModel.from_pretrained(tmp_path)
    assert isinstance(base, HfAttnModel)
    assert AutoConfig.from_pretrained(tmp_path).to_dict()["attention_mode"] == mode_variant[0]


@pytest.mark.parametrize("mode,pos", [("local", "rope"), ("lowrank", "absolute"), ("eager", "absolute")])
def test_remote_code_load_without_package(tmp_path, mode, pos):
    model = make_lm(mode, pos)
    x = ids(2, 10)
    with torch.no_grad():
        expected = model(x).logits
    ckpt = tmp_path / "ckpt"
    model.save_pretrained(ckpt)
    torch.save({"x": x, "logits": expected}, tmp_path / "expected.pt")
    run_without_hf_attn(
        f"""
        import torch
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(ckpt)!r}, trust_remote_code=True).eval()
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        ref = torch.load({str(tmp_path / "expected.pt")!r})
        with torch.no_grad():
            torch.testing.assert_close(model(ref["x"]).logits, ref["logits"], rtol=0, atol=0)
        out = model.generate(ref["x"][:, :3], max_new_tokens=4, do_sample=False)
        assert out.shape == (2, 7)
        print("remote ok")
        """,
        cwd=tmp_path,
    )


@pytest.mark.parametrize("mode", ["eager", "local", "lowrank", "rope"])
@torch.no_grad()
def test_eager_and_sdpa_agree(mode):
    cfg = tiny_config(mode)
    torch.manual_seed(0)
    sdpa = HfAttnForCausalLM(cfg).eval()
    eager = HfAttnForCausalLM(cfg).eval()
    eager.load_state_dict(sdpa.state_dict())
    eager.config._attn_implementation = "eager"
    x = ids(2, 13)
    mask = torch.ones_like(x)
    mask[1, :4] = 0
    torch.testing.assert_close(eager(x, attention_mask=mask).logits, sdpa(x, attention_mask=mask).logits,
                               rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "mode,expected",
    [("eager", (2, 4, 10, 10)), ("rope", (2, 4, 10, 10)), ("local", (2, 4, 3, 4, 8)), ("lowrank", None)],
)
@torch.no_grad()
def test_output_attentions_shapes(mode, expected):
    model = make_lm(mode, None)
    out = model(ids(2, 10), output_attentions=True, output_hidden_states=True)
    assert len(out.attentions) == 2 and len(out.hidden_states) == 3
    for weights in out.attentions:
        if expected is None:
            assert weights is None
        else:
            assert tuple(weights.shape) == expected
            torch.testing.assert_close(weights.sum(-1), torch.ones(expected[:-1]), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["eager", "local", "lowrank", "rope"])
@torch.no_grad()
def test_bidirectional_sees_the_future(mode):
    model = make_lm(mode, None, is_causal=False)
    x = ids(1, 10)
    changed = x.clone()
    changed[:, 2] = (x[:, 2] % 96) + 1  # inside every mode's reach of position 0
    hidden_a = model.model(x).last_hidden_state
    hidden_b = model.model(changed).last_hidden_state
    assert not torch.allclose(hidden_a[:, 0], hidden_b[:, 0], atol=1e-5)
    with pytest.raises(ValueError, match="causal"):
        model(x, labels=x)


@pytest.mark.parametrize("mode", ["eager", "local", "lowrank", "rope"])
@pytest.mark.parametrize("is_causal", [True, False])
@torch.no_grad()
def test_sequence_classification_pools_last_real_token(mode, is_causal):
    torch.manual_seed(0)
    model = HfAttnForSequenceClassification(tiny_config(mode, num_labels=3, is_causal=is_causal)).eval()
    seq = ids(1, 6)
    alone = model(seq).logits
    left = torch.cat([torch.zeros(1, 3, dtype=torch.long), seq], 1)
    right = torch.cat([seq, torch.zeros(1, 3, dtype=torch.long)], 1)
    pad_mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1, 1]])
    torch.testing.assert_close(model(left, attention_mask=pad_mask).logits, alone, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(model(right, attention_mask=pad_mask.flip(1)).logits, alone, rtol=1e-4, atol=1e-4)
    if is_causal:  # without a mask the pad_token_id marks where to pool (pads are attended only bidirectionally)
        torch.testing.assert_close(model(right).logits, alone, rtol=1e-4, atol=1e-4)
    out = model(seq, labels=torch.tensor([2]))
    assert out.loss.ndim == 0 and out.loss > 0


def test_sequence_classification_auto_and_regression(tmp_path):
    model = HfAttnForSequenceClassification(tiny_config("local", num_labels=1))
    loss = model(ids(2, 5), labels=torch.tensor([0.5, -1.0])).loss
    loss.backward()
    assert model.score.weight.grad is not None
    model.save_pretrained(tmp_path)
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path)
    assert isinstance(loaded, HfAttnForSequenceClassification)


def test_causal_lm_loss_is_shifted_cross_entropy():
    model = make_lm("eager", None)
    x = ids(2, 8)
    labels = x.clone()
    labels[0, :3] = -100
    with torch.no_grad():  # with gradients the loss is chunked and logits is None (tests/test_fused_ops.py)
        out = model(x, labels=labels)
    logits = out.logits[:, :-1].reshape(-1, 97)
    expected = torch.nn.functional.cross_entropy(logits, labels[:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(out.loss, expected)


def test_gradient_checkpointing_gives_same_gradients(mode_variant):
    x = ids(2, 10)
    grads = []
    for checkpointing in (False, True):
        model = make_lm(*mode_variant).train()
        if checkpointing:
            model.activation_checkpointing_enable()
            assert model.model.layers[0].gradient_checkpointing
        model(x, labels=x).loss.backward()
        grads.append(model.model.layers[0].self_attn.q_proj.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-6)


def test_tied_embeddings_and_resize():
    model = make_lm("rope", None)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    model.resize_token_embeddings(120)
    assert model.config.vocab_size == 120
    assert model.lm_head.weight.shape == (120, 32)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert model(torch.tensor([[119, 3]])).logits.shape == (1, 2, 120)
    untied = make_lm("eager", None, tie_word_embeddings=False)
    assert untied.lm_head.weight.data_ptr() != untied.model.embed_tokens.weight.data_ptr()


def test_load_with_dtype(tmp_path):
    make_lm("local", "rope").save_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16
    out = model.generate(ids(1, 5), max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 8)


def test_local_cache_is_bounded_by_window():
    model = make_lm("local", "rope", sliding_window=4)
    out = model(ids(1, 3), use_cache=True)
    sizes = []
    cache = cache_of(out)
    for step in range(12):
        out = model(ids(1, 1, seed=step), **with_cache(cache), use_cache=True)
        sizes.append(cache.nbytes())
    assert cache.get_seq_length() == 15
    assert len(set(sizes)) == 1  # constant: window - 1 = 3 keys/values per layer
    per_layer = 2 * 1 * 2 * 3 * 8 * 4  # (k, v) x batch x kv heads x (w - 1) x head_dim x fp32 bytes
    assert sizes[-1] == 2 * per_layer


def test_lowrank_state_is_constant_size():
    model = make_lm("lowrank", None)
    cache = cache_of(model(ids(1, 30), use_cache=True))
    first = cache.nbytes()
    model(ids(1, 1), **with_cache(cache), use_cache=True)
    assert cache.nbytes() == first == 2 * 4 * (2 * 8 * (8 + 1))  # layers x fp32 x Hkv x k x (D for S + 1 for z)


@pytest.mark.parametrize("mode", ["eager", "local", "lowrank", "rope"])
@torch.no_grad()
def test_beam_search_reorders_the_cache(mode):
    model = make_lm(mode, None)
    prompt = ids(2, 5)
    cached = model.generate(prompt, max_new_tokens=6, num_beams=3, do_sample=False)
    uncached = model.generate(prompt, max_new_tokens=6, num_beams=3, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)


# hf_attn built with a classic GPT's architecture (the benchmark's reference GPT)
GPT_FIELDS = dict(norm_type="layernorm", mlp_type="plain", hidden_act="gelu", rms_norm_eps=1e-5)


def test_gpt_architecture_computes_the_reference_gpt():
    """``norm_type="layernorm"``, ``mlp_type="plain"``, ``hidden_act="gelu"``: given the same weights,
    the eager model computes the benchmark's minimal GPT (bias-free LayerNorm, 4x GELU MLP, learned
    positions, tied head), logits, loss and gradients."""
    from hf_attn.benchmark.reference_gpt import RefGPT, RefGPTConfig
    from hf_attn.modeling_hf_attn import HfAttnLayerNorm, HfAttnPlainMLP

    torch.manual_seed(0)
    config = tiny_config("eager", num_key_value_heads=4, intermediate_size=128, loss_chunk_size=5, **GPT_FIELDS)
    ours = HfAttnForCausalLM(config).double()
    layer = ours.model.layers[0]
    assert isinstance(layer.input_layernorm, HfAttnLayerNorm) and isinstance(ours.model.norm, HfAttnLayerNorm)
    assert isinstance(layer.mlp, HfAttnPlainMLP) and not hasattr(layer.mlp, "gate_up_proj")
    with torch.no_grad():  # norms away from their initial ones, so a skipped weight would show
        for name, p in ours.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    ref = RefGPT(RefGPTConfig(vocab_size=97, block_size=128, num_layers=2, num_heads=4, hidden_size=32)).double()
    with torch.no_grad():
        ref.embed_tokens.weight.copy_(ours.model.embed_tokens.weight)
        ref.embed_positions.weight.copy_(ours.model.embed_positions.weight)
        ref.norm.weight.copy_(ours.model.norm.weight)
        for block, layer in zip(ref.blocks, ours.model.layers):
            attn = layer.self_attn
            block.attn_norm.weight.copy_(layer.input_layernorm.weight)
            block.attn.qkv_proj.weight.copy_(torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]))
            block.attn.out_proj.weight.copy_(attn.o_proj.weight)
            block.mlp_norm.weight.copy_(layer.post_attention_layernorm.weight)
            block.mlp.up_proj.weight.copy_(layer.mlp.up_proj.weight)
            block.mlp.down_proj.weight.copy_(layer.mlp.down_proj.weight)
    x = ids(3, 20)
    targets = torch.cat([x[:, 1:], x.new_full((3, 1), -100)], dim=1)
    ref_logits, ref_loss = ref(x, targets)
    ref_loss.backward()
    with torch.no_grad():
        torch.testing.assert_close(ours(x).logits, ref_logits, rtol=1e-10, atol=1e-10)
    loss = ours(input_ids=x, labels=x, use_cache=False).loss  # the training path: fused, chunked loss
    loss.backward()
    torch.testing.assert_close(loss, ref_loss, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(ours.model.layers[1].mlp.up_proj.weight.grad, ref.blocks[1].mlp.up_proj.weight.grad,
                               rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(ours.model.norm.weight.grad, ref.norm.weight.grad, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(ours.model.embed_tokens.weight.grad, ref.embed_tokens.weight.grad, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("mode,pos", [("rope", "rope"), ("local", "absolute"), ("lowrank", "rope")])
def test_gpt_architecture_saves_loads_and_generates(tmp_path, mode, pos):
    model = make_lm(mode, pos, **GPT_FIELDS)
    x = ids(2, 10)
    with torch.no_grad():
        expected = model(x).logits
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert (saved["norm_type"], saved["mlp_type"]) == ("layernorm", "plain")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert {n for n, _ in loaded.named_parameters() if ".mlp." in n and n.startswith("model.layers.0.")} == {
        "model.layers.0.mlp.up_proj.weight", "model.layers.0.mlp.down_proj.weight"}
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, expected, rtol=0, atol=0)
    # cached generation equals recomputing the whole sequence every step
    out = loaded.generate(x[:, :4], max_new_tokens=5, do_sample=False)
    with torch.no_grad():
        full = loaded(out[:, :-1]).logits[:, 3:].argmax(-1)
    assert torch.equal(out[:, 4:], full)
    # a checkpoint of the other architecture does not load silently into this one
    with pytest.raises(ValueError, match="do not match"):
        AutoModelForCausalLM.from_pretrained(tmp_path, mlp_type="gated")


def test_layernorm_keeps_low_precision_models_in_their_dtype():
    model = make_lm("eager", "absolute", **GPT_FIELDS).to(torch.bfloat16)
    norm = model.model.layers[0].input_layernorm
    h = torch.randn(2, 5, 32, dtype=torch.bfloat16)
    out = norm(h)
    assert out.dtype == torch.bfloat16
    want = torch.nn.functional.layer_norm(h.float(), (32,), norm.weight.float(), None, 1e-5)
    torch.testing.assert_close(out.float(), want, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("field,value", [("norm_type", "layernorm"), ("mlp_type", "plain")])
def test_architecture_fields_cannot_change_after_build(field, value):
    model = make_lm("eager", "absolute")
    setattr(model.config, field, value)
    with pytest.raises(ValueError, match=field):
        model(ids(1, 4))
