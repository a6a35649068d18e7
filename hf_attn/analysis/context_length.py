"""Validation perplexity versus context length, by sliding-window evaluation.

The text is the checkpoint's own validation split, read the way training read it: the experiment
config saved beside the weights (``training_config.yaml``) names the corpus and split, and
``hf_attn.training.data`` loads it and tokenises it with the checkpoint's tokenizer into one stream
(documents in corpus order, each ended by ``eos``), exactly the stream training packs into blocks.

At context length L with stride S (default L / 2) windows of L tokens start every S tokens; each
window scores only the tokens the previous window did not (the first window scores all but its
first token, a last window is moved back to end on the last token), so every token of the stream is
scored once, and after the first window each scored token sees between L - S and L - 1 tokens of
context. With S = L the windows do not overlap: that is training's own evaluation (the first token
of each block is not scored). Every length scores the same tokens, so the perplexities compare.

Learned absolute positions (``position_embedding_type="absolute"``: eager, and local / lowrank unless
combined with rope) exist only up to ``max_position_embeddings``; longer lengths are recorded with
perplexity NaN and a note, not run. Rotary checkpoints can be evaluated with a rope scaling chosen at
load time (``CKPT@linear:16``, ``CKPT@dynamic:2``), which overrides the saved config.
"""

from __future__ import annotations

import csv
import hashlib
import math
import multiprocessing
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

# Tokens per forward pass: windows are batched up to this many tokens (at least one window).
BATCH_TOKENS = 8192
CSV_COLUMNS = ("checkpoint", "length", "perplexity", "tokens", "stride", "train_length", "seconds", "note")


@dataclass(frozen=True)
class CheckpointSpec:
    """A checkpoint folder and an optional rope scaling applied when loading it."""

    path: Path
    rope_scaling: dict | None = None

    @property
    def label(self) -> str:
        """Name in the CSV and legend: the folder name (its parent's for a trainer's ``final`` folder),
        plus ``@type:factor`` when scaled."""
        name = self.path.parent.name if self.path.name == "final" else self.path.name
        if self.rope_scaling:
            name += f"@{self.rope_scaling['type']}:{self.rope_scaling['factor']:g}"
        return name


def parse_checkpoint_spec(spec: str) -> CheckpointSpec:
    """``PATH`` or ``PATH@linear:F`` / ``PATH@dynamic:F`` (rope scaling type and factor F >= 1).

    Raises:
        ValueError: for an unknown scaling type or a factor that is not a number >= 1.
    """
    path, _, scaling = spec.partition("@")
    if not scaling:
        return CheckpointSpec(Path(path))
    kind, _, factor = scaling.partition(":")
    if kind not in ("linear", "dynamic"):
        raise ValueError(f"{spec!r}: rope scaling type {kind!r}; allowed: 'linear', 'dynamic' (PATH@linear:16)")
    try:
        value = float(factor)
    except ValueError:
        value = float("nan")
    if not value >= 1:
        raise ValueError(f"{spec!r}: rope scaling factor {factor!r}; allowed: a number >= 1 (PATH@{kind}:16)")
    return CheckpointSpec(Path(path), {"type": kind, "factor": value})


def load_checkpoint(spec: CheckpointSpec) -> tuple[nn.Module, object]:
    """(causal LM in eval mode, tokenizer) of a saved folder, with the spec's rope scaling if any.

    The scaling is passed to ``from_pretrained`` as ``rope_parameters`` (type, factor and the saved
    ``rope_theta``), which rebuilds the rotary tables; the weights are unchanged.

    Raises:
        ValueError: if a scaling is asked of a checkpoint without rotary positions.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    import hf_attn  # noqa: F401  (registers the Auto classes)

    kwargs = {}
    if spec.rope_scaling is not None:
        config = AutoConfig.from_pretrained(spec.path)
        if config.position_embedding_type != "rope":
            raise ValueError(f"{spec.label}: rope scaling needs rotary positions; this checkpoint has "
                             f"position_embedding_type={config.position_embedding_type!r}")
        kwargs["rope_parameters"] = {"rope_type": spec.rope_scaling["type"], "factor": spec.rope_scaling["factor"],
                                     "rope_theta": config.rope_theta}
    model = AutoModelForCausalLM.from_pretrained(spec.path, **kwargs).eval()
    return model, AutoTokenizer.from_pretrained(spec.path)


def position_limit(config) -> int | None:
    """Longest context the weights cover: ``max_position_embeddings`` with a learned absolute
    position table, else ``None`` (rotary positions are unbounded)."""
    return config.max_position_embeddings if config.position_embedding_type == "absolute" else None


def validation_stream(checkpoint: str | Path, tokenizer, overrides: Sequence[str] = (),
                      config_path: str | Path | None = None) -> tuple[torch.Tensor, int]:
    """(validation token ids (N,), training block size) of a checkpoint trained by ``hf_attn.training``.

    The corpus comes from ``config_path`` (default: ``training_config.yaml`` in the checkpoint folder)
    with dotted ``overrides`` (``["--data.cache_dir", "/tmp/c"]``); it is split by
    ``load_raw_datasets`` and tokenised by ``tokenize_and_pack`` as in training, with blocks of one
    token, so the result is the whole stream (training cuts the same stream into ``block_size`` blocks).

    Raises:
        ValueError: if there is no config to read, or a key is invalid.
    """
    from datasets import DatasetDict

    from hf_attn.training.config import load_config
    from hf_attn.training.data import load_raw_datasets, tokenize_and_pack

    path = Path(config_path) if config_path is not None else Path(checkpoint) / "training_config.yaml"
    if not path.is_file():
        raise ValueError(f"{path} does not exist: the validation split is read from the experiment config saved "
                         "by scripts/train.py; pass --config YAML for a checkpoint trained otherwise")
    config = load_config(path, list(overrides))
    raw = load_raw_datasets(config.data, seed=config.training.seed)
    packed = tokenize_and_pack(DatasetDict({"validation": raw["validation"]}), tokenizer, 1,
                               text_column=config.data.text_column, num_proc=config.data.num_proc)
    ids = packed["validation"].with_format("numpy")[:]["input_ids"]  # (N, 1)
    return torch.from_numpy(ids.reshape(-1)).long(), config.data.block_size


def sliding_windows(n_tokens: int, length: int, stride: int) -> list[tuple[int, int]]:
    """(start, first scored offset) of each window of ``length`` tokens over ``n_tokens``.

    Window k covers ``[start, start + length)`` and scores offsets ``[first, length)``: the tokens the
    windows before it did not reach (offset 0 is never scored: nothing in the window predicts it).

    Raises:
        ValueError: unless ``1 <= stride <= length <= n_tokens``.
    """
    if not 1 <= stride <= length <= n_tokens:
        raise ValueError(f"need 1 <= stride ({stride}) <= length ({length}) <= tokens ({n_tokens})")
    starts = list(range(0, n_tokens - length + 1, stride))
    if starts[-1] + length < n_tokens:
        starts.append(n_tokens - length)  # the last window ends on the last token
    windows, reached = [], 0
    for start in starts:
        windows.append((start, max(1, reached - start)))
        reached = start + length
    return windows


@torch.no_grad()
def sliding_perplexity(model: nn.Module, ids: torch.Tensor, length: int, stride: int | None = None,
                       batch_tokens: int = BATCH_TOKENS) -> tuple[float, int]:
    """(perplexity, scored tokens) of ``model`` on the token stream ``ids`` (N,) at context ``length``.

    Windows (:func:`sliding_windows`) run in batches of about ``batch_tokens`` tokens; losses are
    summed in float64 over the scored tokens, perplexity = exp(mean negative log-likelihood).
    """
    stride = stride or max(1, length // 2)
    windows = sliding_windows(ids.numel(), length, stride)
    per_batch = max(1, batch_tokens // length)
    offsets = torch.arange(length)
    total, count = 0.0, 0
    for i in range(0, len(windows), per_batch):
        chunk = windows[i: i + per_batch]
        batch = torch.stack([ids[start: start + length] for start, _ in chunk])  # (b, L)
        first = torch.tensor([f for _, f in chunk])[:, None]
        labels = batch.masked_fill(offsets[None] < first, -100)  # -100: context only, not scored
        logits = model(input_ids=batch, use_cache=False).logits  # (b, L, V)
        # logits at t predict token t + 1; fp32 for an exact softmax
        nll = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), labels[:, 1:], ignore_index=-100, reduction="sum")
        total += float(nll)
        count += int((labels[:, 1:] != -100).sum())
    return math.exp(total / count), count


def _data_key(path: Path, overrides: Sequence[str]) -> str:
    from hf_attn.training.config import load_config

    if not path.is_file():
        return str(path)  # validation_stream raises the error
    config = load_config(path, list(overrides))
    return repr((config.data, config.training.seed))


def _tokenizer_key(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    state = backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(f"{tokenizer.eos_token_id}|{state}".encode()).hexdigest()


@dataclass
class LengthResult:
    """One CSV row: perplexity NaN (with a ``note``) where the length was not evaluated;
    ``train_length`` is the checkpoint's training block size."""

    checkpoint: str
    length: int
    perplexity: float
    tokens: int
    stride: int
    train_length: int
    seconds: float = 0.0
    note: str = ""


@dataclass(frozen=True)
class EvalSettings:
    """How :func:`evaluate_lengths` reads and scores the validation text.

    Attributes:
        stride_fraction: stride = max(1, round(fraction * L)); 1.0 = non-overlapping windows.
        max_tokens: evaluate only the first tokens of each validation stream (quick runs).
        data_overrides: dotted ``--data.KEY VALUE`` arguments applied to the experiment config.
        config_path: experiment YAML naming the corpus (default: the checkpoint's training_config.yaml).
        batch_tokens: tokens per forward pass.
    """

    stride_fraction: float = 0.5
    max_tokens: int | None = None
    data_overrides: tuple[str, ...] = ()
    config_path: str | None = None
    batch_tokens: int = BATCH_TOKENS

    def __post_init__(self) -> None:
        if not 0 < self.stride_fraction <= 1:
            raise ValueError(f"stride_fraction={self.stride_fraction}: expected a number in (0, 1]")
        if self.max_tokens is not None and self.max_tokens < 2:
            raise ValueError(f"max_tokens={self.max_tokens}: expected at least 2 tokens")
        if self.batch_tokens < 1:
            raise ValueError(f"batch_tokens={self.batch_tokens}: expected an integer >= 1")


def evaluate_checkpoint(
    spec: CheckpointSpec,
    lengths: Sequence[int],
    settings: EvalSettings = EvalSettings(),
    *,
    log: Callable[[str], None] = print,
    streams: dict | None = None,
) -> list[LengthResult]:
    """Perplexity of one checkpoint at each length, one row per length (see :func:`evaluate_lengths`).

    ``streams``: a dict shared between calls, so checkpoints trained on one corpus with one tokenizer
    (e.g. several modes) tokenise the validation split once.
    """
    model, tokenizer = load_checkpoint(spec)
    overrides, config_path = list(settings.data_overrides), settings.config_path
    source = Path(config_path) if config_path is not None else spec.path / "training_config.yaml"
    key = (_data_key(source, overrides), _tokenizer_key(tokenizer))
    streams = {} if streams is None else streams
    if key not in streams:
        streams[key] = validation_stream(spec.path, tokenizer, overrides, config_path)
    ids, block_size = streams[key]
    if settings.max_tokens is not None:
        ids = ids[: settings.max_tokens]
    limit = position_limit(model.config)
    rows = []
    for length in lengths:
        stride = max(1, round(settings.stride_fraction * length))
        if limit is not None and length > limit:
            note = f"beyond max_position_embeddings={limit} (learned absolute positions); not evaluated"
            rows.append(LengthResult(spec.label, length, math.nan, 0, stride, block_size, note=note))
        elif length > ids.numel():
            note = f"longer than the {ids.numel()} validation tokens; not evaluated"
            rows.append(LengthResult(spec.label, length, math.nan, 0, stride, block_size, note=note))
        else:
            started = time.perf_counter()
            ppl, count = sliding_perplexity(model, ids, length, stride, settings.batch_tokens)
            rows.append(LengthResult(spec.label, length, ppl, count, stride, block_size, time.perf_counter() - started))
        row = rows[-1]
        log(f"{row.checkpoint} L={row.length}: perplexity {row.perplexity:.3f} over {row.tokens} tokens "
            f"({row.seconds:.1f} s){'; ' + row.note if row.note else ''}")
    return rows


def _evaluate_in_worker(spec: CheckpointSpec, lengths: Sequence[int], settings: EvalSettings, threads: int):
    torch.set_num_threads(threads)
    return evaluate_checkpoint(spec, lengths, settings)


def evaluate_lengths(
    specs: Sequence[CheckpointSpec],
    lengths: Sequence[int],
    settings: EvalSettings = EvalSettings(),
    *,
    jobs: int = 1,
    log: Callable[[str], None] = print,
) -> list[LengthResult]:
    """Perplexity of each checkpoint at each length: rows in ``specs`` order, then length order.

    Lengths beyond a checkpoint's position limit, or longer than the stream, get a NaN row with a note.
    ``jobs``: checkpoints evaluated in that many processes at once (each with its share of the threads;
    workers log with ``print``). The numbers do not depend on it.
    """
    if jobs < 1:
        raise ValueError(f"jobs={jobs}: expected an integer >= 1")
    jobs = min(jobs, len(specs))
    if jobs == 1:
        streams: dict = {}
        return [row for spec in specs for row in evaluate_checkpoint(spec, lengths, settings, log=log, streams=streams)]
    threads = max(1, torch.get_num_threads() // jobs)
    context = multiprocessing.get_context("spawn")  # no fork of a process holding torch threads
    with ProcessPoolExecutor(max_workers=jobs, mp_context=context) as pool:
        results = pool.map(_evaluate_in_worker, specs, [lengths] * len(specs), [settings] * len(specs),
                           [threads] * len(specs))
        return [row for spec_rows in results for row in spec_rows]


def write_csv(rows: Sequence[LengthResult], path: str | Path) -> Path:
    """Write rows with the columns of ``CSV_COLUMNS`` (NaN perplexity written as ``nan``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        for row in rows:
            values = asdict(row)
            values["perplexity"] = "nan" if math.isnan(row.perplexity) else f"{row.perplexity:.4f}"
            values["seconds"] = f"{row.seconds:.1f}"
            writer.writerow(values)
    return path


def read_csv(path: str | Path) -> list[LengthResult]:
    """Rows written by :func:`write_csv`."""
    with Path(path).open(newline="", encoding="utf-8") as fh:
        return [LengthResult(r["checkpoint"], int(r["length"]), float(r["perplexity"]), int(r["tokens"]),
                             int(r["stride"]), int(r["train_length"]), float(r["seconds"]), r["note"])
                for r in csv.DictReader(fh)]


def markdown_table(rows: Sequence[LengthResult]) -> str:
    """A Markdown table: one row per checkpoint, one column per length; lengths that were not
    evaluated show a dash (see the CSV note)."""
    lengths = sorted({r.length for r in rows})
    labels = list(dict.fromkeys(r.checkpoint for r in rows))
    value = {(r.checkpoint, r.length): r.perplexity for r in rows}
    lines = ["| checkpoint | " + " | ".join(f"L={n}" for n in lengths) + " |",
             "|---|" + "---|" * len(lengths)]
    for label in labels:
        cells = [value.get((label, n), math.nan) for n in lengths]
        lines.append(f"| {label} | " + " | ".join("\u2014" if math.isnan(c) else f"{c:.2f}" for c in cells) + " |")
    return "\n".join(lines)


def plot_perplexity(rows: Sequence[LengthResult], path: str | Path, *,
                    title: str = "validation perplexity vs context length") -> Path:
    """One line per checkpoint (log2 length axis), dashed for a rope scaling applied at load time. A
    line stops at the last evaluated length, marked with an x and "limit" when longer ones are beyond
    its position table; dotted verticals mark the training lengths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 5), dpi=100)
    for label in dict.fromkeys(r.checkpoint for r in rows):
        mine = sorted((r for r in rows if r.checkpoint == label), key=lambda r: r.length)
        done = [r for r in mine if not math.isnan(r.perplexity)]
        if not done:
            continue
        (line,) = ax.plot([r.length for r in done], [r.perplexity for r in done], marker="o", markersize=3,
                          linestyle="--" if "@" in label else "-", label=label)
        if any(math.isnan(r.perplexity) and "max_position_embeddings" in r.note for r in mine):
            ax.plot([done[-1].length], [done[-1].perplexity], marker="x", markersize=10, color=line.get_color())
            ax.annotate("limit", (done[-1].length, done[-1].perplexity), textcoords="offset points", xytext=(6, -3),
                        fontsize=8, color=line.get_color())
    for length in sorted({r.train_length for r in rows}):
        ax.axvline(length, color="grey", linestyle=":", linewidth=1)
        ax.annotate(f"trained at {length}", (length, 0), xycoords=("data", "axes fraction"), xytext=(3, 4),
                    textcoords="offset points", fontsize=8, color="grey")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("validation perplexity")
    ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


__all__ = [
    "CSV_COLUMNS",
    "CheckpointSpec",
    "EvalSettings",
    "LengthResult",
    "evaluate_checkpoint",
    "evaluate_lengths",
    "load_checkpoint",
    "markdown_table",
    "parse_checkpoint_spec",
    "plot_perplexity",
    "position_limit",
    "read_csv",
    "sliding_perplexity",
    "sliding_windows",
    "validation_stream",
]
