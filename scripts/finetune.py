#!/usr/bin/env python
"""Fine-tune an hf_attn checkpoint with transformers.Trainer (causal LM or sequence classification).

Every TrainingArguments flag passes through. Examples (see docs/finetune.md):

    python scripts/finetune.py --model_name_or_path runs/tiny --task sequence_classification \\
        --output_dir runs/tiny-cls --do_train --do_eval --do_predict --num_train_epochs 3
    accelerate launch --num_processes 2 scripts/finetune.py ...   # same flags, several processes
"""

from __future__ import annotations

import sys

from transformers import HfArgumentParser, TrainingArguments

from hf_attn.finetune import DataArguments, ModelArguments, run_finetune


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = HfArgumentParser((ModelArguments, DataArguments, TrainingArguments))
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) == 1 and argv[0].endswith((".json", ".yaml", ".yml")):
        loader = parser.parse_json_file if argv[0].endswith(".json") else parser.parse_yaml_file
        model_args, data_args, training_args = loader(argv[0])
    else:
        model_args, data_args, training_args = parser.parse_args_into_dataclasses(args=argv)
    return run_finetune(model_args, data_args, training_args)


if __name__ == "__main__":
    main()
