"""Datasets for fine-tuning: the built-in stdlib classification task, and any `datasets` source.

Built-in task (``BUILTIN_DATASET``): *which standard-library package does this function come from?*
Every example is the source of one function or method from the Python standard library installed with
the running interpreter, and its label is the top-level package of the file it was read from (by
default ``asyncio``, ``email``, ``multiprocessing`` or ``xml``). The labels are therefore facts of
file provenance, assigned mechanically, never by a person or a model. No download is involved.

Honesty measures, all deterministic:
- test code (``test*`` folders and files) is excluded, so the task is about library code;
- a function text that occurs more than once (in any package) is dropped everywhere, so no example
  has two labels and no exact copy crosses a split;
- rows are ordered by a SHA-256 of (path, qualname), a fixed shuffle, so any prefix mixes packages;
- the split is **by file**: all functions of one file land in the same split, so methods of one class
  never sit on both sides of the train/test boundary. Files are visited in order of a SHA-256 of
  their path and each goes to the split furthest below its target share, per package, which keeps
  every package near 80/10/10 without any randomness.
"""

from __future__ import annotations

import ast
import hashlib
import sysconfig
import textwrap
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from datasets import ClassLabel, Dataset, DatasetDict, Features, Value, load_dataset

BUILTIN_DATASET = "hf_attn:stdlib-modules"
DEFAULT_PACKAGES = ("asyncio", "email", "multiprocessing", "xml")
SPLITS = ("train", "validation", "test")
# file extension -> `datasets` builder for --train_file / --validation_file / --test_file
FILE_BUILDERS = {"csv": "csv", "tsv": "csv", "json": "json", "jsonl": "json", "txt": "text", "parquet": "parquet"}


@dataclass(frozen=True)
class Snippet:
    """One function's source and where it came from."""

    text: str
    package: str
    path: str  # relative to the stdlib folder, e.g. "email/utils.py"
    qualname: str  # e.g. "Message.get_payload"


def stdlib_dir() -> Path:
    """The folder of the running interpreter's pure-Python standard library."""
    return Path(sysconfig.get_paths()["stdlib"])


def _is_test_path(relative: Path) -> bool:
    return any(part.startswith("test") or part == "idle_test" for part in relative.parts)


def _functions(tree: ast.AST, prefix: str = ""):
    """Yield (qualname, node) for module-level functions and methods (nested classes included)."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield prefix + node.name, node
        elif isinstance(node, ast.ClassDef):
            yield from _functions(node, prefix + node.name + ".")


def extract_snippets(path: Path, root: Path, package: str, *, min_lines: int, max_chars: int) -> list[Snippet]:
    """All functions of at least ``min_lines`` lines in ``path``, dedented, cut to ``max_chars``.

    Truncation happens at a line boundary so a snippet never ends mid-token.
    """
    source = path.read_text(encoding="utf-8")
    try:
        tree = ast.parse(source)
    except SyntaxError:  # a few stdlib files are templates/data for other tools; they are not library code
        return []
    # Slice lines ourselves: ast.get_source_segment re-splits the whole file on every call (quadratic).
    lines = source.splitlines(keepends=True)
    snippets = []
    for qualname, node in _functions(tree):
        if node.end_lineno - node.lineno + 1 < min_lines:
            continue
        # whole lines from "def" to the end of the body; the first line's indentation is kept so dedent works
        text = textwrap.dedent("".join(lines[node.lineno - 1 : node.end_lineno])).rstrip() + "\n"
        if len(text) > max_chars:
            text = text[: text.rfind("\n", 0, max_chars) + 1 or max_chars].rstrip()
        snippets.append(Snippet(text, package, path.relative_to(root).as_posix(), qualname))
    return snippets


def _split_files(files: Sequence[tuple[str, int]], fractions: dict[str, float]) -> dict[str, str]:
    """Assign each (file, n_examples) to a split, visiting files in SHA-256 order of their path."""
    order = sorted(files, key=lambda f: hashlib.sha256(f[0].encode()).hexdigest())
    counts = dict.fromkeys(fractions, 0)
    assignment = {}
    seen = 0
    for name, n in order:
        seen += n
        # the split furthest below its share of the examples seen so far (ties: train, validation, test)
        split = max(fractions, key=lambda s: fractions[s] * seen - counts[s])
        assignment[name] = split
        counts[split] += n
    return assignment


def build_stdlib_dataset(
    packages: Sequence[str] = DEFAULT_PACKAGES,
    *,
    root: str | Path | None = None,
    min_lines: int = 3,
    max_chars: int = 1200,
    validation_fraction: float = 0.1,
    test_fraction: float = 0.1,
) -> DatasetDict:
    """Build the stdlib function -> package classification task.

    Args:
        packages: Top-level stdlib packages; each is one class (label ids follow this order).
        root: Standard-library folder; default: the running interpreter's (``stdlib_dir()``).
        min_lines: Skip functions shorter than this (one-liners carry almost no signal).
        max_chars: Cut longer functions at the last line break before this many characters.
        validation_fraction: Target share of each package's examples in "validation".
        test_fraction: Target share of each package's examples in "test".

    Returns:
        ``DatasetDict`` with "train", "validation", "test"; columns text (str), label (ClassLabel with
        the package names), path and qualname (provenance, for inspection).

    Raises:
        ValueError: on an unknown/duplicate/too-small package, or fractions outside (0, 1) summing >= 1.
    """
    root = Path(root) if root is not None else stdlib_dir()
    packages = list(packages)
    if len(packages) < 2 or len(set(packages)) != len(packages):
        raise ValueError(f"packages: expected at least two distinct package names, got {packages}")
    for name, value in (("validation_fraction", validation_fraction), ("test_fraction", test_fraction)):
        if not 0 < value < 1:
            raise ValueError(f"{name}: expected a float in (0, 1), got {value!r}")
    if validation_fraction + test_fraction >= 1:
        raise ValueError(
            f"validation_fraction + test_fraction: expected < 1, got {validation_fraction + test_fraction}"
        )
    if min_lines < 1 or max_chars < 1:
        raise ValueError(f"min_lines, max_chars: expected integers >= 1, got {min_lines}, {max_chars}")
    available = sorted(p.name for p in root.iterdir() if (p / "__init__.py").is_file())
    unknown = [p for p in packages if p not in available]
    if unknown:
        raise ValueError(f"packages: {unknown} are not packages in {root}; available: {available}")

    snippets: list[Snippet] = []
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            if not _is_test_path(path.relative_to(root)):
                snippets.extend(extract_snippets(path, root, package, min_lines=min_lines, max_chars=max_chars))
    # Exact duplicates (e.g. identical __repr__ in several files) would be free test points or carry
    # two labels: drop every copy.
    counts = Counter(s.text for s in snippets)
    snippets = [s for s in snippets if counts[s.text] == 1]

    fractions = {"train": 1 - validation_fraction - test_fraction, "validation": validation_fraction,
                 "test": test_fraction}
    assignment: dict[str, str] = {}
    for package in packages:
        per_file = Counter(s.path for s in snippets if s.package == package)
        if len(per_file) < len(SPLITS):
            raise ValueError(
                f"packages: {package!r} has {len(per_file)} file(s) with functions; need at least {len(SPLITS)} "
                "to split by file"
            )
        assignment.update(_split_files(sorted(per_file.items()), fractions))

    features = Features(
        {"text": Value("string"), "label": ClassLabel(names=packages), "path": Value("string"),
         "qualname": Value("string")}
    )
    label_id = {name: i for i, name in enumerate(packages)}
    splits = {}
    for split in SPLITS:
        # Rows in SHA-256 order of (path, qualname): a fixed mix of packages, so that the first N rows
        # (--max_train_samples) are not all one class.
        rows = sorted(
            (s for s in snippets if assignment[s.path] == split),
            key=lambda s: hashlib.sha256(f"{s.path}::{s.qualname}".encode()).hexdigest(),
        )
        splits[split] = Dataset.from_dict(
            {"text": [s.text for s in rows], "label": [label_id[s.package] for s in rows],
             "path": [s.path for s in rows], "qualname": [s.qualname for s in rows]},
            features=features,
        )
    return DatasetDict(splits)


def load_raw_datasets(
    dataset_name: str | None = None,
    dataset_config_name: str | None = None,
    *,
    train_file: str | None = None,
    validation_file: str | None = None,
    test_file: str | None = None,
    validation_split_percentage: int = 10,
    stdlib_packages: Sequence[str] = DEFAULT_PACKAGES,
    seed: int = 42,
    cache_dir: str | None = None,
) -> DatasetDict:
    """Load raw text data the same way whatever the source.

    - neither ``dataset_name`` nor files, or ``dataset_name == BUILTIN_DATASET``: the stdlib task;
    - ``dataset_name``: ``datasets.load_dataset(dataset_name, dataset_config_name)`` (a Hub id, a
      local dataset folder, or a builder name such as "json");
    - files: ``load_dataset(<builder from the extension>, data_files=...)``.

    When the result has no "validation" split, ``validation_split_percentage`` percent of "train" is
    held out with a seeded shuffle.

    Raises:
        ValueError: on an unsupported file extension, both a name and files, or a bad percentage.
    """
    files = {"train": train_file, "validation": validation_file, "test": test_file}
    files = {k: v for k, v in files.items() if v is not None}
    if dataset_name is not None and files:
        raise ValueError("dataset_name, train_file: give a dataset name or data files, not both")
    if (dataset_name is None and not files) or dataset_name == BUILTIN_DATASET:
        return build_stdlib_dataset(stdlib_packages)
    if dataset_name is not None:
        raw = load_dataset(dataset_name, dataset_config_name, cache_dir=cache_dir)
    else:
        if "train" not in files:
            raise ValueError("train_file: required when validation_file/test_file are given")
        extensions = {Path(f).suffix.lstrip(".").lower() for f in files.values()}
        unknown = extensions - set(FILE_BUILDERS)
        builders = {FILE_BUILDERS[e] for e in extensions if e in FILE_BUILDERS}
        if unknown or len(builders) != 1:
            raise ValueError(
                f"train_file/validation_file/test_file: extensions {sorted(extensions)} must all map to one "
                f"builder; supported extensions: {sorted(FILE_BUILDERS)}"
            )
        builder = builders.pop()
        kwargs = {"delimiter": "\t"} if extensions == {"tsv"} else {}
        raw = load_dataset(builder, data_files=files, cache_dir=cache_dir, **kwargs)
    if not isinstance(raw, DatasetDict):
        raise ValueError(f"dataset_name: {dataset_name!r} loaded as {type(raw).__name__}, expected named splits")
    if "train" not in raw:
        raise ValueError(f"dataset_name: {dataset_name!r} has splits {list(raw)}, expected a 'train' split")
    if "validation" not in raw:
        if not 0 < validation_split_percentage < 100:
            raise ValueError(
                f"validation_split_percentage: expected an integer in (0, 100), got {validation_split_percentage}"
            )
        held = raw["train"].train_test_split(test_size=validation_split_percentage / 100, seed=seed)
        raw["train"], raw["validation"] = held["train"], held["test"]
    return raw


__all__ = [
    "BUILTIN_DATASET",
    "DEFAULT_PACKAGES",
    "Snippet",
    "build_stdlib_dataset",
    "extract_snippets",
    "load_raw_datasets",
    "stdlib_dir",
]
