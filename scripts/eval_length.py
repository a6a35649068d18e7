"""Validation perplexity versus context length for one or more hf_attn checkpoints.

    python scripts/eval_length.py outputs/cl/eager/final outputs/cl/rope/final outputs/cl/rope/final@dynamic:2 \
        --lengths 64,128,256,512,1024,2048 --out benchmarks/context_length

Writes OUT/perplexity_vs_length.csv (checkpoint, length, perplexity, tokens, stride, train_length,
seconds, note) and OUT/perplexity_vs_length.png (one line per checkpoint), and prints a Markdown table.
Each checkpoint is read on the validation split of the experiment config it was trained with (its
training_config.yaml; ``--config`` and dotted ``--data.key value`` flags override it), by sliding
windows of each length with stride L/2. A length beyond a learned position table is recorded as not
evaluated (perplexity nan and a note), never run. ``PATH@linear:F`` / ``PATH@dynamic:F`` loads a rotary
checkpoint with that rope scaling. See docs/analysis.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from hf_attn.analysis.context_length import (
    EvalSettings,
    evaluate_lengths,
    markdown_table,
    parse_checkpoint_spec,
    plot_perplexity,
    write_csv,
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoints", nargs="+", help="saved folders, each optionally PATH@linear:F or PATH@dynamic:F")
    parser.add_argument("--lengths", default="64,128,256,512,1024,2048,4096", help="comma-separated context lengths")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--stride-fraction", type=float, default=0.5,
                        help="window stride as a fraction of the length (1 = non-overlapping windows)")
    parser.add_argument("--max-tokens", type=int, help="evaluate only the first N validation tokens")
    parser.add_argument("--batch-tokens", type=int, default=8192, help="tokens per forward pass")
    parser.add_argument("--jobs", type=int, default=1, help="checkpoints evaluated in parallel processes")
    parser.add_argument("--config", help="experiment YAML naming the corpus (default: CKPT/training_config.yaml)")
    args, overrides = parser.parse_known_args(argv)
    if any(arg.startswith("-") and not arg.startswith("--data.") for arg in overrides):
        parser.error(f"unrecognised arguments {overrides}; only --data.KEY VALUE overrides are passed on")
    try:
        lengths = [int(v) for v in args.lengths.split(",") if v.strip()]
        if not lengths or min(lengths) < 2:
            raise ValueError(f"--lengths {args.lengths!r}: expected comma-separated integers >= 2")
        specs = [parse_checkpoint_spec(spec) for spec in args.checkpoints]
        settings = EvalSettings(stride_fraction=args.stride_fraction, max_tokens=args.max_tokens,
                                data_overrides=tuple(overrides), config_path=args.config,
                                batch_tokens=args.batch_tokens)
        rows = evaluate_lengths(specs, lengths, settings, jobs=args.jobs)
    except ValueError as err:
        parser.error(str(err))
    out = Path(args.out)
    print(f"wrote {write_csv(rows, out / 'perplexity_vs_length.csv')}")
    print(f"wrote {plot_perplexity(rows, out / 'perplexity_vs_length.png')}")
    print(markdown_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
