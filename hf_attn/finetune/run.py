"""Fine-tune an hf_attn checkpoint with ``transformers.Trainer``.

Two tasks on any hf_attn checkpoint (a folder or a Hub id):
- ``causal_lm``: continued pre-training / domain adaptation with ``AutoModelForCausalLM``; texts are
  tokenized, joined with eos and packed into blocks of ``max_seq_length`` tokens; evaluation reports
  the loss and the corpus perplexity (hf_attn's ``perplexity`` metric module);
- ``sequence_classification``: a new linear head on the pretrained body with
  ``AutoModelForSequenceClassification``; evaluation reports accuracy and F1 (binary for two labels,
  macro otherwise) through hf_attn's ``accuracy`` / ``f1`` metric modules.

Nothing here is process-specific: the same code runs under ``python``, ``accelerate launch`` and
``torchrun``; Trainer shards the batches and gathers predictions, dataset loading runs on the main
process first, and saving / pushing happens on the main process only.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from datasets import ClassLabel, Dataset, DatasetDict
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    EarlyStoppingCallback,
    EvalPrediction,
    PreTrainedTokenizerBase,
    TrainerCallback,
    TrainingArguments,
    default_data_collator,
    set_seed,
)

import hf_attn  # noqa: F401  (registers the hf_attn Auto classes)

from ..metrics import load_metric
from .args import DataArguments, ModelArguments
from .checkpoints import resolve_resume_checkpoint
from .data import BUILTIN_DATASET, load_raw_datasets
from .trainer import HfAttnTrainer

# Metrics worth recording in the model card; runtimes and throughputs are not properties of the model.
CARD_METRICS = ("accuracy", "f1", "loss", "perplexity")
_IGNORE_INDEX = -100


def load_tokenizer(path: str) -> PreTrainedTokenizerBase:
    """The checkpoint's tokenizer, with a pad token (eos stands in when it has none).

    Raises:
        ValueError: if the tokenizer has neither a pad nor an eos token.
    """
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"tokenizer_name: the tokenizer at {path!r} has no pad_token and no eos_token")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def label_names(raw: DatasetDict, column: str) -> list[str]:
    """Class names: a ClassLabel's names, else the sorted distinct values over all splits (as strings).

    Raises:
        ValueError: if the column is missing or holds fewer than two classes.
    """
    train = raw["train"]
    if column not in train.column_names:
        raise ValueError(f"label_column: {column!r} is not a column of the training data {train.column_names}")
    feature = train.features[column]
    if isinstance(feature, ClassLabel):
        names = list(feature.names)
    else:
        names = sorted({str(v) for split in raw.values() if column in split.column_names for v in split[column]})
    if len(names) < 2:
        raise ValueError(f"label_column: {column!r} holds {len(names)} distinct value(s); classification needs >= 2")
    return names


def _select(dataset: Dataset, limit: int | None) -> Dataset:
    return dataset if limit is None else dataset.select(range(min(limit, len(dataset))))


def prepare_classification(
    raw: Mapping[str, Dataset], tokenizer: PreTrainedTokenizerBase, data_args: DataArguments, names: list[str]
) -> DatasetDict:
    """Tokenize (truncating to ``max_seq_length``) and map labels to ids 0..len(names)-1."""
    first = next(iter(raw.values()))
    is_class_label = isinstance(first.features[data_args.label_column], ClassLabel)
    label_id = {name: i for i, name in enumerate(names)}

    def encode(batch: Mapping[str, list]) -> dict[str, list]:
        out = tokenizer(batch[data_args.text_column], truncation=True, max_length=data_args.max_seq_length)
        labels = batch[data_args.label_column]
        out["labels"] = list(labels) if is_class_label else [label_id[str(v)] for v in labels]
        return out

    return DatasetDict(
        {split: ds.map(encode, batched=True, remove_columns=ds.column_names, desc=f"tokenize {split}")
         for split, ds in raw.items()}
    )


def prepare_causal_lm(raw: Mapping[str, Dataset], tokenizer: PreTrainedTokenizerBase, data_args: DataArguments) -> DatasetDict:
    """Tokenize, append eos to every text, and pack each split into full blocks of ``max_seq_length``.

    Raises:
        ValueError: if a split has fewer tokens than one block.
    """
    block = data_args.max_seq_length
    eos = tokenizer.eos_token_id

    def encode(batch: Mapping[str, list]) -> dict[str, list]:
        ids = tokenizer(batch[data_args.text_column], add_special_tokens=False)["input_ids"]
        return {"input_ids": [x + [eos] if eos is not None else x for x in ids]}

    def pack(batch: Mapping[str, list]) -> dict[str, list]:
        # Concatenate the batch's texts and cut full blocks; the remainder (< block tokens) is dropped.
        flat = [t for ids in batch["input_ids"] for t in ids]
        n = len(flat) // block * block
        blocks = [flat[i : i + block] for i in range(0, n, block)]
        return {"input_ids": blocks, "attention_mask": [[1] * block for _ in blocks], "labels": [list(b) for b in blocks]}

    out = {}
    for split, ds in raw.items():
        ids = ds.map(encode, batched=True, remove_columns=ds.column_names, desc=f"tokenize {split}")
        out[split] = ids.map(pack, batched=True, batch_size=1000, desc=f"pack {split}")
        if len(out[split]) == 0:
            raise ValueError(
                f"max_seq_length: split {split!r} has fewer than {block} tokens, so no block of that length; "
                "lower max_seq_length or give more text"
            )
    return DatasetDict(out)


def classification_metrics(num_labels: int) -> Callable[[EvalPrediction], dict[str, float]]:
    """compute_metrics for Trainer: accuracy and F1 (binary for 2 labels, else macro over all labels)."""
    accuracy, f1 = load_metric("accuracy"), load_metric("f1")
    f1_kwargs = {"average": "binary"} if num_labels == 2 else {"average": "macro", "labels": list(range(num_labels))}

    def compute(prediction: EvalPrediction) -> dict[str, float]:
        logits = prediction.predictions[0] if isinstance(prediction.predictions, tuple) else prediction.predictions
        preds = np.asarray(logits).argmax(-1)
        refs = np.asarray(prediction.label_ids)
        return {
            **accuracy.compute(predictions=preds, references=refs),
            **f1.compute(predictions=preds, references=refs, **f1_kwargs),
        }

    return compute


def token_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """preprocess_logits_for_metrics: per-token NLL (B, L-1) of labels[t+1] under logits[t].

    Keeping (B, L-1) losses instead of (B, L, V) logits is what makes evaluation fit in memory.
    Ignored positions keep label -100 in ``label_ids`` and are dropped in :func:`causal_lm_metrics`.
    """
    if isinstance(logits, tuple):
        logits = logits[0]
    shift_logits, shift_labels = logits[:, :-1], labels[:, 1:]
    return F.cross_entropy(
        shift_logits.transpose(1, 2).float(), shift_labels, ignore_index=_IGNORE_INDEX, reduction="none"
    )


def causal_lm_metrics() -> Callable[[EvalPrediction], dict[str, float]]:
    """compute_metrics for Trainer: token-weighted corpus perplexity from :func:`token_nll`."""
    perplexity = load_metric("perplexity")

    def compute(prediction: EvalPrediction) -> dict[str, float]:
        nll = np.asarray(prediction.predictions)
        scored = np.asarray(prediction.label_ids)[:, 1:] != _IGNORE_INDEX
        result = perplexity.compute(losses=[row[mask].tolist() for row, mask in zip(nll, scored)])
        return {"perplexity": result["perplexity"]}

    return compute


def _card_facts(model_args: ModelArguments, data_args: DataArguments, training_args: TrainingArguments,
                names: list[str] | None) -> dict[str, Any]:
    builtin = data_args.dataset_name in (None, BUILTIN_DATASET) and data_args.train_file is None
    facts: dict[str, Any] = {}
    if training_args.hub_model_id:
        facts["repo_id"] = training_args.hub_model_id
        facts["model_name"] = training_args.hub_model_id.split("/")[-1]
    if not os.path.exists(model_args.model_name_or_path):  # a Hub id, so a valid base_model reference
        facts["base_model"] = model_args.model_name_or_path
    if builtin:
        facts["eval_dataset"] = BUILTIN_DATASET
        facts["eval_dataset_name"] = "Python stdlib functions by package (" + ", ".join(data_args.package_list) + ")"
        facts["training_data"] = (
            "The built-in hf_attn task: each example is one function or method from the Python standard "
            "library, labelled with the stdlib package its file belongs to ("
            + ", ".join(f"`{p}`" for p in data_args.package_list)
            + "). Labels come from file provenance; test code and duplicated functions are excluded; the "
            "train/validation/test split is by file."
        )
    elif data_args.dataset_name:
        facts["datasets"] = [data_args.dataset_name]
    else:
        facts["eval_dataset"] = os.path.basename(data_args.validation_file or data_args.train_file)
        facts["training_data"] = "Local files: " + ", ".join(
            f"`{os.path.basename(f)}`" for f in (data_args.train_file, data_args.validation_file) if f
        )
    if names is not None and "training_data" in facts:
        facts["training_data"] += f" Labels: {', '.join(names)}."
    return facts


def _check_early_stopping(model_args: ModelArguments, training_args: TrainingArguments) -> None:
    if model_args.early_stopping_patience is not None and not training_args.load_best_model_at_end:
        raise ValueError(
            "early_stopping_patience: needs --load_best_model_at_end (with the same --eval_strategy and "
            "--save_strategy, e.g. both 'steps') so there is a best checkpoint to stop at"
        )


def run_finetune(
    model_args: ModelArguments,
    data_args: DataArguments,
    training_args: TrainingArguments,
    callbacks: list[TrainerCallback] | None = None,
) -> dict[str, float]:
    """Train / evaluate / test as the ``do_*`` flags say, save to ``output_dir``, push if asked.

    ``callbacks`` are added to the Trainer's (after early stopping, when enabled).
    ``--resume_from_checkpoint last`` resumes from the newest *complete* ``checkpoint-N`` in
    ``output_dir``, skipping (with a warning) folders a killed save left incomplete.

    Returns:
        All metrics, keys prefixed "train_", "eval_", "test_".

    Raises:
        ValueError: on inconsistent arguments (early stopping without a best model, missing columns,
            a tokenizer larger than the model's vocabulary, ...).
    """
    _check_early_stopping(model_args, training_args)
    # Found before any work, so a run with nothing to resume from fails in seconds, not after data loading.
    resume = (
        resolve_resume_checkpoint(
            training_args.resume_from_checkpoint, training_args.output_dir,
            require_optimizer=not training_args.save_only_model,
        )
        if training_args.do_train
        else None
    )
    # One push, at the end, through HfAttnTrainer.push_to_hub (hf_attn's allow-list and card); no
    # per-save pushes of intermediate states.
    push, training_args.push_to_hub = training_args.push_to_hub, False
    set_seed(training_args.seed)

    with training_args.main_process_first(desc="load dataset"):
        raw = load_raw_datasets(
            data_args.dataset_name,
            data_args.dataset_config_name,
            train_file=data_args.train_file,
            validation_file=data_args.validation_file,
            test_file=data_args.test_file,
            validation_split_percentage=data_args.validation_split_percentage,
            stdlib_packages=data_args.package_list,
            seed=training_args.seed,
        )
    if data_args.text_column not in raw["train"].column_names:
        raise ValueError(f"text_column: {data_args.text_column!r} is not a column of {raw['train'].column_names}")
    raw["train"] = _select(raw["train"], data_args.max_train_samples)
    for split in ("validation", "test"):
        if split in raw:
            raw[split] = _select(raw[split], data_args.max_eval_samples)

    path = model_args.model_name_or_path
    tokenizer = load_tokenizer(model_args.tokenizer_name or path)
    load_kwargs = {"trust_remote_code": model_args.trust_remote_code}
    names = None
    if model_args.task == "sequence_classification":
        names = label_names(raw, data_args.label_column)
        config = AutoConfig.from_pretrained(
            path,
            num_labels=len(names),
            id2label=dict(enumerate(names)),
            label2id={n: i for i, n in enumerate(names)},
            **load_kwargs,
        )
        if config.pad_token_id is None:
            config.pad_token_id = tokenizer.pad_token_id
        model = AutoModelForSequenceClassification.from_pretrained(
            path, config=config, ignore_mismatched_sizes=model_args.ignore_mismatched_sizes, **load_kwargs
        )
        with training_args.main_process_first(desc="tokenize"):
            data = prepare_classification(raw, tokenizer, data_args, names)
        collator = DataCollatorWithPadding(tokenizer)
        compute_metrics, preprocess = classification_metrics(len(names)), None
    else:
        model = AutoModelForCausalLM.from_pretrained(path, **load_kwargs)
        with training_args.main_process_first(desc="tokenize"):
            data = prepare_causal_lm(raw, tokenizer, data_args)
        collator = default_data_collator
        compute_metrics, preprocess = causal_lm_metrics(), token_nll
    if len(tokenizer) > model.config.vocab_size:
        raise ValueError(
            f"tokenizer_name: the tokenizer has {len(tokenizer)} tokens but the model's vocab_size is "
            f"{model.config.vocab_size}; use the checkpoint's own tokenizer"
        )
    card = _card_facts(model_args, data_args, training_args, names)
    model.model_card_data = dict(card)  # intermediate checkpoint-N cards describe the data too

    all_callbacks: list[TrainerCallback] = []
    if model_args.early_stopping_patience is not None:
        all_callbacks.append(
            EarlyStoppingCallback(model_args.early_stopping_patience, model_args.early_stopping_threshold)
        )
    all_callbacks += callbacks or []
    trainer = HfAttnTrainer(
        model=model,
        args=training_args,
        data_collator=collator,
        train_dataset=data["train"] if training_args.do_train else None,
        eval_dataset=data.get("validation"),
        processing_class=tokenizer,
        compute_metrics=compute_metrics,
        preprocess_logits_for_metrics=preprocess,
        callbacks=all_callbacks,
    )

    metrics: dict[str, float] = {}
    if training_args.do_train:
        result = trainer.train(resume_from_checkpoint=resume)
        metrics.update(result.metrics)
        trainer.save_metrics("train", result.metrics)
        trainer.save_state()
    if training_args.do_eval and "validation" in data:
        metrics.update(_evaluate(trainer, data["validation"], "eval"))
    if training_args.do_predict and "test" in data:
        metrics.update(_evaluate(trainer, data["test"], "test"))

    # Card results: the test split when it was evaluated, else validation.
    prefix, split = ("test", "test") if "test_loss" in metrics else ("eval", "validation")
    results = {k: metrics[f"{prefix}_{k}"] for k in CARD_METRICS if f"{prefix}_{k}" in metrics}
    if results:
        card.update(eval_results=results, eval_split=split)
    trainer.model.model_card_data = card
    if push:
        trainer.push_to_hub(commit_message="End of training")  # saves first: weights, config, code, card
    elif training_args.do_train:
        trainer.save_model()  # save_pretrained: weights, config, code, model card (main process only)
    return metrics


def _evaluate(trainer: HfAttnTrainer, dataset: Dataset, prefix: str) -> dict[str, float]:
    metrics = trainer.evaluate(dataset, metric_key_prefix=prefix)
    trainer.log_metrics(prefix, metrics)
    trainer.save_metrics(prefix, metrics)
    return metrics


__all__ = [
    "CARD_METRICS",
    "causal_lm_metrics",
    "classification_metrics",
    "label_names",
    "load_tokenizer",
    "prepare_causal_lm",
    "prepare_classification",
    "run_finetune",
    "token_nll",
]
