"""Crash-safe training checkpoints on top of ``Accelerator.save_state``.

Layout: ``<output_dir>/checkpoints/step_00000100/`` holds what ``save_state`` writes (model,
optimizer, scheduler, grad scaler, RNG state of every process, the trainer's progress counters)
plus ``checkpoint_complete.json``.

Atomicity: every process writes into ``.tmp-step_00000100``; only when all of them succeeded does
the main process write the completion marker and ``rename`` the folder to its final name (a single
atomic operation on POSIX filesystems). A crash, SIGKILL or full disk mid-write therefore leaves
at most a ``.tmp-*`` folder, which is never resumed from and is deleted by the next save, and the
previous checkpoint is untouched. ``latest_checkpoint`` only returns folders that carry the marker.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

from hf_attn.training.fileio import fsync_dir

COMPLETE_MARKER = "checkpoint_complete.json"
_NAME_RE = re.compile(r"^step_(\d{8,})$")
_TMP_PREFIX = ".tmp-"


class CheckpointError(RuntimeError):
    """Writing a checkpoint failed; the previous complete checkpoint is still intact."""


def checkpoint_name(step: int) -> str:
    """Folder name of the checkpoint taken after optimizer step ``step`` (zero-padded, sortable)."""
    return f"step_{step:08d}"


def list_complete_checkpoints(root: str | Path) -> list[tuple[int, Path]]:
    """``(step, folder)`` of every complete checkpoint under ``root``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = _NAME_RE.match(child.name)
        if match and child.is_dir() and (child / COMPLETE_MARKER).is_file():
            found.append((int(match.group(1)), child))
    return sorted(found)


def latest_checkpoint(root: str | Path) -> Path | None:
    """The newest complete checkpoint under ``root`` (half-written ones are ignored), or None."""
    complete = list_complete_checkpoints(root)
    return complete[-1][1] if complete else None


def read_checkpoint_metadata(folder: str | Path) -> dict[str, Any]:
    """The JSON written into the completion marker (step, tokens seen, time...)."""
    with (Path(folder) / COMPLETE_MARKER).open(encoding="utf-8") as fh:
        return json.load(fh)


def _write_marker(folder: Path, metadata: dict[str, Any]) -> None:
    marker = folder / COMPLETE_MARKER
    with marker.open("w", encoding="utf-8") as fh:
        json.dump(metadata, fh, indent=2, default=str)
        fh.flush()
        os.fsync(fh.fileno())


def any_process(accelerator: Accelerator, flag: bool) -> bool:
    """True on every process if ``flag`` is true on any (a collective: call it on all processes).

    Every process must take the same branch afterwards, or the others would wait forever.
    """
    value = torch.tensor([1.0 if flag else 0.0], device=accelerator.device)
    return bool(accelerator.reduce(value, reduction="sum").item() > 0)


# How the libraries under save_state report a full disk: torch's zip writer drops the errno
# ("[enforce fail at inline_container.cc:...] . unexpected pos ...", "PytorchStreamWriter failed writing
# file"); safetensors' Rust writer keeps it in its text ("IoError(Os { code: 28, kind: StorageFull, ...").
_TORCH_WRITER_FAILURE = re.compile(r"inline_container|PytorchStreamWriter|iostream error")
_NO_SPACE_TEXT = re.compile(r"No space left on device|StorageFull")
_QUOTA_TEXT = re.compile(r"Disk quota exceeded|QuotaExceeded")


def describe_write_error(error: BaseException, folder: str | Path) -> str:
    """Say in a user's words why writing into ``folder`` failed.

    A full disk is named as such ("No space left on device (ENOSPC)", with the free space left on
    the folder's filesystem) whichever library raised it: an ``OSError`` anywhere in the exception
    chain, safetensors' error text, or torch's zip-writer error, which carries no errno.
    """
    chain: list[BaseException] = []
    current: BaseException | None = error
    while current is not None and current not in chain:
        chain.append(current)
        current = current.__cause__ or current.__context__
    codes = {e.errno for e in chain if isinstance(e, OSError)}
    text = " ".join(str(e) for e in chain)
    try:
        free = f"{shutil.disk_usage(folder).free / 2**20:.1f} MiB free on that filesystem"
    except OSError:
        free = "free space unknown"
    if errno.EDQUOT in codes or _QUOTA_TEXT.search(text):
        return f"Disk quota exceeded (EDQUOT; {free}); make room or raise the quota, then resume"
    if errno.ENOSPC in codes or _NO_SPACE_TEXT.search(text):
        return f"No space left on device (ENOSPC; {free}); make room, then resume"
    if _TORCH_WRITER_FAILURE.search(text):
        # No errno to go on: give the likeliest cause and the evidence.
        return (
            f"torch's file writer failed, as it does when the disk is full (No space left on device, ENOSPC; "
            f"{free}) or on an I/O error"
        )
    return f"{type(error).__name__}: {error}"


def publish_folder_atomically(
    accelerator: Accelerator,
    final_dir: str | Path,
    write: Callable[[Path], None],
    *,
    marker: dict[str, Any] | None = None,
    what: str = "checkpoint",
) -> Path:
    """Run ``write(tmp_dir)`` on every process, then atomically rename ``tmp_dir`` to ``final_dir``.

    ``write`` must be called on all processes (``save_state`` and FSDP state gathering are
    collective). If ``marker`` is given it is written into the folder as ``COMPLETE_MARKER`` before
    the rename. An existing ``final_dir`` is replaced only after the new folder is complete.

    Raises:
        CheckpointError: if any process failed to write; the temporary folder is removed and
            ``final_dir`` (if it existed) is left as it was.
    """
    final_dir = Path(final_dir)
    tmp_dir = final_dir.with_name(_TMP_PREFIX + final_dir.name)
    if accelerator.is_main_process:
        shutil.rmtree(tmp_dir, ignore_errors=True)  # leftover of a crashed earlier attempt
        tmp_dir.mkdir(parents=True)
    accelerator.wait_for_everyone()

    error: BaseException | None = None
    try:
        write(tmp_dir)
        if marker is not None and accelerator.is_main_process:
            _write_marker(tmp_dir, marker)
    except Exception as err:  # full disk, quota, I/O error...: every process must learn of it
        error = err
    if any_process(accelerator, error is not None):
        # Read the cause before removing the partial folder, which frees the space it took.
        cause = (
            describe_write_error(error, tmp_dir) if error is not None else "another process failed to write"
        )
        if accelerator.is_main_process:
            shutil.rmtree(tmp_dir, ignore_errors=True)
        accelerator.wait_for_everyone()
        raise CheckpointError(
            f"could not write {what} {final_dir}: {cause}. The partial folder was removed and the previous "
            f"{what} is intact"
        ) from error

    if accelerator.is_main_process:
        old_dir = final_dir.with_name(_TMP_PREFIX + "old-" + final_dir.name)
        if final_dir.exists():
            # Keep the old copy until the new one is in place: a crash in between leaves one of them.
            shutil.rmtree(old_dir, ignore_errors=True)
            os.replace(final_dir, old_dir)
        os.replace(tmp_dir, final_dir)
        fsync_dir(final_dir.parent)
        shutil.rmtree(old_dir, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final_dir


def save_checkpoint(
    accelerator: Accelerator,
    root: str | Path,
    step: int,
    *,
    keep: int,
    metadata: dict[str, Any] | None = None,
) -> Path:
    """Atomically save the full training state after ``step`` and keep only the newest ``keep``.

    Must be called on all processes.

    Raises:
        CheckpointError: if writing failed on any process (the previous checkpoint is intact).
    """
    marker = {"step": step, "time": time.time(), **(metadata or {})}
    folder = publish_folder_atomically(
        accelerator,
        Path(root) / checkpoint_name(step),
        lambda tmp: accelerator.save_state(str(tmp)),
        marker=marker,
    )
    if accelerator.is_main_process:
        for _, old in list_complete_checkpoints(root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return folder


__all__ = [
    "COMPLETE_MARKER",
    "CheckpointError",
    "any_process",
    "describe_write_error",
    "checkpoint_name",
    "list_complete_checkpoints",
    "latest_checkpoint",
    "read_checkpoint_metadata",
    "publish_folder_atomically",
    "save_checkpoint",
]
