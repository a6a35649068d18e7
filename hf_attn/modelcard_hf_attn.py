"""Render the hf_attn model card (``README.md``) for a checkpoint folder.

``save_pretrained`` calls :func:`write_model_card` after writing the weights and config, so every
checkpoint (and every ``push_to_hub``, which goes through ``save_pretrained``) carries a card with
Hub metadata: library, tags, pipeline tag, datasets, license, the attention mode and its settings,
and a ``model-index`` with the measured evaluation results.

The card text comes from the template ``model_card.md`` next to this file (a symlink to the
repository's top-level ``model_card.md``). Placeholders are written ``{{ name }}`` and filled by a
ten-line renderer, not Jinja, so the card needs nothing beyond huggingface_hub.

A card is public, so it names the model by its folder's final name (an atomic save writes into a
temporary ``.tmp-<name>`` folder and renames it afterwards) and carries no local filesystem path: any
absolute path in ``model_card_data`` (e.g. a corpus described as ``python-stdlib (/home/me/.pyenv/...)``)
is removed or cut to its last component when the card is rendered (:func:`strip_local_paths`).

This module is copied next to the modeling code into every checkpoint (remote code). It therefore
imports only the standard library, huggingface_hub and transformers. In such a copy the template is
absent, and :func:`write_model_card` writes nothing and returns ``None`` rather than failing the save.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData

TEMPLATE_PATH = Path(__file__).with_name("model_card.md")
# Atomic saves (hf_attn.training's checkpoint writer) write "<parent>/.tmp-<name>" and rename it to
# "<parent>/<name>" once complete, so the card is rendered inside the temporary folder.
TEMPORARY_FOLDER_PREFIX = ".tmp-"

logger = logging.getLogger(__name__)

# Keys a caller may put in ``model.model_card_data``; anything else is a typo and raises.
MODEL_CARD_DATA_KEYS = {
    "model_name": "display name and model-index name (default: the save folder's name)",
    "repo_id": "Hub repo id used in the loading example (default: model_name)",
    "base_model": "Hub id or path of the checkpoint this one was fine-tuned from",
    "datasets": "list of dataset ids the model was trained on",
    "eval_results": "dict metric name -> number, e.g. {'accuracy': 0.91}",
    "eval_dataset": "dataset id the eval_results were measured on (default: datasets[0])",
    "eval_dataset_name": "pretty name of that dataset (default: eval_dataset)",
    "eval_split": "split the eval_results were measured on (default: 'test')",
    "license": "license id (default: 'apache-2.0')",
    "language": "language code(s) of the training text",
    "tags": "extra tags, added to 'hf_attn' and the attention-mode tag",
    "training_data": "markdown paragraph for the 'Training data' section",
    "intended_use": "markdown paragraph for the 'Intended use' section",
}

# An absolute local path: POSIX (also as a file:// URL), home-relative (~/, ~user/) or a Windows drive.
# The look-behind keeps URLs ("https://host/a/b": each "/" follows ":", "/" or a letter) and relative
# names ("user/data", "a/b") out; the path runs to the next space, quote or bracket.
_PATH_CHARS = r"[^\s'\"`,;()\[\]{}<>]"
_ABSOLUTE_PATH = (
    rf"(?<![\w.:/~\\-])(?:(?:file://)?/{_PATH_CHARS}+|~[\w.-]*/{_PATH_CHARS}*|[A-Za-z]:[\\/]{_PATH_CHARS}*)"
)
_PARENTHESISED_PATH = re.compile(rf"\s*\(\s*{_ABSOLUTE_PATH}\s*\)")
_PATH = re.compile(_ABSOLUTE_PATH)

_PLACEHOLDER = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")
_TEMPLATE_COMMENT = re.compile(r"\A\s*<!--.*?-->\s*", re.DOTALL)

_MODE_SUMMARIES = {
    "eager": "full softmax attention, every token attends to every earlier token, with learned absolute "
    "position embeddings; exact, and quadratic in the sequence length.",
    "local": "sliding-window attention: each token attends to itself and the previous {window_minus_one} "
    "tokens{both_sides}, so the cost grows linearly with the sequence length and the KV cache keeps "
    "only the last {window_minus_one} keys and values per layer.",
    "lowrank": "low-rank attention with rank k = {lowrank_dim}: {lowrank_method}; the cost grows linearly "
    "with the sequence length.",
    "rope": "full softmax attention with rotary position embeddings (theta = {rope_theta}{scaling}); exact, "
    "and quadratic in the sequence length.",
}

_MODE_LIMITATIONS = {
    "eager": "Full attention costs O(n²) per layer, and learned absolute positions stop at "
    "max_position_embeddings = {max_position_embeddings} tokens.",
    "local": "A token sees only itself and the previous {window_minus_one} tokens per layer, so information travels at most "
    "{receptive_field} positions through the {num_hidden_layers} layers; anything further back is invisible.",
    "lowrank": "The rank-{lowrank_dim} factorisation approximates softmax attention; sharp, position-precise "
    "lookups (copying one exact earlier token) are harder for it than for full attention.",
    "rope": "Full attention costs O(n²) per layer; rotary positions degrade beyond the trained context of "
    "{max_position_embeddings} tokens unless rope_scaling is set.",
}

# Causal low-rank attention is a kernel (linear-attention) factorisation computed with chunked prefix
# sums; the bidirectional variant projects the keys/values along the sequence (Linformer).
_LOWRANK_METHODS = {
    True: "causal linear attention, softmax(q k^T) replaced by phi(q) phi(k)^T with k-dimensional feature "
    "maps phi ({feature_map}) and evaluated with chunked prefix sums (Katharopoulos et al., 2020)",
    False: "Linformer projection of the keys and values along the sequence to k rows (Wang et al., 2020)",
}

_FEATURE_MAPS = {
    "softmax": "one softmax over the k slots",
    "product": "the outer product of two softmaxes over an m1 x m2 grid of slots, m1 * m2 = k",
}


def render_template(template: str, values: Mapping[str, Any]) -> str:
    """Replace every ``{{ name }}`` in ``template`` with ``str(values[name])``.

    Raises:
        ValueError: if the template names a placeholder missing from ``values``.
    """
    missing = sorted({m.group(1) for m in _PLACEHOLDER.finditer(template)} - set(values))
    if missing:
        raise ValueError(f"model card template: no value for placeholder(s) {missing}; known: {sorted(values)}")
    return _PLACEHOLDER.sub(lambda m: str(values[m.group(1)]), template)


def strip_local_paths(text: str) -> str:
    """``text`` without local filesystem paths, for a public card.

    A parenthesised absolute path is dropped (``"python-stdlib (/usr/lib/python3.11)"`` ->
    ``"python-stdlib"``); any other absolute path is cut to its last component
    (``"local files ['/home/me/data/train.txt']"`` -> ``"local files ['train.txt']"``). URLs and
    relative names such as Hub ids (``user/data``) are left alone.
    """
    text = _PARENTHESISED_PATH.sub("", text)
    return _PATH.sub(lambda m: re.split(r"[\\/]", m.group(0).rstrip("/\\"))[-1], text)


def _strip_paths(key: str, value: Any) -> Any:
    """``value`` (a string or a list of strings) with local paths removed, logging what changed."""
    if isinstance(value, str):
        clean = strip_local_paths(value)
    elif isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        clean = [strip_local_paths(v) for v in value]
    else:
        return value
    if clean != value:
        logger.info("model card: removed local filesystem paths from %s", key)
    return clean


def _check_model_card_data(data: Mapping[str, Any] | None) -> dict[str, Any]:
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise ValueError(f"model_card_data: expected a dict or None, got {type(data).__name__}")
    unknown = sorted(set(data) - set(MODEL_CARD_DATA_KEYS))
    if unknown:
        raise ValueError(f"model_card_data: unknown key(s) {unknown}; allowed keys are {sorted(MODEL_CARD_DATA_KEYS)}")
    data = dict(data)
    for key in ("datasets", "tags"):
        if isinstance(data.get(key), str):
            data[key] = [data[key]]
    base_model = data.get("base_model")
    if isinstance(base_model, str) and strip_local_paths(base_model) != base_model:
        # A local folder is no Hub reference, and its last component alone would name some other repo.
        logger.info("model card: base_model %r is a local path, not a Hub id; left out of the card", base_model)
        data.pop("base_model")
    # The card is published: no field may carry a path of the machine it was written on.
    data = {key: _strip_paths(key, value) for key, value in data.items()}
    results = data.get("eval_results") or {}
    if not isinstance(results, Mapping):
        raise ValueError(f"model_card_data['eval_results']: expected a dict metric -> number, got {results!r}")
    for name, value in results.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"model_card_data['eval_results'][{name!r}]: expected a finite number, got {value!r}")
    return data


def _architectures(config: Any) -> list[str]:
    return list(getattr(config, "architectures", None) or [])


def pipeline_tag_for(config: Any) -> str:
    """The Hub pipeline tag implied by ``config.architectures``.

    ``...ForCausalLM`` -> "text-generation", ``...ForSequenceClassification`` -> "text-classification",
    anything else (the bare ``HfAttnModel``) -> "feature-extraction".
    """
    archs = _architectures(config)
    if any(a.endswith("ForCausalLM") for a in archs):
        return "text-generation"
    if any(a.endswith("ForSequenceClassification") for a in archs):
        return "text-classification"
    return "feature-extraction"


def _rope_scaling(config: Any) -> dict[str, Any] | None:
    """``{"type", "factor"}`` of an active rope scaling, else None.

    transformers 5 folds ``rope_scaling`` into ``rope_parameters`` and fills ``{"rope_type": "default"}``
    when there is none, so "default" (or a missing factor) means no scaling.
    """
    scaling = getattr(config, "rope_scaling", None) or {}
    kind = scaling.get("type", scaling.get("rope_type"))
    if kind in (None, "default") or "factor" not in scaling:
        return None
    return {"type": kind, "factor": scaling["factor"]}


def attention_parameters(config: Any) -> dict[str, Any]:
    """The config fields that define this checkpoint's attention mode, in display order."""
    mode = config.attention_mode
    params: dict[str, Any] = {"attention_mode": mode, "is_causal": bool(getattr(config, "is_causal", True))}
    if mode == "local":
        params["sliding_window"] = config.sliding_window
    elif mode == "lowrank":
        params["lowrank_dim"] = config.lowrank_dim
        if params["is_causal"]:
            params["lowrank_feature_map"] = config.lowrank_feature_map
        params["lowrank_chunk_size"] = config.lowrank_chunk_size
    params["position_embedding_type"] = config.position_embedding_type
    if config.position_embedding_type == "rope":
        params["rope_theta"] = config.rope_theta
        params["rope_scaling"] = _rope_scaling(config)
    params["max_position_embeddings"] = config.max_position_embeddings
    return params


def _table(rows: Mapping[str, Any]) -> str:
    return "\n".join(f"| `{key}` | {value} |" for key, value in rows.items())


def _load_example(repo_id: str, pipeline_tag: str) -> str:
    if pipeline_tag == "text-classification":
        return (
            "from transformers import pipeline\n\n"
            f'classifier = pipeline("text-classification", model="{repo_id}", trust_remote_code=True)\n'
            'print(classifier("def read_header(self, fp):\\n    return fp.readline()"))'
        )
    if pipeline_tag == "text-generation":
        return (
            "from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
            f'tokenizer = AutoTokenizer.from_pretrained("{repo_id}")\n'
            f'model = AutoModelForCausalLM.from_pretrained("{repo_id}", trust_remote_code=True)\n'
            'inputs = tokenizer("def add(a, b):", return_tensors="pt")\n'
            "print(tokenizer.decode(model.generate(**inputs, max_new_tokens=20)[0]))"
        )
    return (
        "from transformers import AutoModel, AutoTokenizer\n\n"
        f'tokenizer = AutoTokenizer.from_pretrained("{repo_id}")\n'
        f'model = AutoModel.from_pretrained("{repo_id}", trust_remote_code=True)\n'
        'hidden = model(**tokenizer("def add(a, b):", return_tensors="pt")).last_hidden_state'
    )


def _evaluation_section(results: Mapping[str, float], dataset: str, split: str) -> str:
    if not results:
        return "No evaluation results were recorded for this checkpoint."
    rows = "\n".join(f"| {name} | {value:.4g} | {dataset} | {split} |" for name, value in results.items())
    return "| metric | value | dataset | split |\n|---|---|---|---|\n" + rows


def _template_values(config: Any, data: Mapping[str, Any], model_name: str, pipeline_tag: str) -> dict[str, Any]:
    mode = config.attention_mode
    causal = bool(getattr(config, "is_causal", True))
    window = getattr(config, "sliding_window", 1)
    scaling = _rope_scaling(config)
    fmt = {
        "window_minus_one": window - 1,
        "sliding_window": window,
        "both_sides": "" if causal else " on each side",
        "receptive_field": config.num_hidden_layers * (window - 1),
        "num_hidden_layers": config.num_hidden_layers,
        "lowrank_dim": getattr(config, "lowrank_dim", None),
        "lowrank_method": _LOWRANK_METHODS[causal].format(feature_map=_FEATURE_MAPS.get(
            getattr(config, "lowrank_feature_map", "softmax"), "")),
        "rope_theta": getattr(config, "rope_theta", None),
        "scaling": f", {scaling['type']} scaling x{scaling['factor']}"
        if scaling
        else "",
        "max_position_embeddings": config.max_position_embeddings,
    }
    if pipeline_tag == "text-classification":
        labels = getattr(config, "id2label", None) or {}
        names = ", ".join(f"`{labels[i]}`" for i in sorted(labels, key=int))
        head = f"a linear classification head over {len(labels)} labels ({names}), read at the last non-padding token"
        task = "sequence classifier"
    elif pipeline_tag == "text-generation":
        head = "a language-modelling head" + (" tied to the input embedding" if config.tie_word_embeddings else "")
        task = "causal language model" if causal else "language model"
    else:
        head, task = "no task head (hidden states out)", "encoder body"
    norm_name = {"rmsnorm": "RMSNorm", "layernorm": "LayerNorm"}[getattr(config, "norm_type", "rmsnorm")]
    if getattr(config, "mlp_type", "gated") == "plain":
        mlp_name = f"MLP[{config.hidden_act}]"
    else:
        mlp_name = "SwiGLU" if config.hidden_act == "silu" else f"GatedMLP[{config.hidden_act}]"
    architecture = {
        "hidden_size": config.hidden_size,
        "num_hidden_layers": config.num_hidden_layers,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_key_value_heads,
        f"intermediate_size ({mlp_name})": config.intermediate_size,
        "vocab_size": config.vocab_size,
        "max_position_embeddings": config.max_position_embeddings,
        "position_embedding_type": config.position_embedding_type,
        "attention": ("causal" if causal else "bidirectional") + f", `{mode}`",
    }
    default_use = (
        "Experiments with attention variants, teaching, and as a small starting point to fine-tune with "
        "`transformers.Trainer` on Python-code tasks like the one it was trained on."
    )
    datasets = data.get("datasets") or []
    default_data = (
        "Trained on: " + ", ".join(f"`{d}`" for d in datasets) + "."
        if datasets
        else "The training data of this checkpoint was not recorded."
    )
    return {
        "model_name": model_name,
        "task_summary": task,
        "attention_mode": mode,
        "norm_name": norm_name,
        "mlp_name": mlp_name,
        "load_example": _load_example(data.get("repo_id") or model_name, pipeline_tag),
        "head_summary": head,
        "architecture_rows": _table(architecture),
        "mode_summary": _MODE_SUMMARIES[mode].format(**fmt) if mode in _MODE_SUMMARIES else f"`{mode}`.",
        "mode_parameters": "| setting | value |\n|---|---|\n" + _table(attention_parameters(config)),
        "intended_use": data.get("intended_use") or default_use,
        "mode_limitation": _MODE_LIMITATIONS.get(mode, "").format(**fmt),
        "training_data": data.get("training_data") or default_data,
        "evaluation": _evaluation_section(
            data.get("eval_results") or {},
            data.get("eval_dataset_name") or data.get("eval_dataset") or (datasets[0] if datasets else "unspecified"),
            data.get("eval_split") or "test",
        ),
        "transformers_version": getattr(config, "transformers_version", None) or _transformers_version(),
    }


def _transformers_version() -> str:
    import transformers  # local import: only needed when the config does not record it

    return transformers.__version__


def model_card_metadata(config: Any, model_card_data: Mapping[str, Any] | None = None, *, model_name: str) -> ModelCardData:
    """Hub metadata (the card's YAML front matter) for a checkpoint with this ``config``.

    Raises:
        ValueError: on unknown ``model_card_data`` keys or non-numeric eval results.
    """
    data = _check_model_card_data(model_card_data)
    pipeline_tag = pipeline_tag_for(config)
    mode = config.attention_mode
    tags = ["hf_attn", f"{mode}-attention", "custom_code", *(data.get("tags") or [])]
    datasets = data.get("datasets") or None
    results = data.get("eval_results") or {}
    eval_dataset = data.get("eval_dataset") or (datasets[0] if datasets else "unspecified")
    eval_results = [
        EvalResult(
            task_type=pipeline_tag,
            dataset_type=eval_dataset,
            dataset_name=data.get("eval_dataset_name") or eval_dataset,
            dataset_split=data.get("eval_split") or "test",
            metric_type=name,
            metric_name=name,
            metric_value=float(value),
        )
        for name, value in results.items()
    ]
    return ModelCardData(
        library_name="transformers",
        pipeline_tag=pipeline_tag,
        license=data.get("license") or "apache-2.0",
        language=data.get("language"),
        tags=tags,
        datasets=datasets,
        base_model=data.get("base_model"),
        model_name=model_name,
        eval_results=eval_results or None,
        # hf_attn-specific block so tools can filter checkpoints by attention mode without the config
        hf_attn=attention_parameters(config),
    )


def folder_model_name(save_directory: str | Path) -> str:
    """The name a checkpoint saved in ``save_directory`` is published under: the folder's name, without
    the ``.tmp-`` prefix of an atomic save's temporary folder (``.tmp-final`` -> ``final``)."""
    name = Path(save_directory).resolve().name
    return name.removeprefix(TEMPORARY_FOLDER_PREFIX) or name


def write_model_card(
    save_directory: str | Path,
    config: Any,
    model_card_data: Mapping[str, Any] | None = None,
) -> Path | None:
    """Render the model card into ``<save_directory>/README.md``.

    The model is named ``model_card_data["model_name"]``, else by :func:`folder_model_name`; local
    filesystem paths in ``model_card_data`` are removed (:func:`strip_local_paths`).

    Args:
        save_directory: The checkpoint folder (already written by ``save_pretrained``).
        config: The checkpoint's ``HfAttnConfig`` (any object with its attributes works).
        model_card_data: Optional extra facts, keys from ``MODEL_CARD_DATA_KEYS`` (datasets,
            eval_results, base_model, ...).

    Returns:
        The path of the written card, or ``None`` when the template is not available (this file
        running as copied remote code without the hf_attn package); a save never fails for that.

    Raises:
        ValueError: on unknown ``model_card_data`` keys or non-numeric eval results.
    """
    if not TEMPLATE_PATH.is_file():
        return None
    data = _check_model_card_data(model_card_data)
    save_directory = Path(save_directory)
    model_name = data.get("model_name") or folder_model_name(save_directory)
    metadata = model_card_metadata(config, data, model_name=model_name)
    template = _TEMPLATE_COMMENT.sub("", TEMPLATE_PATH.read_text(encoding="utf-8"), count=1)
    body = render_template(template, _template_values(config, data, model_name, metadata.pipeline_tag))
    # ModelCard parses the front matter back, so a card the Hub would reject fails here, not on upload.
    card = ModelCard(f"---\n{metadata.to_yaml()}\n---\n\n{body}")
    path = save_directory / "README.md"
    card.save(path)
    return path


__all__ = [
    "MODEL_CARD_DATA_KEYS",
    "TEMPLATE_PATH",
    "TEMPORARY_FOLDER_PREFIX",
    "attention_parameters",
    "folder_model_name",
    "model_card_metadata",
    "pipeline_tag_for",
    "render_template",
    "strip_local_paths",
    "write_model_card",
]
