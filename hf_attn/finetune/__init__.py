"""Fine-tuning hf_attn checkpoints with ``transformers.Trainer`` and publishing them to the Hub.

Kept out of the flat modeling folder on purpose: nothing here is needed to load a checkpoint, so it
never travels with the remote code. ``scripts/finetune.py`` and ``scripts/push_to_hub.py`` are thin
command-line wrappers around :func:`run_finetune` and :func:`push_checkpoint`. :class:`HfAttnTrainer`
is the ``Trainer`` whose Hub pushes go through hf_attn's allow-list and model card.
"""

from .args import TASKS, DataArguments, ModelArguments
from .checkpoints import checkpoint_problems, last_complete_checkpoint
from .data import BUILTIN_DATASET, DEFAULT_PACKAGES, build_stdlib_dataset, load_raw_datasets
from .hub import load_model_card_data, push_checkpoint
from .run import run_finetune
from .trainer import HfAttnTrainer

__all__ = [
    "BUILTIN_DATASET",
    "DEFAULT_PACKAGES",
    "TASKS",
    "DataArguments",
    "HfAttnTrainer",
    "ModelArguments",
    "build_stdlib_dataset",
    "checkpoint_problems",
    "last_complete_checkpoint",
    "load_model_card_data",
    "load_raw_datasets",
    "push_checkpoint",
    "run_finetune",
]
