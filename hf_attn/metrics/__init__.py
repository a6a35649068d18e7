"""Evaluation metrics shipped with hf_attn as local `evaluate` modules (no Hub download needed).

Each metric lives in ``hf_attn/metrics/<name>/<name>.py`` and is loaded by path, which is how
``evaluate`` loads community metrics offline.
"""

from __future__ import annotations

from pathlib import Path

import evaluate

_METRICS_DIR = Path(__file__).resolve().parent


def available_metrics() -> list[str]:
    """Names of the metric modules shipped in this folder (sorted)."""
    return sorted(p.name for p in _METRICS_DIR.iterdir() if (p / f"{p.name}.py").is_file())


def load_metric(name: str, **kwargs) -> evaluate.EvaluationModule:
    """Load the shipped metric ``name`` (e.g. ``"perplexity"``) by path; kwargs go to ``evaluate.load``.

    Raises:
        ValueError: if ``name`` is not one of ``available_metrics()``.
    """
    allowed = available_metrics()
    if name not in allowed:
        raise ValueError(f"metric name={name!r} is invalid: allowed values are {allowed}")
    return evaluate.load(str(_METRICS_DIR / name / f"{name}.py"), **kwargs)


__all__ = ["available_metrics", "load_metric"]
