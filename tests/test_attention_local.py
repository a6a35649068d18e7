"""The blocked local kernel equals dense masked attention, and never builds an n x n tensor."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_config
from shape_probe import ShapeProbe
from transformers import DynamicCache
from transformers.cache_utils import DynamicSlidingWindowLayer

from hf_attn.attention_eager import eager_attention_forward
from hf_attn.attention_local import local_attention_forward
from hf_attn.modeling_hf_attn import HfAttnAttention, HfAttnForCausalLM


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
    cache = DynamicCache(config=tiny_config("local", sliding_window=4))  # what generate() builds
    layer = cache.layers[0]
    assert isinstance(layer, DynamicSlidingWindowLayer) and layer.sliding_window == 4
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


def _saved_floats(out, name):
    """Numel of the float tensors saved by the autograd node called ``name`` behind ``out``."""
    node = out.grad_fn
    while name not in type(node).__name__:
        node = node.next_functions[0][0]
    return sum(t.numel() for t in node.saved_tensors if t.dtype != torch.bool)


def test_recomputing_path_keeps_memory_linear():
    """Saved tensors are q, k, v and the block mask: no padded or gathered (2x) key windows."""
    n, window = 512, 16
    q = torch.randn(1, 4, n, 8, requires_grad=True)
    k, v = torch.randn(1, 2, n, 8, requires_grad=True), torch.randn(1, 2, n, 8, requires_grad=True)
    key_mask = torch.ones(1, n, dtype=torch.bool)
    key_mask[0, :3] = False  # padding takes the recomputing path
    out, _ = local_attention_forward(module(window), q, k, v, key_mask, 8**-0.5)
    saved = _saved_floats(out, "BlockedLocalAttention")
    assert saved == q.numel() + k.numel() + v.numel()  # q, k, v themselves: no padded or gathered copies


# (length, window, chunk, group rows): heads only, exact chunks, a tail chunk, window not a multiple
# of the chunk (per-chunk fold), one-row chunks, several groups
BANDED_CASES = [(13, 16, 8, 16), (64, 16, 8, 16), (70, 16, 8, 24), (33, 16, 16, 16), (90, 12, 8, 16),
                (200, 32, 16, 64), (9, 2, 2, 4), (5, 1, 1, 2)]


@pytest.mark.parametrize("length,window,chunk,group", BANDED_CASES)
@pytest.mark.parametrize("scratch", [False, True])
def test_banded_path_matches_dense_reference(monkeypatch, length, window, chunk, group, scratch):
    """No padding, no cache (training): the banded flash path's output and gradients equal dense
    masked attention, for grouped-query heads and queries in the (B, H, L, D) transposed layout the
    projections produce, with equal or different forward/backward chunks; with ``scratch_output``
    the backward reuses the output's memory."""
    import hf_attn.attention_local as local

    monkeypatch.setattr(local, "_BAND_CHUNK_FORWARD", chunk)
    monkeypatch.setattr(local, "_BAND_CHUNK_BACKWARD", max(1, chunk // 2) if length % 2 else chunk)
    monkeypatch.setattr(local, "_BAND_GROUP_ROWS", group)
    monkeypatch.setattr(local, "_BAND_GROUP_ROWS_FORWARD", 2 * group)
    torch.manual_seed(0)
    q = torch.randn(2, length, 4, 8, dtype=torch.float64).transpose(1, 2)  # (B, H, L, D) view of (B, L, H, D)
    k, v = (torch.randn(2, length, 2, 8, dtype=torch.float64).transpose(1, 2) for _ in range(2))
    q, k, v = (t.requires_grad_(True) for t in (q, k, v))
    grad_out = torch.randn(2, length, 4, 8, dtype=torch.float64)
    expected = dense_reference(q, k, v, None, window, True)
    expected_grads = torch.autograd.grad(expected, (q, k, v), grad_out)
    mod = HfAttnAttention(tiny_config("local", sliding_window=window), layer_idx=0).train()
    got, _ = local_attention_forward(mod, q, k, v, None, 8**-0.5, scratch_output=scratch)
    # no longer than the window: plain causal attention is exact and takes over
    assert ("BandedLocalAttention" in type(got.grad_fn).__name__) == (length > window)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    kept = grad_out.clone()
    grads = torch.autograd.grad(got, (q, k, v), kept)
    for g, e in zip(grads, expected_grads):
        torch.testing.assert_close(g, e, rtol=1e-6, atol=1e-6)
    if not scratch:  # the caller's tensors are untouched unless it declared them scratch
        torch.testing.assert_close(kept, grad_out, rtol=0, atol=0)
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)


def test_banded_path_saves_no_windows_and_no_square():
    """Saved: q, k, v, the output and (B, L, H) statistics; no (n, n) tensor in forward or backward."""
    n, window = 256, 16
    q = torch.randn(1, n, 4, 8).transpose(1, 2).requires_grad_(True)
    k, v = (torch.randn(1, n, 4, 8).transpose(1, 2).requires_grad_(True) for _ in range(2))
    with ShapeProbe() as probe:
        out, _ = local_attention_forward(module(window, num_key_value_heads=4), q, k, v, None, 8**-0.5)
        saved = _saved_floats(out, "BandedLocalAttention")
        out.sum().backward()
    assert not probe.has_square(n)
    assert saved == 4 * q.numel() + n * 4  # q, k, v, out + one statistic per (row, head)


def test_banded_path_retained_graph_backward_twice():
    """With ``retain_graph=True`` nothing is reused: a second backward gives the same gradients."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 40, 2, 8).transpose(1, 2).requires_grad_(True) for _ in range(3))
    out, _ = local_attention_forward(module(8, num_key_value_heads=2), q, k, v, None, 8**-0.5,
                                     scratch_output=True)
    grad = torch.randn(1, 40, 2, 8)
    first = torch.autograd.grad(out, (q, k, v), grad.clone(), retain_graph=True)
    second = torch.autograd.grad(out, (q, k, v), grad.clone())
    for a, b in zip(first, second):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_model_training_gradients_match_eager_path():
    """Through the model (which declares the kernel output scratch), the banded path's parameter
    gradients equal those of the explicit blocked ("eager") path."""
    cfg = tiny_config("local", sliding_window=4)
    torch.manual_seed(0)
    x = torch.randint(1, 97, (2, 23))
    grads = []
    for implementation in ("sdpa", "eager"):
        torch.manual_seed(0)
        model = HfAttnForCausalLM(cfg).train()
        model.config._attn_implementation = implementation
        model(x, labels=x).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("cached", [0, 2, 3, 9])
def test_single_token_fast_path_matches_dense_reference(cached):
    """Decoding one unpadded token skips the blocks; the result is still the windowed attention."""
    torch.manual_seed(0)
    q = torch.randn(2, 4, 1, 8)
    k, v = torch.randn(2, 2, cached + 1, 8), torch.randn(2, 2, cached + 1, 8)
    got, _ = local_attention_forward(module(4), q, k, v, None, 8**-0.5)
    expected = dense_reference(q, k, v, None, 4, True)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


# (batch, length, window, chunk, group rows, call kinds _band_calls makes in the forward): one chunk of
# every batch row per call ("batched"), several chunks of one batch row per call ("rows"), and a
# sequence of at most two chunks as one masked call ("whole"), alone or split over batch slices
BATCHED_CASES = [(5, 40, 8, 8, 64, "batched"), (3, 37, 8, 8, 16, "batched"), (4, 60, 8, 4, 8, "batched"),
                 (2, 100, 8, 4, 64, "rows"), (6, 24, 16, 16, 64, "whole"), (7, 12, 8, 8, 16, "whole")]


def _call_kind(calls) -> str:
    """How ``_band_calls`` grouped its calls: "whole", "batched" or "rows"."""
    if all(chunks == 0 for *_, chunks, _rows in calls):
        return "whole"
    return "batched" if any(b1 - b0 > 1 for b0, b1, _, chunks, _rows in calls if chunks) else "rows"


@pytest.mark.parametrize("batch,length,window,chunk,group,kind", BATCHED_CASES)
@pytest.mark.parametrize("scratch", [False, True])
def test_banded_path_batched_calls_match_dense_reference(monkeypatch, batch, length, window, chunk, group, kind,
                                                         scratch):
    """Batches of several rows in float64: the banded path's calls over several batch rows at once
    (one chunk per batch row, or a short sequence in one masked call) give dense masked attention's
    output and gradients, grouped-query heads included; ``_band_calls`` covers every query row once,
    in increasing start for each batch row."""
    import hf_attn.attention_local as local

    monkeypatch.setattr(local, "_BAND_CHUNK_FORWARD", chunk)
    monkeypatch.setattr(local, "_BAND_CHUNK_BACKWARD", chunk)
    monkeypatch.setattr(local, "_BAND_GROUP_ROWS", group)
    monkeypatch.setattr(local, "_BAND_GROUP_ROWS_FORWARD", group)
    monkeypatch.setattr(local, "_BAND_WHOLE_ROWS", 3 * length)  # "whole" cases split over batch slices
    calls = local._band_calls(batch, length, window, chunk, group)
    assert _call_kind(calls) == kind
    for row in range(batch):
        spans = [(start, start + max(chunks, 1) * rows if chunks else rows)
                 for b0, b1, start, chunks, rows in calls if b0 <= row < b1]
        assert spans[0][0] == 0 and spans[-1][1] == length
        assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))  # contiguous, in order
    torch.manual_seed(0)
    q = torch.randn(batch, length, 4, 8, dtype=torch.float64).transpose(1, 2)  # (B, H, L, D) view of (B, L, H, D)
    k, v = (torch.randn(batch, length, 2, 8, dtype=torch.float64).transpose(1, 2) for _ in range(2))
    q, k, v = (t.requires_grad_(True) for t in (q, k, v))
    grad_out = torch.randn(batch, length, 4, 8, dtype=torch.float64)
    expected = dense_reference(q, k, v, None, window, True)
    expected_grads = torch.autograd.grad(expected, (q, k, v), grad_out)
    mod = HfAttnAttention(tiny_config("local", sliding_window=window), layer_idx=0).train()
    got, _ = local_attention_forward(mod, q, k, v, None, 8**-0.5, scratch_output=scratch)
    assert "BandedLocalAttention" in type(got.grad_fn).__name__
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    grads = torch.autograd.grad(got, (q, k, v), grad_out.clone())
    for g, e in zip(grads, expected_grads):
        torch.testing.assert_close(g, e, rtol=1e-6, atol=1e-6)


def test_banded_calls_batch_short_sequences_into_few_calls():
    """The small-model shape (12 rows of 64 tokens, w = 32): one flash call each way; a long sequence
    in a batch of one keeps several chunks per call."""
    import hf_attn.attention_local as local

    for chunk, group in ((local._BAND_CHUNK_FORWARD, local._BAND_GROUP_ROWS_FORWARD),
                         (min(32, local._BAND_CHUNK_BACKWARD), local._BAND_GROUP_ROWS)):
        assert local._band_calls(12, 64, 32, chunk, group) == [(0, 12, 0, 0, 64)]
        assert len(local._band_calls(12, 256, 32, chunk, group)) == 1 + (256 - 32) // chunk
    long = local._band_calls(1, 16384, 256, 32, 4096)
    assert len(long) == 1 + -(-(16384 - 256) // 4096)


@pytest.mark.parametrize("forward_chunk,backward_chunk", [(4, 16), (16, 4)])
def test_banded_path_whole_call_in_one_direction_only(monkeypatch, forward_chunk, backward_chunk):
    """The forward and the backward chunk differently, so one may be a single whole-sequence call while
    the other runs in chunks: the statistics pass between the two layouts."""
    import hf_attn.attention_local as local

    monkeypatch.setattr(local, "_BAND_CHUNK_FORWARD", forward_chunk)
    monkeypatch.setattr(local, "_BAND_CHUNK_BACKWARD", backward_chunk)
    length, window = 30, 16
    kinds = [_call_kind(local._band_calls(3, length, window, c, 512)) for c in (forward_chunk, backward_chunk)]
    assert sorted(kinds) == ["batched", "whole"]
    torch.manual_seed(0)
    q, k, v = (torch.randn(3, length, 2, 8, dtype=torch.float64).transpose(1, 2).requires_grad_(True)
               for _ in range(3))
    grad_out = torch.randn(3, length, 2, 8, dtype=torch.float64)
    expected = dense_reference(q, k, v, None, window, True)
    expected_grads = torch.autograd.grad(expected, (q, k, v), grad_out)
    mod = HfAttnAttention(tiny_config("local", sliding_window=window, num_key_value_heads=2), layer_idx=0).train()
    got, _ = local_attention_forward(mod, q, k, v, None, 8**-0.5, scratch_output=True)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    for g, e in zip(torch.autograd.grad(got, (q, k, v), grad_out.clone()), expected_grads):
        torch.testing.assert_close(g, e, rtol=1e-6, atol=1e-6)
