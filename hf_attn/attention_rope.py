"""Rotary position embeddings, mode ``rope`` (and ``position_embedding_type="rope"`` for local/lowrank).

Paper: Su et al., "RoFormer: Enhanced Transformer with Rotary Position Embedding" (2021).
Math: rotate each pair of query/key channels (x1, x2) by angle ``p * theta^(-2i/D)``:
``rot(x) = x * cos + rotate_half(x) * sin`` with ``rotate_half(x1, x2) = (-x2, x1)``; then
``rot(q_m) . rot(k_n)`` depends only on m - n, so full attention with rope is invariant to shifting
all positions. The attention math itself is the
full softmax kernel of ``attention_eager``; this file only supplies positions.
Scaling for contexts longer than trained (``config.rope_scaling``):
- ``linear`` (Chen et al., "Position Interpolation", 2023): positions divided by ``factor``;
- ``dynamic`` (dynamic NTK, bloc97 / Code Llama style): once the sequence (cached + new tokens, a
  length the model knows without reading tensors) is longer than ``max_position_embeddings``, the
  base grows to ``theta * (factor * n / max_pos - (factor - 1)) ** (D / (D - 2))`` with n that
  length; below it, plain rope. (Not the largest position id: reading it would stop compiled graphs.)
Shapes: cos/sin (B, L, D) broadcast over heads; q (B, H, L, D), k (B, Hkv, L, D).
Cost: O(n * D). Positions the model made itself (each below the sequence length) index a cos/sin
table, sized from ``max_position_embeddings`` and doubled only for longer sequences; the caller's
position ids (any values) and traced graphs get angles computed from the ids, as transformers does.
The rotation (``apply_rotary``) rotates q and k in one autograd node. With the CPU kernels of
``cpu_kernels.py`` (training steps on float32/float64 CPU tensors) it is a C++ node that reads cos/sin
(B, L, D) as they are, and the attention layer takes ``split_rotate`` instead: one node from the stacked
q/k/v projection to rotated q, k and v, whose backward writes the projection's gradient in one pass.
Otherwise it reads cos/sin written out per head (B, H, L, 1.5 D floats, ``rotary_head_tables``), which
the model builds once per forward and hands to every layer.
Limits: dynamic NTK changes every position's angle once the length passes the trained length, so
keys cached before that point were rotated with the old base (as in other dynamic-NTK implementations).
"""

from __future__ import annotations

import torch
from torch import nn

from .cpu_kernels import usable


def apply_rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q (B, H, L, D) and k (B, Hkv, L, D): ``x * cos + rotate_half(x) * sin``. cos/sin are
    (B, L, D) as ``HfAttnRotary`` builds them (both halves of the last axis equal), or the per-head
    tables ``rotary_head_tables`` makes of them (4-D: built once, shared by every layer)."""
    if torch.compiler.is_compiling():
        # torch.compile / torch.export: the plain formula, which the compiler fuses itself (the eager
        # kernel's in-place writes into strided halves are not traceable); the model passes (B, L, D)
        half = cos.shape[-1] // 2
        cos, sin = cos[..., :half].unsqueeze(1), sin[..., :half].unsqueeze(1)  # (B, 1, L, D/2)
        return _rotated(q, cos, sin), _rotated(k, cos, sin)
    kernels = rotary_kernels(q, k, cos, sin)
    if kernels is not None:  # one pass over q and k, reading cos/sin (B, L, D) or the tables
        if cos.dim() == 3:
            cos, sin = cos[:, None], sin[:, None]
        return tuple(kernels.rotate_pair_node(q, k, _unit_last(cos), _unit_last(sin)))
    if cos.dim() == 3:
        cos, sin = rotary_head_tables(cos, sin, max(q.shape[1], k.shape[1]))
    return _RotatePair.apply(q, k, cos, sin)


def split_rotate(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: int,
                 kv_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """q (B, H, L, D) and k (B, Hkv, L, D) rotated, and v, from the stacked q/k/v projection
    (B, L, (H + 2 Hkv) D), as one C++ node of the CPU kernels (``split_rotate_node``: its backward
    writes the projection's whole gradient, q and k rotated back, in one pass); ``None`` when the
    kernels do not apply or cos/sin are per-head tables (then split and call ``apply_rotary``)."""
    if cos.dim() != 3:
        return None
    kernels = rotary_kernels(qkv, cos, sin)  # None while torch.compile / torch.export trace the model
    if kernels is None:
        return None
    return tuple(kernels.split_rotate_node(qkv, _unit_last(cos[:, None]), _unit_last(sin[:, None]), heads, kv_heads))


def rotary_kernels(*tensors: torch.Tensor):
    """The fused CPU kernels (``cpu_kernels``) when they rotate these tensors: a training step
    (gradients recorded for the first) on float32/float64 CPU tensors of one dtype; else ``None``."""
    if not (torch.is_grad_enabled() and tensors[0].requires_grad):
        return None
    return usable(*tensors)


def _rotated(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The rotation as out-of-place ops: (x1 cos - x2 sin, x2 cos + x1 sin), cos/sin the first halves."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def rotary_head_tables(cos: torch.Tensor, sin: torch.Tensor, heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos (B, L, D) and the first half of sin as (B, heads, L, D) and (B, heads, L, D/2) tables.

    On the CPU they are written out per head, in the (B, L, heads, .) order of the projections'
    memory: an elementwise op over a (B, H, L, D/2) half of q that broadcasts a table over the heads
    runs about 3x slower there than one whose operands all step through the heads. Elsewhere they
    are broadcast views (one head, no copy)."""
    half = cos.shape[-1] // 2
    if cos.device.type != "cpu":
        return cos[:, None], sin[:, None, :, :half]
    b, length, width = cos.shape
    cos_t = cos[:, :, None].expand(b, length, heads, width).contiguous().transpose(1, 2)
    sin_t = sin[:, :, None, :half].expand(b, length, heads, half).contiguous().transpose(1, 2)
    return cos_t, sin_t


class _RotatePair(torch.autograd.Function):
    """The rotation of q and k in one autograd node, with nothing saved but the (shared) tables; the
    backward is the rotation by the opposite angle. (The CPU kernels' node, ``rotate_pair_node``,
    does the same with one pass per tensor, reading cos/sin (B or 1, 1, L, D) as they are.)

    Per tensor one full-width product and two half-width fused multiply-adds, with no
    ``rotate_half`` copy: ``out = x cos``, then ``out1 -= x2 sin``, ``out2 += x1 sin`` (cos full
    width, both halves equal; sin its first half). The outputs keep the strides of q and k (the
    projections' (B, L, H, D) layout) and the dtype ``x * cos`` would have.
    """

    @staticmethod
    def forward(ctx, q, k, cos, sin):
        ctx.save_for_backward(cos, sin)
        ctx.dtypes = (q.dtype, k.dtype)
        return _rotate(q, cos, sin, 1.0), _rotate(k, cos, sin, 1.0)

    @staticmethod
    def backward(ctx, grad_q, grad_k):
        cos, sin = ctx.saved_tensors
        dtype_q, dtype_k = ctx.dtypes
        # the rotation by the opposite angle, written with differentiable ops (double backward works)
        return (_rotate(grad_q, cos, sin, -1.0).to(dtype_q), _rotate(grad_k, cos, sin, -1.0).to(dtype_k),
                None, None)


def _unit_last(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, sign: float) -> torch.Tensor:
    """x (B, h, L, D) rotated by +angle (sign 1) or -angle (sign -1); cos (B, >= h heads, L, D),
    sin (B, >= h heads, L, D/2)."""
    heads, half = x.shape[1], x.shape[-1] // 2
    if cos.shape[1] != heads:  # grouped-query keys read the first heads of the query-sized tables
        cos, sin = cos[:, :heads], sin[:, :heads]
    out = torch.mul(x, cos)
    out[..., :half].addcmul_(x[..., half:], sin, value=-sign)
    out[..., half:].addcmul_(x[..., :half], sin, value=sign)
    return out


class HfAttnRotary(nn.Module):
    """Computes (cos, sin) for position ids; holds no weights and no state-dict buffers."""

    def __init__(self, config) -> None:
        super().__init__()
        self.dim = config.head_dim
        params = config.rope_parameters
        self.base = float(params["rope_theta"])
        self.max_positions = config.max_position_embeddings
        self.scaling_type = params["rope_type"]  # "default", "linear" or "dynamic"
        self.factor = float(params.get("factor", 1.0))
        # (device, length) -> (cos, sin) float32 tables (L, D); a plain dict, so it never enters the state dict
        self._tables: dict[tuple[torch.device, int], tuple[torch.Tensor, torch.Tensor]] = {}

    def _inv_freq(self, base: float | torch.Tensor, device: torch.device) -> torch.Tensor:
        return 1.0 / base ** (torch.arange(0, self.dim, 2, device=device, dtype=torch.float32) / self.dim)

    def _angles(self, positions: torch.Tensor, base: float | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions.float()[..., None] * self._inv_freq(base, positions.device)  # (..., D/2)
        if self.scaling_type == "linear":
            freqs = freqs / self.factor
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos(), emb.sin()

    def _table(self, length: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        # Tables grow in powers of two from the trained length, so generation rebuilds them O(log n) times.
        size = self.max_positions
        while size < length:
            size *= 2
        key = (device, size)
        if key not in self._tables:
            self._tables.clear()
            self._tables[key] = self._angles(torch.arange(size, device=device), self.base)
        return self._tables[key]

    def _dynamic_base(self, seq_len: int | torch.Tensor) -> float | torch.Tensor:
        """Dynamic NTK's base for a sequence of ``seq_len`` tokens: a float for a Python int; a 0-dim
        tensor, computed in the graph with no host read, for a tensor length (static caches count on
        the device) or a symbolic one (torch.export / dynamic torch.compile: no guard on its size)."""
        if isinstance(seq_len, torch.SymInt):  # a traced graph's symbolic length: no guard on its size
            seq_len = torch.scalar_tensor(seq_len, dtype=torch.float32)
        if isinstance(seq_len, torch.Tensor):
            ratio = (self.factor * seq_len.float() / self.max_positions - (self.factor - 1)).clamp(min=1.0)
            return self.base * ratio ** (self.dim / (self.dim - 2))
        if seq_len <= self.max_positions:
            return self.base
        ratio = self.factor * seq_len / self.max_positions - (self.factor - 1)
        return self.base * ratio ** (self.dim / (self.dim - 2))

    @torch.no_grad()
    def forward(
        self,
        position_ids: torch.Tensor,
        dtype: torch.dtype,
        seq_len: int | torch.Tensor | None = None,
        own_positions: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """position_ids (B, L) -> cos, sin (B, L, D) in ``dtype``. Never reads tensor values on the
        host, so the same code runs eagerly, under ``torch.compile`` and in ``torch.export``.

        Args:
            seq_len: tokens of the sequence after this call (cached + L): a Python int, or a 0-dim
                tensor for static caches; ``None`` means L. Dynamic NTK scales by it.
            own_positions: the ids are the model's own count (each < ``seq_len``), so a table of
                ``seq_len`` rows (at least ``max_position_embeddings``) covers them; otherwise
                (the caller's ids, any values) the angles are computed from the ids.
        """
        if seq_len is None:
            seq_len = position_ids.shape[-1]
        base = self._dynamic_base(seq_len) if self.scaling_type == "dynamic" else self.base
        use_table = (
            own_positions
            and isinstance(seq_len, int)
            and isinstance(base, float)
            and base == self.base
            and seq_len <= 8 * self.max_positions  # far beyond the trained length: no giant table
            and not torch.compiler.is_compiling()  # traced graphs compute the angles (no module state to fill)
        )
        if use_table:
            cos_table, sin_table = self._table(seq_len, position_ids.device)
            cos, sin = cos_table[position_ids], sin_table[position_ids]
        else:
            cos, sin = self._angles(position_ids, base)
        return cos.to(dtype), sin.to(dtype)
