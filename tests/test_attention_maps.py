"""Attention maps (hf_attn/analysis/attention_maps.py, scripts/plot_attention.py): each mode's map is
the attention that mode applies, checked against references written out here."""

from __future__ import annotations

import atexit
import functools
import importlib.util
import shutil
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import MODE_IDS, MODE_VARIANTS, tiny_config
from PIL import Image

from hf_attn import HfAttnForCausalLM, HfAttnModel
from hf_attn.analysis.attention_maps import (
    LayerCapture,
    attention_maps,
    capture_attention_inputs,
    grid_image_size,
    implied_output_error,
    local_blocks_to_dense,
    lowrank_scores,
    plot_attention_grid,
    token_labels,
    write_bertviz_html,
)
from hf_attn.attention_local import local_attention_forward
from hf_attn.training.data import stdlib_root
from hf_attn.training.tokenizer import train_bpe_tokenizer

REPO = Path(__file__).resolve().parents[1]
TEXT = "def add(a, b):\n    return a + b\n"


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def band_reference(q, k, window, is_causal, cached=0):
    """softmax(q k^T * scaling) over the band only, (B, H, Lq, Lk) with zeros outside it: written out
    from the definition (key j is in query i's window iff i - w < j <= i, or |i - j| < w)."""
    groups = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(groups, dim=1)
    lq, lk = q.shape[2], k.shape[2]
    i = torch.arange(cached, cached + lq)[:, None]
    j = torch.arange(lk)[None]
    band = (j > i - window) & ((j <= i) if is_causal else (j < i + window))
    scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    return torch.softmax(scores.masked_fill(~band, float("-inf")), dim=-1)


@pytest.mark.parametrize(
    "is_causal,length,window,cached",
    [(True, 17, 4, 0), (True, 8, 8, 0), (True, 3, 5, 0), (True, 6, 4, 3), (False, 17, 4, 0), (False, 5, 3, 0)],
)
def test_local_blocks_to_dense_matches_the_softmax_over_the_band(is_causal, length, window, cached):
    torch.manual_seed(0)
    q = torch.randn(2, 4, length, 8)
    k, v = torch.randn(2, 2, cached + length, 8), torch.randn(2, 2, cached + length, 8)
    module = SimpleNamespace(config=SimpleNamespace(sliding_window=window), training=False)
    _, blocked = local_attention_forward(module, q, k, v, None, 8**-0.5, is_causal=is_causal, implementation="eager")
    assert blocked.shape == (2, 4, -(-length // window), window, (2 if is_causal else 3) * window)
    dense = local_blocks_to_dense(blocked, length, cached=cached)
    torch.testing.assert_close(dense, band_reference(q, k, window, is_causal, cached), rtol=1e-5, atol=1e-6)


def test_local_blocks_to_dense_rejects_what_is_not_a_blocked_map():
    with pytest.raises(ValueError, match="blocked local weights"):
        local_blocks_to_dense(torch.zeros(1, 2, 5, 5), 5)
    with pytest.raises(ValueError, match="neither 2w nor 3w"):
        local_blocks_to_dense(torch.zeros(1, 2, 2, 4, 5), 8)
    with pytest.raises(ValueError, match="does not fit"):
        local_blocks_to_dense(torch.zeros(1, 2, 2, 4, 8), 9)


@pytest.mark.parametrize("position", ["absolute", "rope"])
def test_local_model_maps_are_the_band_of_its_own_queries_and_keys(position):
    torch.manual_seed(0)
    model = HfAttnModel(tiny_config("local", position, sliding_window=4)).eval()
    ids = torch.randint(1, 97, (1, 13))
    maps = attention_maps(model, ids)
    captures = capture_attention_inputs(model, ids)
    assert maps.kind == "dense" and len(maps.layers) == 2
    for layer, capture in zip(maps.layers, captures):
        torch.testing.assert_close(layer, band_reference(capture.query, capture.key, 4, True), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("feature_map", ["product", "softmax"])
@pytest.mark.parametrize("position", ["absolute", "rope"])
def test_implied_lowrank_attention_reproduces_the_layer_output(position, feature_map):
    torch.manual_seed(0)
    config = tiny_config("lowrank", position, lowrank_feature_map=feature_map, lowrank_dim=8, lowrank_chunk_size=4)
    model = HfAttnForCausalLM(config).eval()
    with torch.no_grad():  # peaked features (random init gives near-uniform ones, which hide mistakes)
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.feature_map):
                proj.weight.mul_(8.0)
    ids = torch.randint(1, 97, (1, 19))  # several chunks of 4, one partial
    maps = attention_maps(model, ids)
    assert maps.kind == "dense" and len(maps.max_error) == 2
    assert max(maps.max_error) < 1e-5
    for layer in maps.layers:
        assert layer.shape == (1, 4, 19, 19)
        assert torch.all(layer.triu(1) == 0)  # causal
        torch.testing.assert_close(layer.sum(-1), torch.ones(1, 4, 19))
    # the check has teeth: the same scores without causality, or (rope) without rotation, miss the output
    capture = capture_attention_inputs(model, ids)[0]
    attn = model.model.layers[0].self_attn
    scores = lowrank_scores(attn, capture)
    assert implied_output_error(scores, capture) < 1e-5
    assert implied_output_error(scores + 0.5 * torch.ones_like(scores).triu(1), capture) > 1e-3
    if position == "rope":
        stored = {}
        hooks = [getattr(attn, n).register_forward_hook(lambda m, i, o, n=n: stored.__setitem__(n, o))
                 for n in ("q_proj", "k_proj")]
        with torch.no_grad():
            model(ids)
        for h in hooks:
            h.remove()
        unrotated = LayerCapture(stored["q_proj"].view(1, 19, 4, 8).transpose(1, 2),
                                 stored["k_proj"].view(1, 19, 2, 8).transpose(1, 2), capture.value, capture.output)
        assert implied_output_error(lowrank_scores(attn, unrotated), capture) > 1e-3


@pytest.mark.parametrize("mode", ["eager", "rope"])
def test_full_modes_give_their_softmax_weights(mode):
    torch.manual_seed(0)
    model = HfAttnForCausalLM(tiny_config(mode)).eval()
    ids = torch.randint(1, 97, (1, 9))
    maps = attention_maps(model, ids)
    captures = capture_attention_inputs(model, ids)
    for layer, capture in zip(maps.layers, captures):
        # full causal attention is the band of width L
        torch.testing.assert_close(layer, band_reference(capture.query, capture.key, 9, True), rtol=1e-5, atol=1e-6)


def test_bidirectional_lowrank_gives_its_slot_map():
    model = HfAttnModel(tiny_config("lowrank", is_causal=False, lowrank_dim=6)).eval()
    maps = attention_maps(model, torch.randint(1, 97, (1, 10)))
    assert maps.kind == "slots"
    assert [tuple(layer.shape) for layer in maps.layers] == [(1, 4, 10, 6)] * 2
    torch.testing.assert_close(maps.layers[0].sum(-1), torch.ones(1, 4, 10))
    assert write_bertviz_html(maps, [str(i) for i in range(10)], Path(tempfile.mkdtemp()) / "x.html") is None


# ------------------------------------------------------------------------------------------ the script


@functools.cache
def tokenizer():
    text = (stdlib_root() / "textwrap.py").read_text(encoding="utf-8")
    return train_bpe_tokenizer([text], 300)


def checkpoint(mode: str, position: str) -> Path:
    folder = Path(tempfile.mkdtemp(prefix=f"hf_attn_maps_{mode}_"))
    atexit.register(shutil.rmtree, folder, True)
    torch.manual_seed(0)
    tok = tokenizer()
    model = HfAttnForCausalLM(tiny_config(mode, position, vocab_size=len(tok), pad_token_id=tok.pad_token_id))
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def plot_script():
    spec = importlib.util.spec_from_file_location("plot_attention_script", REPO / "scripts" / "plot_attention.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


@pytest.mark.parametrize("variant", MODE_VARIANTS, ids=MODE_IDS)
def test_script_writes_a_layers_by_heads_grid_for_every_mode(variant, tmp_path, capsys):
    folder = checkpoint(*variant)
    assert plot_script()([str(folder), "--text", TEXT, "--layers", "1", "--heads", "0,2,3", "--out", str(tmp_path),
                          "--no-html"]) == 0
    length = len(tokenizer()(TEXT)["input_ids"])
    with Image.open(tmp_path / "attention.png") as image:
        image.verify()
    with Image.open(tmp_path / "attention.png") as image:
        assert image.size == grid_image_size(1, 3, length)
        assert len(np.unique(np.asarray(image.convert("L")))) > 10  # something was drawn
    if variant[0] == "lowrank":
        assert "reproduces each layer's output" in capsys.readouterr().out


@pytest.mark.parametrize(
    "bad,message",
    [(["--heads", "4"], "heads [4] out of range"), (["--layers", "0,x"], "comma-separated integers"),
     (["--text", "x" * 200], "beyond max_position_embeddings=128")],  # 200 tokens for 128 learned positions
)
def test_script_refuses_bad_arguments_with_a_message(bad, message, tmp_path, capsys):
    args = [str(checkpoint("eager", "absolute")), "--text", TEXT, "--out", str(tmp_path)]
    with pytest.raises(SystemExit):
        plot_script()(args + bad)
    assert message in capsys.readouterr().err
    assert not (tmp_path / "attention.png").exists()


def test_grid_size_and_labels_of_a_longer_text(tmp_path):
    torch.manual_seed(0)
    model = HfAttnModel(tiny_config("local", sliding_window=8)).eval()
    maps = attention_maps(model, torch.randint(1, 97, (1, 100)))
    path = plot_attention_grid(maps, [str(i) for i in range(100)], tmp_path / "long.png")
    with Image.open(path) as image:
        assert image.size == grid_image_size(2, 4, 100)
    labels = token_labels(tokenizer(), tokenizer()("a b\n\tc")["input_ids"])
    assert "".join(labels) == "a\u00b7b\u21b5\u2192c"


def test_bertviz_html(tmp_path):
    pytest.importorskip("bertviz")
    folder = checkpoint("local", "absolute")
    assert plot_script()([str(folder), "--text", TEXT, "--out", str(tmp_path)]) == 0
    html = (tmp_path / "attention.html").read_text(encoding="utf-8")
    assert "return" in html and len(html) > 1000


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))


# -- output_attentions_layout="dense": the model's own (B, H, L, L) weights ---------------------------

def _dense_and_heads(model, ids, mask=None):
    """Per layer: the dense weights and what they must reproduce, the layer's per-head output
    (B, H, L, D) (o_proj's input) and its values (B, Hkv, L, D) (v_proj's output)."""
    base = model.model if hasattr(model, "model") else model
    seen = [{} for _ in base.layers]
    handles = []
    for store, layer in zip(seen, base.layers):
        attn = layer.self_attn
        handles.append(attn.v_proj.register_forward_hook(lambda m, a, out, s=store: s.__setitem__("v", out)))
        handles.append(attn.o_proj.register_forward_pre_hook(lambda m, a, s=store: s.__setitem__("o", a[0])))
    try:
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=mask, output_attentions=True, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    b, length = ids.shape
    d = base.config.head_dim
    return [(w, s["o"].view(b, length, -1, d).transpose(1, 2), s["v"].view(b, length, -1, d).transpose(1, 2))
            for w, s in zip(out.attentions, seen)]


@pytest.mark.parametrize("mode,pos", MODE_VARIANTS, ids=MODE_IDS)
def test_dense_layout_weights_reproduce_each_layer_output(mode, pos):
    """Every mode's dense (B, H, L, L) weights, applied to the values, give the layer's output: exact for
    the softmax modes and local (window band), within the kernel's 1e-6 normaliser for causal lowrank.
    A left-padded row: padding keys get no weight and real rows sum to 1; float64 stays finite."""
    torch.manual_seed(0)
    model = HfAttnForCausalLM(tiny_config(mode, pos, output_attentions_layout="dense")).double().eval()
    ids = torch.randint(1, 97, (2, 13))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    for weights, heads, values in _dense_and_heads(model, ids, mask):
        assert weights.shape == (2, 4, 13, 13)
        groups = heads.shape[1] // values.shape[1]
        applied = weights @ values.repeat_interleave(groups, dim=1)
        tol = 1e-4 if mode == "lowrank" else 1e-10
        torch.testing.assert_close(applied[1], heads[1], rtol=tol, atol=tol)
        torch.testing.assert_close(applied[0, :, 3:], heads[0, :, 3:], rtol=tol, atol=tol)
        real = [weights[1], weights[0, :, 3:, 3:]]  # (padding query rows are not defined)
        assert all((r.triu(1) == 0).all() for r in real) and (weights[0, :, 3:, :3] == 0).all()
        torch.testing.assert_close(weights[0, :, 3:].sum(-1), torch.ones(4, 10, dtype=weights.dtype))
        if mode == "local":
            w = model.config.sliding_window
            assert all((r.tril(-w) == 0).all() for r in real)  # nothing beyond the window


def test_dense_layout_of_bidirectional_lowrank_reproduces_the_output():
    torch.manual_seed(1)
    model = HfAttnModel(tiny_config("lowrank", is_causal=False, output_attentions_layout="dense")).double().eval()
    ids = torch.randint(1, 97, (2, 10))
    for weights, heads, values in _dense_and_heads(model, ids):
        assert weights.shape == (2, 4, 10, 10)
        applied = weights @ values.repeat_interleave(heads.shape[1] // values.shape[1], dim=1)
        torch.testing.assert_close(applied, heads, rtol=1e-10, atol=1e-10)


def test_native_layout_is_the_default_and_unchanged():
    ids = torch.randint(1, 97, (1, 9))
    local = HfAttnForCausalLM(tiny_config("local")).eval()
    with torch.no_grad():
        blocked = local(input_ids=ids, output_attentions=True).attentions[0]
        local.config.output_attentions_layout = "dense"
        dense = local(input_ids=ids, output_attentions=True).attentions[0]
    assert blocked.dim() == 5 and dense.shape == (1, 4, 9, 9)
    torch.testing.assert_close(local_blocks_to_dense(blocked, 9), dense)
    lowrank = HfAttnForCausalLM(tiny_config("lowrank")).eval()
    with torch.no_grad():
        assert lowrank(input_ids=ids, output_attentions=True).attentions[0] is None


def test_dense_layout_of_lowrank_refuses_a_cache_with_a_past():
    model = HfAttnForCausalLM(tiny_config("lowrank", output_attentions_layout="dense")).eval()
    ids = torch.randint(1, 97, (1, 6))
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=True)
        cache = out.cache if "cache" in out else out.past_key_values
        with pytest.raises(ValueError, match="output_attentions_layout"):
            model(input_ids=ids[:, :1], output_attentions=True, use_cache=True,
                  **{"cache" if "cache" in out else "past_key_values": cache})
