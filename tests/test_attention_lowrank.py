"""The chunked causal low-rank kernel equals its quadratic definition; Linformer equals its formula."""

from __future__ import annotations

import pytest
import torch
from conftest import cache_of, tiny_config
from shape_probe import ShapeProbe
from transformers.cache_utils import LinearAttentionLayer

from hf_attn.attention_lowrank import feature_factors, lowrank_attention_forward
from hf_attn.modeling_hf_attn import HfAttnAttention

FEATURE_MAPS = ["product", "softmax"]


def module(**kw) -> HfAttnAttention:
    torch.manual_seed(0)
    return HfAttnAttention(tiny_config("lowrank", **kw), layer_idx=0).eval()


def features(mod, x):
    """phi(x), written out: one softmax over k slots, or the outer product of two softmaxes whose
    logits are the two row slices of the feature weight (m1 + m2 rows, m1 * m2 = k)."""
    w = mod.feature_map.weight.to(x.dtype)
    if mod.config.lowrank_feature_map == "softmax":
        return torch.softmax(x @ w.t(), -1)
    m1, m2 = feature_factors(mod.config)
    a, b = torch.softmax(x @ w[:m1].t(), -1), torch.softmax(x @ w[m1:].t(), -1)
    return torch.einsum("...i,...j->...ij", a, b).reshape(*x.shape[:-1], m1 * m2)


@pytest.mark.parametrize("rank,sizes", [(256, (16, 16)), (32, (4, 8)), (8, (2, 4)), (9, (3, 3))])
def test_product_feature_map_factors(rank, sizes):
    mod = module(lowrank_dim=rank, lowrank_feature_map="product")
    assert feature_factors(mod.config) == sizes
    assert mod.feature_map.weight.shape == (sum(sizes), 8)
    phi = features(mod, torch.randn(5, 8))
    assert phi.shape == (5, rank) and (phi >= 0).all()
    torch.testing.assert_close(phi.sum(-1), torch.ones(5))  # a distribution over the k slots
    assert module(lowrank_dim=rank, lowrank_feature_map="softmax").feature_map.weight.shape == (rank, 8)


def quadratic_reference(mod, q, k, v, key_mask):
    """out_i = sum_{j<=i} phi(q_i).phi(k_j) v_j / sum_{j<=i} phi(q_i).phi(k_j), built as an explicit matrix."""
    fq, fk = features(mod, q), features(mod, k)
    fk = fk * key_mask[:, None, :, None]
    g = q.shape[1] // k.shape[1]
    fk, v = fk.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    a = (fq @ fk.transpose(-1, -2)).tril()  # (B, H, L, L)
    return ((a @ v) / (a.sum(-1, keepdim=True) + 1e-6)).transpose(1, 2)


@pytest.mark.parametrize("feature_map", FEATURE_MAPS)
@pytest.mark.parametrize("chunk", [1, 3, 4, 64])
def test_causal_kernel_matches_quadratic_definition(chunk, feature_map):
    mod = module(lowrank_chunk_size=chunk, lowrank_feature_map=feature_map)
    q, k, v = torch.randn(2, 4, 11, 8), torch.randn(2, 2, 11, 8), torch.randn(2, 2, 11, 8)
    key_mask = torch.ones(2, 11)
    key_mask[1, :3] = 0
    got, weights = lowrank_attention_forward(mod, q, k, v, key_mask.bool(), 8**-0.5)
    assert weights is None
    torch.testing.assert_close(got, quadratic_reference(mod, q, k, v, key_mask), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("feature_map", FEATURE_MAPS)
@pytest.mark.parametrize("chunk", [4, 8])
def test_state_continues_exactly(feature_map, chunk):
    """Prefix in one call + the rest token by token == everything in one call (a prompt of several
    chunks, or within one chunk)."""
    mod = module(lowrank_chunk_size=chunk, lowrank_feature_map=feature_map)
    q, k, v = torch.randn(1, 4, 10, 8), torch.randn(1, 2, 10, 8), torch.randn(1, 2, 10, 8)
    whole, _ = lowrank_attention_forward(mod, q, k, v, None, 8**-0.5)
    layer = LinearAttentionLayer()  # what DynamicCache(config=...) holds for lowrank
    parts = [lowrank_attention_forward(mod, q[:, :, :6], k[:, :, :6], v[:, :, :6], None, 8**-0.5, cache_layer=layer)[0]]
    for t in range(6, 10):
        sl = slice(t, t + 1)
        parts.append(lowrank_attention_forward(mod, q[:, :, sl], k[:, :, sl], v[:, :, sl], None, 8**-0.5, cache_layer=layer)[0])
    torch.testing.assert_close(torch.cat(parts, 1), whole, rtol=1e-5, atol=1e-5)
    assert layer.recurrent_states[0].shape == (1, 2, 8, 9)  # S (k x D) and z (k) side by side
    assert layer.hf_attn_seen_tokens == 10


def test_causal_kernel_never_builds_square_tensor():
    n = 256
    mod = module(lowrank_chunk_size=16)
    q = torch.randn(1, 4, n, 8, requires_grad=True)
    k, v = torch.randn(1, 2, n, 8), torch.randn(1, 2, n, 8)
    with ShapeProbe() as probe:
        out, _ = lowrank_attention_forward(mod, q, k, v, None, 8**-0.5)
        out.sum().backward()
    assert not probe.has_square(n)


def _quadratic_reference_f64(mod, q, k, v, key_mask):
    """``quadratic_reference`` in float64, the ground truth for gradients."""
    g = q.shape[1] // k.shape[1]
    k, v = k.double().repeat_interleave(g, 1), v.double().repeat_interleave(g, 1)
    fq, fk = features(mod, q.double()), features(mod, k) * key_mask[:, None, :, None].double()
    a = (fq @ fk.transpose(-1, -2)).tril()
    return ((a @ v) / (a.sum(-1, keepdim=True) + 1e-6)).transpose(1, 2)


# (length, chunk, rows per streamed block): one block, several blocks, a block ending mid-chunk
# (padded), blocks of one chunk, a sequence within one chunk (no prefix read, no state built), blocks
# of one full chunk each
@pytest.mark.parametrize("feature_map", FEATURE_MAPS)
@pytest.mark.parametrize("length,chunk,rows", [(11, 4, 512), (23, 4, 8), (37, 8, 16), (5, 4, 8), (40, 4, 2),
                                               (7, 8, 512), (16, 16, 512), (24, 8, 8)])
def test_streamed_path_gradients_match_quadratic_definition(monkeypatch, length, chunk, rows, feature_map):
    """The training path (row blocks, hand-written backward that recomputes each block) gives the
    quadratic definition's output and gradients for q, k, v and the feature map, padding included."""
    import hf_attn.attention_lowrank as lowrank

    monkeypatch.setattr(lowrank, "_STREAM_ROWS", rows)
    mod = module(lowrank_chunk_size=chunk, lowrank_feature_map=feature_map)
    mod.feature_map.weight.data.normal_()  # peaked features: a harder test than the small init
    torch.manual_seed(1)
    q = torch.randn(2, 4, length, 8, requires_grad=True)
    k, v = torch.randn(2, 2, length, 8, requires_grad=True), torch.randn(2, 2, length, 8, requires_grad=True)
    key_mask = torch.ones(2, length, dtype=torch.bool)
    key_mask[1, :3] = False
    grad_out = torch.randn(2, length, 4, 8)
    grad_out[1, :3] = 0  # padded query rows carry no loss (their output is arbitrary)
    inputs = (q, k, v, mod.feature_map.weight)
    got, _ = lowrank_attention_forward(mod, q, k, v, key_mask, 8**-0.5)
    expected = _quadratic_reference_f64(mod, q, k, v, key_mask)
    real = key_mask[:, :, None, None].expand_as(got)
    torch.testing.assert_close(got[real].double(), expected[real], rtol=1e-5, atol=1e-5)
    grads = torch.autograd.grad(got, inputs, grad_out)
    expected_grads = torch.autograd.grad(expected, inputs, grad_out.double())
    for name, g, e in zip("q k v feature_map".split(), grads, expected_grads):
        scale = e.abs().max()
        err = ((g.double() - e).abs().max() / scale).item()
        assert err < 1e-5, (name, err)


@pytest.mark.parametrize("feature_map", FEATURE_MAPS)
def test_streamed_path_saves_inputs_and_block_states_only(monkeypatch, feature_map):
    """Saved for backward: the query and key feature logits (M = m1 + m2, or k, per token), v, the
    output with its normaliser and one
    (k, D + 1) state per block of rows; the largest tensor of forward + backward does not grow with
    n (no (n, k) feature map)."""
    import hf_attn.attention_lowrank as lowrank

    monkeypatch.setattr(lowrank, "_STREAM_ROWS", 64)
    largest = {}
    for n in (256, 512):
        mod = module(lowrank_chunk_size=16, lowrank_feature_map=feature_map)
        q = torch.randn(1, 4, n, 8, requires_grad=True)
        k, v = torch.randn(1, 4, n, 8, requires_grad=True), torch.randn(1, 4, n, 8, requires_grad=True)
        with ShapeProbe() as probe:
            out, _ = lowrank_attention_forward(mod, q, k, v, None, 8**-0.5)
            node = out.grad_fn
            while "StreamedCausalLowRank" not in type(node).__name__:
                node = node.next_functions[0][0]
            saved = sum(t.numel() for t in node.saved_tensors if t is not None)
            out.sum().backward()
        blocks = -(-n // lowrank._STREAM_ROWS)
        m = mod.feature_map.weight.shape[0]  # logits per token: k, or m1 + m2
        # logits (B, H, n, M) x 2, v, out (B, H, n, D), normaliser (B, H, n), states (H, k, D + 1)
        assert saved == 2 * q.numel() // 8 * m + 2 * q.numel() + q.numel() // 8 + blocks * 4 * 8 * 9
        # q, k, v, their feature logits and the gradients are (n, H, D) or (n, H, M); anything else
        # that grows with n would be an (n, k) buffer
        per_n = {q.numel(), q.numel() // 8 * m}
        largest[n] = max(s for shape in probe.shapes if (s := torch.Size(shape).numel()) not in per_n)
    assert largest[512] == largest[256]


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_linformer_matches_formula(implementation):
    mod = module(is_causal=False)
    q, k, v = torch.randn(2, 4, 9, 8), torch.randn(2, 2, 9, 8), torch.randn(2, 2, 9, 8)
    got, weights = lowrank_attention_forward(mod, q, k, v, None, 8**-0.5, is_causal=False, implementation=implementation)
    e, f = mod.linformer_e[:, :9], mod.linformer_f[:, :9]  # (k, L)
    kp = (e @ k).repeat_interleave(2, 1)  # (B, H, k, D)
    vp = (f @ v).repeat_interleave(2, 1)
    expected = (torch.softmax(q @ kp.transpose(-1, -2) * 8**-0.5, -1) @ vp).transpose(1, 2)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    if implementation == "eager":
        assert weights.shape == (2, 4, 9, 8)  # softmax over the k = 8 projected slots


def test_linformer_ignores_padding_with_position_ids():
    mod = module(is_causal=False)
    q, k, v = torch.randn(1, 4, 5, 8), torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8)
    alone, _ = lowrank_attention_forward(mod, q, k, v, None, 8**-0.5, is_causal=False)
    pad = lambda t: torch.cat([torch.randn(1, t.shape[1], 3, 8), t], 2)  # noqa: E731
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1]], dtype=torch.bool)
    pos = (mask.long().cumsum(-1) - 1).clamp(min=0)
    padded, _ = lowrank_attention_forward(mod, pad(q), pad(k), pad(v), mask, 8**-0.5, is_causal=False, position_ids=pos)
    torch.testing.assert_close(padded[:, 3:], alone, rtol=1e-5, atol=1e-5)


def test_first_call_with_a_cache_takes_the_streamed_path():
    """A fresh cache (a prompt, or training with use_cache=True as Trainer leaves it) runs the
    streamed kernel and stores its final state; gradients equal those without a cache."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("lowrank", lowrank_chunk_size=4)).train()
    ids = torch.randint(1, 97, (2, 13))
    grads = []
    for use_cache in (False, True):
        model.zero_grad()
        out = model(ids, labels=ids, use_cache=use_cache)
        node, seen, found = out.loss.grad_fn, set(), False
        stack = [node]
        while stack:  # the streamed kernel's node is in the graph either way
            node = stack.pop()
            if node is None or node in seen:
                continue
            seen.add(node)
            found |= "StreamedCausalLowRank" in type(node).__name__
            stack.extend(n for n, _ in node.next_functions)
        assert found, use_cache
        out.loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        if use_cache:
            state = cache_of(out).layers[0].recurrent_states[0]
            assert state.shape == (2, 2, 8, 9) and not state.requires_grad
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, msg=name)


@pytest.mark.parametrize("width", [1, 2, 3, 4, 7, 8, 15, 16, 17, 64])
def test_narrow_softmax_matches_torch_softmax(width):
    """``_softmax_last`` (the transposed layout for narrow widths on the CPU) equals torch.softmax up
    to float rounding, forward and backward (through autograd and through the streamed backward's
    ``_softmax_backward``), for the strided factor slices the kernel feeds it."""
    from hf_attn.attention_lowrank import _softmax_backward, _softmax_last

    torch.manual_seed(0)
    logits = (torch.randn(2, 5, 3, 2 * width) * 4).transpose(1, 2)[..., width:]  # (B, H, L, m), strided
    logits.requires_grad_(True)
    grad = torch.randn(2, 3, 5, width)
    got = _softmax_last(logits)
    expected = torch.softmax(logits, dim=-1)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-7)
    got_grad, = torch.autograd.grad(got, logits, grad)
    expected_grad, = torch.autograd.grad(expected, logits, grad)
    torch.testing.assert_close(got_grad, expected_grad, rtol=1e-5, atol=1e-6)
    dx = torch.empty(2, 3, 5, width)
    _softmax_backward(dx, [got.detach()], [grad[:, :, None]], 5)  # the gradient in one chunk of 5 rows
    torch.testing.assert_close(dx, expected_grad, rtol=1e-5, atol=1e-6)


def test_streamed_path_builds_no_state_when_none_is_wanted():
    """Training (no cache) within one chunk: the streamed kernel reads no prefix and forms no k-slot
    features: no tensor of forward or backward is (C, k) or (k, C) (only the zero start state has k rows)."""
    mod = module(lowrank_chunk_size=16, lowrank_dim=36, lowrank_feature_map="product")  # a 6 x 6 grid
    q = torch.randn(1, 4, 16, 8, requires_grad=True)
    k, v = torch.randn(1, 2, 16, 8, requires_grad=True), torch.randn(1, 2, 16, 8, requires_grad=True)
    with ShapeProbe() as probe:
        out, _ = lowrank_attention_forward(mod, q, k, v, None, 8**-0.5)
        out.sum().backward()
    assert feature_factors(mod.config) == (6, 6)
    assert not any(sorted(shape[-2:]) == [16, 36] for shape in probe.shapes)
    assert any(shape[-2:] == (16, 16) for shape in probe.shapes)  # the in-chunk scores
