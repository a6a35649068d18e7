"""Which ``checkpoint-N`` folder of a Trainer run can be resumed from.

``Trainer`` writes a checkpoint in place, file after file: the model (``model.safetensors`` or its
shards, config, code, card, tokenizer), then ``optimizer.pt``, ``scheduler.pt`` and the RNG state,
and ``trainer_state.json`` last. A job killed during that save leaves a ``checkpoint-N`` folder that
lacks some of them or holds a truncated one. ``Trainer``'s own "resume from the last checkpoint" takes
the highest N regardless and then crashes (no ``trainer_state.json``) or, worse, resumes with a fresh
optimizer (no ``optimizer.pt``). Here such a folder is skipped with a warning naming it.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from ..hub_hf_attn import SAFETENSORS_INDEX, content_problem

logger = logging.getLogger(__name__)

TRAINER_STATE = "trainer_state.json"
_CHECKPOINT = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")
# Values of --resume_from_checkpoint meaning "the newest complete checkpoint-N in output_dir".
RESUME_LAST = ("last", "true")


def _weights_problem(folder: Path) -> str | None:
    # Pickled or FSDP-sharded weights (save_safetensors off, FSDP SHARDED_STATE_DICT): their presence
    # is all that can be checked without unpickling them.
    if (folder / "pytorch_model.bin").is_file() or any(folder.glob("pytorch_model_fsdp*")):
        return None
    index = folder / SAFETENSORS_INDEX
    if index.is_file():
        if problem := content_problem(index):
            return f"{SAFETENSORS_INDEX} is {problem}"
        shards = sorted(set(json.loads(index.read_text(encoding="utf-8")).get("weight_map", {}).values()))
        files = [folder / shard for shard in shards]
    else:
        files = [folder / "model.safetensors"]
    for path in files:
        if not path.is_file():
            return f"no {path.name}"
        if problem := content_problem(path):
            return f"{path.name} is {problem}"
    return None


def checkpoint_problems(folder: str | Path, *, require_optimizer: bool = True) -> list[str]:
    """What ``folder`` lacks for Trainer to resume from it; an empty list means complete.

    Complete means: ``trainer_state.json`` parses (Trainer writes it last, so a killed save lacks it
    or leaves it truncated); the model weights (``model.safetensors``, or every shard named in
    ``model.safetensors.index.json``) are whole safetensors files (pickled or FSDP-sharded weights
    only need to be present); and, unless ``require_optimizer``
    is False (runs with ``save_only_model``), the optimizer and scheduler state Trainer saved
    (``optimizer.pt``, ``scheduler.pt``; with DeepSpeed a ``global_step*`` folder).
    """
    folder = Path(folder)
    if not folder.is_dir():
        return ["not a directory"]
    problems = []
    state = folder / TRAINER_STATE
    if not state.is_file():
        problems.append(f"no {TRAINER_STATE}")
    elif problem := content_problem(state):
        problems.append(f"{TRAINER_STATE} is {problem}")
    if problem := _weights_problem(folder):
        problems.append(problem)
    if require_optimizer and not any(folder.glob("global_step*")):
        # optimizer.pt, accelerate's optimizer.bin, or FSDP's optimizer_0/ folder, as Trainer looks for them
        if not any(folder.glob("optimizer*")):
            problems.append("no optimizer state (optimizer.pt)")
        if not (folder / "scheduler.pt").is_file():
            problems.append("no scheduler.pt")
    return problems


def last_complete_checkpoint(output_dir: str | Path, *, require_optimizer: bool = True) -> Path | None:
    """The ``checkpoint-N`` folder of ``output_dir`` with the highest N that is complete, or None.

    Incomplete newer ones (see :func:`checkpoint_problems`) are skipped with a warning naming the
    folder and what it lacks.
    """
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return None
    steps = {int(m.group(1)): p for p in output_dir.iterdir() if (m := _CHECKPOINT.match(p.name)) and p.is_dir()}
    for step in sorted(steps, reverse=True):
        problems = checkpoint_problems(steps[step], require_optimizer=require_optimizer)
        if not problems:
            return steps[step]
        logger.warning(
            "skipping incomplete checkpoint %s (%s); was the run killed while saving it?", steps[step], "; ".join(problems)
        )
    return None


def resolve_resume_checkpoint(value: str | None, output_dir: str | Path, *, require_optimizer: bool = True) -> str | None:
    """The checkpoint folder ``--resume_from_checkpoint value`` means, checked complete.

    ``None`` -> None (no resume); ``"last"`` / ``"true"`` -> the newest complete ``checkpoint-N`` in
    ``output_dir`` (:func:`last_complete_checkpoint`); anything else is a checkpoint folder.

    Raises:
        ValueError: if ``"last"`` finds no complete checkpoint, or the named folder is incomplete.
    """
    if value is None:
        return None
    if value.lower() in RESUME_LAST:
        found = last_complete_checkpoint(output_dir, require_optimizer=require_optimizer)
        if found is None:
            raise ValueError(
                f"resume_from_checkpoint: {value!r} found no complete {PREFIX_CHECKPOINT_DIR}-N folder in {output_dir} "
                "(incomplete ones are named in the warnings above); run without --resume_from_checkpoint to start over"
            )
        logger.info("resuming from %s", found)
        return str(found)
    problems = checkpoint_problems(value, require_optimizer=require_optimizer)
    if problems:
        raise ValueError(f"resume_from_checkpoint: {value} cannot be resumed from: {'; '.join(problems)}")
    return value


__all__ = ["RESUME_LAST", "checkpoint_problems", "last_complete_checkpoint", "resolve_resume_checkpoint"]
