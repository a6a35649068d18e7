#!/usr/bin/env python
"""Upload an hf_attn checkpoint folder to the Hugging Face Hub (safetensors, config, code, tokenizer, card).

    python scripts/push_to_hub.py runs/tiny-cls your-name/hf-attn-tiny-cls --private
    python scripts/push_to_hub.py runs/tiny-cls your-name/hf-attn-tiny-cls --dry_run   # list, upload nothing
    python scripts/push_to_hub.py runs/tiny-cls your-name/hf-attn-tiny-cls --max_file_size 2GB

The token comes from --token, else HF_TOKEN, else the cached `hf auth login`. A folder with a file
that may not be uploaded (a symlink out of the folder, a file over --max_file_size, a file whose
content does not match its name) is refused with exit status 2 and a message naming each such file.
"""

from __future__ import annotations

import argparse
import logging
import sys

from hf_attn.finetune import load_model_card_data, push_checkpoint
from hf_attn.hub_hf_attn import DEFAULT_MAX_FILE_SIZE


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", help="checkpoint folder written by save_pretrained / Trainer")
    parser.add_argument("repo_id", help="target repo, 'user/name' or 'name' (the token's namespace)")
    visibility = parser.add_mutually_exclusive_group()
    visibility.add_argument("--private", dest="private", action="store_true", default=None,
                            help="create the repo private")
    visibility.add_argument("--public", dest="private", action="store_false", help="create the repo public")
    parser.add_argument("--token", default=None, help="Hub token (default: HF_TOKEN or cached login)")
    parser.add_argument("--revision", default=None, help="branch to commit to")
    parser.add_argument("--create_pr", action="store_true", help="open a pull request instead of committing")
    parser.add_argument("--commit_message", default=None)
    parser.add_argument("--model_card_data", default=None,
                        help="JSON file of model-card facts (datasets, eval_results...) replacing the folder card's")
    parser.add_argument("--keep_card", action="store_true",
                        help="upload README.md as it is (default: re-render it to name repo_id)")
    parser.add_argument("--dry_run", action="store_true", help="print what would be uploaded and stop")
    parser.add_argument("--max_file_size", default=str(DEFAULT_MAX_FILE_SIZE),
                        help="refuse the upload if a file is larger: bytes or e.g. 500MB, 5GB, 2GiB "
                             "(default: the Hub's 50 GB per-file limit)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    try:
        plan, commit = push_checkpoint(
            args.folder,
            args.repo_id,
            private=args.private,
            token=args.token,
            revision=args.revision,
            create_pr=args.create_pr,
            commit_message=args.commit_message,
            model_card_data=load_model_card_data(args.model_card_data),
            keep_card=args.keep_card,
            dry_run=args.dry_run,
            max_file_size=args.max_file_size,
        )
    except ValueError as err:  # a refused folder or bad argument: the message says why, no traceback
        print(f"push_to_hub: {err}", file=sys.stderr)
        return 2
    print("upload:" if commit is None else f"uploaded to {commit.commit_url}:")
    for name in plan.files:
        print(f"  {name}")
    for name, reason in plan.skipped.items():
        print(f"  skipped {name}: {reason}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
