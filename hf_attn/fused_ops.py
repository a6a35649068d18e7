"""Training-time fusions of the model's small ops: RMSNorm, the SwiGLU gate and the LM loss.

Each one computes exactly what the plain PyTorch expression computes (tests compare values and
gradients); it only records fewer autograd nodes and keeps fewer tensors for the backward:

- ``rms_norm``: one node instead of the ~10 that ``F.rms_norm`` records on the CPU (torch has no CPU
  backward kernel for it); keeps the input and the (rows, 1) inverse RMS, and reduces with
  ``vector_norm`` / ``vecdot`` (one pass each).
- ``silu_mul``: ``silu(gate) * up`` from the fused ``gate_up`` tensor; keeps only that tensor (the
  plain form also keeps ``silu(gate)``) and writes both gradient halves into one buffer (no ``cat``).
  ``silu_mul_linear`` also applies a plain ``down_proj`` and recomputes the product in the backward,
  so the (tokens x I) product is not kept either; the backward works on 2048-row slices (an input of
  one slice also keeps ``silu(gate)``, no more than that slice's backward temporaries, and skips
  recomputing it; with the CPU kernels nothing more is kept: their one backward pass recomputes it).
- ``chunked_lm_loss``: next-token cross-entropy of ``head(hidden)`` computed ``chunk`` rows at a time,
  so the (tokens x vocab) logits are never held: for a plain ``nn.Linear`` head the gradient of each
  chunk is formed as it is computed; any other head (hooks, adapters, offload wrappers, autocast) is
  called as a module under activation checkpointing, so it sees every call.

On float32/float64 CPU tensors RMSNorm and ``silu_mul_linear`` run as C++ autograd nodes of
``cpu_kernels.py`` (one kernel pass each way, no Python in either direction) and ``silu_mul`` calls
its kernels from the function below; a backward that is itself recorded (double backward) uses
differentiable PyTorch (ATen) ops. The functions here are the PyTorch-ops forms.

The plain forms run whenever no gradient is recorded and while ``torch.compile``/``torch.export``
trace the model (the compiler fuses them there itself).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as _hooks
from torch.utils.checkpoint import checkpoint

from .cpu_kernels import usable


class _RMSNorm(torch.autograd.Function):
    """y = x * rsqrt(mean(x^2) + eps) * w over the last dim; x and w of one floating dtype, as a few
    PyTorch ops (the CPU kernels' node, ``rms_norm_node``, makes one pass each way)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])
        ctx.eps = eps
        # mean(x^2) from one fused reduction: (|x| / sqrt(C))^2
        rstd = torch.linalg.vector_norm(rows, dim=-1, keepdim=True).div_(x.shape[-1] ** 0.5)
        rstd = rstd.square_().add_(eps).rsqrt_()  # (rows, 1)
        ctx.save_for_backward(x, weight, rstd)  # the input itself: a double backward differentiates it
        return torch.mul(rows, rstd).mul_(weight).view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight, rstd = ctx.saved_tensors
        shape = x.shape
        rows, grad = x.reshape(-1, shape[-1]), grad.reshape(-1, shape[-1])
        need_x, need_w = ctx.needs_input_grad[:2]
        graph = torch.is_grad_enabled()  # the backward is recorded (double backward): out-of-place ops
        if graph:  # rstd as a function of x
            rstd = torch.rsqrt(rows.square().mean(-1, keepdim=True) + ctx.eps)
        normed = rows * rstd
        grad_weight = (grad * normed).sum(0) if need_w else None
        grad_x = None
        if need_x:
            grad_normed = grad * weight
            # d/dx of x * r(x): r * (g - x_hat * mean(g * x_hat))
            mean = torch.linalg.vecdot(grad_normed, normed).unsqueeze(-1).div_(rows.shape[-1])
            if graph:
                grad_x = ((grad_normed - normed * mean) * rstd).view(shape)
            else:
                grad_x = normed.mul_(mean).neg_().add_(grad_normed).mul_(rstd).view(shape)
        return grad_x, grad_weight, None


def norm_in_float32(norm, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``norm(x, weight)`` computed in float32 (float64 for float64 input) and returned in ``x``'s
    dtype; the common float32 case makes no casts. Shared by the model's norm layers."""
    dtype = x.dtype
    if dtype is torch.float32 and weight.dtype is torch.float32:
        return norm(x, weight)
    acc = torch.promote_types(dtype, torch.float32)
    return norm(x.to(acc), weight.to(acc)).to(dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, fused: bool) -> torch.Tensor:
    """RMSNorm of ``x`` scaled by ``weight``, computed in float32 (float64 for float64 input) and
    returned in ``x``'s dtype."""
    fused = fused and torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)

    def norm(x32: torch.Tensor, w32: torch.Tensor) -> torch.Tensor:
        if not fused:
            return F.rms_norm(x32, (x32.shape[-1],), w32, eps)
        kernels = usable(x32, w32)
        return kernels.rms_norm_node(x32, w32, eps) if kernels is not None else _RMSNorm.apply(x32, w32, eps)

    return norm_in_float32(norm, x, weight)


_ROWS = 2048  # rows per slice of the SwiGLU backward: bounds its temporaries to (rows, I)


def _silu_mul_grad(gate_up: torch.Tensor, grad: torch.Tensor, out: torch.Tensor, grad_is_scratch: bool = False,
                   silu: torch.Tensor | None = None) -> torch.Tensor:
    """Write d(silu(gate) * up)/d[gate | up] for ``grad`` into ``out`` (both (rows, 2I)); return the
    product ``silu(gate) * up`` (the ``down_proj`` weight gradient needs it). ``grad_is_scratch``:
    ``grad`` is a temporary of the caller and may be overwritten. ``silu``: ``silu(gate)`` kept by
    the forward (read, never written), else recomputed here."""
    gate, up = gate_up.chunk(2, dim=-1)
    grad_gate, grad_up = out.chunk(2, dim=-1)
    if silu is None:
        silu = F.silu(gate)
        product = silu
    else:
        product = torch.empty_like(silu)
    torch.mul(grad, silu, out=grad_up)
    grad_silu = grad.mul_(up) if grad_is_scratch else grad * up
    torch.ops.aten.silu_backward.grad_input(grad_silu, gate, grad_input=grad_gate)  # one fused kernel
    return torch.mul(silu, up, out=product)


def _silu_mul_grad_graph(gate_up: torch.Tensor, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(d(silu(gate) * up)/d[gate | up] for ``grad``, the product) as differentiable out-of-place ops:
    what a backward that builds a graph (double backward) computes."""
    gate, up = gate_up.chunk(2, dim=-1)
    sig = torch.sigmoid(gate)
    silu = gate * sig
    grad_gate = grad * up * sig * (1 + gate * (1 - sig))
    return torch.cat((grad_gate, grad * silu), dim=-1), silu * up


class _SiluMul(torch.autograd.Function):
    """silu(gate) * up, where ``gate_up = [gate | up]`` along the last dim."""

    @staticmethod
    def forward(ctx, gate_up: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(gate_up)
        ctx.kernels = usable(gate_up)
        if ctx.kernels is not None:
            rows = gate_up.reshape(-1, gate_up.shape[-1]).contiguous()
            return ctx.kernels.swiglu_fwd(rows).view(*gate_up.shape[:-1], -1)
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (gate_up,) = ctx.saved_tensors
        rows_in, rows_grad = gate_up.reshape(-1, gate_up.shape[-1]), grad.reshape(-1, grad.shape[-1])
        if torch.is_grad_enabled():  # double backward: a differentiable graph
            return _silu_mul_grad_graph(gate_up, grad)[0]
        grad_gate_up = torch.empty_like(rows_in, memory_format=torch.contiguous_format)
        if ctx.kernels is not None:
            ctx.kernels.swiglu_bwd(rows_in.contiguous(), rows_grad.contiguous(), grad_gate_up, None)
            return grad_gate_up.view_as(gate_up)
        for s in range(0, rows_in.shape[0], _ROWS):
            _silu_mul_grad(rows_in[s:s + _ROWS], rows_grad[s:s + _ROWS], grad_gate_up[s:s + _ROWS])
        return grad_gate_up.view_as(gate_up)


class _SiluMulLinear(torch.autograd.Function):
    """(silu(gate) * up) @ weight.T: the product is recomputed in the backward, slice by slice,
    so neither it nor its gradient is ever held for all rows. PyTorch ops; the CPU kernels' node
    (``swiglu_linear_node``) does the same with one pass each way."""

    @staticmethod
    def forward(ctx, gate_up: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        gate, up = gate_up.chunk(2, dim=-1)
        silu = F.silu(gate)
        out = F.linear(silu * up, weight)
        if gate_up.numel() <= _ROWS * gate_up.shape[-1]:
            # One slice: keeping silu(gate) costs no more than the slice temporary the backward
            # allocates anyway, and spares its recomputation.
            ctx.save_for_backward(gate_up, weight, silu)
        else:
            ctx.save_for_backward(gate_up, weight)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        gate_up, weight, *kept = ctx.saved_tensors
        rows_in, rows_grad = gate_up.reshape(-1, gate_up.shape[-1]), grad.reshape(-1, grad.shape[-1])
        if torch.is_grad_enabled():  # double backward: a differentiable graph (all rows at once)
            grad_gate_up, product = _silu_mul_grad_graph(rows_in, rows_grad @ weight)
            return grad_gate_up.view_as(gate_up), rows_grad.t() @ product
        silu = kept[0].reshape(-1, kept[0].shape[-1]) if kept else None
        grad_gate_up = torch.empty_like(rows_in) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros_like(weight) if ctx.needs_input_grad[1] else None
        for s in range(0, rows_in.shape[0], _ROWS):
            g, part = rows_grad[s:s + _ROWS], rows_in[s:s + _ROWS]
            if grad_gate_up is not None:
                kept = None if silu is None else silu[s:s + _ROWS]
                product = _silu_mul_grad(part, g @ weight, grad_gate_up[s:s + _ROWS], True, kept)
            else:
                gate, up = part.chunk(2, dim=-1)
                product = (F.silu(gate) if silu is None else silu[s:s + _ROWS]) * up
            if grad_weight is not None:
                grad_weight.addmm_(g.t(), product)
        return (grad_gate_up.view_as(gate_up) if grad_gate_up is not None else None), grad_weight


def silu_mul(gate_up: torch.Tensor, fused: bool) -> torch.Tensor:
    """The SwiGLU product ``silu(gate) * up`` of a ``[gate | up]`` tensor."""
    if fused and torch.is_grad_enabled() and gate_up.requires_grad:
        return _SiluMul.apply(gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def silu_mul_linear(gate_up: torch.Tensor, down: nn.Module, fused: bool) -> torch.Tensor:
    """``down(silu(gate) * up)``. While gradients are recorded and ``down`` is a plain ``nn.Linear``
    (no bias, hooks or adapter), one function that keeps only ``gate_up`` for the backward; otherwise
    ``down`` is called as a module."""
    if (fused and torch.is_grad_enabled() and plain_linear(down) and gate_up.dtype == down.weight.dtype
            and not torch.is_autocast_enabled(gate_up.device.type)
            and (gate_up.requires_grad or down.weight.requires_grad)):
        kernels = usable(gate_up, down.weight)
        if kernels is not None:
            return kernels.swiglu_linear_node(gate_up, down.weight, _ROWS)
        return _SiluMulLinear.apply(gate_up, down.weight)
    return down(silu_mul(gate_up, fused))


def _next_token_targets(labels: torch.Tensor | None, shift_labels: torch.Tensor | None, ignore_index: int) -> torch.Tensor:
    """Targets aligned with the logits: ``labels`` shifted left by one (the last position ignored),
    or ``shift_labels`` as given (already aligned), as transformers' ``ForCausalLMLoss`` does."""
    if shift_labels is not None:
        return shift_labels
    return F.pad(labels, (0, 1), value=ignore_index)[..., 1:]


class _LinearCrossEntropy(torch.autograd.Function):
    """sum over rows of cross_entropy(hidden @ weight.T, targets) / denominator, ``chunk`` rows at a
    time; the gradients are formed in the forward, chunk by chunk, and scaled in the backward.
    ``denominator`` ``None``: the targets that are not ``ignore_index`` (counted by the loss kernel).

    Per chunk it runs the kernels autograd runs for ``F.cross_entropy``: ``log_softmax`` and
    ``nll_loss`` (sum), and for the gradient ``nll_loss_backward`` (-1 at each counted target) and
    ``_log_softmax_backward_data`` (adds the softmax on counted rows), so ignored rows get 0."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk, ignore_index, denominator):
        acc = torch.promote_types(hidden.dtype, torch.float32)  # float32, or float64 for a float64 model
        need_hidden, need_weight = ctx.needs_input_grad[:2]
        grad_hidden = torch.empty_like(hidden) if need_hidden and hidden.shape[0] > chunk else None
        grad_weight = total = count = one = None
        aten = torch.ops.aten
        for start in range(0, hidden.shape[0], chunk):
            h, t = hidden[start:start + chunk], targets[start:start + chunk]
            log_probs = torch.log_softmax(h @ weight.t(), dim=-1, dtype=acc)  # (rows, vocab): the only one alive
            loss, counted = aten.nll_loss_forward(log_probs, t, None, 2, ignore_index)  # 2: reduction "sum"
            total, count = (loss, counted) if total is None else (total + loss, count + counted)
            if not (need_hidden or need_weight):
                continue
            # d loss / d logits = softmax - one_hot(target) on counted rows, 0 on ignored ones
            one = log_probs.new_ones(()) if one is None else one
            dlogits = aten._log_softmax_backward_data(
                aten.nll_loss_backward(one, log_probs, t, None, 2, ignore_index, counted), log_probs, -1, hidden.dtype)
            if need_hidden and grad_hidden is None:  # one chunk: the product is the whole gradient
                grad_hidden = dlogits @ weight
            elif need_hidden:
                torch.mm(dlogits, weight, out=grad_hidden[start:start + chunk])
            if need_weight:
                part = (dlogits.t().to(acc), h.to(acc))
                grad_weight = torch.mm(*part) if grad_weight is None else grad_weight.addmm_(*part)
        denominator = count if denominator is None else denominator
        ctx.weight_dtype = weight.dtype
        ctx.save_for_backward(grad_hidden, grad_weight, denominator)
        return total / denominator

    @staticmethod
    def backward(ctx, grad_loss):
        if torch.is_grad_enabled():
            # the gradients were formed in the forward, outside any graph: second derivatives would be wrong
            raise RuntimeError("double backward (create_graph=True) through the chunked LM loss is not supported; "
                               "set config.loss_chunk_size=0 to compute the loss over full logits")
        grad_hidden, grad_weight, denominator = ctx.saved_tensors
        scale = grad_loss / denominator
        gh = (grad_hidden * scale).to(grad_hidden.dtype) if grad_hidden is not None else None
        gw = (grad_weight * scale).to(ctx.weight_dtype) if grad_weight is not None else None
        return gh, gw, None, None, None, None


def _chunk_loss_sum(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor, ignore_index: int) -> torch.Tensor:
    logits = head(hidden)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return F.cross_entropy(logits, targets, ignore_index=ignore_index, reduction="sum")


def plain_linear(module: nn.Module) -> bool:
    """Whether calling ``module`` is exactly ``x @ weight.T``: a bias-free ``nn.Linear`` (not a
    subclass: no adapter, quantisation or parametrisation) with no hooks of its own or global ones, no
    replaced ``forward`` (accelerate's offload hooks) and real weights. Only then may a fused path
    use its weight without calling it; anything else is called as a module."""
    d = module.__dict__
    return (
        type(module) is nn.Linear
        and d["_parameters"].get("bias") is None
        and not (d["_forward_hooks"] or d["_forward_pre_hooks"] or d["_backward_hooks"] or d["_backward_pre_hooks"])
        and "forward" not in d and "_hf_hook" not in d
        and not (_hooks._global_forward_hooks or _hooks._global_forward_pre_hooks or _hooks._global_backward_hooks
                 or _hooks._global_backward_pre_hooks)
        and d["_parameters"]["weight"].device.type != "meta"
    )


def chunked_lm_loss(
    head: nn.Module,
    hidden: torch.Tensor,
    labels: torch.Tensor | None,
    chunk: int,
    num_items_in_batch: int | torch.Tensor | None = None,
    shift_labels: torch.Tensor | None = None,
    ignore_index: int = -100,
) -> torch.Tensor:
    """transformers' ``ForCausalLMLoss`` of ``head(hidden)`` without holding (tokens x vocab) logits.

    ``hidden`` (B, L, C); ``labels`` (B, L) are shifted here, ``shift_labels`` (B, L) are used as
    given. The mean is over targets != ``ignore_index``, or the sum divided by ``num_items_in_batch``
    when given (gradient accumulation). Equal to the unchunked loss and gradients up to float rounding.
    """
    targets = _next_token_targets(labels, shift_labels, ignore_index).reshape(-1).to(hidden.device)
    rows = hidden.reshape(-1, hidden.shape[-1])
    acc = torch.promote_types(hidden.dtype, torch.float32)
    denominator = None if num_items_in_batch is None else torch.as_tensor(num_items_in_batch, device=hidden.device).to(acc)
    autocast = torch.is_autocast_enabled(hidden.device.type)
    if plain_linear(head) and not autocast and rows.dtype == head.weight.dtype:
        return _LinearCrossEntropy.apply(rows, head.weight, targets, chunk, ignore_index, denominator)
    if denominator is None:
        denominator = (targets != ignore_index).sum().to(acc)
    total = rows.new_zeros((), dtype=denominator.dtype)
    for start in range(0, rows.shape[0], chunk):
        total = total + checkpoint(
            _chunk_loss_sum, head, rows[start:start + chunk], targets[start:start + chunk], ignore_index,
            use_reentrant=False,
        )
    return total / denominator
