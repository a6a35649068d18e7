"""Benchmark hf_attn's attention modes against Hugging Face reference models (see docs/performance.md).

Example (a short development run):
    python scripts/benchmark.py --seq-lens 512,1024 --repeats 1 --out /tmp/bench
"""

import sys

from hf_attn.benchmark.cli import main

if __name__ == "__main__":
    sys.exit(main())
