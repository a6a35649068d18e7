"""torch.compile: every mode traces as one graph (``fullgraph=True`` raises on any graph break, and a
host read of a tensor value is one), and the compiled forward, training step and static-cache
generation equal the uncompiled ones.

Most cases use the ``aot_eager`` backend (dynamo + AOTAutograd, the same graphs inductor gets, without
code generation, which takes tens of seconds per graph on a small CPU); the generation test of
``rope`` runs inductor, the default backend.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import CACHE, tiny_config
from transformers import CompileConfig

from hf_attn import HfAttnForCausalLM

MODES = ["eager", "rope", "local", "lowrank"]


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test compiles from scratch: no graph or recompile budget shared between tests."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def make_lm(mode: str, **kw) -> HfAttnForCausalLM:
    torch.manual_seed(0)
    model = HfAttnForCausalLM(tiny_config(mode, **kw))
    # peaked logits: greedy choices are far apart, so float noise never flips a token
    torch.nn.init.normal_(model.lm_head.weight, std=2.0)
    return model


def padded_batch(length: int = 13) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ids (2, L), a left-padded mask (row 0 has 3 padding tokens) and labels ignoring the padding."""
    ids = torch.randint(1, 97, (2, length), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    return ids, mask, ids.masked_fill(mask == 0, -100)


@pytest.mark.parametrize("mode", MODES)
def test_compiled_training_steps_equal_uncompiled(mode):
    """Forward, loss.backward() and optimizer.step() through ``torch.compile(fullgraph=True)`` give the
    uncompiled logits, loss, gradients and updated weights: a left-padded batch (masks, positions
    counted from it), then a batch without a mask (each mode's unpadded path)."""
    reference = make_lm(mode).train()
    model = copy.deepcopy(reference)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (reference, model)]
    ids, mask, labels = padded_batch()
    for batch in (dict(input_ids=ids, attention_mask=mask, labels=labels), dict(input_ids=ids, labels=ids)):
        results = []
        for net, run, optimizer in ((reference, reference, optimizers[0]), (model, compiled, optimizers[1])):
            with torch.no_grad():
                logits = run(**batch, use_cache=False).logits
            # with gradients the uncompiled loss is chunked (logits None); compiled it is one call
            out = run(**batch, use_cache=False)
            out.loss.backward()
            results.append((logits, out.loss.detach(), [p.grad.clone() for p in net.parameters()]))
            optimizer.step()
            optimizer.zero_grad()
        (logits, loss, grads), (c_logits, c_loss, c_grads) = results
        torch.testing.assert_close(c_logits, logits, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(c_loss, loss, rtol=1e-5, atol=1e-5)
        for got, expected in zip(c_grads, grads):
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)
        for got, expected in zip(model.parameters(), reference.parameters()):
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", ["rope", "local"])
@torch.no_grad()
def test_compiled_forward_with_dynamic_lengths_equals_uncompiled(mode):
    """``dynamic=True``: a graph with a symbolic sequence length serves lengths it was not traced for
    (local attention guards on whether the length is a multiple of the window: none of these is)."""
    model = make_lm(mode).eval()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager", dynamic=True)
    for length in (13, 7, 30):
        ids = torch.randint(1, 97, (2, length), generator=torch.Generator().manual_seed(length))
        torch.testing.assert_close(compiled(ids, use_cache=False).logits, model(ids, use_cache=False).logits,
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode,backend", [("eager", "aot_eager"), ("rope", "inductor"), ("local", "aot_eager"),
                                          ("lowrank", "aot_eager")])
@torch.no_grad()
def test_compiled_static_cache_generation_equals_uncompiled(mode, backend):
    """``generate(cache_implementation="static", compile_config=...)`` compiles the decoding step
    (fullgraph) and produces the uncompiled tokens, for a left-padded batch."""
    if mode == "lowrank" and CACHE == "past_key_values":
        pytest.skip("transformers < 5.24 asks a static cache of linear-attention layers for a length it lacks")
    model = make_lm(mode).eval()
    ids, mask, _ = padded_batch(6)
    expected = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False,
                              cache_implementation="static")
    config = CompileConfig(backend=backend, fullgraph=True, mode="default")
    config._compile_all_devices = True  # transformers compiles on accelerators only unless told otherwise
    got = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False,
                         cache_implementation="static", compile_config=config)
    assert hasattr(model, "_compiled_call")  # the compiled step did run
    assert torch.equal(got, expected)


def test_value_checks_still_run_eagerly_after_compiling():
    """Tracing skips the host-side value checks; eager calls of the same model keep them."""
    model = make_lm("eager").eval()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    ids = torch.randint(1, 97, (1, 5))
    with torch.no_grad():
        compiled(ids, use_cache=False)
    with pytest.raises(ValueError, match="token id 500"):
        model(torch.full((1, 5), 500), use_cache=False)
    with pytest.raises(ValueError, match="0 \\(padding\\) or 1"):
        model(ids, attention_mask=torch.full((1, 5), 2), use_cache=False)
