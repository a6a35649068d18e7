"""Attention maps of any hf_attn model, in one (query x key) picture per layer and head.

What each mode gives, and how it becomes a map (shapes for a batch B, H heads, L tokens):

- ``eager``, ``rope``: ``output_attentions=True`` returns the softmax weights (B, H, L, L) as they are.
- ``local``: ``output_attentions=True`` returns blocked weights (B, H, n_blocks, w, span), span = 2w
  (causal) or 3w (bidirectional); :func:`local_blocks_to_dense` puts them back at their (query, key)
  positions: query r of block b is token ``b * w + r``, span offset s is key ``b * w + s - w + cached``
  (the kernel pads ``w - cached`` zero keys in front, see ``attention_local.build_local_block_mask``).
- ``lowrank``, causal: the kernel never forms weights (it keeps running sums). The attention it implies
  is ``A_ij = phi(q_i) . phi(k_j)`` for ``j <= i``, rows normalised; :func:`implied_lowrank_attention`
  recomputes it exactly from each layer's q and k (captured with forward hooks on ``q_proj`` /
  ``k_proj``, rotated as the model rotates them) and the layer's own ``feature_map``, and
  :func:`attention_maps` checks it: ``sum_j A_ij v_j`` must equal the layer's attention output.
- ``lowrank``, bidirectional (Linformer): ``output_attentions=True`` returns (B, H, L, k) weights over
  the k projected slots; the map is that (L x k) slot map, not a (query x key) one.

Cost: every dense map is (B, H, L, L) floats per layer, O(L^2) memory, whatever the mode computes
(the implied low-rank map costs O(L^2 * k) to form). Meant for short texts (a few hundred tokens).
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from hf_attn.attention_local import local_blocks_to_dense  # noqa: F401  (re-exported: analysis API)
from hf_attn.attention_lowrank import _EPS as _KERNEL_EPS  # the causal kernel's normaliser epsilon
from hf_attn.attention_lowrank import lowrank_features  # noqa: F401  (re-exported: analysis API)
from hf_attn.attention_lowrank import lowrank_scores as layer_lowrank_scores
from hf_attn.attention_rope import apply_rotary

# Pixels per inch of the saved grid; with sizes in tenths of an inch the PNG size is exact.
DPI = 100


@dataclass
class AttentionMaps:
    """Per-layer attention maps of one forward pass.

    Attributes:
        layers: one (B, H, Lq, Lk) float32 tensor per layer; Lk is the number of keys (``kind ==
            "dense"``) or of Linformer slots (``kind == "slots"``).
        kind: ``"dense"`` (query x key positions) or ``"slots"`` (query x low-rank slot).
        source: how the maps were obtained (one line, for titles and logs).
        max_error: causal low-rank only: per layer, the largest ``|A v - layer output|`` over heads,
            tokens and channels (the check that the implied map is the one the kernel applies).
    """

    layers: list[torch.Tensor]
    kind: str
    source: str
    max_error: list[float] = field(default_factory=list)


def _base_model(model: nn.Module) -> nn.Module:
    """The bare ``HfAttnModel`` of a model with a head (``.model``), or the model itself."""
    return model.model if hasattr(model, "model") and hasattr(model.model, "layers") else model


@dataclass
class LayerCapture:
    """What one attention layer computed: q and k after rotary positions, (B, H, L, D) and
    (B, Hkv, L, D); v (B, Hkv, L, D); the kernel's output per head (B, H, L, D), before ``o_proj``."""

    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    output: torch.Tensor


def capture_attention_inputs(model: nn.Module, input_ids: torch.Tensor) -> list[LayerCapture]:
    """Run ``model`` on ``input_ids`` (B, L), no padding, no cache, and return each layer's q, k, v
    and attention output, read with forward hooks on ``q_proj``, ``k_proj``, ``v_proj`` and ``o_proj``.

    q and k are rotated here exactly as ``HfAttnAttention.forward`` rotates them when the model has
    rotary positions (``position_embedding_type == "rope"``): ``apply_rotary`` with the model's
    ``rotary`` cos/sin at positions ``0 .. L - 1``.
    """
    base = _base_model(model)
    seen: list[dict[str, torch.Tensor]] = [{} for _ in base.layers]
    handles = []
    for index, layer in enumerate(base.layers):
        attn = layer.self_attn
        for name in ("q_proj", "k_proj", "v_proj"):
            handles.append(getattr(attn, name).register_forward_hook(
                lambda _mod, _inp, out, store=seen[index], key=name: store.__setitem__(key, out.detach())))
        handles.append(attn.o_proj.register_forward_pre_hook(
            lambda _mod, inp, store=seen[index]: store.__setitem__("o_in", inp[0].detach())))
    try:
        with torch.no_grad():
            base(input_ids=input_ids, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()

    config = base.config
    b, length = input_ids.shape
    d = config.head_dim
    rotation = None
    if getattr(base, "rotary", None) is not None:
        positions = torch.arange(length, device=input_ids.device)[None]
        rotation = base.rotary(positions, seen[0]["q_proj"].dtype)  # (cos, sin), each (1, L, D)
    captures = []
    for store in seen:
        q = store["q_proj"].view(b, length, -1, d).transpose(1, 2)  # (B, H, L, D)
        k = store["k_proj"].view(b, length, -1, d).transpose(1, 2)  # (B, Hkv, L, D)
        v = store["v_proj"].view(b, length, -1, d).transpose(1, 2)
        if rotation is not None:
            q, k = apply_rotary(q, k, *rotation)
        out = store["o_in"].view(b, length, -1, d).transpose(1, 2)  # (B, H, L, D)
        captures.append(LayerCapture(q, k, v, out))
    return captures


@torch.no_grad()
def lowrank_scores(attn: nn.Module, capture: LayerCapture) -> torch.Tensor:
    """Unnormalised causal low-rank scores (B, H, L, L) of a captured layer: ``phi(q_i) . phi(k_j)``
    for j <= i, else 0 (``attention_lowrank.lowrank_scores``, which the model's dense weights use)."""
    return layer_lowrank_scores(attn, capture.query, capture.key)


def implied_lowrank_attention(attn: nn.Module, capture: LayerCapture) -> torch.Tensor:
    """The (B, H, L, L) attention a causal low-rank layer applies: :func:`lowrank_scores` with each
    row divided by its sum z_i. (The kernel divides by z_i + 1e-6, which only matters for a query
    whose features barely overlap any key's; :func:`implied_output_error` accounts for it.)"""
    scores = lowrank_scores(attn, capture)
    return scores / scores.sum(-1, keepdim=True)


@torch.no_grad()
def implied_output_error(scores: torch.Tensor, capture: LayerCapture) -> float:
    """Largest ``|sum_j A_ij v_j * z_i / (z_i + eps) - output_i|`` of a causal low-rank layer, with
    ``scores`` from :func:`lowrank_scores`, A its rows normalised and z_i their sums: how far the
    implied attention is from what the kernel computed (which divides by ``z_i + eps``)."""
    z = scores.sum(-1, keepdim=True)  # (B, H, L, 1)
    value = capture.value.float().repeat_interleave(scores.shape[1] // capture.value.shape[1], dim=1)
    implied = (scores / z) @ value * (z / (z + _KERNEL_EPS))
    return float((implied - capture.output.float()).abs().max())


def attention_maps(model: nn.Module, input_ids: torch.Tensor) -> AttentionMaps:
    """The attention maps of every layer for ``input_ids`` (B, L) (no padding), in eval mode.

    Full modes and local give (B, H, L, L) weights; causal low-rank its implied (B, H, L, L) map,
    checked against the layer output (``max_error``); bidirectional low-rank its (B, H, L, k) slot map.
    """
    base = _base_model(model)
    config = base.config
    was_training = base.training
    base.eval()
    try:
        if config.attention_mode == "lowrank" and config.is_causal:
            captures = capture_attention_inputs(base, input_ids)
            layers, errors = [], []
            with torch.no_grad():
                for layer, capture in zip(base.layers, captures):
                    scores = lowrank_scores(layer.self_attn, capture)
                    layers.append(scores / scores.sum(-1, keepdim=True))
                    errors.append(implied_output_error(scores, capture))
            return AttentionMaps(layers, "dense", "implied by the rank-k feature map: phi(q_i).phi(k_j), j <= i, "
                                 "rows normalised", errors)
        with torch.no_grad():
            out = base(input_ids=input_ids, output_attentions=True, use_cache=False)
        weights = [w.float() for w in out.attentions]
        if config.attention_mode == "local":
            length = input_ids.shape[1]
            return AttentionMaps([local_blocks_to_dense(w, length) for w in weights], "dense",
                                 f"local window w={config.sliding_window}: blocked weights placed at their positions")
        if config.attention_mode == "lowrank":
            return AttentionMaps(weights, "slots", f"Linformer: softmax over k={config.lowrank_dim} projected slots")
        return AttentionMaps(weights, "dense", "softmax weights (output_attentions)")
    finally:
        base.train(was_training)


def token_labels(tokenizer, ids: Sequence[int]) -> list[str]:
    """One readable label per token id: the decoded text with space, tab and newline made visible."""
    labels = []
    for token_id in ids:
        text = tokenizer.decode([int(token_id)])
        text = text.replace("\n", "\u21b5").replace("\t", "\u2192").replace(" ", "\u00b7")
        labels.append(text or "\u2205")
    return labels


def _select(values: Sequence[int] | None, count: int, what: str) -> list[int]:
    if values is None:
        return list(range(count))
    bad = [v for v in values if not 0 <= v < count]
    if bad:
        raise ValueError(f"{what} {bad} out of range: this model has {count} {what} (0..{count - 1})")
    return list(values)


def _cell_inches(length: int) -> float:
    # About 0.07 inch (5 points) per token, room for one small tick label; 2 to 6 inches a panel.
    return round(min(max(0.07 * length, 2.0), 6.0), 1)


def figure_inches(n_rows: int, n_cols: int, length: int) -> tuple[float, float]:
    """(width, height) in inches of a grid of ``n_rows`` layers x ``n_cols`` heads for L = ``length``
    queries: square panels plus fixed margins for token labels and titles (tenths of an inch, so the
    PNG is exactly ``figure_inches * DPI`` pixels)."""
    cell = _cell_inches(length)
    return round(n_cols * cell + 1.4, 1), round(n_rows * cell + 1.9, 1)


def grid_image_size(n_rows: int, n_cols: int, length: int) -> tuple[int, int]:
    """(width, height) in pixels of the PNG :func:`plot_attention_grid` writes."""
    width, height = figure_inches(n_rows, n_cols, length)
    return round(width * DPI), round(height * DPI)


def plot_attention_grid(
    maps: AttentionMaps,
    tokens: Sequence[str],
    path: str | Path,
    *,
    layers: Sequence[int] | None = None,
    heads: Sequence[int] | None = None,
    title: str = "",
) -> Path:
    """Write a layers x heads grid of heatmaps (batch item 0) with token labels to ``path`` (PNG).

    Each panel has its own colour scale, square-root from 0 to its largest weight. Rows are queries (top = first
    token); columns are keys, or the k slots for a ``"slots"`` map. With more than 64 tokens only every
    n-th label is written.

    Raises:
        ValueError: for a layer or head index the model does not have, or ``tokens`` of the wrong length.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import PowerNorm
    from PIL import Image

    n_layers, n_heads = len(maps.layers), maps.layers[0].shape[1]
    rows, cols = _select(layers, n_layers, "layers"), _select(heads, n_heads, "heads")
    length = maps.layers[0].shape[2]
    if len(tokens) != length:
        raise ValueError(f"tokens: {len(tokens)} labels for {length} queries")
    width, height = figure_inches(len(rows), len(cols), length)
    fig = plt.figure(figsize=(width, height), dpi=DPI)
    axes = fig.subplots(
        len(rows), len(cols), squeeze=False,
        gridspec_kw=dict(left=1.0 / width, right=1 - 0.4 / width, bottom=1.0 / height, top=1 - 0.9 / height,
                         wspace=0.08, hspace=0.12),
    )
    step = max(1, math.ceil(length / 64))
    ticks = list(range(0, length, step))
    # 80% of the room each label has along a panel, in points, at most 8
    fontsize = max(3.0, min(8.0, 0.8 * 72 * _cell_inches(length) / len(ticks)))
    for i, layer in enumerate(rows):
        for j, head in enumerate(cols):
            ax = axes[i][j]
            panel = maps.layers[layer][0, head].detach().float().cpu().numpy()
            # square-root colour scale: small weights stay visible next to a query's own key (weight 1 on
            # the first row of every causal map)
            norm = PowerNorm(0.5, vmin=0.0, vmax=max(float(panel.max()), 1e-12))
            ax.imshow(panel, cmap="viridis", norm=norm, aspect="auto", interpolation="nearest")
            ax.set_title(f"layer {layer}, head {head}", fontsize=8)
            ax.set_yticks(ticks if j == 0 else [])
            if j == 0:
                ax.set_yticklabels([tokens[t] for t in ticks], fontsize=fontsize)
            if maps.kind == "dense":
                ax.set_xticks(ticks if i == len(rows) - 1 else [])
                if i == len(rows) - 1:
                    ax.set_xticklabels([tokens[t] for t in ticks], fontsize=fontsize, rotation=90)
            else:
                ax.set_xticks([])
                if i == len(rows) - 1:
                    ax.set_xlabel(f"slot (0..{panel.shape[1] - 1})", fontsize=8)
    fig.suptitle(f"{title}\n{maps.source}" if title else maps.source, fontsize=9)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI)
    plt.close(fig)
    # a 256-colour palette: the same picture at about 40% of the bytes (heatmaps + text need few colours)
    with Image.open(buffer) as image:
        image.convert("RGB").quantize(256, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)
    return path


def write_bertviz_html(
    maps: AttentionMaps, tokens: Sequence[str], path: str | Path, *, layers: Sequence[int] | None = None
) -> Path | None:
    """Write bertviz's interactive ``head_view`` of dense maps (batch item 0) to ``path`` (HTML).

    Returns ``None`` without writing when bertviz is not installed or the maps are slot maps (bertviz
    draws (L x L) token-to-token attention only).
    """
    if maps.kind != "dense":
        return None
    try:
        from bertviz import head_view
    except ImportError:
        return None
    attention = [layer[:1].detach().float().cpu() for layer in maps.layers]  # bertviz: (1, H, L, L) per layer
    include = _select(layers, len(attention), "layers")
    html = head_view(attention, list(tokens), prettify_tokens=False, include_layers=include, html_action="return")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(html.data, encoding="utf-8")
    return path


__all__ = [
    "AttentionMaps",
    "LayerCapture",
    "attention_maps",
    "capture_attention_inputs",
    "figure_inches",
    "grid_image_size",
    "implied_lowrank_attention",
    "implied_output_error",
    "local_blocks_to_dense",
    "lowrank_features",
    "lowrank_scores",
    "plot_attention_grid",
    "token_labels",
    "write_bertviz_html",
]
