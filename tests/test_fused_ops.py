"""hf_attn/fused_ops.py: the fused RMSNorm, SwiGLU gate and chunked LM loss equal the plain PyTorch
expressions in value and gradient, keep fewer tensors, and the model uses them as documented."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import MODE_IDS, MODE_VARIANTS, node_name, tiny_config

from hf_attn import HfAttnForCausalLM
from hf_attn.fused_ops import chunked_lm_loss, rms_norm, silu_mul


def _saved_shapes(fn) -> list[tuple[int, ...]]:
    """Shapes of every tensor autograd saves while ``fn`` runs."""
    shapes = []

    def pack(t):
        shapes.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return shapes


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_rms_norm_matches_plain(dtype, cpu_kernels):
    torch.manual_seed(0)
    x = torch.randn(3, 5, 16, dtype=dtype, requires_grad=True)
    w = (torch.randn(16) * 0.5 + 1).to(dtype).requires_grad_()
    g = torch.randn(3, 5, 16, dtype=dtype)
    acc = torch.promote_types(dtype, torch.float32)
    ref = (F.rms_norm(x.to(acc), (16,), eps=1e-5) * w.to(acc)).to(dtype)
    ref_dx, ref_dw = torch.autograd.grad(ref, (x, w), g)
    out = rms_norm(x, w, 1e-5, fused=True)
    dx, dw = torch.autograd.grad(out, (x, w), g)
    tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 2e-2}[dtype]
    torch.testing.assert_close(out, ref, rtol=tol, atol=tol)
    torch.testing.assert_close(dx, ref_dx, rtol=tol, atol=tol)
    torch.testing.assert_close(dw, ref_dw, rtol=tol, atol=tol * 10)
    assert (cpu_kernels.calls == ["rms_norm_node"]) == cpu_kernels.on


def test_rms_norm_records_one_node_and_keeps_input_and_rstd(cpu_kernels):
    x = torch.randn(4, 8, 16, requires_grad=True)
    w = torch.ones(16, requires_grad=True)
    out = rms_norm(x, w, 1e-6, fused=True)
    assert node_name(out) == ("RMSNormNode" if cpu_kernels.on else "_RMSNormBackward")
    shapes = _saved_shapes(lambda: rms_norm(x, w, 1e-6, fused=True))
    assert sorted(shapes) == sorted([(4, 8, 16), (16,), (32, 1)])
    # only the weight trains (frozen input): its gradient alone, the input's is not formed
    (dw,) = torch.autograd.grad(rms_norm(x.detach(), w, 1e-6, fused=True).sum(), (w,))
    torch.testing.assert_close(dw, F.rms_norm(x.detach(), (16,), eps=1e-6).sum((0, 1)))


def test_silu_mul_matches_plain_and_keeps_only_gate_up(cpu_kernels):
    torch.manual_seed(0)
    gu = torch.randn(2, 7, 2 * 12, dtype=torch.float64, requires_grad=True)
    g = torch.randn(2, 7, 12, dtype=torch.float64)
    gate, up = gu.chunk(2, dim=-1)
    ref = F.silu(gate) * up
    (ref_grad,) = torch.autograd.grad(ref, (gu,), g)
    out = silu_mul(gu, fused=True)
    (grad,) = torch.autograd.grad(out, (gu,), g)
    torch.testing.assert_close(out, ref, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-13, atol=1e-13)
    assert _saved_shapes(lambda: silu_mul(gu, fused=True)) == [(2, 7, 24)]
    assert (cpu_kernels.calls[:2] == ["swiglu_fwd", "swiglu_bwd"]) == cpu_kernels.on
    # inference or plain: the same values without the autograd function
    with torch.no_grad():
        torch.testing.assert_close(silu_mul(gu, fused=True), ref.detach())


def _loss_and_grads(model, ids, labels, chunk, **kwargs):
    model.zero_grad(set_to_none=True)
    model.config.loss_chunk_size = chunk
    out = model(input_ids=ids, labels=labels, use_cache=False, **kwargs)
    out.loss.backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("chunk", [7, 64], ids=["chunks", "one_chunk"])
@pytest.mark.parametrize("mode,positions", MODE_VARIANTS, ids=MODE_IDS)
def test_chunked_loss_equals_full_logits_loss(mode, positions, chunk):
    """float64: the chunked loss and every parameter gradient equal cross-entropy over the full logits
    (7-token chunks do not divide the 3 x 21 tokens; 64 holds them in one chunk, which takes its own
    path; ignored labels included)."""
    torch.manual_seed(0)
    model = HfAttnForCausalLM(tiny_config(mode, positions)).double()
    ids = torch.randint(1, 97, (3, 21))
    labels = ids.clone()
    labels[0, :6] = -100
    out, grads = _loss_and_grads(model, ids, labels, chunk=chunk)
    assert out.logits is None
    model.zero_grad(set_to_none=True)
    model.config.loss_chunk_size = 0
    logits = model(input_ids=ids, use_cache=False).logits
    assert logits.shape == (3, 21, 97)
    ref = F.cross_entropy(logits[:, :-1].reshape(-1, 97), labels[:, 1:].reshape(-1), ignore_index=-100)
    ref.backward()
    torch.testing.assert_close(out.loss, ref.detach(), rtol=1e-13, atol=1e-13)
    for name, p in model.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-10, atol=1e-13, msg=name)


@pytest.mark.parametrize(
    "kwargs",
    [{"num_items_in_batch": 37}, {"shift_labels": "random"}, {"ignore_index": 5}],
    ids=["num_items_in_batch", "shift_labels", "ignore_index"],
)
def test_chunked_loss_honours_loss_keywords(kwargs):
    """Every loss keyword the unchunked (transformers ForCausalLMLoss) path takes gives the same loss
    and gradients chunked, in float32."""
    torch.manual_seed(1)
    model = HfAttnForCausalLM(tiny_config("rope"))
    ids = torch.randint(1, 97, (2, 19))
    if kwargs.get("shift_labels") == "random":
        kwargs = {"shift_labels": torch.randint(0, 97, (2, 19))}
        labels = None
    else:
        labels = ids.clone()
        labels[:, ::4] = kwargs.get("ignore_index", -100)
    a, ga = _loss_and_grads(model, ids, labels, 5, **kwargs)
    b, gb = _loss_and_grads(model, ids, labels, 0, **kwargs)
    assert a.logits is None and b.logits is not None
    torch.testing.assert_close(a.loss, b.loss, rtol=1e-6, atol=1e-6)
    for name in gb:
        torch.testing.assert_close(ga[name], gb[name], rtol=1e-5, atol=1e-6, msg=name)


def test_chunked_loss_never_keeps_full_logits():
    """What autograd saves for the backward contains no (tokens x vocab) tensor when chunked, and
    does when chunking is off."""
    model = HfAttnForCausalLM(tiny_config("local", vocab_size=4099))
    ids = torch.randint(1, 97, (2, 40))

    def forward(chunk):
        model.config.loss_chunk_size = chunk
        return lambda: model(input_ids=ids, labels=ids, use_cache=False)

    def holds_logits(shapes):
        return any(len(s) >= 1 and s[-1] == 4099 and torch.Size(s).numel() >= 80 * 4099 for s in shapes)

    assert holds_logits(_saved_shapes(forward(0)))
    assert not holds_logits(_saved_shapes(forward(16)))


def test_hooked_head_is_called_and_gives_the_same_gradients():
    """A head with a forward hook (or an adapter) is called as a module for every chunk (under
    activation checkpointing: once in the forward, once again in the backward), never bypassed."""
    torch.manual_seed(2)
    model = HfAttnForCausalLM(tiny_config("eager"))
    ids = torch.randint(1, 97, (2, 12))
    calls = []
    model.lm_head.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    a, ga = _loss_and_grads(model, ids, ids, 10)
    assert sum(calls) == 2 * 24 and max(calls) == 10
    b, gb = _loss_and_grads(model, ids, ids, 0)
    torch.testing.assert_close(a.loss, b.loss)
    for name in gb:
        torch.testing.assert_close(ga[name], gb[name], rtol=1e-5, atol=1e-6, msg=name)


def test_logits_returned_without_gradients_or_with_custom_loss():
    model = HfAttnForCausalLM(tiny_config("eager"))
    ids = torch.randint(1, 97, (2, 12))
    with torch.no_grad():
        out = model(input_ids=ids, labels=ids, use_cache=False)
    assert out.logits.shape == (2, 12, 97) and out.loss is not None
    seen = []

    def my_loss(logits, labels, vocab_size, **kwargs):
        seen.append(logits.shape)
        return logits.float().logsumexp(-1).mean()

    model.loss_function = my_loss
    out = model(input_ids=ids, labels=ids, use_cache=False)
    assert seen == [(2, 12, 97)] and out.logits is not None
    torch.testing.assert_close(out.loss, out.logits.logsumexp(-1).mean())


@pytest.mark.parametrize("chunk", [4, 18])
def test_chunked_lm_loss_function_direct(chunk):
    """The function on its own, with a plain head: mean over valid targets, as F.cross_entropy."""
    torch.manual_seed(3)
    head = torch.nn.Linear(8, 11, bias=False).double()
    hidden = torch.randn(2, 9, 8, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 11, (2, 9))
    loss = chunked_lm_loss(head, hidden, labels, chunk=chunk)
    ref = F.cross_entropy(head(hidden)[:, :-1].reshape(-1, 11), labels[:, 1:].reshape(-1))
    torch.testing.assert_close(loss, ref)
    g1 = torch.autograd.grad(loss, (hidden, head.weight))
    g2 = torch.autograd.grad(ref, (hidden, head.weight))
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("value", [-1, 1.5, True, "8"])
def test_loss_chunk_size_is_validated(value):
    with pytest.raises(ValueError, match="loss_chunk_size"):
        tiny_config(loss_chunk_size=value)


def test_plain_linear_only_for_bare_bias_free_linears():
    from hf_attn.fused_ops import plain_linear

    assert plain_linear(torch.nn.Linear(4, 3, bias=False))
    assert not plain_linear(torch.nn.Linear(4, 3, bias=True))
    hooked = torch.nn.Linear(4, 3, bias=False)
    hooked.register_forward_pre_hook(lambda module, args: None)
    assert not plain_linear(hooked)
    backward_hooked = torch.nn.Linear(4, 3, bias=False)
    backward_hooked.register_full_backward_hook(lambda module, gi, go: None)
    assert not plain_linear(backward_hooked)
    patched = torch.nn.Linear(4, 3, bias=False)
    patched.forward = lambda x: x  # what accelerate's offload hooks do
    assert not plain_linear(patched)

    class Sub(torch.nn.Linear):
        pass

    assert not plain_linear(Sub(4, 3, bias=False))
    assert not plain_linear(torch.nn.Linear(4, 3, bias=False, device="meta"))
    handle = torch.nn.modules.module.register_module_forward_hook(lambda module, args, out: None)
    try:
        assert not plain_linear(torch.nn.Linear(4, 3, bias=False))
    finally:
        handle.remove()


def test_stacked_qkv_projection_equals_module_calls_and_hooks_still_fire():
    """The stacked q/k/v matmul gives the three modules' outputs and gradients; a hook on one of
    them switches that layer back to calling the modules, so the hook sees every call."""
    torch.manual_seed(4)
    model = HfAttnForCausalLM(tiny_config("rope")).double()
    ids = torch.randint(1, 97, (2, 9))
    stacked, g_stacked = _loss_and_grads(model, ids, ids, 0)
    seen = []
    for layer in model.model.layers:
        layer.self_attn.k_proj.register_forward_hook(lambda module, args, out: seen.append(out.shape))
    called, g_called = _loss_and_grads(model, ids, ids, 0)
    assert seen == [(2, 9, 16)] * 2  # k_proj of both layers, once each
    torch.testing.assert_close(stacked.logits, called.logits, rtol=1e-12, atol=1e-12)
    for name in g_called:
        torch.testing.assert_close(g_stacked[name], g_called[name], rtol=1e-10, atol=1e-12, msg=name)



def test_inference_never_stacks_qkv_weights():
    """Stacking copies the three weights (torch.cat); in inference that would happen for every decoded
    token, so only a forward that records gradients stacks them."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class CountCat(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.cats = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.cats += func is torch.ops.aten.cat.default
            return func(*args, **(kwargs or {}))

    model = HfAttnForCausalLM(tiny_config("eager"))
    ids = torch.randint(1, 97, (1, 6))
    with torch.no_grad(), CountCat() as inference:
        model(input_ids=ids, use_cache=False)
    with CountCat() as training:
        model(input_ids=ids, labels=ids, use_cache=False)
    assert inference.cats == 0 and training.cats == model.config.num_hidden_layers


def test_fused_ops_off_records_plain_ops_with_the_same_results():
    """``fused_ops=False``: no custom autograd function in the graph (so double backward works), and the
    same loss and gradients as the fused default."""
    torch.manual_seed(5)
    model = HfAttnForCausalLM(tiny_config("local")).double()
    ids = torch.randint(1, 97, (2, 11))
    fused, g_fused = _loss_and_grads(model, ids, ids, 4)
    model.config.fused_ops = False
    plain, g_plain = _loss_and_grads(model, ids, ids, 0)
    # (the unchunked loss is transformers' ForCausalLMLoss, which takes float32 logits)
    torch.testing.assert_close(fused.loss.float(), plain.loss)
    for name in g_plain:
        torch.testing.assert_close(g_fused[name], g_plain[name], rtol=1e-5, atol=1e-7, msg=name)
    names = set()

    def walk(fn):
        if fn is not None and fn not in seen:
            seen.add(fn)
            names.add(fn.name())
            for next_fn, _ in fn.next_functions:
                walk(next_fn)

    seen = set()
    out = model(input_ids=ids, labels=ids, use_cache=False)
    walk(out.loss.grad_fn)
    assert not any(n.startswith(("_RMSNorm", "_SiluMul", "_LinearCrossEntropy")) or "CppNode" in n for n in names), names
    # double backward through the plain graph
    weight = model.model.layers[0].mlp.down_proj.weight
    (grad,) = torch.autograd.grad(out.loss, weight, create_graph=True)
    (grad2,) = torch.autograd.grad(grad.square().sum(), weight)
    assert torch.isfinite(grad2).all() and grad2.abs().sum() > 0


def test_fused_ops_is_validated():
    with pytest.raises(ValueError, match="fused_ops"):
        tiny_config(fused_ops="yes")


@pytest.mark.parametrize("rows_per_slice", [64, 4])
def test_silu_mul_linear_matches_plain_and_bounds_what_it_keeps(monkeypatch, rows_per_slice, cpu_kernels):
    """With the PyTorch ops, inputs of one slice keep silu(gate) (no recomputation) and longer ones
    keep only gate_up and the weight, recomputing the product slice by slice; the kernels always keep
    only those two (their backward recomputes everything in its one pass). All give the plain
    expression's gradients."""
    import hf_attn.fused_ops as fused

    monkeypatch.setattr(fused, "_ROWS", rows_per_slice)
    torch.manual_seed(0)
    gu = torch.randn(2, 7, 2 * 12, dtype=torch.float64, requires_grad=True)
    down = torch.nn.Linear(12, 5, bias=False).double()
    g = torch.randn(2, 7, 5, dtype=torch.float64)
    gate, up = gu.chunk(2, dim=-1)
    ref = down(F.silu(gate) * up)
    ref_grads = torch.autograd.grad(ref, (gu, down.weight), g)
    out = fused.silu_mul_linear(gu, down, fused=True)
    assert node_name(out) == ("SwiGLULinearNode" if cpu_kernels.on else "_SiluMulLinearBackward")
    grads = torch.autograd.grad(out, (gu, down.weight), g)
    torch.testing.assert_close(out, ref, rtol=1e-13, atol=1e-13)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    kept = sorted(_saved_shapes(lambda: fused.silu_mul_linear(gu, down, fused=True)))
    assert (cpu_kernels.calls == ["swiglu_linear_node"] * 2) == cpu_kernels.on  # (the backward's slices run in C++)
    one_slice = gu.shape[0] * gu.shape[1] <= rows_per_slice and not cpu_kernels.on
    expected = [(2, 7, 12), (2, 7, 24), (5, 12)] if one_slice else [(2, 7, 24), (5, 12)]
    assert kept == expected


def test_swiglu_functions_support_double_backward(cpu_kernels):
    """A backward that builds a graph (``create_graph=True``) takes differentiable ops, so second
    derivatives of the SwiGLU gate, alone and with ``down_proj``, pass torch's numerical check."""
    from hf_attn import cpu_kernels as kernel_switch
    from hf_attn.fused_ops import _SiluMulLinear

    torch.manual_seed(0)
    gu = torch.randn(2, 3, 8, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda a: silu_mul(a, fused=True), (gu,))
    if cpu_kernels.on:  # the kernels' C++ node (2-row slices), else the PyTorch-ops function
        assert torch.autograd.gradgradcheck(lambda a, b: kernel_switch.kernels().swiglu_linear_node(a, b, 2), (gu, w))
    assert torch.autograd.gradgradcheck(lambda a, b: _SiluMulLinear.apply(a, b), (gu, w))
    assert ("swiglu_fwd" in cpu_kernels.calls) == cpu_kernels.on
    assert ("swiglu_linear_node" in cpu_kernels.calls) == cpu_kernels.on


def test_gradient_penalty_through_the_fused_model_equals_plain_ops():
    """Second derivatives through a whole fused training forward (full-logits loss) equal the plain
    ops'; the chunked loss, whose gradients are formed in its forward, refuses a double backward."""
    torch.manual_seed(0)
    ids = torch.randint(1, 97, (2, 8))

    def penalty(**overrides):
        torch.manual_seed(0)
        # eager attention math: torch's CPU sdpa kernel has no double backward
        model = HfAttnForCausalLM(tiny_config("rope", "rope", attn_implementation="eager", **overrides)).double()
        loss = model(input_ids=ids, labels=ids).loss
        grads = torch.autograd.grad(loss, list(model.parameters()), create_graph=True)
        total = sum(g.square().sum() for g in grads)
        return torch.autograd.grad(total, list(model.parameters()))

    fused = penalty(loss_chunk_size=0)
    plain = penalty(loss_chunk_size=0, fused_ops=False)
    for a, b in zip(fused, plain):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)
    with pytest.raises(RuntimeError, match="loss_chunk_size=0"):
        penalty()
