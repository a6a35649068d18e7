"""hf_attn/cpu_kernels.py: the fused C++ kernels equal the PyTorch expressions (values and gradients,
float32 and float64, odd widths, several threads), run only where documented, and the
``HF_ATTN_CPU_KERNELS`` switch builds, falls back or raises as documented."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_config
from remote_code import run_without_hf_attn

from hf_attn import HfAttnForCausalLM, cpu_kernels

TOL = {torch.float64: 1e-12, torch.float32: 1e-5}


@pytest.fixture(scope="module")
def ext():
    """The compiled extension (built once per machine, then loaded from the cache)."""
    module = cpu_kernels.kernels()
    assert module is not None, cpu_kernels._state.get("error")
    return module


@pytest.fixture(params=[1, 2], ids=["1-thread", "2-threads"])
def threads(request):
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("width", [128, 7, 133])
def test_rms_norm_kernels_equal_the_plain_expression(ext, dtype, width, threads):
    torch.manual_seed(0)
    rows = 300  # several tasks per thread and more than one 64-row block of weight-gradient sums
    x = torch.randn(rows, width, dtype=dtype, requires_grad=True)
    w = (torch.randn(width, dtype=dtype) * 0.5 + 1).requires_grad_()
    g = torch.randn(rows, width, dtype=dtype)
    ref = F.rms_norm(x, (width,), w, 1e-5)
    ref_dx, ref_dw = torch.autograd.grad(ref, (x, w), g)
    out, rstd = ext.rms_norm_fwd(x.detach(), w.detach(), 1e-5)
    tol = TOL[dtype]
    torch.testing.assert_close(out, ref.detach(), rtol=tol, atol=tol)
    torch.testing.assert_close(rstd, torch.rsqrt(x.detach().square().mean(-1, keepdim=True) + 1e-5), rtol=tol, atol=tol)
    dx, dw = ext.rms_norm_bwd(g, x.detach(), w.detach(), rstd, True, True)
    torch.testing.assert_close(dx, ref_dx, rtol=tol, atol=tol)
    torch.testing.assert_close(dw, ref_dw, rtol=tol * 10, atol=tol * 10)
    only_w = ext.rms_norm_bwd(g, x.detach(), w.detach(), rstd, False, True)
    assert only_w[0] is None  # the input's gradient is not formed
    torch.testing.assert_close(only_w[1], dw, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("width", [344, 7])
def test_swiglu_kernels_equal_the_plain_expression(ext, dtype, width, threads):
    torch.manual_seed(0)
    gate_up = torch.randn(300, 2 * width, dtype=dtype) * 4  # silu's tails included
    gate_up[0, :3] = torch.tensor([-100.0, 100.0, 0.0], dtype=dtype)
    g = torch.randn(300, width, dtype=dtype)
    leaf = gate_up.clone().requires_grad_()
    gate, up = leaf.chunk(2, dim=-1)
    ref = F.silu(gate) * up
    (ref_grad,) = torch.autograd.grad(ref, (leaf,), g)
    tol = TOL[dtype]
    torch.testing.assert_close(ext.swiglu_fwd(gate_up), ref.detach(), rtol=tol, atol=tol)
    grad, product = torch.full_like(gate_up, float("nan")), torch.full_like(g, float("nan"))
    ext.swiglu_bwd(gate_up, g, grad, product)
    torch.testing.assert_close(grad, ref_grad, rtol=tol, atol=tol)
    torch.testing.assert_close(product, ref.detach(), rtol=tol, atol=tol)
    grad_only = torch.full_like(gate_up, float("nan"))
    ext.swiglu_bwd(gate_up, g, grad_only, None)  # the product is optional
    torch.testing.assert_close(grad_only, grad, rtol=0, atol=0)


def _textbook_rotation(x, cos, sin, sign=1.0):
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin * sign


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_rotate_kernel_equals_the_textbook_rotation_for_any_layout(ext, dtype, threads):
    """x in the projections' (B, L, H, D) memory or contiguous, cos/sin broadcast over batch or
    heads or written per head (the first heads read for grouped keys), +/- angle."""
    torch.manual_seed(0)
    b, heads, length, dim = 3, 4, 9, 10
    angles = torch.randn(b, length, dim // 2, dtype=dtype)
    cos, sin = torch.cat((angles, angles), -1).cos(), torch.cat((angles, angles), -1).sin()  # (B, L, D)
    transposed = torch.randn(b, length, heads, dim, dtype=dtype).transpose(1, 2)
    contiguous = torch.randn(b, 2, length, dim, dtype=dtype)
    tables = cos[:, None].expand(b, heads, length, dim).contiguous(), sin[:, None].expand(b, heads, length, dim)
    tol = TOL[dtype]
    for x in (transposed, contiguous):
        for c, s in ((cos[:, None], sin[:, None]), tables, (cos[:1, None], sin[:1, None])):
            cb, sb = (cos[:1, None], sin[:1, None]) if c.shape[0] == 1 else (cos[:, None], sin[:, None])
            for sign in (1.0, -1.0):
                got = ext.rotate(x, c, s, sign)
                torch.testing.assert_close(got, _textbook_rotation(x, cb, sb, sign), rtol=tol, atol=tol)
                assert got.stride() == x.stride()
    expanded = torch.randn(1, 1, length, dim, dtype=dtype).expand(b, heads, length, dim)  # not dense
    torch.testing.assert_close(ext.rotate(expanded, cos[:, None], sin[:, None], 1.0),
                               _textbook_rotation(expanded, cos[:, None], sin[:, None]), rtol=tol, atol=tol)


@pytest.mark.parametrize("kv_heads", [4, 2], ids=["mha", "gqa"])
def test_split_rotate_node_equals_split_then_rotate(ext, kv_heads, threads):
    """The node over the stacked q/k/v projection gives q and k rotated ((B, h, L, D)-contiguous) and v
    a view of the projection, and its backward the same gradient as splitting and rotating with
    PyTorch ops (float64), first and second derivatives (a recorded backward takes ATen ops)."""
    torch.manual_seed(0)
    b, heads, length, dim = 2, 4, 5, 8
    qkv = torch.randn(b, length, (heads + 2 * kv_heads) * dim, dtype=torch.float64, requires_grad=True)
    angles = torch.randn(b, length, dim // 2, dtype=torch.float64)
    cos, sin = torch.cat((angles, angles), -1).cos()[:, None], torch.cat((angles, angles), -1).sin()[:, None]
    q, k, v = ext.split_rotate_node(qkv, cos, sin, heads, kv_heads)
    rq, rk, rv = (t.view(b, length, -1, dim).transpose(1, 2)
                  for t in qkv.split_with_sizes([heads * dim, kv_heads * dim, kv_heads * dim], -1))
    expected = _textbook_rotation(rq, cos, sin), _textbook_rotation(rk, cos, sin), rv
    for got, want in zip((q, k, v), expected):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert q.is_contiguous() and k.is_contiguous() and v.data_ptr() == rv.data_ptr() and v.stride() == rv.stride()
    grads = [torch.randn_like(t) for t in (q, k, v)]
    (got,) = torch.autograd.grad((q, k, v), qkv, grads)
    (want,) = torch.autograd.grad(expected, qkv, grads)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradgradcheck(lambda x: ext.split_rotate_node(x, cos, sin, heads, kv_heads), (qkv,))


def test_apply_rotary_gives_the_kernel_any_strides(cpu_kernels):
    """q/k and cos/sin whose last axis is not contiguous are made so before the kernel reads them."""
    from hf_attn.attention_rope import _rotated, apply_rotary

    torch.manual_seed(0)
    q = torch.randn(2, 3, 8, 5, dtype=torch.float64).transpose(-1, -2).requires_grad_()  # last stride 5
    k = torch.randn(2, 3, 5, 8, dtype=torch.float64, requires_grad=True)
    angles = torch.randn(2, 5, 4, dtype=torch.float64)
    cos, sin = torch.cat((angles, angles), -1).cos(), torch.cat((angles, angles), -1).sin()
    strided_cos = cos.transpose(-1, -2).contiguous().transpose(-1, -2)
    got = apply_rotary(q, k, strided_cos, sin)
    c, s = cos[:, None, :, :4], sin[:, None, :, :4]
    for g, x in zip(got, (q, k)):
        torch.testing.assert_close(g, _rotated(x, c, s), rtol=1e-12, atol=1e-12)
    assert (cpu_kernels.calls == ["rotate_pair_node"]) == cpu_kernels.on


def test_kernels_reject_what_they_cannot_read(ext):
    with pytest.raises(RuntimeError, match="contiguous"):
        ext.rms_norm_fwd(torch.randn(4, 6).t(), torch.ones(4), 1e-6)
    with pytest.raises(RuntimeError, match="cos/sin"):
        ext.rotate(torch.randn(1, 2, 5, 8), torch.randn(1, 1, 4, 8), torch.randn(1, 1, 4, 8), 1.0)


def _step(model, ids):
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("mode,positions", [("rope", "rope"), ("eager", "absolute"), ("local", "rope")])
def test_training_step_with_kernels_equals_the_torch_ops(monkeypatch, mode, positions):
    """A float64 training step computes the same loss and gradients with and without the kernels, and
    the kernels do run in it (RMSNorm, SwiGLU and, with rotary positions, the rotation); a forward
    without gradients never calls them (inference stays on the PyTorch ops, no build needed)."""
    from conftest import KernelSpy

    torch.manual_seed(0)
    model = HfAttnForCausalLM(tiny_config(mode, positions)).double().train()
    ids = torch.randint(1, 97, (2, 12))
    monkeypatch.setenv(cpu_kernels.ENV_VAR, "0")
    ref_loss, ref_grads = _step(model, ids)
    monkeypatch.setenv(cpu_kernels.ENV_VAR, "1")
    spy = KernelSpy(cpu_kernels.kernels())
    monkeypatch.setitem(cpu_kernels._state, "module", spy)
    loss, grads = _step(model, ids)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=1e-12)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[name], rtol=1e-10, atol=1e-10, msg=name)
    expected = {"rms_norm_node", "swiglu_linear_node"} | ({"split_rotate_node"} if positions == "rope" else set())
    assert set(spy.calls) == expected
    spy.calls.clear()
    with torch.no_grad():
        model(input_ids=ids)
    assert spy.calls == []


def test_double_backward_through_the_kernel_paths_uses_differentiable_ops(cpu_kernels):
    """A gradient penalty (``create_graph=True``) through RMSNorm: the backward builds its graph from
    PyTorch ops, so second derivatives pass torch's numerical check with the kernels on too."""
    from hf_attn.fused_ops import rms_norm

    x = torch.randn(3, 4, 8, dtype=torch.float64, requires_grad=True)
    w = torch.randn(8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda a, b: rms_norm(a, b, 1e-6, fused=True), (x, w))
    assert ("rms_norm_node" in cpu_kernels.calls) == cpu_kernels.on


def test_switch_values(monkeypatch):
    for raw, value in (("auto", "auto"), ("1", "on"), ("0", "off"), ("OFF", "off"), ("", "auto")):
        monkeypatch.setenv(cpu_kernels.ENV_VAR, raw)
        assert cpu_kernels.choice() == value
    monkeypatch.setenv(cpu_kernels.ENV_VAR, "fast")
    with pytest.raises(ValueError, match=r"HF_ATTN_CPU_KERNELS='fast'.*'auto'.*'1'.*'0'"):
        cpu_kernels.choice()


def _failing_build():
    raise OSError("no C++ compiler")


def test_off_never_builds(monkeypatch):
    monkeypatch.setattr(cpu_kernels, "_build", _failing_build)
    monkeypatch.setattr(cpu_kernels, "_state", {})
    monkeypatch.setenv(cpu_kernels.ENV_VAR, "0")
    assert cpu_kernels.kernels() is None
    assert cpu_kernels._state == {}


def test_auto_falls_back_with_one_warning_and_on_raises(monkeypatch):
    monkeypatch.setattr(cpu_kernels, "_build", _failing_build)
    monkeypatch.setattr(cpu_kernels, "_state", {})
    monkeypatch.setenv(cpu_kernels.ENV_VAR, "auto")
    torch.manual_seed(0)
    model = HfAttnForCausalLM(tiny_config("rope", "rope")).train()
    ids = torch.randint(1, 97, (2, 8))
    with pytest.warns(RuntimeWarning, match="no C\\+\\+ compiler.*HF_ATTN_CPU_KERNELS=0"):
        model(input_ids=ids, labels=ids).loss.backward()  # trains on the PyTorch ops
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once: the next steps are silent
        model(input_ids=ids, labels=ids).loss.backward()
    monkeypatch.setenv(cpu_kernels.ENV_VAR, "1")
    with pytest.raises(RuntimeError, match="HF_ATTN_CPU_KERNELS=1.*no C\\+\\+ compiler"):
        model(input_ids=ids, labels=ids)


def test_remote_code_checkpoint_carries_the_kernels(tmp_path, ext):
    """A checkpoint saved with its code trains with the kernels in a process that cannot import
    hf_attn: the kernel source travels in cpu_kernels.py (the same source: the cached build)."""
    HfAttnForCausalLM(tiny_config("rope", "rope")).save_pretrained(tmp_path / "ckpt")
    result = run_without_hf_attn(
        f"""
        import os, sys
        os.environ["HF_ATTN_CPU_KERNELS"] = "1"
        import torch
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(tmp_path / "ckpt")!r}, trust_remote_code=True).train()
        ids = torch.randint(1, 97, (2, 8))
        model(input_ids=ids, labels=ids).loss.backward()
        kernels = sys.modules[type(model).__module__.rsplit(".", 1)[0] + ".cpu_kernels"]
        print("KERNELS", kernels._state["module"].__name__)
        """,
        cwd=tmp_path,
    )
    assert f"KERNELS {ext.__name__}" in result.stdout
