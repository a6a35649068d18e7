"""What a resumed run may change, checked before any work.

Every checkpoint's completion marker records the run that wrote it (``run_record``): the resolved
config, the number of processes and whether the weights are sharded (FSDP). ``--resume`` compares
the new config with that record rather than with ``output_dir/config.yaml`` (a copy for people to
read), so a lost, empty or corrupt ``config.yaml`` never blocks a resume.

- **Refused** (``ValueError`` naming the key): ``model.*``, ``data.*`` except ``cache_dir`` and
  ``num_proc``, ``tokenizer.*`` and ``training.seed`` (they decide the weights' shapes, the data and
  its order); the global batch ``per_device_batch_size x processes x gradient_accumulation_steps``
  (it decides which blocks every step reads; the three factors may change as long as the product
  stays); the kind of checkpoint (FSDP-sharded or not) and, for a sharded one, the number of processes.
- **Applied** from the next step: every other ``training`` key. The optimizer and schedule keys
  (learning rate, warmup, ``max_steps``, minimum ratio, weight decay, Adam betas/epsilon) are set on
  the restored optimizer and scheduler by ``trainer.apply_training_settings`` (the cosine is rebuilt
  to end at the new ``max_steps``); the others are read at every step.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from hf_attn.training.checkpoint import COMPLETE_MARKER, read_checkpoint_metadata
from hf_attn.training.config import ExperimentConfig, load_yaml

REFUSED_SECTIONS = ("model", "data", "tokenizer")
# data.cache_dir and data.num_proc only say where and how fast the same data is prepared.
MAY_CHANGE_IN_REFUSED_SECTIONS = {"data": ("cache_dir", "num_proc")}
REFUSED_TRAINING_KEYS = ("seed",)
# How this call was started, not what the run does: never reported as a change.
_INVOCATION_KEYS = ("output_dir", "resume", "overwrite_output_dir")


@dataclass
class RunRecord:
    """What a checkpoint says about the run that wrote it; None where it does not say."""

    config: dict[str, Any] | None
    num_processes: int | None
    sharded: bool | None
    source: str  # where the record was read, for messages
    problem: str | None = None  # why no config could be read


def run_record(config: ExperimentConfig, num_processes: int, sharded: bool) -> dict[str, Any]:
    """The JSON-able record stored in every checkpoint's completion marker."""
    return {"config": _plain(config.to_dict()), "num_processes": num_processes, "sharded": sharded}


def read_run_record(checkpoint: str | Path, fallback_config: str | Path) -> RunRecord:
    """The record in ``checkpoint``'s marker; for checkpoints written before markers carried one,
    the config in ``fallback_config`` (``output_dir/config.yaml``) if it is readable."""
    marker = read_checkpoint_metadata(checkpoint)
    if isinstance(marker.get("config"), dict):
        return RunRecord(
            marker["config"],
            marker.get("num_processes"),
            marker.get("sharded"),
            f"{checkpoint}/{COMPLETE_MARKER}",
        )
    source = str(fallback_config)
    try:
        saved = load_yaml(Path(fallback_config).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as err:
        return RunRecord(None, None, None, source, f"{type(err).__name__}: {err}")
    if not isinstance(saved, dict) or not all(isinstance(saved.get(s, {}), dict) for s in REFUSED_SECTIONS):
        return RunRecord(None, None, None, source, f"not a config mapping: {saved!r:.80}")
    return RunRecord(saved, None, None, source)


def check_resume(record: RunRecord, config: ExperimentConfig, num_processes: int, sharded: bool) -> list[str]:
    """Refuse a resume that would silently change the run; list what it changes instead.

    Returns:
        ``"training.key: old -> new"`` for every applied change (empty when nothing changed or the
        record holds no config).

    Raises:
        ValueError: naming the refused key(s) and what to do.
    """
    _check_process_layout(record, num_processes, sharded)
    if record.config is None:
        return []
    saved, now = record.config, _plain(config.to_dict())
    for section in REFUSED_SECTIONS:
        old, new = dict(saved.get(section) or {}), dict(now[section])
        for key in MAY_CHANGE_IN_REFUSED_SECTIONS.get(section, ()):
            old.pop(key, None)
            new.pop(key, None)
        for key in sorted(old.keys() | new.keys()):
            if old.get(key) != new.get(key):
                _refuse(f"{section}.{key}", old.get(key), new.get(key))
    old_training, new_training = saved.get("training") or {}, now["training"]
    for key in REFUSED_TRAINING_KEYS:
        if old_training.get(key) != new_training[key]:
            _refuse(f"training.{key}", old_training.get(key), new_training[key])
    _check_global_batch(old_training, record.num_processes or num_processes, config, num_processes)
    return [
        f"training.{key}: {old_training.get(key)!r} -> {value!r}"
        for key, value in new_training.items()
        if key not in _INVOCATION_KEYS and key in old_training and old_training[key] != value
    ]


def _plain(value: Any) -> Any:
    # The form a value takes after a JSON round trip (tuples become lists), so that a config read
    # back from a marker compares equal to the same config in memory.
    return json.loads(json.dumps(value, default=str))


def _refuse(name: str, old: Any, new: Any) -> None:
    raise ValueError(
        f"cannot resume: config {name} changed since the checkpoint was written ({old!r} -> {new!r}); "
        "resume with the original value or use another training.output_dir"
    )


def _check_process_layout(record: RunRecord, num_processes: int, sharded: bool) -> None:
    if record.sharded is None or (
        record.sharded == sharded and (not sharded or record.num_processes == num_processes)
    ):
        return
    kinds = {True: "sharded by FSDP", False: "unsharded (one process or DDP)"}
    raise ValueError(
        f"cannot resume: the checkpoint was written {kinds[record.sharded]} by {record.num_processes} "
        f"process(es) and this run is {kinds[sharded]} with {num_processes}; an FSDP checkpoint resumes "
        "only under FSDP with the same number of processes, so launch with the accelerate config and "
        "--num_processes of the original run"
    )


def _check_global_batch(
    old_training: dict[str, Any], old_processes: int, config: ExperimentConfig, num_processes: int
) -> None:
    t = config.training
    old_batch = old_training.get("per_device_batch_size")
    old_accumulation = old_training.get("gradient_accumulation_steps")
    if old_batch is None or old_accumulation is None:
        return
    old_global = old_batch * old_processes * old_accumulation
    new_global = t.per_device_batch_size * num_processes * t.gradient_accumulation_steps
    if old_global == new_global:
        return
    if old_global % (num_processes * t.gradient_accumulation_steps) == 0:
        hint = f"--training.per_device_batch_size {old_global // (num_processes * t.gradient_accumulation_steps)}"
    elif old_global % (num_processes * t.per_device_batch_size) == 0:
        hint = f"--training.gradient_accumulation_steps {old_global // (num_processes * t.per_device_batch_size)}"
    else:
        hint = f"a number of processes that divides {old_global}"
    raise ValueError(
        f"cannot resume: the global batch would change from {old_global} to {new_global} blocks per step "
        "(training.per_device_batch_size x processes x training.gradient_accumulation_steps: "
        f"{old_batch} x {old_processes} x {old_accumulation} -> {t.per_device_batch_size} x {num_processes} x "
        f"{t.gradient_accumulation_steps}); it decides which blocks every step reads. Keep it at {old_global}, "
        f"e.g. with {hint}"
    )


__all__ = [
    "REFUSED_SECTIONS",
    "REFUSED_TRAINING_KEYS",
    "RunRecord",
    "check_resume",
    "read_run_record",
    "run_record",
]
