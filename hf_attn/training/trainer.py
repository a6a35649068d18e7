"""The training loop: one function, ``train(config)``, that runs unchanged on 1 CPU, N GPUs or FSDP.

Accelerate decides the device and the parallelism from how the script was launched
(``python``, ``accelerate launch --multi_gpu``, ``--config_file fsdp.yaml``); this module only sees
an ``Accelerator``. What it adds on top:

- data order fixed by the optimizer step (``StepBatchSampler``), so a 1-process and an N-process
  run with the same global batch take the same steps, and resume needs no batch replay;
- AdamW (decay on matrices only), linear warmup + cosine decay, clipping, gradient accumulation;
- validation perplexity with the shipped ``evaluate`` module ``hf_attn/metrics/perplexity``;
- atomic checkpoints (``checkpoint.py``), ``resume`` from the last complete one, with changed
  optimizer/schedule keys applied and changes that would alter the run refused (``resume.py``);
- SIGTERM / SIGINT stop at the next step boundary with a checkpoint (``signals.py``);
- FSDP2 on CPU-only machines too (Accelerate itself only enables FSDP on accelerators);
- a non-finite loss or gradient norm stops the run (or skips the step) before the optimizer
  touches the weights;
- at the end a ``save_pretrained`` folder (safetensors + tokenizer + generation config + remote
  code) that ``AutoModelForCausalLM`` / ``AutoTokenizer`` load.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import time
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.state import PartialState
from accelerate.utils import (
    DistributedType,
    FullyShardedDataParallelPlugin,
    broadcast_object_list,
    is_tensorboard_available,
    set_seed,
)
from datasets import Dataset
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from hf_attn import HfAttnForCausalLM
from hf_attn.metrics import load_metric
from hf_attn.training.checkpoint import (
    any_process,
    checkpoint_name,
    latest_checkpoint,
    publish_folder_atomically,
    save_checkpoint,
)
from hf_attn.training.config import STDLIB_DATASET, ExperimentConfig, TrainingConfig, save_config
from hf_attn.training.data import (
    StepBatchSampler,
    describe_corpus,
    iter_texts,
    load_raw_datasets,
    tokenize_and_pack,
)
from hf_attn.training.resume import check_resume, read_run_record, run_record
from hf_attn.training.signals import StopSignals, TrainingInterrupted
from hf_attn.training.tokenizer import load_tokenizer, train_bpe_tokenizer

logger = get_logger(__name__)

CHECKPOINTS_DIR = "checkpoints"
FINAL_DIR = "final"
TOKENIZER_DIR = "tokenizer"
METRICS_FILE = "metrics.jsonl"
RESOLVED_CONFIG_FILE = "config.yaml"
RESULTS_FILE = "train_results.json"


class NonFiniteLossError(RuntimeError):
    """The loss or gradient norm became NaN/inf; the weights were not updated with it."""


@dataclass
class TrainProgress:
    """Counters saved inside every checkpoint (registered with ``accelerator.register_for_checkpointing``)."""

    step: int = 0
    tokens_seen: int = 0
    skipped_steps: int = 0

    def state_dict(self) -> dict[str, int]:
        return {"step": self.step, "tokens_seen": self.tokens_seen, "skipped_steps": self.skipped_steps}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.step = state["step"]
        self.tokens_seen = state["tokens_seen"]
        self.skipped_steps = state["skipped_steps"]


@dataclass
class TrainResult:
    """What a run produced. Same values on every process.

    ``losses``: step -> mean training loss over the global batch, for the steps this call ran.
    ``evaluations``: ``{"step", "perplexity", "mean_loss", "num_tokens"}`` per validation.
    ``tokens_per_second``: global training throughput of this call (evaluation and checkpoints excluded).
    """

    output_dir: Path
    final_dir: Path
    steps: int
    resumed_from: Path | None
    losses: dict[int, float] = field(default_factory=dict)
    evaluations: list[dict[str, float]] = field(default_factory=list)
    final_eval: dict[str, float] = field(default_factory=dict)
    tokens_per_second: float = float("nan")
    skipped_steps: int = 0
    is_main_process: bool = True


class WarmupCosine:
    """LR multiplier: linear warmup from ~0 to 1 over ``warmup`` steps, then cosine down to ``min_ratio``.

    A callable object (not a lambda) so ``LambdaLR.state_dict`` can save it inside checkpoints.
    """

    def __init__(self, warmup: int, total: int, min_ratio: float) -> None:
        self.warmup, self.total, self.min_ratio = warmup, total, min_ratio

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        decay_steps = max(1, self.total - self.warmup)
        progress = min(1.0, (step - self.warmup) / decay_steps)
        return self.min_ratio + (1.0 - self.min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def _param_group_settings(t: TrainingConfig) -> list[dict[str, Any]]:
    # AdamW settings of the two parameter groups: decayed matrices, then undecayed norms and biases.
    common = {"lr": t.learning_rate, "betas": (t.adam_beta1, t.adam_beta2), "eps": t.adam_epsilon}
    return [{**common, "weight_decay": t.weight_decay}, {**common, "weight_decay": 0.0}]


def build_optimizer(model: torch.nn.Module, config: ExperimentConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices (ndim >= 2) only; norms and biases are not decayed."""
    decay, no_decay = [], []
    for param in model.parameters():  # parameters() yields a tied weight once
        if param.requires_grad:
            (decay if param.ndim >= 2 else no_decay).append(param)
    settings = _param_group_settings(config.training)
    return torch.optim.AdamW([{"params": decay, **settings[0]}, {"params": no_decay, **settings[1]}])


def build_scheduler(optimizer: torch.optim.Optimizer, t: TrainingConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup then cosine decay to ``min_lr_ratio``, stepped once per optimizer step."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, WarmupCosine(t.warmup_steps, t.max_steps, t.min_lr_ratio)
    )


def apply_training_settings(
    optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LambdaLR, t: TrainingConfig
) -> None:
    """Make a restored optimizer and schedule follow ``t``, keeping their step count and Adam moments.

    ``load_state`` restores each group's lr, betas, eps and weight decay and the schedule's own fields
    (warmup, total steps, minimum ratio, base LR) from the checkpoint, so without this a resumed run
    would keep the old values whatever its config says (e.g. a raised ``max_steps`` would leave the LR
    flat at its minimum). With unchanged settings this sets exactly the values already there.
    """
    for group, settings in zip(optimizer.param_groups, _param_group_settings(t)):
        group.update(settings, initial_lr=t.learning_rate)
    schedule = WarmupCosine(t.warmup_steps, t.max_steps, t.min_lr_ratio)
    scheduler.base_lrs = [t.learning_rate] * len(optimizer.param_groups)
    scheduler.lr_lambdas = [schedule] * len(optimizer.param_groups)
    # The LR of the next step, computed as LambdaLR.step() does: base LR x schedule(steps taken).
    lrs = [base * schedule(scheduler.last_epoch) for base in scheduler.base_lrs]
    for group, lr in zip(optimizer.param_groups, lrs):
        group["lr"] = lr
    scheduler._last_lr = lrs  # what get_last_lr() reports until the next step


def resolve_mixed_precision(setting: str) -> str:
    """Turn ``training.mixed_precision`` into an Accelerate precision for this machine.

    ``auto``: the launcher's ``--mixed_precision`` if it set one other than ``no``; else ``bf16``
    on a GPU that supports it, ``fp16`` on other GPUs, ``no`` on CPU.

    Raises:
        ValueError: for ``fp16`` without a GPU (Accelerate would silently train in fp32).
    """
    has_gpu = torch.cuda.is_available()
    if setting == "auto":
        launcher = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
        if launcher != "no":
            return launcher
        if not has_gpu:
            return "no"
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if setting == "fp16" and not has_gpu:
        raise ValueError(
            "config key training.mixed_precision='fp16' is invalid on this machine: fp16 needs a GPU; "
            "allowed values here are ['auto', 'no', 'bf16']"
        )
    return setting


def evaluate_perplexity(
    model: torch.nn.Module, loader: DataLoader, accelerator: Accelerator
) -> dict[str, float]:
    """Validation perplexity over every batch of the (prepared) ``loader``.

    Per-token losses are gathered from all processes and fed to the shipped ``perplexity`` metric
    on the main process; the result is broadcast so that every process returns the same dict.
    """
    metric = load_metric("perplexity", keep_in_memory=True) if accelerator.is_main_process else None
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for batch in loader:
            input_ids = batch["input_ids"]
            logits = model(input_ids=input_ids, use_cache=False).logits  # (B, T, V)
            # Token t predicts token t + 1: (B, V, T-1) against (B, T-1), fp32 for an exact softmax.
            nll = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), input_ids[:, 1:], reduction="none")
            nll = accelerator.gather_for_metrics(nll)
            if metric is not None:
                metric.add_batch(losses=nll.cpu().double().numpy())
    model.train(was_training)
    result = [metric.compute() if metric is not None else None]
    broadcast_object_list(result)
    return result[0]


def _flat_hparams(config: ExperimentConfig) -> dict[str, Any]:
    # TensorBoard hparams accept only scalars and strings.
    flat = {}
    for section, values in config.to_dict().items():
        for key, value in values.items():
            flat[f"{section}.{key}"] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return flat


def _model_card_data(config: ExperimentConfig, final_eval: dict[str, float]) -> dict[str, Any]:
    data = config.data
    corpus = describe_corpus(data)
    if data.dataset == STDLIB_DATASET:
        paragraph = (
            "Trained from scratch on the source code of the Python standard library (every `*.py` file under "
            "`sysconfig.get_paths()['stdlib']`, third-party packages excluded), split into train/validation by "
            "a hash of each file's relative path."
        )
    else:
        paragraph = f"Trained from scratch on {corpus}."
    card: dict[str, Any] = {
        "training_data": paragraph,
        "eval_results": {"perplexity": final_eval["perplexity"]},
        "eval_dataset_name": corpus,
        "eval_split": "validation",
    }
    if data.dataset not in (STDLIB_DATASET, "files"):
        card["datasets"] = [data.dataset]
    return card


class _MetricsLog:
    """Appends JSON lines to ``metrics.jsonl`` and forwards scalars to Accelerate's trackers."""

    def __init__(self, accelerator: Accelerator, path: Path) -> None:
        self.accelerator, self.path = accelerator, path

    def log(self, values: dict[str, float], step: int) -> None:
        self.accelerator.log(values, step=step)
        if self.accelerator.is_main_process:
            with self.path.open("a", encoding="utf-8") as fh:
                fh.write(json.dumps({"step": step, **values}) + "\n")


@dataclass
class _StartPoint:
    """Where a run starts: the checkpoint to resume from (or None) and what the resume changes."""

    checkpoint: Path | None = None
    changes: list[str] = field(default_factory=list)  # "training.key: old -> new", applied
    warning: str | None = None


def _is_sharded(accelerator: Accelerator) -> bool:
    # FSDP checkpoints hold one shard per process; the others hold whole tensors.
    return accelerator.distributed_type == DistributedType.FSDP


def _check_output_dir(config: ExperimentConfig, accelerator: Accelerator) -> _StartPoint:
    """Decide where the run starts (and refuse a resume that would change the run).

    The main process decides and broadcasts, so that all processes agree even while it deletes.
    """
    out = Path(config.training.output_dir)
    decision: list[Any] = [None, None]  # [_StartPoint, error message]
    if accelerator.is_main_process:
        try:
            decision[0] = _main_process_output_dir(
                config, out, accelerator.num_processes, _is_sharded(accelerator)
            )
        except ValueError as err:
            decision[1] = str(err)
    broadcast_object_list(decision)
    if decision[1] is not None:
        raise ValueError(decision[1])
    return decision[0]


def _main_process_output_dir(
    config: ExperimentConfig, out: Path, num_processes: int, sharded: bool
) -> _StartPoint:
    t = config.training
    latest = latest_checkpoint(out / CHECKPOINTS_DIR)
    if t.resume:
        if latest is None:
            return _StartPoint()
        record = read_run_record(latest, out / RESOLVED_CONFIG_FILE)
        warning = None
        if record.config is None:
            warning = (
                f"{latest} records no config and {record.source} is unreadable ({record.problem}): resuming "
                "without checking which config keys changed"
            )
        return _StartPoint(latest, check_resume(record, config, num_processes, sharded), warning)
    if latest is not None or (out / FINAL_DIR).exists():
        if not t.overwrite_output_dir:
            found = latest.name if latest is not None else FINAL_DIR
            raise ValueError(
                f"config key training.output_dir={t.output_dir!r} is invalid: it already holds a run ({found}); "
                "pass --resume to continue it, --training.overwrite_output_dir true to start over, "
                "or choose another output_dir"
            )
        for name in (CHECKPOINTS_DIR, FINAL_DIR, TOKENIZER_DIR, METRICS_FILE, "tensorboard"):
            target = out / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
    return _StartPoint()


def _prepare_tokenizer(
    config: ExperimentConfig, accelerator: Accelerator, raw_train: Any, resuming: bool
) -> PreTrainedTokenizerBase:
    """Main process trains/loads and saves the tokenizer into the run folder; the others load that copy."""
    tok_dir = Path(config.training.output_dir) / TOKENIZER_DIR
    if accelerator.is_main_process:
        if resuming and tok_dir.is_dir():
            tokenizer = load_tokenizer(str(tok_dir))
        else:
            if config.tokenizer.path is not None:
                tokenizer = load_tokenizer(config.tokenizer.path)
            else:
                tokenizer = train_bpe_tokenizer(
                    iter_texts(raw_train, config.data.text_column),
                    config.tokenizer.vocab_size,
                    min_frequency=config.tokenizer.min_frequency,
                    model_max_length=config.hf_config(vocab_size=1).max_position_embeddings,
                    length=len(raw_train),
                )
            tokenizer.save_pretrained(str(tok_dir))
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        tokenizer = load_tokenizer(str(tok_dir))
    return tokenizer


def _use_fsdp_on_cpu(accelerator: Accelerator) -> None:
    """Switch a gloo ``MULTI_CPU`` group to FSDP2, as the launcher's FSDP config asked.

    Accelerate only turns its FSDP plugin on for accelerator process groups: on a CPU-only machine
    it forms a ``MULTI_CPU`` group and would silently train with DDP. torch's FSDP2 (``fully_shard``)
    runs on CPU over gloo, so the state is switched to FSDP with the plugin that Accelerate builds
    from the launcher's ``FSDP_*`` variables; everything downstream (``prepare``, sharded
    ``save_state``/``load_state``, ``get_state_dict``) then takes its FSDP2 path.
    """
    plugin = FullyShardedDataParallelPlugin()
    if plugin.fsdp_version != 2:
        # Accelerate's FSDP1 wrapper looks for an accelerator device and stops with "There are
        # currently no available devices found"; say what to change instead.
        raise ValueError(
            f"FSDP on CPU needs fsdp_version: 2 (torch's fully_shard); the accelerate config has "
            f"fsdp_version: {plugin.fsdp_version}, which Accelerate runs on GPUs only"
        )
    if accelerator.mixed_precision != "no":
        plugin.set_mixed_precision(accelerator.mixed_precision)
    accelerator.state.fsdp_plugin = plugin
    accelerator.state.distributed_type = DistributedType.FSDP
    # Accelerate's collectives (reduce, gather...) read the type from PartialState's shared state.
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP


def _make_accelerator(t: TrainingConfig) -> Accelerator:
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    on_cpu = launched > 1 and not torch.cuda.is_available()
    accelerator = Accelerator(
        # `accelerate launch --multi_gpu` on a machine without GPUs would otherwise start N unrelated
        # single-process runs; cpu=True makes them one gloo (MULTI_CPU) group.
        cpu=on_cpu,
        mixed_precision=resolve_mixed_precision(t.mixed_precision),
        log_with=None if t.report_to == "none" else t.report_to,
        project_dir=t.output_dir,
        # The schedule is in optimizer steps; by default Accelerate would step it once per process.
        step_scheduler_with_optimizer=False,
    )
    if on_cpu and os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        _use_fsdp_on_cpu(accelerator)
    if accelerator.num_processes != launched:
        raise RuntimeError(
            f"the launcher started {launched} processes but Accelerate formed a group of "
            f"{accelerator.num_processes}; check the accelerate config (distributed_type, num_processes)"
        )
    return accelerator


def _prepare_data(
    config: ExperimentConfig, accelerator: Accelerator, resuming: bool
) -> tuple[PreTrainedTokenizerBase, Dataset, Dataset]:
    """Tokenizer plus packed train and validation blocks (main process first: it fills the caches)."""
    with accelerator.main_process_first():
        raw = load_raw_datasets(config.data, seed=config.training.seed)
    tokenizer = _prepare_tokenizer(config, accelerator, raw["train"], resuming=resuming)
    with accelerator.main_process_first():
        blocks = tokenize_and_pack(
            raw,
            tokenizer,
            config.data.block_size,
            text_column=config.data.text_column,
            num_proc=config.data.num_proc,
        )
    return tokenizer, blocks["train"], blocks["validation"]


def _build_model(config: ExperimentConfig, tokenizer: PreTrainedTokenizerBase) -> HfAttnForCausalLM:
    set_seed(config.training.seed)  # the same initial weights whatever the data preparation consumed
    model = HfAttnForCausalLM(
        config.hf_config(
            vocab_size=len(tokenizer),
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        setattr(model.generation_config, name, getattr(tokenizer, name))
    return model


class _StepOutcome(NamedTuple):
    """One step's forward/backward result, identical on every process."""

    loss: float  # averaged over the global batch
    nonfinite: bool  # any process saw a NaN/inf loss or gradient norm
    grad_norm: torch.Tensor | None  # before clipping; None without clipping
    stop: bool  # any process received a stop signal


def _forward_backward(
    model: torch.nn.Module,
    batches: Iterator[dict[str, torch.Tensor]],
    accelerator: Accelerator,
    t: TrainingConfig,
    stop_requested: bool,
) -> _StepOutcome:
    """Accumulate one optimizer step's gradients and clip them; share the step's flags."""
    accumulation = t.gradient_accumulation_steps
    micro_losses = []
    for micro in range(accumulation):
        input_ids = next(batches)["input_ids"].to(accelerator.device, non_blocking=True)  # (B, T)
        # Gradients are all-reduced only on the last micro-batch of the step.
        with accelerator.no_sync(model) if micro < accumulation - 1 else nullcontext():
            loss = model(input_ids=input_ids, labels=input_ids, use_cache=False).loss
            accelerator.backward(loss / accumulation)
        micro_losses.append(loss.detach().float())
    loss = torch.stack(micro_losses).mean()
    grad_norm = accelerator.clip_grad_norm_(model.parameters(), t.max_grad_norm) if t.max_grad_norm else None
    bad = not torch.isfinite(loss).item()
    if grad_norm is not None and accelerator.mixed_precision != "fp16":  # fp16: the grad scaler handles it
        bad = bad or not torch.isfinite(grad_norm).item()
    # One collective for the loss and both flags: every process must take the same branch afterwards.
    flags = torch.tensor([float(bad), float(stop_requested)], device=loss.device)
    stats = accelerator.reduce(torch.cat([loss.reshape(1), flags]), reduction="sum")
    return _StepOutcome(
        stats[0].item() / accelerator.num_processes, stats[1].item() > 0, grad_norm, stats[2].item() > 0
    )


def _without_tied_duplicates(state_dict: dict[str, Any], model: torch.nn.Module) -> dict[str, Any]:
    """Keep one name per shared parameter (the first, e.g. the embedding of a tied ``lm_head``).

    FSDP's ``get_state_dict`` gathers every name into its own tensor, so ``save_pretrained`` no longer
    sees that the output embedding *is* the input embedding and would save it twice.
    """
    first: dict[int, str] = {}
    duplicates = set()
    for name, param in model.named_parameters(remove_duplicate=False):
        if first.setdefault(id(param), name) != name:
            duplicates.add(name)
    return {name: value for name, value in state_dict.items() if name not in duplicates}


def _save_final(
    accelerator: Accelerator,
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    config: ExperimentConfig,
    final_eval: dict[str, float],
    summary: dict[str, Any],
) -> Path:
    """Atomically write the ``save_pretrained`` folder (weights, tokenizer, code, card, results)."""

    def write(folder: Path) -> None:
        state_dict = accelerator.get_state_dict(model)  # collective under FSDP: every process calls it
        if accelerator.is_main_process:
            unwrapped = accelerator.unwrap_model(model)
            unwrapped.model_card_data = _model_card_data(config, final_eval)
            unwrapped.save_pretrained(str(folder), state_dict=_without_tied_duplicates(state_dict, unwrapped))
            tokenizer.save_pretrained(str(folder))
            save_config(config, folder / "training_config.yaml")
            with (folder / RESULTS_FILE).open("w", encoding="utf-8") as fh:
                json.dump(summary, fh, indent=2)

    final_dir = Path(config.training.output_dir) / FINAL_DIR
    return publish_folder_atomically(accelerator, final_dir, write, what="final model")


def train(config: ExperimentConfig) -> TrainResult:
    """Train the model described by ``config``; call it on every process of the launch.

    Raises:
        ValueError: for a bad config/output folder, before any training step.
        NonFiniteLossError: on a NaN/inf loss with ``training.on_nonfinite_loss='stop'`` (or too many
            skipped steps in a row); the last checkpoint is intact.
        CheckpointError: if a checkpoint could not be written; the previous one is intact.
        TrainingInterrupted: SIGTERM/SIGINT arrived; a checkpoint of the last step was written.
    """
    t = config.training
    out = Path(t.output_dir)
    accelerator = _make_accelerator(t)
    start = _check_output_dir(config, accelerator)
    resume_dir = start.checkpoint
    if start.warning is not None:
        logger.warning(start.warning, main_process_only=True)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        save_config(config, out / RESOLVED_CONFIG_FILE)
    set_seed(t.seed)
    tokenizer, train_blocks, validation_blocks = _prepare_data(config, accelerator, resume_dir is not None)
    periodic_blocks = validation_blocks
    if t.eval_blocks is not None:
        periodic_blocks = validation_blocks.select(range(min(t.eval_blocks, len(validation_blocks))))

    model = _build_model(config, tokenizer)
    raw_optimizer = optimizer = build_optimizer(model, config)
    raw_scheduler = scheduler = build_scheduler(optimizer, t)
    eval_loader = DataLoader(periodic_blocks, batch_size=t.eval_batch_size, shuffle=False)
    final_eval_loader = DataLoader(validation_blocks, batch_size=t.eval_batch_size, shuffle=False)
    model, optimizer, scheduler, eval_loader, final_eval_loader = accelerator.prepare(
        model, optimizer, scheduler, eval_loader, final_eval_loader
    )
    progress = TrainProgress()
    accelerator.register_for_checkpointing(progress)
    if resume_dir is not None:
        accelerator.load_state(str(resume_dir))
        apply_training_settings(raw_optimizer, raw_scheduler, t)
        accelerator.print(f"resumed from {resume_dir} at step {progress.step}")
        if start.changes:
            accelerator.print(
                f"config changed since the checkpoint, applied from step {progress.step + 1}: "
                + "; ".join(start.changes)
            )
    elif t.resume:
        accelerator.print(f"no complete checkpoint in {out / CHECKPOINTS_DIR}: starting from scratch")

    sampler = StepBatchSampler(
        len(train_blocks),
        batch_size=t.per_device_batch_size,
        num_processes=accelerator.num_processes,
        process_index=accelerator.process_index,
        accumulation_steps=t.gradient_accumulation_steps,
        seed=t.seed,
        start_step=progress.step,
        max_steps=t.max_steps,
    )
    # Not passed to accelerator.prepare: StepBatchSampler already shards by process (see its docstring).
    train_loader = DataLoader(
        train_blocks,
        batch_sampler=sampler,
        num_workers=t.num_workers,
        pin_memory=accelerator.device.type == "cuda",
    )
    tokens_per_step = sampler.global_batch_size * config.data.block_size
    if t.report_to == "tensorboard" and not is_tensorboard_available():
        # Accelerate would drop the tracker silently; say so, metrics.jsonl still has everything.
        logger.warning(
            "training.report_to='tensorboard' but the tensorboard package is not installed: logging to "
            f"{out / METRICS_FILE} only (pip install tensorboard, or set training.report_to none)",
            main_process_only=True,
        )
    elif t.report_to != "none":
        accelerator.init_trackers("tensorboard", config=_flat_hparams(config))
    log = _MetricsLog(accelerator, out / METRICS_FILE)
    result = TrainResult(
        out, out / FINAL_DIR, t.max_steps, resume_dir, is_main_process=accelerator.is_main_process
    )
    accelerator.print(
        f"{sum(p.numel() for p in model.parameters()):,} parameters, {len(train_blocks):,} train blocks of "
        f"{config.data.block_size} tokens ({describe_corpus(config.data)}), global batch "
        f"{sampler.global_batch_size} blocks, {accelerator.num_processes} process(es) "
        f"({accelerator.distributed_type.value}), mixed precision {accelerator.mixed_precision}"
    )

    record = run_record(config, accelerator.num_processes, _is_sharded(accelerator))
    last_saved_step = progress.step if resume_dir is not None else None

    def checkpoint(step: int) -> Path:
        nonlocal last_saved_step
        folder = save_checkpoint(
            accelerator,
            out / CHECKPOINTS_DIR,
            step,
            keep=t.keep_checkpoints,
            metadata={"tokens_seen": progress.tokens_seen, **record},
        )
        last_saved_step = step
        return folder

    def interrupted(stop: StopSignals) -> TrainingInterrupted:
        folder = (
            out / CHECKPOINTS_DIR / checkpoint_name(progress.step)
            if last_saved_step == progress.step
            else checkpoint(progress.step)
        )
        bar.close()
        accelerator.end_training()  # flush the trackers
        name = signal.Signals(stop.received).name if stop.requested else "a stop signal on another process"
        return TrainingInterrupted(
            f"stopped by {name} after step {progress.step} of {t.max_steps}; checkpoint {folder} holds the "
            "whole training state: continue with --resume (same config and training.output_dir)",
            signal_name=name,
            step=progress.step,
            checkpoint=folder,
            exit_code=128 + (stop.received or signal.SIGTERM),
            num_processes=accelerator.num_processes,
            is_main_process=accelerator.is_main_process,
        )

    # window_*: since the last log line; train_time/run_steps: this whole call (eval and checkpoints excluded).
    window_loss, window_losses, window_steps, window_time = 0.0, 0, 0, 0.0
    train_time, run_steps, consecutive_skips = 0.0, 0, 0
    batches = iter(train_loader)
    bar = tqdm(
        total=t.max_steps, initial=progress.step, desc="train", disable=not accelerator.is_local_main_process
    )
    stop = StopSignals(announce=accelerator.is_local_main_process)
    with stop:
        for step in range(progress.step + 1, t.max_steps + 1):  # 1-based: step s is the s-th optimizer step
            started = time.perf_counter()
            model.train()
            outcome = _forward_backward(model, batches, accelerator, t, stop.requested)
            loss, grad_norm = outcome.loss, outcome.grad_norm
            if outcome.nonfinite:
                where = f"at step {step} (loss {loss}, grad norm {grad_norm})"
                last = latest_checkpoint(out / CHECKPOINTS_DIR)
                if accelerator.mixed_precision == "fp16":
                    optimizer.step()  # the grad scaler sees the inf/NaN gradients, skips and lowers its scale
                optimizer.zero_grad(set_to_none=True)
                if t.on_nonfinite_loss == "stop":
                    raise NonFiniteLossError(
                        f"non-finite loss or gradient {where}; the step was not applied, so the weights are "
                        f"unchanged. Last complete checkpoint: {last}. Lower training.learning_rate, use "
                        "mixed_precision bf16, or set training.on_nonfinite_loss=skip"
                    )
                consecutive_skips += 1
                progress.skipped_steps += 1
                result.skipped_steps += 1
                logger.warning(f"skipped non-finite step {where}", main_process_only=True)
                if consecutive_skips > t.max_consecutive_skips:
                    raise NonFiniteLossError(
                        f"{consecutive_skips} non-finite steps in a row, the last {where}; more than "
                        f"training.max_consecutive_skips={t.max_consecutive_skips}. Last complete checkpoint: {last}"
                    )
            else:
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                consecutive_skips = 0
                result.losses[step] = loss
                window_loss += loss
                window_losses += 1
            scheduler.step()
            progress.step = step
            progress.tokens_seen += tokens_per_step
            elapsed = time.perf_counter() - started
            window_time, window_steps = window_time + elapsed, window_steps + 1
            train_time, run_steps = train_time + elapsed, run_steps + 1
            bar.update(1)

            done = step == t.max_steps
            if step % t.log_every == 0 or done:
                values = {
                    "train/lr": scheduler.get_last_lr()[0],
                    "train/tokens_per_second": tokens_per_step * window_steps / window_time,
                }
                if window_losses:  # every step of the window may have been skipped
                    values["train/loss"] = window_loss / window_losses
                if grad_norm is not None and not outcome.nonfinite:
                    values["train/grad_norm"] = float(grad_norm)
                log.log(values, step=step)
                bar.set_postfix(
                    loss=f"{values.get('train/loss', float('nan')):.3f}", lr=f"{values['train/lr']:.2e}"
                )
                window_loss, window_losses, window_steps, window_time = 0.0, 0, 0, 0.0
            if outcome.stop:  # before any evaluation: a preempted job may have seconds left
                raise interrupted(stop)
            if t.eval_every and step % t.eval_every == 0 and not done:
                evaluation = evaluate_perplexity(model, eval_loader, accelerator)
                result.evaluations.append({"step": step, **evaluation})
                log.log(
                    {"eval/perplexity": evaluation["perplexity"], "eval/loss": evaluation["mean_loss"]}, step
                )
            if t.checkpoint_every and (step % t.checkpoint_every == 0 or done):
                checkpoint(step)
        # A signal during the last step's update or checkpoint: stop before the final evaluation.
        if any_process(accelerator, stop.requested):
            raise interrupted(stop)
    bar.close()
    if run_steps:
        result.tokens_per_second = tokens_per_step * run_steps / train_time

    result.final_eval = evaluate_perplexity(model, final_eval_loader, accelerator)
    result.evaluations.append({"step": progress.step, **result.final_eval})
    log.log(
        {"eval/perplexity": result.final_eval["perplexity"], "eval/loss": result.final_eval["mean_loss"]},
        progress.step,
    )
    summary = {
        "steps": progress.step,
        "tokens_seen": progress.tokens_seen,
        "skipped_steps": progress.skipped_steps,
        "validation_perplexity": result.final_eval["perplexity"],
        "validation_loss": result.final_eval["mean_loss"],
        "validation_tokens": result.final_eval["num_tokens"],
        # None when this call ran no step (resuming a finished run).
        "train_tokens_per_second": result.tokens_per_second if run_steps else None,
        "num_processes": accelerator.num_processes,
        "mixed_precision": accelerator.mixed_precision,
        "parameters": sum(p.numel() for p in accelerator.unwrap_model(model).parameters()),
    }
    _save_final(accelerator, model, tokenizer, config, result.final_eval, summary)
    accelerator.end_training()
    return result


__all__ = [
    "NonFiniteLossError",
    "TrainProgress",
    "TrainResult",
    "TrainingInterrupted",
    "WarmupCosine",
    "apply_training_settings",
    "build_optimizer",
    "build_scheduler",
    "evaluate_perplexity",
    "resolve_mixed_precision",
    "train",
]
