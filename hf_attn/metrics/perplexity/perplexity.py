"""Perplexity as a local `evaluate` metric module, computed from the model's own outputs.

Unlike the Hub's ``perplexity`` metric (which downloads a model and runs it), this module only
aggregates what the evaluation loop already computed, so it works offline and for any model:

    perplexity = exp( sum_t nll_t / N ),   nll_t = -log p(y_t | y_<t),

the exponential of the mean negative log-likelihood (natural log) over all N scored tokens of the
corpus (token-weighted, not a mean of per-example perplexities).

Two input formats, chosen by the config name given to ``load_metric`` / ``evaluate.load``:
- ``"default"`` (alias ``"losses"``): ``losses``, per example the per-token NLLs, shape (T_i,)
  (cheap; what the training loop sends);
- ``"logits"``: ``logits`` + ``labels``, per example logits (T, V) and labels (T,), with ``-100``
  marking tokens that are not scored. By default labels are the input ids and are shifted inside, as the
  Hugging Face causal-LM heads do (``logits[t]`` predicts ``labels[t + 1]``); pass
  ``shift_labels=False`` to ``compute`` when the labels are already aligned with the logits.
"""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """
Corpus perplexity exp(mean token NLL), from per-token losses or from logits and labels.
"""

_KWARGS_DESCRIPTION = """
Args:
    losses (`list` of `list` of `float`): per example, the per-token negative log-likelihoods (nats).
    logits (`list` of `list` of `list` of `float`): per example, logits of shape (T, V).
    labels (`list` of `list` of `int`): per example, token ids of shape (T,); -100 is ignored.
    shift_labels (`bool`, default True): with logits/labels, score logits[t] against labels[t + 1].
Returns:
    perplexity (`float`): exp(mean_loss).
    mean_loss (`float`): mean per-token negative log-likelihood in nats.
    num_tokens (`int`): number of scored tokens N.
Raises:
    ValueError: if no token is scored, a loss is not finite or negative, or a label is out of range.
Examples:
    >>> metric = hf_attn.metrics.load_metric("perplexity")
    >>> metric.compute(losses=[[0.0, 2.0], [1.0]])["perplexity"]  # exp(1.0)
    2.718281828459045
    >>> metric = hf_attn.metrics.load_metric("perplexity", config_name="logits")
    >>> metric.compute(logits=[[[0.0, 0.0], [0.0, 0.0]]], labels=[[0, 1]])["perplexity"]  # uniform over 2
    2.0
"""

_CITATION = """
@article{jelinek1977perplexity,
  title={Perplexity---a measure of the difficulty of speech recognition tasks},
  author={Jelinek, Fred and Mercer, Robert L and Bahl, Lalit R and Baker, James K},
  journal={The Journal of the Acoustical Society of America}, volume={62}, number={S1}, year={1977}
}
"""

_IGNORE_INDEX = -100

_FEATURES = {
    "losses": datasets.Features({"losses": datasets.List(datasets.Value("float64"))}),
    "logits": datasets.Features(
        {
            "logits": datasets.List(datasets.List(datasets.Value("float32"))),
            "labels": datasets.List(datasets.Value("int64")),
        }
    ),
}


def _nll_from_logits(logits: np.ndarray, labels: np.ndarray, shift_labels: bool) -> np.ndarray:
    """Per-token NLLs of the scored positions of one example; logits (T, V), labels (T,)."""
    if shift_labels:
        logits, labels = logits[:-1], labels[1:]
    keep = labels != _IGNORE_INDEX
    logits, labels = logits[keep].astype(np.float64), labels[keep]
    if labels.size and (labels.min() < 0 or labels.max() >= logits.shape[-1]):
        raise ValueError(
            f"labels: expected ids in [0, {logits.shape[-1]}) or {_IGNORE_INDEX}, got {labels.min()}..{labels.max()}"
        )
    # log-softmax with the max subtracted, so large logits do not overflow exp.
    shifted = logits - logits.max(axis=-1, keepdims=True)
    log_norm = np.log(np.exp(shifted).sum(axis=-1))
    return log_norm - shifted[np.arange(labels.size), labels]


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Perplexity(evaluate.Metric):
    """Token-weighted corpus perplexity from per-token losses or from logits and labels."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=_FEATURES[self._input_format()],
        )

    def _input_format(self) -> str:
        # evaluate only accepts alternative feature sets that share their names, so the two input
        # formats are two configs of the module instead.
        name = "losses" if self.config_name == "default" else self.config_name
        if name not in _FEATURES:
            raise ValueError(
                f"perplexity config_name={self.config_name!r} is invalid: allowed values are 'default', "
                f"{sorted(_FEATURES)}"
            )
        return name

    def _compute(self, losses=None, logits=None, labels=None, shift_labels: bool = True) -> dict:
        if losses is not None:
            nll = np.concatenate([np.asarray(x, dtype=np.float64) for x in losses]) if losses else np.zeros(0)
        else:
            nll_parts = [
                _nll_from_logits(
                    np.asarray(lg, dtype=np.float32), np.asarray(lb, dtype=np.int64), shift_labels
                )
                for lg, lb in zip(logits, labels, strict=True)
            ]
            nll = np.concatenate(nll_parts) if nll_parts else np.zeros(0)
        if nll.size == 0:
            raise ValueError("losses/labels: no token is scored, perplexity is undefined")
        if not np.isfinite(nll).all() or (nll < -1e-6).any():
            raise ValueError(
                "losses: expected finite non-negative per-token negative log-likelihoods, "
                f"got values in [{nll.min()}, {nll.max()}]"
            )
        mean_loss = float(nll.mean())
        return {"perplexity": float(np.exp(mean_loss)), "mean_loss": mean_loss, "num_tokens": int(nll.size)}
