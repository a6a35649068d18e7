"""Run Python in a subprocess that cannot import hf_attn (as on a machine where it is not installed)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

# Prepended to the child's code: drop every way the package could be found (repo root on sys.path,
# the editable-install finder and its path hook), then prove it is gone.
_SCRUB = """
import importlib.util, os, sys
sys.path[:] = [p for p in sys.path if p and not os.path.isfile(os.path.join(p, "hf_attn", "__init__.py"))]
sys.meta_path[:] = [f for f in sys.meta_path if "__editable__" not in getattr(f, "__module__", "")]
sys.path_hooks[:] = [h for h in sys.path_hooks if "__editable__" not in getattr(h, "__module__", "")]
sys.path_importer_cache.clear()
assert importlib.util.find_spec("hf_attn") is None, "hf_attn is still importable"
"""


def run_without_hf_attn(code: str, cwd: str | Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter (cwd=``cwd``) where ``import hf_attn`` fails; raise on error."""
    script = _SCRUB + textwrap.dedent(code)
    env = {
        "HF_HUB_OFFLINE": "1",
        "HF_HOME": str(Path(cwd) / ".hf_home"),  # fresh remote-code module cache
        "PATH": "/usr/bin:/bin",
        "HOME": str(Path.home()),
        "TOKENIZERS_PARALLELISM": "false",
    }
    if "TORCH_EXTENSIONS_DIR" in os.environ:  # where the CPU kernels are built and cached
        env["TORCH_EXTENSIONS_DIR"] = os.environ["TORCH_EXTENSIONS_DIR"]
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=str(cwd), env=env, capture_output=True, text=True, timeout=timeout
    )
    if result.returncode != 0:
        raise AssertionError(f"subprocess failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result
