"""hf_attn meets the contract transformers' own models meet: loading options, loss keywords, Trainer's
label smoothing, packed rows, accelerate offload hooks, PEFT adapters, keywords and live configs."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import CACHE, MODE_IDS, MODE_VARIANTS, tiny_config
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

from hf_attn import HfAttnConfig, HfAttnForCausalLM, HfAttnForSequenceClassification


def make_lm(mode: str = "eager", pos: str | None = None, **kw) -> HfAttnForCausalLM:
    torch.manual_seed(0)
    return HfAttnForCausalLM(tiny_config(mode, pos, **kw)).eval()


def ids(batch: int = 2, length: int = 9, seed: int = 0) -> torch.Tensor:
    return torch.randint(1, 97, (batch, length), generator=torch.Generator().manual_seed(seed))


# -- configs and loading ---------------------------------------------------------------------------

def test_extra_config_attribute_round_trips(tmp_path):
    model = make_lm()
    model.config.note = "x"
    model.save_pretrained(tmp_path)
    assert AutoConfig.from_pretrained(tmp_path).note == "x"
    assert AutoModelForCausalLM.from_pretrained(tmp_path).config.note == "x"


def test_config_accepts_what_transformers_accepts():
    assert HfAttnConfig(rms_norm_eps=1.0).rms_norm_eps == 1.0
    with pytest.raises(ValueError, match="rms_norm_eps"):
        HfAttnConfig(rms_norm_eps=0.0)
    # odd head dims are fine when no rotary positions use them
    config = HfAttnConfig(hidden_size=20, num_attention_heads=4, attention_mode="local")
    assert config.head_dim == 5
    HfAttnForCausalLM(tiny_config("eager", hidden_size=20, num_attention_heads=4, num_key_value_heads=2))


def test_ignore_mismatched_sizes_reheads_a_classifier(tmp_path):
    torch.manual_seed(0)
    HfAttnForSequenceClassification(tiny_config("eager", num_labels=3)).save_pretrained(tmp_path)
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path, num_labels=5, ignore_mismatched_sizes=True)
    assert model.score.weight.shape == (5, 32)
    assert model(ids()).logits.shape == (2, 5)
    with pytest.raises(ValueError, match="shape"):
        AutoModelForSequenceClassification.from_pretrained(tmp_path, num_labels=5)


def test_from_pretrained_with_state_dict_and_no_path(monkeypatch):
    model = make_lm("rope")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    loaded = HfAttnForCausalLM.from_pretrained(None, config=model.config, state_dict=model.state_dict()).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids()).logits, model(ids()).logits)


# -- loss keywords and Trainer ---------------------------------------------------------------------

def test_shift_labels_are_used_as_given():
    model = make_lm()
    x = ids()
    with torch.no_grad():  # (with gradients the same losses come chunked: tests/test_fused_ops.py)
        out = model(x, labels=x)
    shifted = F.pad(x, (0, 1), value=-100)[:, 1:]
    by_hand = F.cross_entropy(out.logits.reshape(-1, 97), shifted.reshape(-1), ignore_index=-100)
    torch.testing.assert_close(model(x, shift_labels=shifted).loss, by_hand)
    torch.testing.assert_close(out.loss, by_hand)
    # labels that are already aligned with the logits are not shifted again
    aligned = model(x, shift_labels=x).loss
    torch.testing.assert_close(aligned, F.cross_entropy(out.logits.reshape(-1, 97), x.reshape(-1)))


def test_trainer_label_smoothing_shifts_next_token_labels(tmp_path):
    from transformers import Trainer, TrainingArguments

    model = make_lm()
    args = TrainingArguments(output_dir=str(tmp_path), label_smoothing_factor=0.1, report_to=[], use_cpu=True)
    trainer = Trainer(model=model, args=args)
    x = ids()
    loss = trainer.compute_loss(model, {"input_ids": x, "labels": x.clone()})
    with torch.no_grad():
        logits = model(x).logits
    shifted = x[:, 1:]
    by_hand = F.cross_entropy(logits[:, :-1].reshape(-1, 97), shifted.reshape(-1), label_smoothing=0.1)
    torch.testing.assert_close(loss.detach(), by_hand, rtol=1e-5, atol=1e-5)


# -- packed rows -----------------------------------------------------------------------------------

@pytest.mark.parametrize("mode,pos", MODE_VARIANTS, ids=MODE_IDS)
@torch.no_grad()
def test_packed_rows_equal_each_sequence_alone_or_are_refused(mode, pos):
    model = make_lm(mode, pos)
    a, b = ids(1, 7, seed=1), ids(1, 5, seed=2)
    packed = torch.cat([a, b], dim=1)
    positions = torch.cat([torch.arange(7), torch.arange(5)])[None]
    if mode in ("local", "lowrank"):
        with pytest.raises(ValueError, match="packed sequences"):
            model(packed, position_ids=positions)
        return
    logits = model(packed, position_ids=positions).logits
    torch.testing.assert_close(logits[:, :7], model(a).logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits[:, 7:], model(b).logits, rtol=1e-5, atol=1e-5)


def test_flattening_collator_batch_trains_like_separate_sequences():
    from transformers import DataCollatorWithFlattening

    model = make_lm("rope")
    features = [{"input_ids": ids(1, n, seed=n)[0].tolist()} for n in (6, 4)]
    batch = DataCollatorWithFlattening()(features)
    packed_loss = model(**{k: v for k, v in batch.items() if k != "labels"}, labels=batch["labels"]).loss
    losses = [model(torch.tensor([f["input_ids"]]), labels=torch.tensor([f["input_ids"]])) for f in features]
    tokens = [len(f["input_ids"]) - 1 for f in features]
    separate = sum(out.loss * n for out, n in zip(losses, tokens)) / sum(tokens)
    torch.testing.assert_close(packed_loss, separate, rtol=1e-5, atol=1e-5)


# -- keywords --------------------------------------------------------------------------------------

def test_unknown_keyword_is_a_type_error():
    with pytest.raises(TypeError, match="unexpected_option"):
        make_lm()(ids(), unexpected_option=True)


def test_cache_keyword_of_the_installed_transformers():
    model = make_lm()
    out = model(ids(1, 4), use_cache=True)
    cache = getattr(out, CACHE)
    assert cache is not None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        again = model(ids(1, 1), past_key_values=cache, use_cache=True)  # the older name still works
    assert getattr(again, CACHE).get_seq_length() == 5
    with pytest.raises(ValueError, match="not both"):
        model(ids(1, 1), cache=cache, past_key_values=cache)


@pytest.mark.parametrize("mode", ["local", "lowrank"])
def test_flash_packing_keywords_are_refused_where_unused(mode):
    with pytest.raises(ValueError, match="cu_seq_lens_q"):
        make_lm(mode)(ids(), cu_seq_lens_q=torch.tensor([0, 9]))


# -- attention weights ------------------------------------------------------------------------------

@pytest.mark.parametrize("mode,pos", MODE_VARIANTS, ids=MODE_IDS)
def test_attention_weights_stay_in_the_graph(mode, pos):
    model = make_lm(mode, pos)
    out = model(ids(), output_attentions=True)
    weights = [w for w in out.attentions if w is not None]
    if mode == "lowrank":  # causal low-rank forms no weights
        assert weights == []
        return
    assert len(weights) == 2 and all(w.requires_grad for w in weights)
    grads = torch.autograd.grad(weights[0].sum() + out.logits.sum(), model.model.layers[0].self_attn.q_proj.weight)
    assert grads[0].abs().sum() > 0


# -- hooks, offload, adapters ----------------------------------------------------------------------

@pytest.mark.parametrize("mode,pos", MODE_VARIANTS, ids=MODE_IDS)
def test_forward_hook_activations_survive_backward(mode, pos):
    """What a forward hook captured (o_proj's input, the attention output) is not overwritten by the
    backward, and saved tensors are not modified in place."""
    model = make_lm(mode, pos).train()
    captured = []
    model.model.layers[0].self_attn.o_proj.register_forward_hook(lambda m, args, out: captured.append(args[0]))
    packed = []

    def pack(t):
        packed.append((t, t.detach().clone()))
        return t

    x = ids(2, 24)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(x, labels=x).loss
    before = captured[0].detach().clone()
    loss.backward()
    torch.testing.assert_close(captured[0].detach(), before, rtol=0, atol=0)
    for tensor, copy in packed:
        torch.testing.assert_close(tensor.detach(), copy, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("mode,pos", MODE_VARIANTS, ids=MODE_IDS)
@torch.no_grad()
def test_disk_offloaded_model_equals_in_memory(tmp_path, mode, pos):
    from accelerate import disk_offload

    model = make_lm(mode, pos)
    x = ids()
    expected = model(x).logits
    disk_offload(model, offload_dir=str(tmp_path), execution_device="cpu")
    assert model.model.layers[0].mlp.gate_up_proj.weight.device.type == "meta"  # weights live on disk
    torch.testing.assert_close(model(x).logits, expected)


@pytest.mark.parametrize("mode", ["eager", "local", "lowrank", "rope"])
@torch.no_grad()
def test_device_map_auto_with_disk_offload_equals_in_memory(tmp_path, mode):
    model = make_lm(mode)
    x = ids()
    expected = model(x).logits
    model.save_pretrained(tmp_path / "ckpt")
    offloaded = AutoModelForCausalLM.from_pretrained(
        tmp_path / "ckpt", device_map="auto", max_memory={"cpu": "60KB"}, offload_folder=str(tmp_path / "offload")
    )
    assert any(p.device.type == "meta" for p in offloaded.parameters())  # some layers live on disk
    torch.testing.assert_close(offloaded(x).logits, expected)


@pytest.mark.parametrize("mode,pos", MODE_VARIANTS, ids=MODE_IDS)
@torch.no_grad()
def test_lora_on_every_linear_layer_applies_and_merges_back(mode, pos):
    peft = pytest.importorskip("peft")
    model = make_lm(mode, pos)
    x = ids()
    base = model(x).logits
    lora = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    targeted = {name.split(".")[-1] for name, module in lora.named_modules() if isinstance(module, peft.tuners.lora.Linear)}
    assert {"gate_up_proj", "down_proj", "q_proj", "k_proj", "v_proj", "o_proj"} <= targeted
    if mode == "lowrank":
        assert "feature_map" in targeted
    adapted = lora(x).logits
    assert (adapted - base).abs().max() > 1e-3
    merged = lora.merge_and_unload()
    torch.testing.assert_close(merged(x).logits, adapted, rtol=1e-5, atol=1e-5)


# -- live config -----------------------------------------------------------------------------------

@pytest.mark.parametrize("field,value", [("attention_mode", "local"), ("sliding_window", 2), ("is_causal", False)])
def test_changing_a_structural_field_after_construction_is_refused(tmp_path, field, value):
    model = make_lm("local" if field == "sliding_window" else "eager")
    setattr(model.config, field, value)
    with pytest.raises(ValueError, match=field):
        model(ids())
    with pytest.raises(ValueError, match=field):
        model.save_pretrained(tmp_path)


# -- inputs ----------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(attention_mask=torch.tensor([[1, 1, 2, 1]])), "0 \\(padding\\) or 1"),
        (dict(attention_mask=torch.tensor([[1, -1, 1, 1]])), "0 \\(padding\\) or 1"),
        (dict(position_ids=torch.arange(4.0)[None]), "integer tensor"),
        (dict(position_ids=torch.ones(1, 4, dtype=torch.bool)), "integer tensor"),
    ],
)
def test_malformed_masks_and_positions_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_lm()(ids(1, 4), **kwargs)


def test_integer_inputs_embeds_are_refused():
    with pytest.raises(ValueError, match="floating-point"):
        make_lm()(inputs_embeds=torch.ones(1, 4, 32, dtype=torch.long))


@pytest.mark.parametrize("mode", ["eager", "local", "lowrank", "rope"])
@torch.no_grad()
def test_float64_inputs_embeds_run_in_the_model_dtype_or_fail_clearly(mode):
    model = make_lm(mode)
    embeds = model.get_input_embeddings()(ids(1, 6))
    expected = model(inputs_embeds=embeds).logits
    torch.testing.assert_close(model(inputs_embeds=embeds.double()).logits, expected)


def test_local_mask_cache_is_bounded_and_owned_by_the_model():
    model = make_lm("local")
    store = model.model._mask_cache
    store.max_bytes = 4096
    with torch.no_grad():
        for n in range(5, 60, 3):
            cache = getattr(model(ids(1, n), use_cache=True), CACHE)
            model(ids(1, 2), **{CACHE: cache}, use_cache=True)  # a cached multi-token call builds a mask
    assert 0 < store.nbytes <= 4096


def test_rope_scaling_override_at_load_time(tmp_path):
    make_lm("rope").save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # transformers prefers rope_parameters
        model = AutoModelForCausalLM.from_pretrained(tmp_path, rope_scaling={"type": "linear", "factor": 4.0})
    assert model.config.rope_parameters["rope_type"] == "linear" and model.model.rotary.factor == 4.0
