#!/usr/bin/env bash
# The model and generation tests against the LOWEST transformers release hf_attn supports (the lower
# bound in pyproject.toml), in a second environment that shares everything else with this one.
# Run after scripts/test.sh (which installs hf_attn); CI runs both.
set -euo pipefail
cd "$(dirname "$0")/.."
low="$(python scripts/transformers_range.py --lowest)"
venv="${HF_ATTN_LOWEST_VENV:-${TMPDIR:-/tmp}/hf_attn-transformers-$low}"
python -m venv --system-site-packages "$venv"
"$venv/bin/python" -m pip install --quiet "transformers==$low"
"$venv/bin/python" -c "import sys, transformers; print('transformers', transformers.__version__); sys.exit(transformers.__version__ != '$low')"
"$venv/bin/python" -m pytest -q -p no:cacheprovider tests/test_modeling_hf_attn.py tests/test_generation.py \
    tests/test_modeling_contract.py tests/test_validation.py "$@"
