"""Experiment configs: a YAML file of four sections, overridable from the command line.

A config is data only (``configs/<size>_<mode>.yaml``)::

    model:      # any HfAttnConfig field except vocab_size / special token ids (taken from the tokenizer)
    data:       # DataConfig: corpus, split, block size
    tokenizer:  # TokenizerConfig: train a byte-level BPE, or load one by path
    training:   # TrainingConfig: optimisation, evaluation, checkpoints, logging

Every key is checked before any work starts: an unknown key or a bad value raises ``ValueError``
naming the dotted key (``training.max_steps``), the value and what is allowed. Command-line flags
``--section.key value`` (or ``--section.key=value``) override the file; values are parsed as YAML,
so ``10`` is an int, ``5e-3`` a float, ``null`` is None and ``[a, b]`` is a list.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import re
import shlex
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from hf_attn.configuration_hf_attn import HfAttnConfig
from hf_attn.training.fileio import write_text_atomically

# --------------------------------------------------------------------------------------------------
# Value checks. Each returns None when the value is fine, else the "allowed" half of the message.
# --------------------------------------------------------------------------------------------------

Check = Callable[[Any], "str | None"]


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _got(value: Any) -> str:
    # A quoted number ("0.001") reads as a string; say so, since the value looks right when printed.
    return f" (got a {type(value).__name__})" if isinstance(value, (str, bool)) else ""


def integer(minimum: int, *, optional: bool = False) -> Check:
    """An int >= minimum (or None when ``optional``)."""

    def check(value: Any) -> str | None:
        if optional and value is None:
            return None
        if _is_int(value) and value >= minimum:
            return None
        return f"expected an integer >= {minimum}" + (" or null" if optional else "") + _got(value)

    return check


def number(low: float, high: float = math.inf, *, low_open: bool = False, optional: bool = False) -> Check:
    """A finite float in [low, high] (or (low, high] when ``low_open``), or None when ``optional``."""

    def check(value: Any) -> str | None:
        if optional and value is None:
            return None
        if _is_number(value) and (value > low if low_open else value >= low) and value <= high:
            return None
        interval = f"{'(' if low_open else '['}{low}, {high}{']' if high != math.inf else ')'}"
        return f"expected a number in {interval}" + (" or null" if optional else "") + _got(value)

    return check


def choice(*allowed: Any) -> Check:
    """One of ``allowed``."""

    def check(value: Any) -> str | None:
        return None if value in allowed else f"allowed values are {list(allowed)}"

    return check


def string(*, optional: bool = False) -> Check:
    """A non-empty string (or None when ``optional``)."""

    def check(value: Any) -> str | None:
        if (optional and value is None) or (isinstance(value, str) and value):
            return None
        return "expected a non-empty string" + (" or null" if optional else "")

    return check


def string_list(*, optional: bool = False) -> Check:
    """A non-empty list of non-empty strings (a single string is accepted and wrapped)."""

    def check(value: Any) -> str | None:
        if optional and value is None:
            return None
        if isinstance(value, str) and value:
            return None
        if isinstance(value, list) and value and all(isinstance(v, str) and v for v in value):
            return None
        return "expected a string or a non-empty list of strings" + (" or null" if optional else "")

    return check


def boolean(value: Any) -> str | None:
    """True or False."""
    return None if isinstance(value, bool) else "expected true or false"


def _field(default: Any, check: Check, doc: str) -> Any:
    """A dataclass field carrying its validator and one line of documentation."""
    return field(default=default, metadata={"check": check, "doc": doc})


# --------------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------------

STDLIB_DATASET = "stdlib"
FILES_DATASET = "files"


@dataclass
class DataConfig:
    """Where the text comes from and how it is cut into training blocks."""

    dataset: str = _field(
        STDLIB_DATASET,
        string(),
        "'stdlib' (embedded: this Python's standard-library *.py files), 'files' (local text files "
        "in data_files), or any datasets.load_dataset path: a Hub name or a local dataset folder",
    )
    data_files: str | list[str] | None = _field(
        None,
        string_list(optional=True),
        "dataset 'files': files, folders or glob patterns (one document per file)",
    )
    dataset_config: str | None = _field(
        None, string(optional=True), "Hub dataset config name (e.g. wikitext-2-raw-v1)"
    )
    train_split: str = _field("train", string(), "Hub/local dataset: the split to train on")
    validation_split: str | None = _field(
        "validation",
        string(optional=True),
        "Hub/local dataset: the validation split; null or missing -> validation_fraction of train",
    )
    text_column: str = _field("text", string(), "column holding the text")
    validation_fraction: float = _field(
        0.02,
        number(0.0, 0.5, low_open=True),
        "share of documents held out (stdlib/files: by hash of the path)",
    )
    block_size: int = _field(256, integer(8), "tokens per training example (documents are packed)")
    num_proc: int | None = _field(None, integer(1, optional=True), "processes for datasets.map")
    cache_dir: str | None = _field(
        None, string(optional=True), "datasets cache folder (default: HF_DATASETS_CACHE)"
    )


@dataclass
class TokenizerConfig:
    """Train a byte-level BPE on the training split, or load an existing tokenizer."""

    path: str | None = _field(
        None, string(optional=True), "existing tokenizer (folder or Hub name); null = train one"
    )
    vocab_size: int = _field(8192, integer(259), "vocabulary size of the trained BPE")
    min_frequency: int = _field(2, integer(1), "minimum pair count for a BPE merge")


@dataclass
class TrainingConfig:
    """Optimisation, evaluation, checkpointing and logging."""

    output_dir: str = _field("outputs/run", string(), "run folder: checkpoints/, final/, logs")
    seed: int = _field(0, integer(0), "seed of model init, data order and dropout")
    max_steps: int = _field(1000, integer(1), "optimizer steps")
    per_device_batch_size: int = _field(8, integer(1), "blocks per device per micro-step")
    gradient_accumulation_steps: int = _field(1, integer(1), "micro-steps per optimizer step")
    learning_rate: float = _field(1e-3, number(0.0, 1.0, low_open=True), "peak learning rate")
    min_lr_ratio: float = _field(0.1, number(0.0, 1.0), "cosine decays to learning_rate * min_lr_ratio")
    warmup_steps: int = _field(0, integer(0), "linear warmup steps")
    weight_decay: float = _field(0.1, number(0.0), "AdamW decoupled weight decay (matrices only)")
    adam_beta1: float = _field(0.9, number(0.0, 1.0), "AdamW beta1")
    adam_beta2: float = _field(0.95, number(0.0, 1.0), "AdamW beta2")
    adam_epsilon: float = _field(1e-8, number(0.0, 1.0, low_open=True), "AdamW epsilon")
    max_grad_norm: float | None = _field(
        1.0, number(0.0, low_open=True, optional=True), "clip norm; null = off"
    )
    mixed_precision: str = _field(
        "auto",
        choice("auto", "no", "fp16", "bf16"),
        "auto: the launcher's setting, else bf16/fp16 on GPU, no on CPU",
    )
    log_every: int = _field(10, integer(1), "steps between loss/lr/tokens-per-second logs")
    eval_every: int | None = _field(
        200, integer(1, optional=True), "steps between validations; null = end only"
    )
    eval_blocks: int | None = _field(
        None,
        integer(1, optional=True),
        "periodic validations use the first N validation blocks (null = all); the final one uses all",
    )
    eval_batch_size: int = _field(8, integer(1), "blocks per device per validation batch")
    checkpoint_every: int | None = _field(
        200, integer(1, optional=True), "steps between checkpoints; null = none"
    )
    keep_checkpoints: int = _field(2, integer(1), "complete checkpoints kept (oldest deleted first)")
    on_nonfinite_loss: str = _field(
        "stop", choice("stop", "skip"), "NaN/inf loss or gradient: stop, or skip the step"
    )
    max_consecutive_skips: int = _field(
        10, integer(1), "with skip: stop after this many non-finite steps in a row"
    )
    report_to: str = _field("tensorboard", choice("tensorboard", "none"), "Accelerate tracker")
    num_workers: int = _field(0, integer(0), "DataLoader worker processes")
    resume: bool = _field(False, boolean, "continue from the latest complete checkpoint in output_dir")
    overwrite_output_dir: bool = _field(False, boolean, "delete output_dir's checkpoints and start over")


# Model keys that the trainer sets itself from the tokenizer, or that make no sense for LM training.
_MODEL_KEYS_FROM_TOKENIZER = ("vocab_size", "bos_token_id", "eos_token_id", "pad_token_id")
MODEL_KEYS = tuple(
    name
    for name, p in inspect.signature(HfAttnConfig.__init__).parameters.items()
    if name != "self" and p.kind is p.POSITIONAL_OR_KEYWORD and name not in _MODEL_KEYS_FROM_TOKENIZER
)
_PLACEHOLDER_VOCAB = 1024  # only used to validate the model section before the tokenizer exists

SECTIONS: dict[str, type] = {"data": DataConfig, "tokenizer": TokenizerConfig, "training": TrainingConfig}


@dataclass
class ExperimentConfig:
    """A whole experiment: the HfAttnConfig kwargs plus the three trainer sections."""

    model: dict[str, Any] = field(default_factory=dict)
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (YAML/JSON serialisable), the inverse of ``config_from_dict``."""
        out: dict[str, Any] = {"model": dict(self.model)}
        for name in SECTIONS:
            out[name] = dataclasses.asdict(getattr(self, name))
        return out

    def hf_config(self, **tokenizer_fields: Any) -> HfAttnConfig:
        """The model's ``HfAttnConfig``; ``tokenizer_fields`` are vocab_size and the special token ids."""
        return HfAttnConfig(**self.model, **tokenizer_fields)


# --------------------------------------------------------------------------------------------------
# Loading and validation
# --------------------------------------------------------------------------------------------------


class _YamlLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that also reads YAML 1.2 floats such as ``5e-3`` and ``1E4`` as numbers.

    PyYAML implements YAML 1.1, whose float pattern requires a dot (``5.0e-3``), so ``5e-3`` loads
    as the string ``'5e-3'``; everyone writes learning rates that way.
    """


_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def load_yaml(stream: Any) -> Any:
    """Parse YAML text or a file object like ``yaml.safe_load``, with YAML 1.2 floats (``5e-3``)."""
    return yaml.load(stream, Loader=_YamlLoader)  # a SafeLoader subclass: builds plain data only


def _build_section(name: str, cls: type, values: Mapping[str, Any]) -> Any:
    if not isinstance(values, Mapping):
        raise ValueError(f"config section {name!r} is invalid: expected a mapping of keys, got {values!r}")
    allowed = [f.name for f in dataclasses.fields(cls)]
    for key in values:
        if key not in allowed:
            raise ValueError(f"config key {name}.{key} is unknown: allowed keys in {name!r} are {allowed}")
    section = cls(**values)
    for f in dataclasses.fields(cls):
        value = getattr(section, f.name)
        problem = f.metadata["check"](value)
        if problem is not None:
            raise ValueError(f"config key {name}.{f.name}={value!r} is invalid: {problem}")
    return section


def _check_model_section(model: Mapping[str, Any]) -> None:
    if not isinstance(model, Mapping):
        raise ValueError(
            f"config section 'model' is invalid: expected a mapping of HfAttnConfig fields, got {model!r}"
        )
    for key in model:
        if key in _MODEL_KEYS_FROM_TOKENIZER:
            raise ValueError(
                f"config key model.{key} is not allowed: it is taken from the tokenizer "
                "(set tokenizer.vocab_size or tokenizer.path instead)"
            )
        if key not in MODEL_KEYS:
            raise ValueError(
                f"config key model.{key} is unknown: allowed keys in 'model' are {list(MODEL_KEYS)}"
            )
    try:
        HfAttnConfig(**model, vocab_size=_PLACEHOLDER_VOCAB)
    except ValueError as err:
        # HfAttnConfig names its own field ("HfAttnConfig.x=..."); add where it came from.
        raise ValueError(f"config section 'model' is invalid: {err}") from err
    if model.get("is_causal", True) is not True:
        raise ValueError(
            "config key model.is_causal=False is invalid: language-model training needs is_causal=True"
        )


def _check_cross_fields(config: ExperimentConfig) -> None:
    """Rules that involve more than one key."""
    data, training = config.data, config.training
    max_positions = config.model.get("max_position_embeddings", HfAttnConfig().max_position_embeddings)
    if data.block_size > max_positions:
        raise ValueError(
            f"config key data.block_size={data.block_size} is invalid: expected <= "
            f"model.max_position_embeddings={max_positions}"
        )
    if data.dataset == FILES_DATASET and data.data_files is None:
        raise ValueError(
            "config key data.data_files=None is invalid: data.dataset='files' needs files or globs"
        )
    if data.dataset != FILES_DATASET and data.data_files is not None:
        raise ValueError(
            f"config key data.data_files={data.data_files!r} is invalid: only used with data.dataset='files' "
            f"(got data.dataset={data.dataset!r})"
        )
    if training.resume and training.overwrite_output_dir:
        raise ValueError(
            "config keys training.resume=True and training.overwrite_output_dir=True are invalid together: "
            "choose one"
        )


def config_from_dict(raw: Mapping[str, Any]) -> ExperimentConfig:
    """Build and fully validate an ``ExperimentConfig`` from nested dicts.

    Raises:
        ValueError: naming the dotted key, the value and the allowed values/keys.
    """
    if not isinstance(raw, Mapping):
        raise ValueError(
            f"config is invalid: expected a mapping with sections {['model', *SECTIONS]}, got {raw!r}"
        )
    allowed_sections = ["model", *SECTIONS]
    for key in raw:
        if key not in allowed_sections:
            raise ValueError(f"config section {key!r} is unknown: allowed sections are {allowed_sections}")
    model = dict(raw.get("model") or {})
    _check_model_section(model)
    sections = {name: _build_section(name, cls, raw.get(name) or {}) for name, cls in SECTIONS.items()}
    config = ExperimentConfig(model=model, **sections)
    _check_cross_fields(config)
    return config


def parse_overrides(args: Sequence[str]) -> dict[str, Any]:
    """Turn ``["--training.max_steps", "10", "--model.attention_mode=local"]`` into a dotted-key dict.

    Values are parsed as YAML scalars/lists. A flag without a value (followed by another flag or
    the end) means ``true``.

    Raises:
        ValueError: for an argument that is not ``--section.key`` form.
    """
    overrides: dict[str, Any] = {}
    for key, text, _ in _split_override_args(args):
        try:
            overrides[key] = load_yaml(text)
        except yaml.YAMLError as err:
            raise ValueError(f"command-line value for {key} is not valid YAML: {text!r} ({err})") from err
    return overrides


def _split_override_args(args: Sequence[str]) -> list[tuple[str, str, list[str]]]:
    """``(dotted key, value text, the arguments it came from)`` for each ``--section.key [value]``."""
    parsed = []
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or "." not in arg[2:].split("=", 1)[0]:
            raise ValueError(
                f"command-line argument {arg!r} is invalid: expected --section.key VALUE or --section.key=VALUE "
                f"with section in {['model', *SECTIONS]}"
            )
        key, has_value, text = arg[2:].partition("=")
        tokens = [arg]
        if not has_value:
            if i + 1 < len(args) and not args[i + 1].startswith("--"):
                text = args[i + 1]
                tokens.append(text)
                i += 1
            else:
                text = "true"
        parsed.append((key, text, tokens))
        i += 1
    return parsed


def resume_command(
    script: str, config_path: str | None, overrides: Sequence[str], num_processes: int = 1
) -> str:
    """The shell command that continues a run started as ``script --config config_path *overrides``.

    Used in the message of an interrupted run: the same arguments plus ``--resume``, without the
    flags that contradict it (``training.resume``, ``training.overwrite_output_dir``). A
    multi-process run is relaunched through ``accelerate launch``, whose options this process does
    not see; the command says where they go.
    """
    kept = [
        token
        for key, _, tokens in _split_override_args(overrides)
        if key not in ("training.resume", "training.overwrite_output_dir")
        for token in tokens
    ]
    config = ["--config", config_path] if config_path is not None else []
    arguments = shlex.join([script, *config, *kept, "--resume"])
    if num_processes == 1:
        return f"{shlex.quote(sys.executable)} {arguments}"
    return f"accelerate launch <the launcher options of this run> {arguments}"


def apply_overrides(raw: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Return a copy of the nested dict ``raw`` with dotted-key ``overrides`` set (two levels)."""
    merged: dict[str, Any] = {k: dict(v) if isinstance(v, Mapping) else v for k, v in (raw or {}).items()}
    for dotted, value in overrides.items():
        section, _, key = dotted.partition(".")
        if not key or "." in key:
            raise ValueError(f"override key {dotted!r} is invalid: expected section.key (exactly one dot)")
        target = merged.setdefault(section, {})
        if not isinstance(target, dict):
            raise ValueError(
                f"override key {dotted!r} is invalid: config section {section!r} is not a mapping"
            )
        target[key] = value
    return merged


def load_config(
    path: str | Path | None = None, overrides: Mapping[str, Any] | Sequence[str] = ()
) -> ExperimentConfig:
    """Read a YAML experiment config (or start from defaults), apply overrides, validate.

    Args:
        path: YAML file; ``None`` starts from the defaults.
        overrides: dotted-key dict, or the raw ``--section.key value`` command-line arguments.

    Raises:
        ValueError: for an unreadable file, an unknown key or an invalid value (before any training).
    """
    raw: Any = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"config file {str(path)!r} does not exist")
        with path.open(encoding="utf-8") as fh:
            raw = load_yaml(fh) or {}
    if not isinstance(overrides, Mapping):
        overrides = parse_overrides(list(overrides))
    return config_from_dict(apply_overrides(raw, overrides))


def save_config(config: ExperimentConfig, path: str | Path) -> None:
    """Write the resolved config as YAML (what a run actually used), atomically.

    A crash or full disk mid-write leaves the previous file, never an empty or truncated one.
    """
    write_text_atomically(path, yaml.safe_dump(config.to_dict(), sort_keys=False))


def describe_keys() -> str:
    """A Markdown table of every trainer key with default and meaning (used for docs/training.md)."""
    lines = ["| key | default | meaning |", "|---|---|---|"]
    for name, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            lines.append(f"| `{name}.{f.name}` | `{f.default!r}` | {f.metadata['doc']} |")
    return "\n".join(lines)


__all__ = [
    "DataConfig",
    "TokenizerConfig",
    "TrainingConfig",
    "ExperimentConfig",
    "MODEL_KEYS",
    "config_from_dict",
    "load_config",
    "parse_overrides",
    "apply_overrides",
    "load_yaml",
    "resume_command",
    "save_config",
    "describe_keys",
]
