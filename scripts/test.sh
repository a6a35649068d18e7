#!/usr/bin/env bash
# Set up a fresh machine and run the whole test suite: the README's test command, and what CI runs.
# torch is pinned first: on a machine without torch, an unpinned install pulls a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install --quiet "torch==2.13.0"
python -m pip install --quiet -e ".[dev]"
python -m ruff check hf_attn scripts tests
python -m pytest -q "$@"
