"""Benchmark suite: hf_attn's attention modes measured side by side with Hugging Face reference models.

Never imported by the modeling code. Entry point: ``scripts/benchmark.py`` (``cli.main``).
Modules: ``measure`` (timing, peak memory, matmul peak), ``kv_cache`` (cache bytes), ``flops`` (MFU),
``spec`` (shared sizes), ``ours`` / ``reference`` (the two sides), ``reference_gpt`` (the minimal GPT
of the ``small`` section), ``suite`` (the sections), ``report`` (files, ratios, targets, plots),
``profiling`` (operator and Python profiles), ``cli``.
"""
