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
