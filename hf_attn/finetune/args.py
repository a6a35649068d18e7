"""Command-line arguments of the fine-tune script, next to ``transformers.TrainingArguments``.

``HfArgumentParser((ModelArguments, DataArguments, TrainingArguments))`` turns the three dataclasses
into one parser, so every ``TrainingArguments`` flag (``--learning_rate``, ``--eval_strategy``,
``--push_to_hub``, ``--resume_from_checkpoint``...) passes through unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .data import BUILTIN_DATASET, DEFAULT_PACKAGES

TASKS = ("causal_lm", "sequence_classification")


@dataclass
class ModelArguments:
    """Which checkpoint to start from, which head to put on it, and early stopping."""

    model_name_or_path: str = field(metadata={"help": "hf_attn checkpoint folder or Hub id to start from."})
    task: str = field(
        default="sequence_classification",
        metadata={"help": f"One of {list(TASKS)}: continued pre-training, or a new classification head."},
    )
    tokenizer_name: str | None = field(default=None, metadata={"help": "Tokenizer path if not the checkpoint's."})
    trust_remote_code: bool = field(
        default=False, metadata={"help": "Load the checkpoint's own code (needed only without hf_attn's classes)."}
    )
    ignore_mismatched_sizes: bool = field(
        default=False,
        metadata={"help": "Re-initialise a classification head whose label count differs from the data's."},
    )
    early_stopping_patience: int | None = field(
        default=None,
        metadata={
            "help": "Stop after this many evaluations without improvement of --metric_for_best_model. Needs "
            "--load_best_model_at_end and matching --eval_strategy/--save_strategy."
        },
    )
    early_stopping_threshold: float = field(
        default=0.0, metadata={"help": "Minimum improvement that resets the early-stopping patience."}
    )

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"task: got {self.task!r}, allowed values are {list(TASKS)}")
        if self.early_stopping_patience is not None and self.early_stopping_patience < 1:
            raise ValueError(f"early_stopping_patience: expected an integer >= 1, got {self.early_stopping_patience}")
        if self.early_stopping_threshold < 0:
            raise ValueError(f"early_stopping_threshold: expected >= 0, got {self.early_stopping_threshold}")


@dataclass
class DataArguments:
    """Where the data comes from and how it is cut into model inputs."""

    dataset_name: str | None = field(
        default=None,
        metadata={
            "help": f"`datasets.load_dataset` name (Hub id, local dataset folder, builder). Default (and "
            f"'{BUILTIN_DATASET}'): the built-in stdlib function -> package task, no download."
        },
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "Dataset configuration name."})
    train_file: str | None = field(default=None, metadata={"help": "csv/tsv/json/jsonl/txt/parquet training file."})
    validation_file: str | None = field(default=None, metadata={"help": "Validation file, same format."})
    test_file: str | None = field(default=None, metadata={"help": "Test file, same format."})
    text_column: str = field(default="text", metadata={"help": "Column holding the input text."})
    label_column: str = field(default="label", metadata={"help": "Column holding the class (sequence_classification)."})
    max_seq_length: int = field(
        default=256,
        metadata={"help": "Classification: truncate to this many tokens. causal_lm: length of the packed blocks."},
    )
    validation_split_percentage: int = field(
        default=10, metadata={"help": "Percent of train held out when the data has no validation split."}
    )
    stdlib_packages: str = field(
        default=",".join(DEFAULT_PACKAGES),
        metadata={"help": "Built-in dataset: comma-separated stdlib packages, one class each."},
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Keep only the first N training rows."})
    max_eval_samples: int | None = field(
        default=None, metadata={"help": "Keep only the first N validation and test rows."}
    )

    def __post_init__(self) -> None:
        if self.max_seq_length < 2:
            raise ValueError(f"max_seq_length: expected an integer >= 2, got {self.max_seq_length}")
        for name in ("max_train_samples", "max_eval_samples"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name}: expected an integer >= 1 or None, got {value}")
        if not 0 < self.validation_split_percentage < 100:
            raise ValueError(
                f"validation_split_percentage: expected an integer in (0, 100), got {self.validation_split_percentage}"
            )

    @property
    def package_list(self) -> list[str]:
        """``stdlib_packages`` split on commas."""
        return [p.strip() for p in self.stdlib_packages.split(",") if p.strip()]


__all__ = ["TASKS", "DataArguments", "ModelArguments"]
