"""``transformers.Trainer`` whose Hub uploads go through hf_attn's allow-list and model card.

``Trainer.push_to_hub`` replaces ``output_dir/README.md`` with a generic Trainer card and then uploads
all of ``output_dir`` (``training_args.bin``, a pickle, included; also results and logs), and
``Trainer._push_from_checkpoint`` (``--hub_strategy every_save``) does the same at every save.
:class:`HfAttnTrainer` keeps Trainer's timing and arguments but publishes through
:func:`~hf_attn.finetune.hub.push_checkpoint`: the files ``plan_upload`` allows (safetensors, config,
code, tokenizer) and the hf_attn card, re-rendered to name the repo.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from huggingface_hub import CommitInfo
from transformers import Trainer
from transformers.trainer_utils import HubStrategy, SaveStrategy

from ..hub_hf_attn import MODEL_CARD
from .hub import facts_from_card, push_checkpoint

logger = logging.getLogger(__name__)

# Trainer.push_to_hub's model-card keywords -> hf_attn model_card_data keys.
_CARD_KEYWORDS = {
    "language": "language",
    "license": "license",
    "tags": "tags",
    "model_name": "model_name",
    "finetuned_from": "base_model",
    "dataset": "datasets",
}


class HfAttnTrainer(Trainer):
    """A ``Trainer`` for hf_attn models that never uploads pickles and keeps hf_attn's model card.

    ``push_to_hub`` and the per-save pushes of ``--push_to_hub --hub_strategy every_save`` upload one
    commit each through hf_attn's allow-list. Pushes are synchronous (Trainer's are background jobs).
    ``hub_strategy`` ``checkpoint`` / ``all_checkpoints`` are refused: they publish the resumable
    checkpoint folder, whose optimizer, scheduler and RNG states are pickles.
    """

    def init_hf_repo(self, token: str | None = None, private: bool | None = None) -> None:
        """Refuse the checkpoint-uploading hub strategies, then create the repo as Trainer does.

        Raises:
            ValueError: if ``hub_strategy`` is ``checkpoint`` or ``all_checkpoints``.
        """
        if self.args.hub_strategy in (HubStrategy.CHECKPOINT, HubStrategy.ALL_CHECKPOINTS):
            raise ValueError(
                f"hub_strategy: {self.args.hub_strategy.value!r} would upload the resumable checkpoint folder, whose "
                "optimizer, scheduler and RNG states are pickles; hf_attn uploads none. Use 'every_save' or 'end'."
            )
        super().init_hf_repo(token=token, private=private)

    def push_to_hub(
        self,
        commit_message: str | None = "End of training",
        blocking: bool = True,
        token: str | None = None,
        revision: str | None = None,
        private: bool | None = None,
        **card_kwargs: Any,
    ) -> CommitInfo | None:
        """Save the model to ``output_dir`` and upload it through hf_attn's allow-list, in one commit.

        Same arguments as ``Trainer.push_to_hub``; the upload always blocks (``blocking`` is accepted
        for compatibility). ``card_kwargs`` (``tags``, ``language``, ``license``, ``model_name``,
        ``finetuned_from``, ``dataset``) go into the hf_attn card.

        Returns:
            The commit on the main process, None on the others.

        Raises:
            TypeError: on a card keyword hf_attn's card has no place for.
            ValueError: if ``output_dir`` may not be uploaded (see ``plan_upload``).
        """
        unknown = sorted(set(card_kwargs) - set(_CARD_KEYWORDS))
        if unknown:
            raise TypeError(f"push_to_hub: unexpected keyword(s) {unknown}; card keywords are {sorted(_CARD_KEYWORDS)}")
        self.callback_handler.on_push_begin(self.args, self.state, self.control)
        # On every process: under FSDP / DeepSpeed gathering the weights is collective.
        self.save_model(_internal_call=True)
        if not self.is_world_process_zero():
            return None
        return self._publish(
            self.args.output_dir, commit_message, card_kwargs, token=token, revision=revision, private=private
        )

    def _push_from_checkpoint(self, checkpoint_folder: str) -> None:
        """Per-save push (``hub_strategy`` ``every_save``): the model files of ``checkpoint_folder``."""
        if not self.is_world_process_zero() or self.args.hub_strategy == HubStrategy.END:
            return
        self.callback_handler.on_push_begin(self.args, self.state, self.control)
        if self.args.save_strategy == SaveStrategy.STEPS:
            message = f"Training in progress, step {self.state.global_step}"
        else:
            message = f"Training in progress, epoch {int(self.state.epoch or 0)}"
        self._publish(checkpoint_folder, message, {})

    def _publish(
        self,
        folder: str | os.PathLike,
        commit_message: str | None,
        card_kwargs: dict[str, Any],
        *,
        token: str | None = None,
        revision: str | None = None,
        private: bool | None = None,
    ) -> CommitInfo:
        repo_id = self.hub_model_id or self.args.hub_model_id or Path(self.args.output_dir).absolute().name
        card_path = Path(folder) / MODEL_CARD
        facts: dict[str, Any] | None = None  # None: push_checkpoint carries the folder card's facts over
        tags = card_kwargs.get("tags") or []
        tags = [tags] if isinstance(tags, str) else list(tags)
        tags += [t for t in (getattr(self.model, "model_tags", None) or []) if t not in tags]
        if card_kwargs or tags:
            facts = facts_from_card(card_path) if card_path.is_file() else {}
            for keyword, value in card_kwargs.items():
                if keyword != "tags" and value is not None:
                    facts[_CARD_KEYWORDS[keyword]] = value
            if tags:
                facts["tags"] = list(facts.get("tags") or []) + [t for t in tags if t not in (facts.get("tags") or [])]
        plan, commit = push_checkpoint(
            folder,
            repo_id,
            private=self.args.hub_private_repo if private is None else private,
            token=self.args.hub_token if token is None else token,
            revision=self.args.hub_revision if revision is None else revision,
            commit_message=commit_message,
            model_card_data=facts,
        )
        self.hub_model_id = commit.repo_url.repo_id
        logger.info("pushed %s to %s (skipped: %s)", plan.files, commit.commit_url, sorted(plan.skipped))
        return commit


__all__ = ["HfAttnTrainer"]
