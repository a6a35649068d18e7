"""Rotary embeddings: relative-position property, scaling rules, no state-dict entries."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_config

from hf_attn import HfAttnForCausalLM
from hf_attn.attention_rope import HfAttnRotary, apply_rotary


def rotary(**kw) -> HfAttnRotary:
    return HfAttnRotary(tiny_config("rope", **kw))


def test_dot_products_depend_only_on_offset():
    rot = rotary()
    q, k = torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8)
    scores = []
    for start in (0, 5, 93):
        pos = torch.tensor([[start, start + 7]])
        cos, sin = rot(pos, torch.float32)
        rq, _ = apply_rotary(q, k, cos[:, :1], sin[:, :1])
        _, rk = apply_rotary(q, k, cos[:, 1:], sin[:, 1:])
        scores.append((rq * rk).sum())
    torch.testing.assert_close(scores[0], scores[1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(scores[0], scores[2], rtol=1e-4, atol=1e-4)


def test_linear_scaling_divides_positions():
    plain, linear = rotary(), rotary(rope_scaling={"type": "linear", "factor": 4.0})
    cos_lin, sin_lin = linear(torch.tensor([[8, 20]]), torch.float32)
    cos_ref, sin_ref = plain(torch.tensor([[2, 5]]), torch.float32)
    torch.testing.assert_close(cos_lin, cos_ref)
    torch.testing.assert_close(sin_lin, sin_ref)


def test_dynamic_ntk_is_plain_within_trained_length_and_stretches_beyond():
    plain, dynamic = rotary(), rotary(rope_scaling={"type": "dynamic", "factor": 2.0})
    short = torch.arange(100)[None]
    torch.testing.assert_close(dynamic(short, torch.float32)[0], plain(short, torch.float32)[0])
    long = torch.arange(400)[None]  # beyond max_position_embeddings=128: a larger base, slower rotation
    cos_dyn, _ = dynamic(long, torch.float32)
    cos_plain, _ = plain(long, torch.float32)
    assert not torch.allclose(cos_dyn, cos_plain)
    # the lowest frequency channel rotates slower with the stretched base
    assert torch.acos(cos_dyn[0, 1, 3].clamp(-1, 1)) < torch.acos(cos_plain[0, 1, 3].clamp(-1, 1))


def test_rope_model_has_no_position_weights_and_runs_past_trained_length():
    model = HfAttnForCausalLM(tiny_config("rope", rope_scaling={"type": "dynamic", "factor": 2.0})).eval()
    assert not any("position" in name or "rotary" in name for name in model.state_dict())
    with torch.no_grad():
        out = model(torch.randint(1, 97, (1, 300))).logits  # max_position_embeddings is 128
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("table_dtype", [torch.float64, torch.float32])
def test_fused_rotation_matches_textbook_form_and_gradients(table_dtype, cpu_kernels):
    """``apply_rotary``'s fused passes (the CPU kernel, or half-width PyTorch ops) equal
    ``x * cos + rotate_half(x) * sin``, values and gradients, for the projections' transposed layout,
    grouped-query keys and mixed dtypes (float32 tables for float64 q/k: the PyTorch ops)."""
    def rotate_half(x):  # the textbook (x1, x2) -> (-x2, x1), as Llama writes it
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((-x2, x1), dim=-1)

    torch.manual_seed(0)
    cos, sin = rotary()(torch.arange(7)[None].expand(2, 7), table_dtype)  # (B, L, D)
    q = torch.randn(2, 7, 4, 8, dtype=torch.float64).transpose(1, 2).requires_grad_(True)  # (B, H, L, D) view
    k = torch.randn(2, 7, 2, 8, dtype=torch.float64).transpose(1, 2).requires_grad_(True)
    rq, rk = apply_rotary(q, k, cos, sin)
    c, s = cos[:, None].double(), sin[:, None].double()
    eq, ek = q * c + rotate_half(q) * s, k * c + rotate_half(k) * s
    torch.testing.assert_close(rq, eq, rtol=1e-7, atol=1e-7)
    torch.testing.assert_close(rk, ek, rtol=1e-7, atol=1e-7)
    assert rq.stride() == q.stride()  # the (B, L, H, D) memory layout is kept
    grads = torch.randn_like(rq), torch.randn_like(rk)
    got = torch.autograd.grad((rq, rk), (q, k), grads)
    expected = torch.autograd.grad((eq, ek), (q, k), grads)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-7, atol=1e-7)
    kernel_ran = cpu_kernels.calls == ["rotate_pair_node"]  # q and k, forward and backward in its C++ node
    assert kernel_ran == (cpu_kernels.on and table_dtype == torch.float64)
    bq = torch.randn(1, 4, 7, 8, dtype=torch.bfloat16)  # bf16 activations, wider tables -> their dtype, as x * cos
    assert apply_rotary(bq, bq, cos[:1], sin[:1])[0].dtype == table_dtype


def test_rotation_supports_double_backward(cpu_kernels):
    """The rotation's backward is itself the rotation by the opposite angle, recorded with
    differentiable ops when it builds a graph (the kernel's first backward included): second
    derivatives (``create_graph=True``, e.g. gradient penalties) pass torch's numerical check."""
    cos, sin = rotary()(torch.arange(5)[None], torch.float64)
    q = torch.randn(1, 4, 5, 8, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 2, 5, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda a, b: apply_rotary(a, b, cos, sin), (q, k))
    assert ("rotate_pair_node" in cpu_kernels.calls) == cpu_kernels.on


def test_tables_are_sized_from_lengths_never_from_position_values():
    """The model's own positions (below ``seq_len``, a Python int) index a table of
    ``max_position_embeddings`` rows doubled until it covers ``seq_len``; the caller's ids, whatever
    their values, get angles computed from them (equal to the table's) and never grow a table."""
    rot = rotary()  # max_position_embeddings=128
    positions = torch.arange(300)[None]
    from_table = rot(positions, torch.float32, seq_len=300, own_positions=True)
    assert [size for _, size in rot._tables] == [512]
    computed = rot(positions, torch.float32)
    torch.testing.assert_close(from_table, computed, rtol=0, atol=1e-6)
    rot(torch.tensor([[10**7]]), torch.float32)
    assert [size for _, size in rot._tables] == [512]


def test_dynamic_ntk_scales_by_the_sequence_length_cache_included():
    """A decoding step is scaled as its whole sequence (cached + new tokens), whether that length is a
    Python int (dynamic caches) or a 0-dim tensor (static caches count on the device)."""
    dynamic = rotary(rope_scaling={"type": "dynamic", "factor": 2.0})
    whole = dynamic(torch.arange(300)[None], torch.float32)  # seq_len defaults to the ids' length
    last = torch.tensor([[299]])
    for seq_len in (300, torch.tensor(300)):
        step = dynamic(last, torch.float32, seq_len=seq_len)
        torch.testing.assert_close(step[0], whole[0][:, -1:])
        torch.testing.assert_close(step[1], whole[1][:, -1:])
    plain = rotary()(last, torch.float32)
    torch.testing.assert_close(dynamic(last, torch.float32, seq_len=torch.tensor(128))[0], plain[0])


def test_rotation_tables_are_built_once_per_forward_and_follow_in_place_changes():
    """The model builds the per-head tables once per forward and every layer gets the same objects;
    ``apply_rotary`` on (B, L, D) cos/sin builds them itself, so an in-place change of cos/sin is
    always seen and a pair of fresh tensors rotates the same."""
    from hf_attn.attention_rope import _RotatePair, rotary_head_tables
    from hf_attn.modeling_hf_attn import HfAttnModel

    model = HfAttnModel(tiny_config("rope"))
    seen = []
    for layer in model.layers:
        layer.self_attn.register_forward_pre_hook(lambda m, args: seen.append(args[3]))
    with torch.no_grad():
        model(input_ids=torch.randint(1, 97, (2, 6)))
    assert len(seen) == 2 and all(a is b for a, b in zip(*seen))  # the same tables in both layers
    assert seen[0][0].shape == (1, 4, 6, 8) and seen[0][1].shape == (1, 4, 6, 4)

    torch.manual_seed(0)
    cos, sin = rotary()(torch.arange(5)[None], torch.float32)  # (1, L, D)
    q = torch.randn(2, 5, 4, 8).transpose(1, 2)
    k = torch.randn(2, 5, 2, 8).transpose(1, 2)
    first = rotary_head_tables(cos, sin, 4)
    assert first[0].shape == (1, 4, 5, 8) and first[1].shape == (1, 4, 5, 4)
    torch.testing.assert_close(first[0], cos[:, None].expand(1, 4, 5, 8), rtol=0, atol=0)
    torch.testing.assert_close(first[1], sin[:, None, :, :4].expand(1, 4, 5, 4), rtol=0, atol=0)
    before = apply_rotary(q, k, cos, sin)
    for a, b in zip(before, apply_rotary(q, k, *first)):  # prebuilt tables rotate the same
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    cos.mul_(-1)  # cos and sin of the angle + pi: every output flips sign
    sin.mul_(-1)
    after = apply_rotary(q, k, cos, sin)
    for a, b in zip(before, after):
        torch.testing.assert_close(b, -a, rtol=0, atol=0)
    fresh = apply_rotary(q, k, cos.clone(), sin.clone())
    for a, b in zip(after, fresh):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # the broadcast (one-head) tables other devices get rotate the same
    broadcast = _RotatePair.apply(q, k, cos[:, None], sin[:, None, :, :4])
    for a, b in zip(after, broadcast):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_rope_model_under_inference_mode_matches_no_grad():
    """Inference tensors keep no version counter: their rotation tables are built per call, with the
    same logits as under no_grad."""
    torch.manual_seed(0)
    model = HfAttnForCausalLM(tiny_config("rope")).eval()
    ids = torch.randint(1, 97, (2, 9))
    with torch.no_grad():
        expected = model(ids).logits
    with torch.inference_mode():
        got = model(ids).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
