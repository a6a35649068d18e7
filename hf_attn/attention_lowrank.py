"""Low-rank attention, mode ``lowrank``; k = ``config.lowrank_dim``.

Bidirectional (``is_causal=False``): exact Linformer (Wang et al., "Linformer: Self-Attention with
Linear Complexity", 2020). Keys and values are projected along the sequence axis to k slots,
``K' = E K``, ``V' = F V`` with learned E, F of shape (k, max_position_embeddings), then
``out = softmax(q K'^T * scaling) V'``. E and F are indexed by position id, so left padding does not
shift the projection, and padding tokens are zeroed before projecting. Cost O(n * k).

Causal (the default): plain Linformer mixes future tokens into every slot, so a causal LM cannot use
it. We factorise the attention matrix through a non-negative rank-k feature map instead
(Katharopoulos et al., "Transformers are RNNs", 2020; Choromanski et al., "Performer", 2021):
``out_i = phi(q_i) S_i / (phi(q_i) . z_i)``, ``S_i = sum_{j<=i} phi(k_j) v_j^T``, ``z_i = sum_{j<=i} phi(k_j)``.
The attention matrix ``phi(Q) phi(K)^T`` (masked to j <= i, rows normalised) has rank <= k: each key
writes into k soft slots, each query reads them, like Linformer's k compressed positions but
assigned by content, so a prefix is summarised without seeing the future.
``config.lowrank_feature_map`` picks phi, a distribution over the k slots:
``"softmax"``: ``phi(x) = softmax(x W)`` with learned W (D, k);
``"product"``: the slots form an m1 x m2 grid (k = m1 * m2, 16 x 16 for k = 256) and
``phi(x) = softmax(x W1) (outer) softmax(x W2)`` with W1 (D, m1), W2 (D, m2), as in product-key
memories (Lample et al., "Large Memory Layers with Product Keys", 2019). The product map costs
2 D (m1 + m2) per token instead of 2 D k, and a query-key score factorises,
``phi(q).phi(k) = (a_q.a_k)(b_q.b_k)``, so the in-chunk scores cost C (m1 + m2) instead of C k.
The rank bound is the same; each token's distribution is less free (a product of two).
The prefix sums run in chunks of ``config.lowrank_chunk_size``: exact within a chunk, carried
state across chunks, so time is O(n * k * D). Without a past state (training, full-sequence
inference, a prompt) the chunks are streamed in blocks of rows by ``_StreamedCausalLowRank``, whose
backward recomputes one block's features and chunk states at a time: saved memory is q, k, v, the
output and its normaliser plus one (k, D + 1) state per block, and no step allocates an (n, k)
buffer. Generation steps after the prompt run their chunks at once through the same block code,
from the cached state. Generation keeps only (S, z): a constant (B, Hkv, k, D + 1) state per layer.
Traced graphs (``torch.compile``, ``torch.export``) run every row as one block of plain ops with
autograd's backward (O(n * k) saved features instead of O(block)); a dynamic length in
``torch.export`` makes the whole sequence one chunk (O(n^2) in-chunk scores, see ``_float_inputs``).
Shapes: query (B, H, L, D); key, value (B, Hkv, L, D); output (B, L, H, D).
Weights returned with ``output_attentions``: bidirectional -> (B, H, L, k) softmax over the k slots;
causal -> ``None`` (the n x n matrix is never formed).
Limits: causal mode approximates softmax attention with a rank-k kernel (weaker at exact recall);
with rotary positions the features depend on absolute position (not shift-invariant); the
bidirectional projection covers at most ``max_position_embeddings`` positions.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .attention_eager import eager_attention_forward, sdpa_attention_forward
from .cache_hf_attn import lowrank_state, set_lowrank_state
from .configuration_hf_attn import lowrank_grid

# Keeps the normaliser of a query that has seen only padding away from 0/0.
_EPS = 1e-6


def init_lowrank_module(module: nn.Module, config) -> None:
    """Add the mode's parameters to an attention module."""
    if config.is_causal:
        module.feature_map = nn.Linear(config.head_dim, sum(feature_factors(config)), bias=False)
    else:
        shape, std = (config.lowrank_dim, config.max_position_embeddings), linformer_init_std(config)
        module.linformer_e = nn.Parameter(torch.randn(shape) * std)
        module.linformer_f = nn.Parameter(torch.randn(shape) * std)


def linformer_init_std(config) -> float:
    """Xavier-normal std of a (k, max_positions) projection, as in the Linformer reference code."""
    return math.sqrt(2.0 / (config.lowrank_dim + config.max_position_embeddings))


def lowrank_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    *,
    is_causal: bool = True,
    cache_layer=None,
    position_ids: torch.Tensor | None = None,
    implementation: str = "sdpa",
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Causal feature-map attention or bidirectional Linformer (see the module docstring).

    Args:
        attention_mask: (B, L) bool key padding mask (``True`` = real token) or ``None``.
        cache_layer: causal generation state (a linear-attention cache layer holding the
            (B, Hkv, k, D + 1) state): read before and written after this call.
        position_ids: (B or 1, L) positions indexing the Linformer projections (bidirectional only).
    """
    if not is_causal:
        return _linformer(module, query, key, value, attention_mask, scaling, dropout, position_ids, implementation)
    return _causal_feature_map(module, query, key, value, attention_mask, cache_layer)


def _linformer(module, query, key, value, attention_mask, scaling, dropout, position_ids, implementation):
    length = key.shape[2]
    if position_ids is None:
        position_ids = torch.arange(length, device=key.device)[None]
    if attention_mask is not None:
        keep = attention_mask[:, None, :, None].to(key.dtype)  # (B, 1, L, 1)
        key, value = key * keep, value * keep
    e = module.linformer_e[:, position_ids].permute(1, 0, 2).to(key.dtype)  # (B or 1, k, L)
    f = module.linformer_f[:, position_ids].permute(1, 0, 2).to(value.dtype)
    key = torch.matmul(e[:, None], key)  # (B, Hkv, k, D)
    value = torch.matmul(f[:, None], value)  # (B, Hkv, k, D)
    kernel = eager_attention_forward if implementation == "eager" else sdpa_attention_forward
    return kernel(module, query, key, value, None, scaling, dropout, is_causal=False)


def _causal_feature_map(module, query, key, value, attention_mask, cache_layer):
    # Prefix sums in low precision drift; the whole kernel runs in float32 even under autocast.
    with torch.autocast(device_type=query.device.type, enabled=False):
        q, k, v, mask, chunk, g = _float_inputs(module, query, key, value, attention_mask)
        sizes = feature_factors(module.config)
        past = lowrank_state(cache_layer) if cache_layer is not None else None
        if past is None and not torch.compiler.is_compiling():
            # training, full-sequence inference, a prompt: streamed, O(block) memory; the state after
            # the last row only when a cache keeps it
            want_state = cache_layer is not None
            out, end_state = _StreamedCausalLowRank.apply(q, k, v, mask, chunk, sizes, want_state)
        else:
            # generation: this call's chunks at once, from the cached state; and torch.compile /
            # torch.export, which trace this one block with autograd's backward (the streamed
            # Function loops over row blocks in Python, so a graph would exist per length)
            block = _Block(q, k, v, sizes, mask, chunk, None if past is None else past.repeat_interleave(g, dim=1))
            out, _ = _normalise(block.y(), q.shape[2])
            end_state = block.end_state if cache_layer is not None else None
        if cache_layer is not None:
            # the g heads of a group hold one state
            set_lowrank_state(cache_layer, end_state[:, ::g].contiguous(), query.shape[2])
    # out is a (B, H, L, D) view of (B, L, H, D) memory (see the streamed forward): no copy here
    return out.transpose(1, 2).to(query.dtype).contiguous(), None


def lowrank_features(attn: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The k-slot feature map phi of a causal low-rank attention module, as its kernel computes it:
    the module's ``feature_map`` logits, one softmax per factor (``feature_factors``), and their outer
    product flattened (``"product"`` map) or the single softmax (``"softmax"`` map).
    (..., D) -> (..., k), float32."""
    weight_dtype = next(attn.feature_map.parameters()).dtype
    logits = attn.feature_map(x.to(weight_dtype)).float()
    factors = [torch.softmax(part, dim=-1) for part in logits.split(feature_factors(attn.config), dim=-1)]
    if len(factors) == 1:
        return factors[0]
    a, b = factors
    return (a[..., :, None] * b[..., None, :]).flatten(-2)


def lowrank_scores(module: nn.Module, query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """Unnormalised causal scores (B, H, L, L) of one call: ``phi(q_i) . phi(k_j)`` for j <= i, else 0
    (non-negative); keys repeated to the query heads. O(L^2 * k) time, O(L^2) memory."""
    groups = query.shape[1] // key.shape[1]
    fk = lowrank_features(module, key).repeat_interleave(groups, dim=1)  # (B, H, L, k)
    return (lowrank_features(module, query) @ fk.transpose(-1, -2)).tril()


def lowrank_dense_weights(module: nn.Module, weights: torch.Tensor | None, query: torch.Tensor, key: torch.Tensor,
                          value: torch.Tensor, attention_mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                          **kwargs) -> torch.Tensor:
    """``config.output_attentions_layout="dense"``: the (B, H, L, L) token weights the layer implies.

    Causal: phi(q_i) . phi(k_j) over unpadded j <= i, rows normalised (the kernel divides by the row
    sum + 1e-6); O(L^2 * k), for the whole sequence in one call (the model refuses a cache with a
    past). Bidirectional (Linformer): the (B, H, L, k) slot weights times the value projection F over
    the tokens, since out = P (F V) = (P F) V; rows need not sum to 1."""
    if not module.config.is_causal:
        length = key.shape[2]
        if position_ids is None:
            position_ids = torch.arange(length, device=key.device)[None]
        f = module.linformer_f[:, position_ids].permute(1, 0, 2).to(weights.dtype)  # (B or 1, k, L)
        if attention_mask is not None:
            f = f * attention_mask[:, None, :].to(f.dtype)
        return torch.matmul(weights, f[:, None])  # (B, H, L, k) @ (B or 1, 1, k, L)
    scores = lowrank_scores(module, query, key)
    if attention_mask is not None:
        scores = scores * attention_mask[:, None, None, :].to(scores.dtype)
    return (scores / scores.sum(-1, keepdim=True).clamp_min(torch.finfo(scores.dtype).tiny)).to(query.dtype)


# Rows per block of the streamed path (rounded to whole chunks): each block's feature maps,
# chunk states and their gradients are a few MB, so no step allocates O(n * k) at once.
_STREAM_ROWS = 512


def feature_factors(config) -> tuple[int, ...]:
    """Sizes of the softmax factors whose outer product is the k-slot feature map: ``(k,)`` for
    ``lowrank_feature_map="softmax"``, ``(m1, m2)`` with ``m1 * m2 = k`` and ``m1 <= m2`` as close
    as possible for ``"product"`` (16 x 16 for k = 256)."""
    if config.lowrank_feature_map == "softmax":
        return (config.lowrank_dim,)
    return lowrank_grid(config.lowrank_dim)


def _float_inputs(module, query, key, value, attention_mask):
    """float32 feature logits of the queries (B, H, L, M) and keys (repeated to the query heads),
    values (B, H, L, D), float padding mask or None, chunk length and group size g = H / Hkv.

    The logits come from calling ``module.feature_map`` (an ``nn.Linear`` from D to M = the sum of
    the factor sizes) as a module, so its hooks run (accelerate offload, PEFT adapters) and autograd
    differentiates it; the kernel below only sees logits.
    """
    g = query.shape[1] // key.shape[1]
    dtype = next(module.feature_map.parameters()).dtype  # autocast is off here: inputs in the weight's dtype
    # on the (B, L, H, D) layout the projections produced (q, k arrive as transposed views of it): the
    # linear reads it without a copy, and its gradient comes back in that layout
    q, k = (module.feature_map(t.to(dtype).transpose(1, 2)).float().transpose(1, 2) for t in (query, key))
    v = value.float()
    if g > 1:
        k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
    mask = attention_mask.float() if attention_mask is not None else None
    length = query.shape[2]
    # torch.export with a dynamic length: ceil(L / C) chunks give shapes whose divisibility its symbolic
    # shapes cannot prove, so the whole sequence is one chunk (the in-chunk form, O(L^2) scores)
    whole = isinstance(length, torch.SymInt) and torch.compiler.is_exporting()
    chunk = length if whole else min(module.config.lowrank_chunk_size, length)
    return q, k, v, mask, chunk, g


# Softmax widths below this go through the transposed layout on the CPU (``_softmax_last``).
_NARROW_SOFTMAX = 16


def _softmax_last(x: torch.Tensor) -> torch.Tensor:
    """``torch.softmax(x, -1)``. The CPU kernel vectorises along the softmax axis, so a narrow one (a
    product map's factors: 8 wide for k = 64) runs row by row, about 10x slower than softmax over the
    second-last axis of the transposed view, where it vectorises across rows; same math, equal up to
    float rounding. Traced graphs keep the plain op (the compiler writes its own kernel)."""
    if x.shape[-1] < _NARROW_SOFTMAX and x.device.type == "cpu" and not torch.compiler.is_compiling():
        return torch.softmax(x.transpose(-1, -2), dim=-2).transpose(-1, -2)
    return torch.softmax(x, dim=-1)


def _factor_softmax(logits, sizes):
    """One softmax per factor of the feature logits: a list of (..., m_f)."""
    if len(sizes) == 1:
        return [_softmax_last(logits)]
    return [_softmax_last(part) for part in logits.split(sizes, dim=-1)]


def _outer(factors):
    """The k-slot features: the outer product of the factors, flattened (a product of
    distributions, so non-negative and summing to 1 like a single softmax)."""
    if len(factors) == 1:
        return factors[0]
    a, b = factors
    return (a[..., :, None] * b[..., None, :]).flatten(-2)


def _chunks(t, rows, chunk):
    """(B, H, R, c) -> (B, H, chunks, C, c), zero rows appended up to whole chunks."""
    pad = -rows % chunk
    if pad:
        t = F.pad(t, (0, 0, 0, pad))
    return t.view(t.shape[0], t.shape[1], -1, chunk, t.shape[-1])


class _Block:
    """Causal feature-map attention of one row block that starts from the prefix ``state``
    (B, H, k, D + 1), or from zeros when ``state`` is None. Holds the tensors the backward reuses, in
    chunks (B, H, nc, C, .): query and key factors (keys' first factor zeroed at padding, so a padded
    key writes nothing), the values with a ones column, the in-chunk score factors and their masked
    product. The k-slot features, the state each chunk starts from and ``end_state`` after the block
    are computed on first use: a block of one chunk from zeros (a training sequence no longer than a
    chunk) reads no prefix, so it needs none of them unless the state after it is wanted."""

    def __init__(self, q, k, v, sizes, mask, chunk, state, keep_factor_scores=True):
        rows = q.shape[2]
        self.qf_soft = _factor_softmax(q, sizes)  # (B, H, R, m_f) each, from the logits q, k
        self.kf_soft = _factor_softmax(k, sizes)
        kf = list(self.kf_soft)
        if mask is not None:
            kf[0] = kf[0] * mask[:, None, :, None]
        self.qf = [_chunks(t, rows, chunk) for t in self.qf_soft]
        self.kf = [_chunks(t, rows, chunk) for t in kf]
        self.v1 = _chunks(F.pad(v, (0, 1), value=1.0), rows, chunk)  # (B, H, nc, C, D + 1)
        self.slots = math.prod(sizes)
        self.state = state
        # whether some chunk starts from a state that is not zero (and so reads the prefix)
        self.reads = state is not None or self.v1.shape[2] > 1
        # in-chunk scores phi(q_i) . phi(k_j) = prod_f (a_f(q_i) . a_f(k_j)): C x C per factor,
        # never the C x k features (the product map's saving)
        # (``keep_factor_scores=False``: the product overwrites the first factor's scores, one (C, C)
        # buffer fewer; the in-place ops only outside autograd)
        self.factor_scores = [a @ b.transpose(-1, -2) for a, b in zip(self.qf, self.kf)]
        scores = self.factor_scores
        if len(scores) == 1:
            self.scores = scores[0].tril()
        else:
            self.scores = (scores[0] * scores[1] if keep_factor_scores else scores[0].mul_(scores[1])).tril_()

    # computed on first use and kept (plain attributes rather than functools.cached_property, whose
    # lock torch.compile cannot trace)
    def _memo(self, name, compute):
        value = self.__dict__.get(name)
        if value is None:
            value = self.__dict__[name] = compute()
        return value

    @property
    def fq(self) -> torch.Tensor:
        """Query k-slot features (B, H, nc, C, k)."""
        return self._memo("_fq", lambda: _outer(self.qf))

    @property
    def fk(self) -> torch.Tensor:
        """Key k-slot features (B, H, nc, C, k)."""
        return self._memo("_fk", lambda: _outer(self.kf))

    @property
    def writes(self) -> torch.Tensor:
        """What each chunk adds to the state (B, H, nc, k, D + 1)."""
        return self._memo("_writes", lambda: self.fk.transpose(-1, -2) @ self.v1)

    @property
    def prefix(self) -> torch.Tensor:
        """The state each chunk starts from (B, H, nc, k, D + 1): the block's start plus every earlier
        chunk's writes."""
        return self._memo("_prefix", self._prefix)

    def _prefix(self) -> torch.Tensor:
        start = self.state
        if start is None:
            start = self.v1.new_zeros(*self.v1.shape[:2], self.slots, self.v1.shape[-1])
        if self.v1.shape[2] == 1:
            return start[:, :, None]
        return _running_sum(start, self.writes)

    @property
    def end_state(self) -> torch.Tensor:
        """The state after the block (B, H, k, D + 1)."""
        last = self.writes[:, :, -1]
        return self.prefix[:, :, -1] + last if self.reads else last

    def y(self):
        """Unnormalised result (B, H, nc, C, D + 1): in-chunk part plus the read of the prefix."""
        y = self.scores @ self.v1
        return y + self.fq @ self.prefix if self.reads else y


def _running_sum(start, terms, reverse=False):
    """Exclusive running sum over the chunk axis: ``out[:, :, c] = start + terms[:, :, :c].sum(2)``
    (with ``reverse``, over the chunks after c), added chunk by chunk into one buffer. A block has
    few chunks, so this beats cumsum + cat, and it never subtracts (inclusive - own would cancel
    large terms in float32). Traced graphs take one cumsum over [start, terms[:-1]] instead: the
    same additions in the same order, without a Python loop over a (possibly symbolic) chunk count."""
    if torch.compiler.is_compiling():
        if reverse:
            return _running_sum(start, terms.flip(2)).flip(2)
        return torch.cat([start[:, :, None], terms[:, :, :-1]], dim=2).cumsum(2)
    out = torch.empty_like(terms)
    order = range(terms.shape[2] - 1, -1, -1) if reverse else range(terms.shape[2])
    tracked = torch.is_grad_enabled() and (start.requires_grad or terms.requires_grad)
    prev = None
    for c in order:
        if prev is None:
            out[:, :, c] = start
        elif tracked:  # generation under autograd: differentiable in-place writes
            out[:, :, c] = out[:, :, prev] + terms[:, :, prev]
        else:
            torch.add(out[:, :, prev], terms[:, :, prev], out=out[:, :, c])
        prev = c
    return out


def _normalise(y: torch.Tensor, rows: int, out: torch.Tensor | None = None,
               z_out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, H, nc, C, D + 1) -> numerator over normaliser (B, H, rows, D), normaliser (B, H, rows),
    written into ``out`` and ``z_out`` when given."""
    b, h = y.shape[:2]
    y = y.view(b, h, -1, y.shape[-1])[:, :, :rows]
    z = torch.add(y[..., -1], _EPS, out=z_out)
    return torch.div(y[..., :-1], z[..., None], out=out), z


def _factor_grads(dfeatures, factors):
    """Gradient of the flattened outer product w.r.t. each factor."""
    if len(factors) == 1:
        return [dfeatures]
    a, b = factors
    d = dfeatures.unflatten(-1, (a.shape[-1], b.shape[-1]))
    return [(d * b[..., None, :]).sum(-1), (d * a[..., :, None]).sum(-2)]


def _normaliser_backward(grad_out, out, z):
    """dy (B, H, R, D + 1) of ``out = y[..., :D] / z``, ``z = y[..., D] + eps``: (go / z, -(go . out) / z),
    written into one buffer without temporaries."""
    dy = grad_out.new_empty(*grad_out.shape[:-1], grad_out.shape[-1] + 1)
    num, den = dy[..., :-1], dy[..., -1]
    torch.sum(torch.mul(grad_out, out, out=num), dim=-1, out=den)  # go . out, with num as scratch
    den.div_(z).neg_()
    torch.div(grad_out, z[..., None], out=num)
    return dy


def _plus(total: torch.Tensor | None, term: torch.Tensor) -> torch.Tensor:
    """total + term, where None stands for a zero total."""
    return term if total is None else total + term


def _softmax_backward(dx, factors, dfactors, rows):
    """Write d logits into dx (B, H, rows, sum of m_f) from each factor's softmax (B, H, rows, m_f)
    and its gradient in chunks (B, H, nc, C, m_f)."""
    offset = 0
    for a, da in zip(factors, dfactors):
        da = da.flatten(2, 3)[:, :, :rows]
        width = a.shape[-1]
        torch.mul(a, da - (da * a).sum(-1, keepdim=True), out=dx[..., offset: offset + width])
        offset += width


class _StreamedCausalLowRank(torch.autograd.Function):
    """Causal feature-map attention over row blocks; the backward recomputes one block at a time.

    Inputs: feature logits q, k (B, H, L, M) and values v (B, H, L, D), float32 (k, v already
    repeated to the query heads), mask (B, L) float or None, chunk, factor sizes (summing to M), and
    whether the state after the last row is wanted (a cache keeps it).
    Outputs: (B, H, L, D), a view of (B, L, H, D) memory (the layout the caller returns), and the
    state after the last row (B, H, k, D + 1), for a generation cache (not differentiable; an empty
    tensor when not wanted).
    Saved: q, k (logits), v, mask, the output and its normaliser (B, H, L), and the (k, D + 1)
    state at the start of each block.
    """

    @staticmethod
    def forward(ctx, q, k, v, mask, chunk, sizes, need_state):
        b, h, length, d = v.shape
        rows = max(chunk, _STREAM_ROWS // chunk * chunk)
        zero = q.new_zeros(b, h, math.prod(sizes), d + 1)  # (k, D + 1)
        out, z = q.new_empty(b, length, h, d).transpose(1, 2), q.new_empty(b, h, length)
        state, starts = None, []  # None: the zero state
        for r0 in range(0, length, rows):
            r1 = min(r0 + rows, length)
            starts.append(zero if state is None else state)
            block = _Block(q[:, :, r0:r1], k[:, :, r0:r1], v[:, :, r0:r1], sizes,
                           mask[:, r0:r1] if mask is not None else None, chunk, state,
                           keep_factor_scores=False)
            if r1 < length or need_state:
                state = block.end_state
            _normalise(block.y(), r1 - r0, out[:, :, r0:r1], z[:, :, r0:r1])
        ctx.save_for_backward(q, k, v, mask, out, z, torch.stack(starts))
        ctx.args = (chunk, rows, sizes)
        state = state if need_state else q.new_empty(0)
        ctx.mark_non_differentiable(state)  # the cache's copy: later calls do not backpropagate into it
        return out, state

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out, _grad_state):
        q, k, v, mask, out, z, starts = ctx.saved_tensors
        chunk, rows, sizes = ctx.args
        length = q.shape[2]
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        carry = None  # d loss / d (state after this block); None: zero (the last block)
        for index in reversed(range(starts.shape[0])):
            r0 = index * rows
            r1 = min(r0 + rows, length)
            n = r1 - r0
            qb, kb, vb = q[:, :, r0:r1], k[:, :, r0:r1], v[:, :, r0:r1]
            mb = mask[:, r0:r1] if mask is not None else None
            blk = _Block(qb, kb, vb, sizes, mb, chunk, starts[index] if index else None)
            n_chunks = blk.v1.shape[2]
            # out = y[..., :D] / z with z = y[..., D] + eps, so dy = (go / z, -(go . out) / z)
            dy = _normaliser_backward(grad_out[:, :, r0:r1], out[:, :, r0:r1], z[:, :, r0:r1])
            dy = _chunks(dy, n, chunk)
            dscores = (dy @ blk.v1.transpose(-1, -2)).tril_()
            dv1 = blk.scores.transpose(-1, -2) @ dy
            # through the reads of the prefix (none when every chunk starts from zero)
            dqf = _factor_grads(dy @ blk.prefix.transpose(-1, -2), blk.qf) if blk.reads else None
            dkf = None
            if carry is not None or n_chunks > 1:
                # a chunk's write reaches every later chunk's prefix and the state after the block:
                # dwrites[c] = carry + sum of dprefix over the chunks after c, a reversed running sum
                dprefix = blk.fq.transpose(-1, -2) @ dy  # (B, H, nc, k, D + 1)
                start = carry if carry is not None else torch.zeros_like(starts[0])
                dwrites = _running_sum(start, dprefix, reverse=True)
                carry = dwrites[:, :, 0] + dprefix[:, :, 0]
                dv1 += blk.fk @ dwrites
                dkf = _factor_grads(blk.v1 @ dwrites.transpose(-1, -2), blk.kf)
            elif index:  # one chunk after which nothing was read: only the earlier blocks' gradient
                carry = (blk.fq.transpose(-1, -2) @ dy)[:, :, 0]
            # the in-chunk scores
            scores = blk.factor_scores
            dqf, dkf = dqf or [None] * len(scores), dkf or [None] * len(scores)
            # d factor f's scores: dscores times the other factor's scores (in place: the block's
            # factor scores are not read again)
            dsfs = [scores[1].mul_(dscores), scores[0].mul_(dscores)] if len(scores) == 2 else [dscores]
            for f, (aq, ak, dsf) in enumerate(zip(blk.qf, blk.kf, dsfs)):
                # (C, C) @ (C, m) as the transposed product (m, C) @ (C, C): BLAS is several times
                # faster with m (a few slots) as the rows than as the columns, and the factors are
                # stored (m, C) already (see _softmax_last)
                dqf[f] = _plus(dqf[f], (ak.transpose(-1, -2) @ dsf.transpose(-1, -2)).transpose(-1, -2))
                dkf[f] = _plus(dkf[f], (aq.transpose(-1, -2) @ dsf).transpose(-1, -2))
            dv[:, :, r0:r1] = dv1.flatten(2, 3)[:, :, :n, :-1]
            if mb is not None:
                dkf[0] = dkf[0] * _chunks(mb[:, None, :, None], n, chunk)
            for feats, dfeats, dx in ((blk.qf_soft, dqf, dq), (blk.kf_soft, dkf, dk)):
                _softmax_backward(dx[:, :, r0:r1], feats, dfeats, n)  # d logits
        return dq, dk, dv, None, None, None, None
