"""Print the transformers requirement declared in pyproject.toml (``--lowest``: its lower bound only).

Used by scripts/test.sh (install the newest allowed release) and scripts/test_lowest.sh (pin the
lowest), so the supported range is written in one place.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def transformers_requirement(pyproject: Path = PYPROJECT) -> str:
    """The quoted ``"transformers..."`` entry of the dependencies (a regex: tomllib needs Python 3.11)."""
    match = re.search(r'^\s*"(transformers[^"]*)"', pyproject.read_text(encoding="utf-8"), flags=re.MULTILINE)
    if match is None:
        raise SystemExit(f"{pyproject}: no transformers dependency")
    return match.group(1)


def lowest(requirement: str) -> str:
    match = re.search(r">=\s*([0-9][0-9.]*)", requirement)
    if match is None:
        raise SystemExit(f"pyproject.toml: {requirement!r} has no lower bound (>=)")
    return match.group(1)


if __name__ == "__main__":
    requirement = transformers_requirement()
    print(lowest(requirement) if "--lowest" in sys.argv[1:] else requirement)
