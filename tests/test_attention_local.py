"""The blocked local kernel equals dense masked attention, and never builds an n x n tensor."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_config
from shape_probe import ShapeProbe

from hf_attn.attention_eager import eager_attention_forward
from hf_attn.attention_local import SlidingWindowCacheLayer, local_attention_forward
from hf_attn.modeling_hf_attn import HfAttnAttention


def dense_reference(q, k, v, key_mask, window, is_causal):
    """O(n^2) masked softmax over the window, for comparison only."""
    lq, lk = q.shape[2], k.shape[2]
    qpos = torch.arange(lk - lq, lk)[:, None]
    kpos = torch.arange(lk)[None]
    allowed = (kpos > qpos - window) & ((kpos <= qpos) if is_causal else (kpos < qpos + window))
    mask = allowed[None, None] & (key_mask[:, None, None, :] if key_mask is not None else True)
    mask = mask | (kpos == qpos)
    return eager_attention_forward(torch.nn.Identity(), q, k, v, mask, q.shape[-1] ** -0.5, is_causal=False)[0]


def module(window: int, **kw) -> HfAttnAttention:
    return HfAttnAttention(tiny_config("local", sliding_window=window, **kw), layer_idx=0).eval()


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
@pytest.mark.parametrize(
    "is_causal,length,window,cached",
    # (a cache, i.e. keys before the first query, only exists for causal models)
    [(True, 17, 4, 0), (True, 8, 8, 0), (True, 3, 5, 0), (True, 5, 4, 3), (True, 1, 4, 3), (True, 6, 3, 9),
     (False, 17, 4, 0), (False, 8, 8, 0), (False, 3, 5, 0)],
)
def test_matches_dense_reference(implementation, is_causal, length, window, cached):
    torch.manual_seed(0)
    q = torch.randn(2, 4, length, 8)
    k, v = torch.randn(2, 2, cached + length, 8), torch.randn(2, 2, cached + length, 8)
    key_mask = torch.ones(2, cached + length, dtype=torch.bool)
    key_mask[1, :2] = False  # left padding in row 1
    mod = module(window)
    got, weights = local_attention_forward(mod, q, k, v, key_mask, 8**-0.5, is_causal=is_causal, implementation=implementation)
    expected = dense_reference(q, k, v, key_mask, window, is_causal)
    real = key_mask[:, cached:]  # padding rows hold arbitrary (finite) values
    torch.testing.assert_close(got[real], expected[real], rtol=1e-5, atol=1e-5)
    assert torch.isfinite(got).all()
    if implementation == "eager":
        assert weights.shape[:4] == (2, 4, -(-length // window), window)


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_no_square_tensor_anywhere(implementation):
    n, window = 256, 16
    q, k, v = torch.randn(1, 4, n, 8), torch.randn(1, 2, n, 8), torch.randn(1, 2, n, 8)
    key_mask = torch.ones(1, n, dtype=torch.bool)
    key_mask[0, :5] = False
    q.requires_grad_(True)
    with ShapeProbe() as probe:
        out, _ = local_attention_forward(module(window), q, k, v, key_mask, 8**-0.5, implementation=implementation)
        out.sum().backward()
    assert not probe.has_square(n)
    assert probe.largest <= 4 * n * 3 * window  # heads x n x span, with slack for the 3w bidirectional span


def test_cache_layer_keeps_window_minus_one():
    layer = SlidingWindowCacheLayer(window=4)
    k = torch.arange(10.0).view(1, 1, 10, 1)
    full_k, _ = layer.update(k, k)
    assert full_k.shape[2] == 10 and layer.keys.flatten().tolist() == [7.0, 8.0, 9.0]
    step_k, _ = layer.update(torch.full((1, 1, 1, 1), 10.0), torch.zeros(1, 1, 1, 1))
    assert step_k.flatten().tolist() == [7.0, 8.0, 9.0, 10.0]
    assert layer.keys.flatten().tolist() == [8.0, 9.0, 10.0]


@pytest.mark.parametrize("is_causal,length,cached", [(True, 23, 0), (True, 5, 2), (False, 23, 0), (True, 8, 0)])
def test_recomputing_path_gradients_match_eager(monkeypatch, is_causal, length, cached):
    """The grouped sdpa path (backward recomputes each group) gives the eager path's gradients."""
    import hf_attn.attention_local as local

    monkeypatch.setattr(local, "_GROUP_ROWS", 8)  # several groups of 2 blocks of w = 4
    torch.manual_seed(0)
    q = torch.randn(2, 4, length, 8)
    k, v = torch.randn(2, 2, cached + length, 8), torch.randn(2, 2, cached + length, 8)
    key_mask = torch.ones(2, cached + length, dtype=torch.bool)
    key_mask[1, :3] = False
    grad_out = torch.randn(2, length, 4, 8)
    results = []
    for implementation in ("eager", "sdpa"):
        inputs = [t.clone().requires_grad_(True) for t in (q, k, v)]
        out, _ = local_attention_forward(module(4), *inputs, key_mask, 8**-0.5, is_causal=is_causal,
                                         implementation=implementation)
        (out * grad_out).sum().backward()
        results.append([out] + [t.grad for t in inputs])
    for eager, grouped in zip(*results):
        torch.testing.assert_close(grouped, eager, rtol=1e-5, atol=1e-5)


def test_recomputing_path_keeps_memory_linear():
    """Saved tensors are q, k, v and the block mask: no padded or gathered (2x) key windows."""
    n, window = 512, 16
    q = torch.randn(1, 4, n, 8, requires_grad=True)
    k, v = torch.randn(1, 2, n, 8, requires_grad=True), torch.randn(1, 2, n, 8, requires_grad=True)
    out, _ = local_attention_forward(module(window), q, k, v, None, 8**-0.5)
    node = out.grad_fn  # the row slice, then the blocked function
    while "BlockedLocalAttention" not in type(node).__name__:
        node = node.next_functions[0][0]
    floats = [t.numel() for t in node.saved_tensors if t.dtype != torch.bool]
    assert sum(floats) == q.numel() + k.numel() + v.numel()  # q, k, v themselves: no padded or gathered copies


@pytest.mark.parametrize("cached", [0, 2, 3, 9])
def test_single_token_fast_path_matches_dense_reference(cached):
    """Decoding one unpadded token skips the blocks; the result is still the windowed attention."""
    torch.manual_seed(0)
    q = torch.randn(2, 4, 1, 8)
    k, v = torch.randn(2, 2, cached + 1, 8), torch.randn(2, 2, cached + 1, 8)
    got, _ = local_attention_forward(module(4), q, k, v, None, 8**-0.5)
    expected = dense_reference(q, k, v, None, 4, True)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
