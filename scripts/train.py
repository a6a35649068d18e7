"""Train an hf_attn language model from a YAML experiment config.

    python scripts/train.py --config configs/small_eager.yaml                    # one process
    accelerate launch --multi_gpu --num_processes 8 scripts/train.py --config ...  # 8 GPUs, same script
    accelerate launch --config_file configs/accelerate/fsdp.yaml scripts/train.py --config ...

Any config key can be overridden with a dotted flag, e.g. ``--model.attention_mode local
--training.max_steps 10``; ``--resume`` continues from the last complete checkpoint of
``training.output_dir``. SIGTERM or Ctrl-C stops after the current optimizer step with a checkpoint
and prints the command that continues the run (exit code 128 + the signal number). See docs/training.md.
"""

from __future__ import annotations

import argparse
import math
import sys

from hf_attn.training import TrainingInterrupted, load_config, resume_command, train


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--config", help="YAML experiment config (configs/<size>_<mode>.yaml); default: built-in defaults"
    )
    parser.add_argument("--resume", action="store_true", help="continue from the latest complete checkpoint")
    args, overrides = parser.parse_known_args(argv)
    if args.resume:
        overrides.append("--training.resume=true")
    try:
        config = load_config(args.config, overrides)
    except ValueError as err:
        parser.error(str(err))  # exit code 2 with the message, before any work
    try:
        result = train(config)
    except TrainingInterrupted as stopped:
        if stopped.is_main_process:
            command = resume_command(sys.argv[0], args.config, overrides, stopped.num_processes)
            print(f"{stopped}\nresume with: {command}", flush=True)
        return stopped.exit_code
    if result.is_main_process:
        speed = (
            ""
            if math.isnan(result.tokens_per_second)
            else f", {result.tokens_per_second:.0f} training tokens/s"
        )
        print(
            f"validation perplexity {result.final_eval['perplexity']:.3f} "
            f"(loss {result.final_eval['mean_loss']:.4f} over {result.final_eval['num_tokens']} tokens){speed}; "
            f"model saved to {result.final_dir}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
