#!/usr/bin/env bash
# From a fresh checkout on a machine with no GPU: install, train the small default model on the
# embedded corpus (the Python standard library's own source), evaluate it, save it, reload it
# through AutoModelForCausalLM/AutoTokenizer and print a generated sample. A few minutes on 2 CPU cores.
#
#   bash scripts/quickstart.sh
#
# Environment knobs:
#   PYTHON           interpreter to use (default: python)
#   TORCH_PIP_ARGS   extra pip arguments for torch, e.g. "--index-url https://download.pytorch.org/whl/cpu"
#                    to fetch the small CPU-only wheel instead of the CUDA one
#   OUTPUT_DIR       run folder (default: outputs/quickstart)
#   OMP_NUM_THREADS  intra-op threads (default 1: this model's matrices are too small to gain from
#                    more, and on a shared CPU extra threads only contend)
# Running it again resumes the same run (finished: it re-evaluates, re-saves and samples again).
set -euo pipefail

cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python}"
OUTPUT_DIR="${OUTPUT_DIR:-outputs/quickstart}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"

echo "== 1/3 install (torch first, then hf_attn and TensorBoard)"
# shellcheck disable=SC2086  # TORCH_PIP_ARGS is a list of arguments on purpose
"$PYTHON" -m pip install "torch==2.13.0" ${TORCH_PIP_ARGS:-}
"$PYTHON" -m pip install -e . tensorboard

echo "== 2/3 train configs/small_eager.yaml on the Python standard library, evaluate, save"
"$PYTHON" scripts/train.py --config configs/small_eager.yaml --training.output_dir "$OUTPUT_DIR" --resume

echo "== 3/3 reload $OUTPUT_DIR/final with the Auto classes and sample"
"$PYTHON" scripts/generate.py "$OUTPUT_DIR/final" --prompt "def " --max_new_tokens 100
