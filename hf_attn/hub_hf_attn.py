"""Upload an hf_attn checkpoint folder to the Hugging Face Hub: an allow-list, one commit.

What goes up (top-level files only):
- weights: ``*.safetensors`` (+ ``model.safetensors.index.json``). Pickle-based weights (``*.bin``,
  ``*.pt``, ``*.pth``, ``*.pkl``, ``*.ckpt``) are never uploaded: loading them runs arbitrary code. A
  folder that has only such weights is refused;
- ``config.json`` (must carry ``auto_map``) and ``generation_config.json``;
- the code: the modules named in ``auto_map`` and, recursively, the sibling modules they import, i.e.
  exactly what ``trust_remote_code=True`` needs. Every such file must be present;
- tokenizer files and the model card ``README.md``.
Everything else (``training_args.bin``, optimizer/scheduler/RNG states, ``trainer_state.json``,
``checkpoint-*`` folders, logs) is skipped and reported.

A file admitted by its name must also earn its place by what it is, or the whole upload is refused
(nothing is skipped silently, since a repo missing it would be broken):
- it is a regular file inside the folder, or a symlink whose target is inside the folder: a link that
  leads out (``tokenizer.json -> ~/.ssh/id_rsa``) is never followed;
- it is at most ``max_file_size`` bytes (default: the Hub's 50 GB per-file limit);
- its content matches its name: ``*.safetensors`` parse as safetensors (header and data sizes agree),
  ``*.json`` parse as a JSON object, text files (``.py``, ``.md``, ``.txt``, ``.jinja``) decode as
  UTF-8, and no other file is a pickle or a ``torch.save`` zip archive.

All upload routes (``scripts/push_to_hub.py``, ``model.push_to_hub``, ``save_pretrained(push_to_hub=
True)`` and the fine-tuning Trainer's pushes) go through :func:`plan_upload`.

This module is copied next to the modeling code into every checkpoint, so ``model.push_to_hub``
works from a remote-code copy too. It imports only the standard library and huggingface_hub.
"""

from __future__ import annotations

import json
import re
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from huggingface_hub import CommitInfo, CommitOperationAdd, HfApi, ModelCard

CONFIG_FILES = ("config.json", "generation_config.json")
MODEL_CARD = "README.md"
SAFETENSORS_INDEX = "model.safetensors.index.json"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "chat_template.jinja",
    "chat_template.json",
)
# Formats whose loading unpickles (runs code); never uploaded.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib")
# The Hub refuses files over 50 GB; failing before the upload saves streaming them first.
DEFAULT_MAX_FILE_SIZE = 50 * 10**9
# Text formats among the allowed files; they must decode as UTF-8.
TEXT_SUFFIXES = (".py", ".md", ".txt", ".jinja")
# First bytes of a pickle (protocol 2 and later) and of the zip archive torch.save writes.
_PICKLE_MAGIC = (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05", b"PK\x03\x04")
# A safetensors header is a small JSON object; a larger "length" means the file is something else.
_MAX_SAFETENSORS_HEADER = 100 * 2**20

# The same two patterns transformers' remote-code copier follows (dynamic_module_utils).
_IMPORT_PATTERNS = (
    re.compile(r"^\s*import\s+\.(\S+)\s*$", re.MULTILINE),
    re.compile(r"^\s*from\s+\.(\S+)\s+import", re.MULTILINE),
)
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
               "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


@dataclass
class UploadPlan:
    """Files of a checkpoint folder that will be uploaded, and those skipped (with the reason)."""

    folder: Path
    files: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)


def parse_size(size: int | str) -> int:
    """Bytes in ``size``: an int, or a string such as ``"500MB"``, ``"5GB"``, ``"2GiB"`` (same units as
    ``max_shard_size``: KB/MB/GB are powers of 10, KiB/MiB/GiB powers of 2).

    Raises:
        ValueError: if ``size`` is negative or not in that notation.
    """
    if isinstance(size, bool):
        raise ValueError(f"max_file_size: expected bytes or a string like '5GB', got {size!r}")
    if isinstance(size, int):
        value = size
    else:
        match = _SIZE.match(str(size))
        if not match:
            raise ValueError(f"max_file_size: expected bytes or a string like '5GB' or '500MiB', got {size!r}")
        value = int(float(match.group(1)) * _SIZE_UNITS[(match.group(2) or "B").upper()])
    if value < 0:
        raise ValueError(f"max_file_size: expected a size >= 0, got {size!r}")
    return value


def _format_size(size: int) -> str:
    for unit, factor in (("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if size >= factor:
            return f"{size / factor:.1f} {unit} ({size} bytes)"
    return f"{size} bytes"


def _safetensors_problem(path: Path) -> str | None:
    """Why ``path`` is not a complete safetensors file, or None.

    The format is an 8-byte little-endian header length, a JSON header mapping tensor names to
    ``data_offsets`` within the data section, then the data section, which the offsets must exactly
    cover. A pickle renamed to ``.safetensors`` fails the first check, a truncated file the last.
    """
    size = path.stat().st_size
    with path.open("rb") as fh:
        prefix = fh.read(8)
        if len(prefix) < 8:
            return f"not a safetensors file ({size} bytes, shorter than the 8-byte header length)"
        length = int.from_bytes(prefix, "little")
        if length > min(size - 8, _MAX_SAFETENSORS_HEADER):
            return f"not a safetensors file (its first 8 bytes give a header of {length} bytes in a {size}-byte file)"
        try:
            header = json.loads(fh.read(length))
        except ValueError:
            return "not a safetensors file (its header is not JSON)"
    if not isinstance(header, dict):
        return "not a safetensors file (its header is not a JSON object)"
    end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        if not (
            isinstance(offsets, list)
            and len(offsets) == 2
            and all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
            and 0 <= offsets[0] <= offsets[1]
        ):
            return f"not a safetensors file (tensor {name!r} has no valid data_offsets)"
        end = max(end, offsets[1])
    data = size - 8 - length
    if end != data:
        return f"incomplete or corrupt safetensors file (the header describes {end} bytes of tensor data, the file holds {data})"
    return None


def content_problem(path: str | Path) -> str | None:
    """Why the bytes of ``path`` are not what its name promises, or None when they are.

    ``*.safetensors``: a complete safetensors file; ``*.json``: a JSON object; ``.py``/``.md``/``.txt``/
    ``.jinja``: UTF-8 text; anything else: not a pickle or ``torch.save`` archive (the formats whose
    loading runs code).
    """
    path = Path(path)
    name = path.name
    if name.endswith(".safetensors"):
        return _safetensors_problem(path)
    if name.endswith(".json"):
        try:
            value = json.loads(path.read_bytes())
        except ValueError as err:  # JSONDecodeError and UnicodeDecodeError both are ValueErrors
            return f"not valid JSON ({err})"
        return None if isinstance(value, dict) else f"JSON but not an object (a {type(value).__name__})"
    if name.endswith(TEXT_SUFFIXES):
        try:
            path.read_bytes().decode("utf-8")
        except UnicodeDecodeError as err:
            return f"not UTF-8 text ({err})"
        return None
    with path.open("rb") as fh:
        if fh.read(4).startswith(_PICKLE_MAGIC):
            return "a pickle / torch.save archive (loading it runs code)"
    return None


def _file_problem(path: Path, root: Path, max_file_size: int) -> str | None:
    """Why ``path`` may not be uploaded from the folder ``root`` (resolved), or None.

    Checked in this order so that nothing outside the folder is ever opened, and no oversized file read.
    """
    if path.is_symlink():
        target = path.resolve()
        if not target.is_relative_to(root):
            return f"symlink to {target}, outside the folder; copy the file into the folder to upload it"
    if not path.is_file():
        return "not a regular file"
    size = path.stat().st_size
    if size > max_file_size:
        return f"{_format_size(size)}, over max_file_size = {_format_size(max_file_size)}"
    return content_problem(path)


def _auto_map_modules(config: Mapping[str, Any]) -> set[str]:
    modules = set()
    for ref in (config.get("auto_map") or {}).values():
        for name in ref if isinstance(ref, (list, tuple)) else [ref]:
            # "other/repo--module.Class" points at code in another repo: nothing to ship here
            if name and "--" not in name:
                modules.add(name.rsplit(".", 1)[0])
    return modules


def code_files(folder: str | Path) -> list[str]:
    """The .py files ``trust_remote_code=True`` loading of ``folder`` needs, sorted.

    Starts from the modules named in ``config.json``'s ``auto_map`` and follows flat relative imports.

    Raises:
        ValueError: if config.json is missing, has no ``auto_map``, or a needed file is absent.
    """
    folder = Path(folder)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise ValueError(f"folder: {folder} has no config.json; expected a save_pretrained checkpoint folder")
    modules = _auto_map_modules(json.loads(config_path.read_text(encoding="utf-8")))
    if not modules:
        raise ValueError(
            f"config.json in {folder} has no auto_map: the checkpoint could not be loaded without hf_attn "
            "installed. Save it with a model whose class is registered for auto class (import hf_attn does that)."
        )
    needed: set[str] = set()
    missing: set[str] = set()
    todo = sorted(modules)
    while todo:
        name = todo.pop()
        filename = name.replace(".", "/") + ".py"
        if filename in needed or filename in missing:
            continue
        path = folder / filename
        if not path.is_file():
            missing.add(filename)
            continue
        needed.add(filename)
        source = path.read_text(encoding="utf-8")
        for pattern in _IMPORT_PATTERNS:
            todo.extend(pattern.findall(source))
    if missing:
        raise ValueError(f"folder: {folder} lacks code file(s) {sorted(missing)} that auto_map / the code imports")
    return sorted(needed)


def _allowed_by_name(name: str) -> bool:
    return name.endswith((".safetensors", ".py")) or name in (SAFETENSORS_INDEX, MODEL_CARD, *CONFIG_FILES, *TOKENIZER_FILES)


def plan_upload(folder: str | Path, *, max_file_size: int | str = DEFAULT_MAX_FILE_SIZE) -> UploadPlan:
    """Decide which files of ``folder`` go to the Hub (see the module docstring).

    Args:
        folder: A save_pretrained checkpoint folder.
        max_file_size: Largest file allowed, in bytes or as a string like ``"5GB"``.

    Raises:
        ValueError: if the folder is not a checkpoint, has no safetensors weights (pickle-only
            weights are refused), lacks a shard named in the safetensors index, or lacks code; or if
            a file it would upload is a symlink leading out of the folder, is larger than
            ``max_file_size``, or is not what its name says (all such files are named at once).
    """
    folder = Path(folder)
    limit = parse_size(max_file_size)
    if not folder.is_dir():
        raise ValueError(f"folder: {folder} is not a directory")
    root = folder.resolve()
    plan = UploadPlan(folder)
    candidates: list[str] = []
    for path in sorted(folder.iterdir()):
        name = path.name
        if path.is_dir():
            plan.skipped[name + "/"] = "folder (intermediate checkpoints and logs stay local)"
        elif name.endswith(PICKLE_SUFFIXES):
            plan.skipped[name] = "pickle format (unsafe to load); only safetensors are uploaded"
        elif _allowed_by_name(name):
            candidates.append(name)
        else:
            plan.skipped[name] = "not part of a model repository (training state, logs, results)"
    # Judge every candidate before code_files reads config.json and the .py sources, so that nothing is
    # read through a link out of the folder; a stray .py is held to the same rule (it is at best useless).
    problems = {name: p for name in candidates if (p := _file_problem(folder / name, root, limit))}
    if problems:
        listing = "\n".join(f"  {name}: {problem}" for name, problem in problems.items())
        raise ValueError(f"folder: {folder}: refusing to upload, {len(problems)} file(s) are not what they should be:\n{listing}")
    code = set(code_files(folder))
    for name in candidates:
        if name.endswith(".py") and name not in code:
            plan.skipped[name] = "not imported by the modeling code"
        else:
            plan.files.append(name)
    plan.skipped = dict(sorted(plan.skipped.items()))
    weights = [f for f in plan.files if f.endswith(".safetensors")]
    if not weights:
        pickles = [f for f in plan.skipped if f.endswith(PICKLE_SUFFIXES) and "training_args" not in f]
        hint = f"; it has pickle weights {pickles}: re-save them with save_pretrained (safetensors)" if pickles else ""
        raise ValueError(f"folder: {folder} has no *.safetensors weights{hint}")
    index = folder / SAFETENSORS_INDEX
    if index.is_file():
        shards = set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())
        absent = sorted(shards - set(weights))
        if absent:
            raise ValueError(f"folder: {folder} lacks shard(s) {absent} named in {SAFETENSORS_INDEX}")
    return plan


def upload_checkpoint(
    folder: str | Path,
    repo_id: str,
    *,
    private: bool | None = None,
    token: bool | str | None = None,
    revision: str | None = None,
    create_pr: bool = False,
    commit_message: str | None = None,
    commit_description: str | None = None,
    model_card: str | Path | None = None,
    max_file_size: int | str = DEFAULT_MAX_FILE_SIZE,
) -> CommitInfo:
    """Create ``repo_id`` if needed and upload the planned files of ``folder`` in one commit.

    Args:
        folder: A save_pretrained checkpoint folder.
        repo_id: "user/name" or "name" (the token's namespace is used).
        private: Visibility when the repo is created (None: the Hub's default); an existing repo keeps its own.
        token: Hub token; None uses HF_TOKEN or the cached ``hf auth login``.
        revision: Branch to commit to (created from main if it does not exist).
        create_pr: Open a pull request instead of committing to the branch.
        commit_message: Default "Upload hf_attn checkpoint".
        commit_description: Optional longer description.
        model_card: A README.md to upload instead of (or in the absence of) the folder's own.
        max_file_size: Largest file allowed (bytes or e.g. ``"5GB"``), see :func:`plan_upload`.

    Raises:
        ValueError: see :func:`plan_upload`.
    """
    plan = plan_upload(folder, max_file_size=max_file_size)
    sources = {name: plan.folder / name for name in plan.files}
    if model_card is not None:
        sources[MODEL_CARD] = Path(model_card)
    if MODEL_CARD in sources:
        # A card whose metadata the Hub cannot parse is rejected server-side after the upload; fail first.
        ModelCard.load(sources[MODEL_CARD])
    api = HfApi()
    repo_id = api.create_repo(repo_id, private=private, token=token, exist_ok=True, repo_type="model").repo_id
    if revision is not None and not revision.startswith("refs/pr"):
        api.create_branch(repo_id, branch=revision, token=token, exist_ok=True)
    operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(path)) for name, path in sorted(sources.items())]
    return api.create_commit(
        repo_id,
        operations=operations,
        commit_message=commit_message or "Upload hf_attn checkpoint",
        commit_description=commit_description,
        token=token,
        revision=revision,
        create_pr=create_pr,
    )


def push_model_to_hub(
    model: Any,
    repo_id: str,
    *,
    commit_message: str | None = None,
    commit_description: str | None = None,
    private: bool | None = None,
    token: bool | str | None = None,
    revision: str | None = None,
    create_pr: bool = False,
    max_shard_size: int | str | None = "50GB",
    tags: list[str] | str | None = None,
    max_file_size: int | str = DEFAULT_MAX_FILE_SIZE,
) -> CommitInfo:
    """``model.push_to_hub`` for hf_attn: save to a temporary folder (weights, config, code, card), upload.

    transformers' own ``push_to_hub`` replaces README.md with the Hub's current card or a generic
    template; this keeps the card ``save_pretrained`` rendered and adds ``tags`` (plus ``model.model_tags``)
    to its metadata. Same keyword arguments as ``PreTrainedModel.push_to_hub``, plus ``max_file_size``
    (see :func:`plan_upload`).
    """
    extra_tags = [tags] if isinstance(tags, str) else list(tags or [])
    extra_tags += [t for t in (getattr(model, "model_tags", None) or []) if t not in extra_tags]
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp, max_shard_size=max_shard_size)
        card_path = Path(tmp) / MODEL_CARD
        if extra_tags and card_path.is_file():
            card = ModelCard.load(card_path)
            card.data.tags = list(card.data.tags or []) + [t for t in extra_tags if t not in (card.data.tags or [])]
            card.save(card_path)
        return upload_checkpoint(
            tmp,
            repo_id,
            private=private,
            token=token,
            revision=revision,
            create_pr=create_pr,
            commit_message=commit_message or "Upload model",
            commit_description=commit_description,
            max_file_size=max_file_size,
        )


__all__ = [
    "DEFAULT_MAX_FILE_SIZE",
    "PICKLE_SUFFIXES",
    "UploadPlan",
    "code_files",
    "content_problem",
    "parse_size",
    "plan_upload",
    "push_model_to_hub",
    "upload_checkpoint",
]
