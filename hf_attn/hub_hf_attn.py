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

# The same two patterns transformers' remote-code copier follows (dynamic_module_utils).
_IMPORT_PATTERNS = (
    re.compile(r"^\s*import\s+\.(\S+)\s*$", re.MULTILINE),
    re.compile(r"^\s*from\s+\.(\S+)\s+import", re.MULTILINE),
)


@dataclass
class UploadPlan:
    """Files of a checkpoint folder that will be uploaded, and those skipped (with the reason)."""

    folder: Path
    files: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)


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


def plan_upload(folder: str | Path) -> UploadPlan:
    """Decide which files of ``folder`` go to the Hub (see the module docstring).

    Raises:
        ValueError: if the folder is not a checkpoint, has no safetensors weights (pickle-only
            weights are refused), lacks a shard named in the safetensors index, or lacks code.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"folder: {folder} is not a directory")
    code = set(code_files(folder))
    plan = UploadPlan(folder)
    for path in sorted(folder.iterdir()):
        name = path.name
        if path.is_dir():
            plan.skipped[name + "/"] = "folder (intermediate checkpoints and logs stay local)"
        elif name.endswith(PICKLE_SUFFIXES):
            plan.skipped[name] = "pickle format (unsafe to load); only safetensors are uploaded"
        elif (
            name.endswith(".safetensors")
            or name in (SAFETENSORS_INDEX, MODEL_CARD, *CONFIG_FILES, *TOKENIZER_FILES)
            or name in code
        ):
            plan.files.append(name)
        elif name.endswith(".py"):
            plan.skipped[name] = "not imported by the modeling code"
        else:
            plan.skipped[name] = "not part of a model repository (training state, logs, results)"
    weights = [f for f in plan.files if f.endswith(".safetensors")]
    if not weights:
        pickles = [f for f in plan.skipped if f.endswith(PICKLE_SUFFIXES) and "training_args" not in f]
        hint = f"it has pickle weights {pickles}; re-save them with save_pretrained (safetensors)" if pickles else ""
        raise ValueError(f"folder: {folder} has no *.safetensors weights. {hint}".strip())
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

    Raises:
        ValueError: see :func:`plan_upload`.
    """
    plan = plan_upload(folder)
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
) -> CommitInfo:
    """``model.push_to_hub`` for hf_attn: save to a temporary folder (weights, config, code, card), upload.

    transformers' own ``push_to_hub`` replaces README.md with the Hub's current card or a generic
    template; this keeps the card ``save_pretrained`` rendered and adds ``tags`` (plus ``model.model_tags``)
    to its metadata. Same keyword arguments as ``PreTrainedModel.push_to_hub``.
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
        )


__all__ = ["PICKLE_SUFFIXES", "UploadPlan", "code_files", "plan_upload", "push_model_to_hub", "upload_checkpoint"]
