"""Turning result rows into files, ratio tables, PASS/FAIL targets and plots.

Everything here is computed from the rows of one run (``suite.run_suite``): nothing is hard-coded
except the targets' thresholds.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

from .spec import SmallSpec
from .suite import COLUMNS, SMALL_REFERENCE, small_builders

# (section, ours case, reference case) pairs shown on the console and in the summary; ratios.csv has all pairs.
PRIMARY_PAIRS: dict[str, list[tuple[str, str]]] = {
    "attention": [("ours_eager", "sdpa_causal"), ("ours_rope", "sdpa_causal"), ("ours_lowrank", "sdpa_causal"),
                  ("ours_lowrank_softmax", "sdpa_causal"), ("ours_local", "sdpa_causal"), ("ours_local", "mistral_sdpa"), ("ours_local", "mistral_eager"),
                  ("mistral_hf_attn_local", "mistral_sdpa")],
    "kernel": [("ours_eager", "sdpa_causal"), ("ours_lowrank", "sdpa_causal"), ("ours_lowrank_softmax", "sdpa_causal"),
               ("ours_local", "sdpa_causal"),
               ("ours_local", "mistral_sdpa"), ("mistral_hf_attn_local", "mistral_sdpa")],
    "model": [("ours_eager", "gpt2_sdpa"), ("ours_rope", "llama_sdpa"), ("ours_local", "mistral_sdpa"),
              ("ours_lowrank", "llama_sdpa"), ("mistral_hf_attn_local", "mistral_sdpa"),
              ("ours_local", "ours_local_unfused"), ("ours_lowrank", "ours_lowrank_unfused")],
    "generation": [("ours_eager", "gpt2_sdpa"), ("ours_rope", "llama_sdpa"), ("ours_local", "mistral_sdpa"),
                   ("ours_lowrank", "llama_sdpa"), ("mistral_hf_attn_local", "mistral_sdpa")],
    "train": [("ours_eager", "llama_sdpa"), ("ours_rope", "llama_sdpa"), ("ours_local", "mistral_sdpa"),
              ("ours_lowrank", "llama_sdpa"), ("mistral_hf_attn_local", "mistral_sdpa")],
    "small": [(case, SMALL_REFERENCE) for case in small_builders(SmallSpec()) if case != SMALL_REFERENCE],
}
# metric -> column it divides; for every metric the ratio is ours / reference.
RATIO_METRICS = {"time": "time_s", "cpu_time": "cpu_time_s", "memory": "peak_mem_bytes", "tokens_per_s": "tokens_per_s",
                 "kv_cache": "kv_cache_bytes"}


def ok_rows(rows: Iterable[dict], section: str) -> list[dict]:
    """Rows of ``section`` that were measured (status ``ok``)."""
    return [r for r in rows if r["section"] == section and r["status"] == "ok"]


def lookup(rows: Iterable[dict], section: str, case: str, seq_len: int | None = None) -> dict | None:
    """The measured row of ``case`` in ``section`` (at ``seq_len`` when given), or ``None``."""
    for row in ok_rows(rows, section):
        if row["case"] == case and (seq_len is None or row["seq_len"] == seq_len):
            return row
    return None


def ratio_rows(rows: list[dict]) -> list[dict]:
    """Every ours/reference ratio the rows support: same section and length, both measured."""
    out: list[dict] = []
    for section in PRIMARY_PAIRS:
        measured = ok_rows(rows, section)
        for ours in (r for r in measured if r["side"] == "ours"):
            for ref in (r for r in measured if r["side"] == "reference" and r["seq_len"] == ours["seq_len"]):
                for metric, column in RATIO_METRICS.items():
                    a, b = ours[column], ref[column]
                    if a is None or b is None or b == 0:
                        continue
                    out.append({"section": section, "seq_len": ours["seq_len"], "ours": ours["case"],
                                "reference": ref["case"], "metric": metric, "ours_value": a,
                                "reference_value": b, "ratio": a / b})
    return out


@dataclass
class TargetResult:
    """One performance target: its requirement, what this run measured, and the verdict."""

    name: str
    requirement: str
    measured: float | None
    passed: bool | None  # None: the run did not measure what the target needs
    detail: str

    @property
    def verdict(self) -> str:
        return "NOT MEASURED" if self.passed is None else ("PASS" if self.passed else "FAIL")


def _quotient(rows: list[dict], section: str, numerator: str, denominator: str, n: int | None,
              column: str) -> tuple[float | None, str]:
    """``column`` of case ``numerator`` divided by that of case ``denominator``, both at length ``n``."""
    a, b = lookup(rows, section, numerator, n), lookup(rows, section, denominator, n)
    if a is None or b is None:
        missing = [c for c, r in ((numerator, a), (denominator, b)) if r is None]
        return None, f"no measured {section} row for {missing} at n={n}"
    detail = f"{numerator} {a[column]:.4g} / {denominator} {b[column]:.4g} at n={a['seq_len']}"
    if column == "time_s" and a["cpu_time_s"] and b["cpu_time_s"]:
        detail += f"; CPU-time ratio {a['cpu_time_s'] / b['cpu_time_s']:.2f}"
    return a[column] / b[column], detail


def _with_kernel(layer: tuple[float | None, str], rows: list[dict], numerator: str, denominator: str, n: int,
                 column: str) -> tuple[float | None, str]:
    """A layer-level quotient, its detail extended with the same quotient of the ``kernel`` section."""
    kernel, _ = _quotient(rows, "kernel", numerator, denominator, n, column)
    value, detail = layer
    return value, detail + ("" if kernel is None else f"; kernel only (no projections): {kernel:.2f}")


def _worst_doubling(rows: list[dict], section: str, case: str, column: str) -> tuple[float | None, str]:
    """Largest ``column(2n) / column(n)`` over the measured doublings of ``case`` in ``section``."""
    points = sorted((r["seq_len"], r[column]) for r in ok_rows(rows, section)
                    if r["case"] == case and r[column] is not None)
    growth = [(n2, v2 / v1) for (n1, v1), (n2, v2) in zip(points, points[1:]) if n2 == 2 * n1 and v1 > 0]
    if not growth:
        return None, f"no pair of measured lengths n, 2n for {case}"
    n_worst, worst = max(growth, key=lambda g: g[1])
    listing = ", ".join(f"{n2 // 2}->{n2}: {g:.2f}x" for n2, g in growth)
    detail = f"worst {worst:.2f}x at {n_worst // 2}->{n_worst} ({listing})"
    if column == "time_s":
        cpu, _ = _worst_doubling(rows, section, case, "cpu_time_s")
        detail += "" if cpu is None else f"; worst CPU-time growth {cpu:.2f}x"
    return worst, detail


def _cache_constancy(rows: list[dict], case: str, window: int) -> tuple[float | None, str]:
    full = [r for r in rows if r["section"] == "generation_cache" and r["case"] == case and r["seq_len"] >= window]
    if len(full) < 2:
        return None, f"fewer than 2 cache measurements of {case} at length >= window {window}"
    sizes = [r["kv_cache_bytes"] for r in full]
    return max(sizes) / min(sizes), (f"{len(full)} steps from length {full[0]['seq_len']} to {full[-1]['seq_len']}: "
                                     f"{min(sizes)}..{max(sizes)} bytes")


def _target(name: str, requirement: str, value_detail: tuple[float | None, str], ok) -> TargetResult:
    value, detail = value_detail
    return TargetResult(name, requirement, value, None if value is None else bool(ok(value)), detail)


def evaluate_targets(rows: list[dict], window: int, rank: int) -> list[TargetResult]:
    """The issue's performance targets, each judged from this run's rows."""
    at, mt = "attention", "time_s"
    return [
        _target("local_attention_speed", f"local w={window}, n=16384: attention fwd+bwd >= 10x faster than "
                "full causal sdpa", _with_kernel(_quotient(rows, at, "sdpa_causal", "ours_local", 16384, mt), rows, "sdpa_causal",
                             "ours_local", 16384, mt), lambda v: v >= 10),
        _target("local_attention_memory", f"local w={window}, n=16384: peak memory >= 10x below Mistral "
                "sliding-window attention (sdpa)",
                _with_kernel(_quotient(rows, at, "mistral_sdpa", "ours_local", 16384, "peak_mem_bytes"), rows,
                             "mistral_sdpa", "ours_local", 16384, "peak_mem_bytes"), lambda v: v >= 10),
        _target("local_linear_time", "local: doubling n at most 2.2x attention layer time (all lengths interleaved)",
                _worst_doubling(rows, "scaling", "ours_local", mt), lambda v: v <= 2.2),
        _target("local_linear_memory", "local: doubling n at most 2.2x attention peak memory",
                _worst_doubling(rows, at, "ours_local", "peak_mem_bytes"), lambda v: v <= 2.2),
        _target("lowrank_attention_speed", f"lowrank k={rank}, n=8192: attention fwd+bwd >= 5x faster than "
                "full causal sdpa", _with_kernel(_quotient(rows, at, "sdpa_causal", "ours_lowrank", 8192, mt), rows, "sdpa_causal",
                             "ours_lowrank", 8192, mt), lambda v: v >= 5),
        _target("lowrank_linear_time", "lowrank: doubling n at most 2.2x attention layer time (all lengths interleaved)",
                _worst_doubling(rows, "scaling", "ours_lowrank", mt), lambda v: v <= 2.2),
        _target("lowrank_linear_memory", "lowrank: doubling n at most 2.2x attention peak memory",
                _worst_doubling(rows, at, "ours_lowrank", "peak_mem_bytes"), lambda v: v <= 2.2),
        _target("eager_train_throughput", "eager model: training tokens/s / LlamaForCausalLM (sdpa) >= 1.0",
                _quotient(rows, "train", "ours_eager", "llama_sdpa", None, "tokens_per_s"),
                lambda v: v >= 1.0),
        _target("rope_train_throughput", "rope model: training tokens/s / LlamaForCausalLM (sdpa) >= 1.0",
                _quotient(rows, "train", "ours_rope", "llama_sdpa", None, "tokens_per_s"),
                lambda v: v >= 1.0),
        _target("rope_overhead", "rope model: training step time / eager model's <= 1.05",
                _quotient(rows, "train", "ours_rope", "ours_eager", None, mt), lambda v: v <= 1.05),
        _target("lent_local_attention_memory", f"MistralAttention with attn_implementation='hf_attn_local', "
                f"w={window}, n=16384: peak memory >= 10x below the same layer with sdpa",
                _quotient(rows, at, "mistral_sdpa", "mistral_hf_attn_local", 16384, "peak_mem_bytes"),
                lambda v: v >= 10),
        _target("lent_local_model_speed", f"MistralForCausalLM with attn_implementation='hf_attn_local', "
                f"w={window}, n=16384: model fwd+bwd >= 5x faster than with sdpa",
                _quotient(rows, "model", "mistral_sdpa", "mistral_hf_attn_local", 16384, mt), lambda v: v >= 5),
        _target("local_kv_cache_constant", "local generation: cache bytes constant once the window is full "
                "(max/min = 1.0)", _cache_constancy(rows, "ours_local", window), lambda v: v == 1.0),
        _target("local_model_memory_chunked_loss", "local, n=16384: whole-model fwd+bwd peak memory >= 2x below "
                "the same model with the loss over full logits and unfused ops (hf_attn 0.3's training path)",
                _quotient(rows, "model", "ours_local_unfused", "ours_local", 16384, "peak_mem_bytes"),
                lambda v: v >= 2),
        _target("lowrank_model_memory_chunked_loss", "lowrank, n=16384: whole-model fwd+bwd peak memory >= 2x "
                "below the same model with the loss over full logits and unfused ops (hf_attn 0.3's training path)",
                _quotient(rows, "model", "ours_lowrank_unfused", "ours_lowrank", 16384, "peak_mem_bytes"),
                lambda v: v >= 2),
        _target("small_eager_step", "baby GPT (small section): eager training step time / reference GPT <= 1.05",
                _quotient(rows, "small", "ours_eager", SMALL_REFERENCE, None, mt), lambda v: v <= 1.05),
        _target("small_rope_step", "baby GPT: rope training step time / reference GPT <= 1.05",
                _quotient(rows, "small", "ours_rope", SMALL_REFERENCE, None, mt), lambda v: v <= 1.05),
        _target("small_eager_gpt_step", "baby GPT, hf_attn built with the reference's architecture (LayerNorm, "
                "4x GELU MLP): eager step time / reference GPT <= 1.05",
                _quotient(rows, "small", "ours_eager_gpt", SMALL_REFERENCE, None, mt), lambda v: v <= 1.05),
        _target("small_rope_gpt_step", "baby GPT, hf_attn built with the reference's architecture: rope step time "
                "/ reference GPT <= 1.05",
                _quotient(rows, "small", "ours_rope_gpt", SMALL_REFERENCE, None, mt), lambda v: v <= 1.05),
        _target("small_local_full_window", "baby GPT: local with n <= sliding_window (plain causal path) "
                "step time / eager <= 1.05 (within 5%)",
                _quotient(rows, "small", "ours_local_full", "ours_eager", None, mt), lambda v: v <= 1.05),
        _target("small_lowrank_step", "baby GPT: lowrank training step time / eager <= 1.3",
                _quotient(rows, "small", "ours_lowrank", "ours_eager", None, mt), lambda v: v <= 1.3),
    ]


def _csv_value(value: object) -> object:
    return "" if value is None else value


def write_csv(path: Path, rows: list[dict], columns: Iterable[str]) -> None:
    """Write ``rows`` (dicts) with the given column order."""
    columns = list(columns)
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({c: _csv_value(row.get(c)) for c in columns})


def write_results(out_dir: Path, rows: list[dict], env: dict, targets: list[TargetResult],
                  ratios: list[dict]) -> dict[str, Path]:
    """results.csv, results.json (environment + rows + ratios + targets) and ratios.csv in ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"csv": out_dir / "results.csv", "json": out_dir / "results.json", "ratios": out_dir / "ratios.csv"}
    write_csv(paths["csv"], rows, COLUMNS)
    write_csv(paths["ratios"], ratios, ["section", "seq_len", "ours", "reference", "metric", "ours_value",
                                        "reference_value", "ratio"])
    payload = {"environment": env, "rows": rows, "ratios": ratios,
               "targets": [dict(asdict(t), verdict=t.verdict) for t in targets]}
    paths["json"].write_text(json.dumps(payload, indent=1, default=str), encoding="utf-8")
    return paths


def _fmt(value: float | None, scale: float = 1.0, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value / scale:,.{digits}f}"


def _markdown_table(header: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cells) + " |" for cells in body]
    return "\n".join(lines)


def _cell(rows: list[dict], section: str, case: str, n: int, column: str, scale: float, digits: int) -> str:
    for row in rows:
        if row["section"] == section and row["case"] == case and row["seq_len"] == n:
            return _fmt(row[column], scale, digits) if row["status"] == "ok" else row["status"]
    return "-"


def length_table(rows: list[dict], section: str, column: str, scale: float, digits: int = 1) -> str:
    """Markdown table: one line per case, one column per sequence length, ``column / scale``."""
    lengths = sorted({r["seq_len"] for r in rows if r["section"] == section})
    cases = list(dict.fromkeys(r["case"] for r in rows if r["section"] == section))
    body = [[c] + [_cell(rows, section, c, n, column, scale, digits) for n in lengths] for c in cases]
    return _markdown_table(["case"] + [f"n={n}" for n in lengths], body)


def ratio_table(ratios: list[dict], section: str, metric: str) -> str:
    """Markdown table of ours/reference ratios of ``metric`` for the primary pairs of ``section``."""
    lengths = sorted({r["seq_len"] for r in ratios if r["section"] == section and r["metric"] == metric})
    index = {(r["ours"], r["reference"], r["seq_len"]): r["ratio"]
             for r in ratios if r["section"] == section and r["metric"] == metric}
    body = [[f"{ours} / {ref}"] + [_fmt(index.get((ours, ref, n)), digits=2) for n in lengths]
            for ours, ref in PRIMARY_PAIRS[section] if any((ours, ref, n) in index for n in lengths)]
    return _markdown_table([f"{metric} ratio"] + [f"n={n}" for n in lengths], body)


def section_table(rows: list[dict], section: str) -> str:
    """Markdown table of a single-length section (generation, train): one line per case."""
    body = []
    for r in (r for r in rows if r["section"] == section):
        body.append([r["case"], str(r["seq_len"]), r["status"], _fmt(r["time_s"], 1e-3), _fmt(r["tokens_per_s"]),
                     _fmt(r["peak_mem_bytes"], 2**20), _fmt(r["kv_cache_bytes"], 2**10),
                     _fmt(r["mfu"], 0.01, 2) if r["mfu"] is not None else "-", r["implementation"] or "-"])
    header = ["case", "n", "status", "time ms", "tokens/s", "peak MiB", "cache KiB", "MFU %", "impl"]
    return _markdown_table(header, body)


def small_table(rows: list[dict]) -> str:
    """Markdown table of the ``small`` section: one line per case, with its parameter count, median
    step time (wall and CPU) and the quotients by the reference GPT and by ours eager."""
    measured = {r["case"]: r for r in ok_rows(rows, "small")}
    ref, eager = measured.get(SMALL_REFERENCE), measured.get("ours_eager")

    def quotient(row: dict, by: dict | None, column: str) -> str:
        return _fmt(row[column] / by[column], digits=3) if by is not None and by[column] else "-"

    body = []
    for r in (r for r in rows if r["section"] == "small"):
        if r["status"] != "ok":
            body.append([r["case"], r["status"], *["-"] * 9])
            continue
        body.append([r["case"], f"{r['params']:,}", _fmt(r["time_s"], 1e-3, 2), quotient(r, ref, "time_s"),
                     quotient(r, eager, "time_s"), _fmt(r["cpu_time_s"], 1e-3, 2), quotient(r, ref, "cpu_time_s"),
                     quotient(r, eager, "cpu_time_s"), _fmt(r["tokens_per_s"], digits=0),
                     _fmt(r["peak_mem_bytes"], 2**20), str(r["repeats"])])
    header = ["case", "parameters", "step ms", "/ reference", "/ eager", "CPU ms", "CPU / reference", "CPU / eager",
              "tokens/s", "peak MiB", "repeats"]
    return _markdown_table(header, body)


def compile_table(rows: list[dict]) -> str:
    """Markdown table of the ``compile`` section: per part (train, decode) and case, tokens/s uncompiled
    and compiled, their ratio compiled / uncompiled (> 1 means compiling pays) and the compile seconds."""
    body = []
    for section, part in (("compile_train", "train"), ("compile_decode", "decode")):
        cases = list(dict.fromkeys(r["case"] for r in rows if r["section"] == section))
        for case in cases:
            pair = {bool(r["compiled"]): r for r in rows if r["section"] == section and r["case"] == case}
            plain, comp = pair.get(False), pair.get(True)

            def tps(r: dict | None) -> str:
                if r is None:
                    return "-"
                return _fmt(r["tokens_per_s"]) if r["status"] == "ok" else r["status"]

            ok = plain is not None and comp is not None and plain["status"] == comp["status"] == "ok"
            ratio = _fmt(comp["tokens_per_s"] / plain["tokens_per_s"], digits=2) if ok else "-"
            any_row = comp or plain
            body.append([part, case, str(any_row["seq_len"]), str(any_row["batch"]), tps(plain), tps(comp), ratio,
                         _fmt(comp["compile_s"]) if comp is not None and comp["compile_s"] is not None else "-",
                         f"{plain['repeats']}/{comp['repeats']}" if ok else "-"])
    header = ["part", "case", "n", "batch", "uncompiled tok/s", "compiled tok/s", "compiled / uncompiled",
              "compile s", "repeats"]
    return _markdown_table(header, body)


def targets_table(targets: list[TargetResult]) -> str:
    """Markdown table of the targets with verdicts."""
    body = [[t.name, t.requirement, _fmt(t.measured, digits=2), t.verdict, t.detail] for t in targets]
    return _markdown_table(["target", "requirement", "measured", "verdict", "detail"], body)


def summary_markdown(rows: list[dict], env: dict, ratios: list[dict], targets: list[TargetResult],
                     command: str) -> str:
    """The whole run as markdown: settings, raw tables, ratio tables and targets."""
    parts = [
        "# hf_attn benchmark results",
        f"Command: `{command}`",
        f"Device: {env['device']}, {env['threads']} threads, dtype {env['dtype']}, torch {env['torch']}, "
        f"transformers {env['transformers']}, measured fp matmul peak {env['matmul_peak_flops'] / 1e9:.1f} GFLOP/s "
        f"({env['matmul_peak_size']}^2). Load average at start {env.get('load_average')}, "
        f"at end {env.get('load_average_end')}. Fused CPU kernels: {env.get('cpu_kernels', 'not recorded')}.",
        f"Timing: {env['timing_method']}. Memory: {env['memory_method']}.",
        f"Sizes: {env['spec']}.",
        "## Targets", targets_table(targets),
    ]
    for section, title in (("attention", "One attention layer (projections included), forward + backward"),
                           ("kernel", "Attention kernel alone (no projections, mask creation included), "
                                      "forward + backward"),
                           ("model", "Whole model, forward + backward of the LM loss")):
        if any(r["section"] == section for r in rows):
            parts += [f"## {title}", "Median time (ms):", length_table(rows, section, "time_s", 1e-3),
                      "Peak memory (MiB):", length_table(rows, section, "peak_mem_bytes", 2**20),
                      "Ratios ours / reference (time; < 1 means ours is faster):", ratio_table(ratios, section, "time"),
                      "Ratios ours / reference (CPU time of the process, less sensitive to other load):",
                      ratio_table(ratios, section, "cpu_time"),
                      "Ratios ours / reference (peak memory):", ratio_table(ratios, section, "memory")]
    if any(r["section"] == "scaling" for r in rows):
        parts += ["## Growth with n (linear modes, all lengths interleaved in the same rounds)",
                  "Median time (ms):", length_table(rows, "scaling", "time_s", 1e-3),
                  "Median CPU time of the process (ms):", length_table(rows, "scaling", "cpu_time_s", 1e-3)]
    for section, title in (("generation", "Generation (greedy, batch 1)"),
                           ("train", "Training step (forward + backward + AdamW)")):
        if any(r["section"] == section for r in rows):
            parts += [f"## {title}", section_table(rows, section)]
    if any(r["section"].startswith("compile_") for r in rows):
        parts += ["## torch.compile(fullgraph=True) vs uncompiled",
                  "train: forward + backward + AdamW (model compiled, optimizer not); decode: greedy generate() "
                  "with a static cache (decode step compiled via CompileConfig). Compile time excluded from "
                  "the timings (compiled cases warmed up until no new graph compiles) and shown apart.",
                  compile_table(rows)]
    small = [r for r in rows if r["section"] == "small"]
    if small:
        parts += ["## Small size: baby-GPT training step (forward + backward + AdamW)",
                  f"n={small[0]['seq_len']}, batch {small[0]['batch']}; median of interleaved steps. "
                  "What each case is:\n\n" + "\n".join(f"- `{r['case']}`: {r['note']}" for r in small),
                  small_table(rows)]
    return "\n\n".join(parts) + "\n"


def plot_results(out_dir: Path, rows: list[dict]) -> list[Path]:
    """Draw attention.png, kernel.png, model.png (time and memory vs n, log-log), generation.png, train.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written: list[Path] = []
    for section, title in (("attention", "one attention layer, fwd+bwd"), ("kernel", "attention kernel only, fwd+bwd"),
                           ("model", "whole model, fwd+bwd")):
        measured = ok_rows(rows, section)
        if not measured:
            continue
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
        for ax, column, label in ((axes[0], "time_s", "median time (s)"), (axes[1], "peak_mem_bytes", "peak memory (MiB)")):
            scale = 2**20 if column == "peak_mem_bytes" else 1.0
            sides = {r["case"]: r["side"] for r in measured}
            for case, side in sides.items():
                points = sorted((r["seq_len"], r[column] / scale) for r in measured if r["case"] == case)
                ax.plot(*zip(*points), marker="o", linestyle="-" if side == "ours" else "--", label=case)
            ax.set(xscale="log", yscale="log", xlabel="sequence length n", ylabel=label, title=f"{title}: {label}")
            ax.set_xscale("log", base=2)
            ax.grid(True, which="both", alpha=0.3)
        axes[1].legend(fontsize=8)
        fig.tight_layout()
        written.append(out_dir / f"{section}.png")
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)

    cache = [r for r in rows if r["section"] == "generation_cache"]
    gen = ok_rows(rows, "generation")
    if cache or gen:
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
        for case in dict.fromkeys(r["case"] for r in cache):
            points = [(r["gen_len"], r["kv_cache_bytes"] / 2**10) for r in cache if r["case"] == case]
            axes[0].plot(*zip(*points), linestyle="-" if case.startswith("ours_") else "--", label=case)
        axes[0].set(xlabel="generated tokens", ylabel="cache KiB", title="cache bytes vs generated length")
        axes[0].legend(fontsize=8)
        axes[0].grid(True, alpha=0.3)
        axes[1].barh([r["case"] for r in gen], [r["tokens_per_s"] for r in gen])
        axes[1].set(xlabel="tokens/s", title="greedy generate() throughput")
        fig.tight_layout()
        written.append(out_dir / "generation.png")
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)

    small = ok_rows(rows, "small")
    if small:
        fig, ax = plt.subplots(figsize=(8, 4))
        ax.barh([r["case"] for r in small], [1e3 * r["time_s"] for r in small],
                xerr=[[1e3 * (r["time_s"] - r["time_s_min"]) for r in small],
                      [1e3 * (r["time_s_max"] - r["time_s"]) for r in small]])
        ax.set(xlabel="median step ms (bars: min..max)",
               title=f"baby-GPT training step, n={small[0]['seq_len']}, batch {small[0]['batch']}")
        fig.tight_layout()
        written.append(out_dir / "small.png")
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)

    train = ok_rows(rows, "train")
    if train:
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
        names = [r["case"] for r in train]
        axes[0].barh(names, [r["tokens_per_s"] for r in train])
        axes[0].set(xlabel="tokens/s", title=f"training step, n={train[0]['seq_len']}, batch {train[0]['batch']}")
        axes[1].barh(names, [100 * r["mfu"] for r in train])
        axes[1].set(xlabel="MFU (% of measured matmul peak)", title="model FLOPs utilisation")
        fig.tight_layout()
        written.append(out_dir / "train.png")
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)
    return written
