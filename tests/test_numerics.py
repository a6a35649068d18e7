"""No NaN or inf in outputs or gradients at the numeric edges: padding-only rows and windows,
large activations, reduced-precision autocast, extreme rotary positions."""

from __future__ import annotations

import pytest
import torch
from conftest import MODE_IDS, MODE_VARIANTS, tiny_config

from hf_attn import HfAttnForCausalLM


def finite_forward_backward(model, **inputs) -> None:
    out = model(**inputs)
    assert torch.isfinite(out.logits).all()
    out.logits.float().square().mean().backward()
    for name, p in model.named_parameters():
        if p.grad is not None:
            assert torch.isfinite(p.grad).all(), name


@pytest.mark.parametrize("mode,pos", MODE_VARIANTS, ids=MODE_IDS)
def test_padding_only_rows_and_windows(mode, pos):
    model = HfAttnForCausalLM(tiny_config(mode, pos, sliding_window=3))
    x = torch.randint(1, 97, (3, 16))
    mask = torch.ones_like(x)
    mask[0] = 0  # nothing but padding
    mask[1, :12] = 0  # long left padding: early windows see only padding
    mask[2, 5:] = 0  # right padding
    finite_forward_backward(model, input_ids=x, attention_mask=mask)


@pytest.mark.parametrize("mode", ["eager", "local", "lowrank", "rope"])
def test_large_activations(mode):
    model = HfAttnForCausalLM(tiny_config(mode))
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(1e4)
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(30.0)
            layer.self_attn.k_proj.weight.mul_(30.0)
    finite_forward_backward(model, input_ids=torch.randint(1, 97, (2, 12)))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mode,pos", MODE_VARIANTS, ids=MODE_IDS)
def test_autocast(mode, pos, dtype):
    model = HfAttnForCausalLM(tiny_config(mode, pos))
    x = torch.randint(1, 97, (2, 12))
    mask = torch.ones_like(x)
    mask[1, :5] = 0
    with torch.autocast("cpu", dtype=dtype):
        out = model(x, attention_mask=mask, labels=x)  # chunked loss (logits None)
        with torch.no_grad():
            logits = model(x, attention_mask=mask).logits
    assert out.logits is None and torch.isfinite(out.loss) and torch.isfinite(logits.float()).all()
    out.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("mode", ["eager", "lowrank", "rope"])
def test_half_precision_weights_generate(mode):
    model = HfAttnForCausalLM(tiny_config(mode)).to(torch.bfloat16).eval()
    out = model(torch.randint(1, 97, (1, 9)))
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.logits.float()).all()
    assert model.generate(torch.randint(1, 97, (1, 4)), max_new_tokens=5, do_sample=False).shape == (1, 9)


@pytest.mark.parametrize("mode", ["rope", "local"])
@pytest.mark.parametrize("scaling", [None, {"type": "linear", "factor": 8.0}, {"type": "dynamic", "factor": 4.0}])
def test_extreme_rope_positions(mode, scaling):
    model = HfAttnForCausalLM(tiny_config(mode, "rope", rope_scaling=scaling)).eval()
    positions = torch.arange(10_000_000, 10_000_008)[None]
    with torch.no_grad():
        out = model(torch.randint(1, 97, (1, 8)), position_ids=positions).logits
    assert torch.isfinite(out).all()
