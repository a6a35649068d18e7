#!/usr/bin/env bash
# Set up a fresh machine and run the whole test suite: the README's test command, and what CI runs.
# torch is pinned first: on a machine without torch, an unpinned install pulls a multi-GB CUDA build.
# transformers is upgraded to the newest release pyproject.toml allows, which is what a fresh
# `pip install hf_attn` gets; scripts/test_lowest.sh checks the lowest one.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install --quiet "torch==2.13.0"
python -m pip install --quiet -e ".[dev]"
python -m pip install --quiet --upgrade "$(python scripts/transformers_range.py)"
python -c "import transformers; print('transformers', transformers.__version__)"
python -m ruff check hf_attn scripts tests
python -m pytest -q "$@"
