"""The chunked causal low-rank kernel equals its quadratic definition; Linformer equals its formula."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_config
from shape_probe import ShapeProbe

from hf_attn.attention_lowrank import LowRankStateCacheLayer, lowrank_attention_forward
from hf_attn.modeling_hf_attn import HfAttnAttention


def module(**kw) -> HfAttnAttention:
    torch.manual_seed(0)
    return HfAttnAttention(tiny_config("lowrank", **kw), layer_idx=0).eval()


def quadratic_reference(mod, q, k, v, key_mask):
    """out_i = sum_{j<=i} phi(q_i).phi(k_j) v_j / sum_{j<=i} phi(q_i).phi(k_j), built as an explicit matrix."""
    w = mod.feature_map.weight.t()
    fq, fk = torch.softmax(q @ w, -1), torch.softmax(k @ w, -1)
    fk = fk * key_mask[:, None, :, None]
    g = q.shape[1] // k.shape[1]
    fk, v = fk.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    a = (fq @ fk.transpose(-1, -2)).tril()  # (B, H, L, L)
    return ((a @ v) / (a.sum(-1, keepdim=True) + 1e-6)).transpose(1, 2)


@pytest.mark.parametrize("chunk", [1, 3, 4, 64])
def test_causal_kernel_matches_quadratic_definition(chunk):
    mod = module(lowrank_chunk_size=chunk)
    q, k, v = torch.randn(2, 4, 11, 8), torch.randn(2, 2, 11, 8), torch.randn(2, 2, 11, 8)
    key_mask = torch.ones(2, 11)
    key_mask[1, :3] = 0
    got, weights = lowrank_attention_forward(mod, q, k, v, key_mask.bool(), 8**-0.5)
    assert weights is None
    torch.testing.assert_close(got, quadratic_reference(mod, q, k, v, key_mask), rtol=1e-5, atol=1e-5)


def test_state_continues_exactly():
    """Prefix in one call + the rest token by token == everything in one call."""
    mod = module(lowrank_chunk_size=4)
    q, k, v = torch.randn(1, 4, 10, 8), torch.randn(1, 2, 10, 8), torch.randn(1, 2, 10, 8)
    whole, _ = lowrank_attention_forward(mod, q, k, v, None, 8**-0.5)
    layer = LowRankStateCacheLayer()
    parts = [lowrank_attention_forward(mod, q[:, :, :6], k[:, :, :6], v[:, :, :6], None, 8**-0.5, cache_layer=layer)[0]]
    for t in range(6, 10):
        sl = slice(t, t + 1)
        parts.append(lowrank_attention_forward(mod, q[:, :, sl], k[:, :, sl], v[:, :, sl], None, 8**-0.5, cache_layer=layer)[0])
    torch.testing.assert_close(torch.cat(parts, 1), whole, rtol=1e-5, atol=1e-5)
    assert [t.shape for t in layer.tensors()] == [(1, 2, 8, 9)]  # S (k x D) and z (k) side by side


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
    w = mod.feature_map.weight.double().t()
    fq, fk = torch.softmax(q.double() @ w, -1), torch.softmax(k @ w, -1) * key_mask[:, None, :, None].double()
    a = (fq @ fk.transpose(-1, -2)).tril()
    return ((a @ v) / (a.sum(-1, keepdim=True) + 1e-6)).transpose(1, 2)


# (length, chunk, rows per streamed block): one block, several blocks, a block ending mid-chunk
# (padded), blocks of one chunk
@pytest.mark.parametrize("length,chunk,rows", [(11, 4, 512), (23, 4, 8), (37, 8, 16), (5, 4, 8), (40, 4, 2)])
def test_streamed_path_gradients_match_quadratic_definition(monkeypatch, length, chunk, rows):
    """The training path (row blocks, hand-written backward that recomputes each block) gives the
    quadratic definition's output and gradients for q, k, v and the feature map, padding included."""
    import hf_attn.attention_lowrank as lowrank

    monkeypatch.setattr(lowrank, "_STREAM_ROWS", rows)
    mod = module(lowrank_chunk_size=chunk)
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


def test_streamed_path_saves_inputs_and_block_states_only(monkeypatch):
    """Saved for backward: q, k, v, the feature map and one (k, D + 1) state per block of rows;
    the largest tensor of forward + backward does not grow with n (no (n, k) feature map)."""
    import hf_attn.attention_lowrank as lowrank

    monkeypatch.setattr(lowrank, "_STREAM_ROWS", 64)
    largest = {}
    for n in (256, 512):
        mod = module(lowrank_chunk_size=16)
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
        assert saved == 3 * q.numel() + 8 * 8 + blocks * 4 * 8 * 9  # q, k, v, W (k x D), states (H, k, D + 1)
        # q, k, v and their gradients are (n, H, D); anything bigger would be an (n, k) buffer
        largest[n] = max(s for shape in probe.shapes if (s := torch.Size(shape).numel()) != q.numel())
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
