"""Publish a checkpoint folder (e.g. a fine-tune's output_dir) to the Hub with its code and model card.

The allow-list and the upload itself live in ``hf_attn/hub_hf_attn.py`` (shared with
``model.push_to_hub``); this module adds what only makes sense for a folder on disk: rendering a
fresh model card from the folder's config plus facts you pass (datasets, eval results), and a dry run.
"""

from __future__ import annotations

import json
import logging
import re
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from huggingface_hub import CommitInfo, ModelCard

from ..hub_hf_attn import DEFAULT_MAX_FILE_SIZE, MODEL_CARD, UploadPlan, plan_upload, upload_checkpoint
from ..modelcard_hf_attn import write_model_card

logger = logging.getLogger(__name__)


def load_model_card_data(path: str | Path | None) -> dict[str, Any] | None:
    """Read model-card facts from a JSON file (keys as in ``MODEL_CARD_DATA_KEYS``); None passes through.

    Raises:
        ValueError: if the file does not hold a JSON object.
    """
    if path is None:
        return None
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise ValueError(f"model_card_data: {path} must hold a JSON object, got {type(data).__name__}")
    return data


# Sections of model_card.md whose text carries facts that config.json does not hold.
_CARD_SECTIONS = {"Training data": "training_data", "Intended use": "intended_use"}
# Tags write_model_card adds by itself (re-added on re-rendering, so not carried over).
_AUTOMATIC_TAG = re.compile(r"^(hf_attn|custom_code|[a-z]+-attention)$")


def facts_from_card(path: str | Path) -> dict[str, Any]:
    """Recover ``model_card_data`` from a card written by ``write_model_card``.

    Structured facts come from the metadata (model-index results, datasets, base_model, license,
    language, user tags); the "Training data" and "Intended use" paragraphs from the body. Re-rendering
    with these facts and a new repo id gives the same card, pointing at the new repo.
    """
    card = ModelCard.load(path)
    meta = card.data
    facts: dict[str, Any] = {}
    if meta.eval_results:
        first = meta.eval_results[0]
        facts["eval_results"] = {r.metric_type: r.metric_value for r in meta.eval_results}
        facts["eval_dataset"] = first.dataset_type
        facts["eval_dataset_name"] = first.dataset_name
        if first.dataset_split:
            facts["eval_split"] = first.dataset_split
    for key in ("datasets", "base_model", "license", "language"):
        if getattr(meta, key, None):
            facts[key] = getattr(meta, key)
    tags = [t for t in (meta.tags or []) if not _AUTOMATIC_TAG.match(t)]
    if tags:
        facts["tags"] = tags
    for heading, key in _CARD_SECTIONS.items():
        match = re.search(rf"^## {heading}\n\n(.*?)\n+## ", card.text, flags=re.DOTALL | re.MULTILINE)
        if match:
            facts[key] = match.group(1).strip()
    return facts


def push_checkpoint(
    folder: str | Path,
    repo_id: str,
    *,
    private: bool | None = None,
    token: str | None = None,
    revision: str | None = None,
    create_pr: bool = False,
    commit_message: str | None = None,
    model_card_data: Mapping[str, Any] | None = None,
    keep_card: bool = False,
    dry_run: bool = False,
    max_file_size: int | str = DEFAULT_MAX_FILE_SIZE,
) -> tuple[UploadPlan, CommitInfo | None]:
    """Upload ``folder`` to ``repo_id`` (weights as safetensors, config, code, tokenizer, card).

    The card is re-rendered from the folder's config.json so that its name and loading example point
    at ``repo_id``; its facts come from ``model_card_data`` when given, else from the folder's own
    README.md (:func:`facts_from_card`). ``keep_card=True`` uploads README.md untouched instead. The
    folder itself is never modified.

    Args:
        folder: A save_pretrained / Trainer output folder.
        repo_id: Target repo, "user/name" or "name".
        private: Visibility of a newly created repo (None: Hub default).
        token: Hub token; None uses HF_TOKEN or the cached login.
        revision, create_pr, commit_message: As in ``HfApi.create_commit``.
        model_card_data: Facts for the card (see ``MODEL_CARD_DATA_KEYS``), replacing the folder card's.
        keep_card: Upload the folder's README.md as it is.
        dry_run: Only plan; upload nothing and return ``(plan, None)``.
        max_file_size: Largest file allowed, bytes or a string like ``"5GB"`` (see ``plan_upload``).

    Returns:
        The upload plan (files, skipped files with reasons) and the commit info.

    Raises:
        ValueError: for a folder that is not an uploadable hf_attn checkpoint (see ``plan_upload``).
    """
    from transformers import AutoConfig

    import hf_attn  # noqa: F401  (registers the hf_attn config class with AutoConfig)

    folder = Path(folder)
    plan = plan_upload(folder, max_file_size=max_file_size)
    with tempfile.TemporaryDirectory() as tmp:
        card = None
        has_card = MODEL_CARD in plan.files
        if keep_card and not has_card:
            raise ValueError(f"keep_card: {folder} has no {MODEL_CARD} to keep")
        if not keep_card:
            if model_card_data is not None:
                data = dict(model_card_data)
            else:
                data = facts_from_card(folder / MODEL_CARD) if has_card else {}
            data.setdefault("model_name", repo_id.split("/")[-1])
            data.setdefault("repo_id", repo_id)
            card = write_model_card(tmp, AutoConfig.from_pretrained(folder), data)
            if not has_card:
                plan.files.append(MODEL_CARD)
                plan.files.sort()
        for name, reason in plan.skipped.items():
            logger.debug("skipping %s: %s", name, reason)
        if dry_run:
            return plan, None
        commit = upload_checkpoint(
            folder, repo_id, private=private, token=token, revision=revision, create_pr=create_pr,
            commit_message=commit_message, model_card=card, max_file_size=max_file_size,
        )
    return plan, commit


__all__ = ["facts_from_card", "load_model_card_data", "push_checkpoint"]
