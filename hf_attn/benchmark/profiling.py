"""Operator-level profiles of one attention layer (forward + backward), to find where a mode is slow.

``python scripts/benchmark.py --profile 4096 --modes local,lowrank`` writes
``profile_<case>_n<N>.txt`` per case: torch.profiler's operator table sorted by self CPU time, with
input shapes, so a slow op can be traced back to a line of the attention code.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from .measure import _quiet_stderr
from .ours import build_our_layer
from .reference import build_reference_layer
from .spec import BenchSpec


def profile_layer(case: str, n: int, spec: BenchSpec, batch: int = 1, rows: int = 25) -> str:
    """Operator table (self CPU time, shapes, memory) of one forward + backward of layer ``case`` at length n.

    ``case`` is ``ours_<mode>`` or a reference layer name.
    """
    layer = build_our_layer(case[5:], spec) if case.startswith("ours_") else build_reference_layer(case, spec)
    gen = torch.Generator().manual_seed(n)
    x = torch.randn(batch, n, spec.hidden_size, generator=gen).to(spec.dtype).requires_grad_()
    grad = torch.randn(batch, n, spec.hidden_size, generator=gen).to(spec.dtype)

    def step() -> None:
        layer.zero_grad(set_to_none=True)
        x.grad = None
        layer(x).backward(grad)

    step()  # warm-up
    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], record_shapes=True, profile_memory=True) as prof:
        step()
    total_ms = sum(e.self_cpu_time_total for e in prof.key_averages()) / 1e3
    header = f"# {case}, n={n}, batch={batch}, {spec}\n# total self CPU time {total_ms:.1f} ms\n"
    table = prof.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total", row_limit=rows,
                                                                 max_name_column_width=60, max_shapes_column_width=90)
    return header + table


def write_profiles(out_dir: Path, cases: list[str], n: int, spec: BenchSpec) -> list[Path]:
    """``profile_<case>_n<n>.txt`` for every case, in ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for case in cases:
        paths.append(out_dir / f"profile_{case}_n{n}.txt")
        paths[-1].write_text(profile_layer(case, n, spec), encoding="utf-8")
    return paths
