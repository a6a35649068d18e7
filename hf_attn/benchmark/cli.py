"""Command line of the benchmark suite (``scripts/benchmark.py`` calls :func:`main`)."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

import torch

from .profiling import write_profiles, write_small_profiles
from .reference import REFERENCE_LAYERS, REFERENCE_MODELS
from .report import (
    PRIMARY_PAIRS,
    compile_table,
    evaluate_targets,
    plot_results,
    ratio_rows,
    ratio_table,
    small_table,
    summary_markdown,
    targets_table,
    write_results,
)
from .spec import DTYPES, BenchSpec, SmallSpec
from .suite import ATTENTION_MODES, SECTIONS, RunOptions, run_suite, small_builders


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.replace(",", " ").split())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected positive integers")
    return values


def _name_list(allowed: tuple[str, ...]):
    def parse(text: str) -> tuple[str, ...]:
        values = tuple(v for v in text.replace(",", " ").split() if v)
        unknown = [v for v in values if v not in allowed]
        if unknown:
            raise argparse.ArgumentTypeError(f"{unknown} unknown; allowed values are {list(allowed)}")
        return values

    return parse


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (defaults = the full run documented in docs/performance.md)."""
    p = argparse.ArgumentParser(
        description="Benchmark hf_attn's attention modes side by side with Hugging Face reference models.")
    d = RunOptions()
    s = BenchSpec()
    p.add_argument("--seq-lens", type=_int_list, default=d.seq_lens, help="sequence lengths (comma-separated)")
    p.add_argument("--modes", type=_name_list(ATTENTION_MODES), default=d.modes, help="hf_attn attention modes")
    p.add_argument("--references", type=_name_list(tuple(REFERENCE_MODELS)), default=d.reference_models,
                   help="reference models (model, generation and train sections)")
    p.add_argument("--reference-layers", type=_name_list(REFERENCE_LAYERS), default=d.reference_layers,
                   help="reference attention layers (attention section)")
    p.add_argument("--sections", type=_name_list(SECTIONS), default=d.sections,
                   help=f"what to measure, of {list(SECTIONS)} (default: all but 'small', the baby-GPT "
                        "training step on one thread, run only when named)")
    p.add_argument("--repeats", type=int, default=d.repeats, help="timed repeats per case (median reported)")
    p.add_argument("--warmup", type=int, default=d.warmup, help="untimed warm-up calls per case")
    p.add_argument("--time-budget", type=float, default=d.time_budget_s,
                   help="seconds of timed rounds per group (section x length): fast groups repeat more "
                        "than --repeats until this is filled (at most 50 rounds)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch intra-op threads")
    p.add_argument("--out", type=Path, default=Path("benchmarks"), help="output folder (CSV, JSON, PNG, summary.md)")
    p.add_argument("--batch", type=int, default=d.batch, help="batch of the attention/model sections")
    p.add_argument("--hidden-size", type=int, default=s.hidden_size)
    p.add_argument("--num-heads", type=int, default=s.num_heads)
    p.add_argument("--num-layers", type=int, default=s.num_layers)
    p.add_argument("--intermediate-size", type=int, default=s.intermediate_size)
    p.add_argument("--vocab-size", type=int, default=s.vocab_size)
    p.add_argument("--window", type=int, default=s.window, help="sliding window (ours local, Mistral)")
    p.add_argument("--rank", type=int, default=s.rank, help="k of lowrank mode")
    p.add_argument("--gen-prompt", type=int, default=d.gen_prompt, help="prompt tokens of the generation section")
    p.add_argument("--gen-tokens", type=int, default=d.gen_tokens, help="generated tokens")
    p.add_argument("--cache-stride", type=int, default=d.cache_stride, help="record cache bytes every N tokens")
    p.add_argument("--train-seq-len", type=int, default=d.train_seq_len)
    p.add_argument("--train-batch", type=int, default=d.train_batch)
    p.add_argument("--mem-budget-gb", type=float, default=d.mem_budget_bytes / 2**30,
                   help="skip a case whose predicted peak exceeds this (GiB)")
    p.add_argument("--max-case-seconds", type=float, default=d.max_case_seconds,
                   help="skip a case whose predicted step time exceeds this")
    p.add_argument("--peak-matmul-size", type=int, default=d.peak_matmul_size, help="size of the MFU peak matmul")
    p.add_argument("--compile-backend", default=d.compile_backend,
                   help="torch.compile backend of the compile section (inductor; aot_eager/eager for a quick check)")
    p.add_argument("--compile-train-seq-len", type=int, default=d.compile_train_seq_len)
    p.add_argument("--compile-train-batch", type=int, default=d.compile_train_batch)
    p.add_argument("--compile-gen-prompt", type=int, default=d.compile_gen_prompt,
                   help="prompt tokens of the compile section's static-cache decoding")
    p.add_argument("--compile-gen-tokens", type=int, default=d.compile_gen_tokens,
                   help="new tokens of the compile section's static-cache decoding")
    p.add_argument("--small-compiled", type=_name_list(tuple(small_builders(SmallSpec()))), default=d.small_compiled, metavar="CASES",
                   help="cases of the small section also measured under torch.compile(fullgraph=True) with "
                        "--compile-backend, as <case>_compiled (e.g. refgpt_sdpa,ours_eager,ours_rope)")
    p.add_argument("--from-json", type=Path, default=None, metavar="RESULTS_JSON",
                   help="measure nothing: rebuild ratios, targets, summary and plots in --out from the rows "
                        "of an earlier run's results.json")
    p.add_argument("--profile", type=int, default=None, metavar="N",
                   help="instead of benchmarking, write torch.profiler operator tables of one attention layer "
                        "(forward + backward) at length N for --modes and --reference-layers")
    p.add_argument("--profile-small", action="store_true",
                   help="instead of benchmarking, write torch.profiler and cProfile tables of baby-GPT training "
                        "steps (--repeats interleaved profiled steps per case of the small section) and each "
                        "case's per-operator difference from the reference GPT")
    return p


def options_from_args(args: argparse.Namespace) -> tuple[RunOptions, BenchSpec]:
    """Map parsed arguments onto ``RunOptions`` and ``BenchSpec``."""
    opts = RunOptions(
        seq_lens=tuple(sorted(set(args.seq_lens))), modes=args.modes, reference_models=args.references,
        reference_layers=args.reference_layers, sections=args.sections, repeats=args.repeats,
        warmup=args.warmup, time_budget_s=args.time_budget, batch=args.batch, gen_prompt=args.gen_prompt,
        gen_tokens=args.gen_tokens,
        cache_stride=args.cache_stride, train_seq_len=args.train_seq_len, train_batch=args.train_batch,
        mem_budget_bytes=int(args.mem_budget_gb * 2**30), max_case_seconds=args.max_case_seconds,
        peak_matmul_size=args.peak_matmul_size, compile_backend=args.compile_backend,
        compile_train_seq_len=args.compile_train_seq_len, compile_train_batch=args.compile_train_batch,
        compile_gen_prompt=args.compile_gen_prompt, compile_gen_tokens=args.compile_gen_tokens,
        small_compiled=args.small_compiled,
    )
    longest = max(max(opts.seq_lens), opts.gen_prompt + opts.gen_tokens, opts.train_seq_len,
                  opts.compile_train_seq_len, opts.compile_gen_prompt + opts.compile_gen_tokens)
    spec = BenchSpec(
        hidden_size=args.hidden_size, num_heads=args.num_heads, num_layers=args.num_layers,
        intermediate_size=args.intermediate_size, vocab_size=args.vocab_size, window=args.window,
        rank=args.rank, max_positions=longest, dtype=DTYPES[args.dtype],
    )
    return opts, spec


def main(argv: list[str] | None = None) -> int:
    """Run the suite, write results to ``--out``, print tables and targets. Returns the exit code (0)."""
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    opts, spec = options_from_args(args)
    if args.profile is not None:
        cases = [f"ours_{m}" for m in opts.modes] + list(opts.reference_layers)
        for path in write_profiles(args.out, cases, args.profile, spec):
            print(f"wrote {path}")
        return 0
    if args.profile_small:
        for path in write_small_profiles(args.out, opts.small, steps=opts.repeats):
            print(f"wrote {path}")
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    command = "python scripts/benchmark.py " + shlex.join(argv)
    if args.from_json is not None:
        earlier = json.loads(args.from_json.read_text(encoding="utf-8"))
        rows, env = earlier["rows"], earlier["environment"]
        command = env.get("command", f"(options in {args.from_json}'s environment block; rendered by {command})")
        window, rank = env["spec"]["window"], env["spec"]["rank"]
    else:
        partial = args.out / "results.partial.json"

        def checkpoint(rows: list[dict], env: dict) -> None:
            partial.write_text(json.dumps({"environment": env, "rows": rows}, default=str), encoding="utf-8")

        rows, env = run_suite(opts, spec, log=lambda line: print(line, flush=True), checkpoint=checkpoint)
        partial.unlink(missing_ok=True)
        env["command"] = command
        window, rank = spec.window, spec.rank
    ratios = ratio_rows(rows)
    targets = evaluate_targets(rows, window, rank)
    paths = write_results(args.out, rows, env, targets, ratios)
    summary = summary_markdown(rows, env, ratios, targets, command.strip())
    (args.out / "summary.md").write_text(summary, encoding="utf-8")
    plots = plot_results(args.out, rows)

    print(f"\ndevice {env['device']} | threads {env['threads']} | dtype {env['dtype']} | torch {env['torch']}")
    for section in PRIMARY_PAIRS:
        for metric in ("time", "cpu_time", "memory", "tokens_per_s", "kv_cache"):
            if any(r["section"] == section and r["metric"] == metric for r in ratios):
                print(f"\n[{section}] ours / reference, {metric}:\n{ratio_table(ratios, section, metric)}")
    if any(r["section"] == "small" for r in rows):
        print(f"\n[small] baby-GPT training step, ratios to the reference GPT and to ours eager:\n{small_table(rows)}")
    if any(r["section"].startswith("compile_") for r in rows):
        print(f"\n[compile] torch.compile(fullgraph=True) vs uncompiled, tokens/s:\n{compile_table(rows)}")
    print("\nTargets:\n" + targets_table(targets))
    for t in targets:
        value = "-" if t.measured is None else f"{t.measured:.2f}"
        print(f"{t.verdict:<12} {t.name:<26} measured {value:<8} {t.requirement}")
    print("\nwrote " + ", ".join(str(p) for p in [*paths.values(), args.out / "summary.md", *plots]))
    return 0
