"""Accuracy as a local `evaluate` metric module (loaded by path, so no Hub access is needed).

Accuracy = (1 / N) * sum_i w_i * [prediction_i == reference_i], with optional per-example weights
w_i (normalised by sum_i w_i). Inputs are integer class ids of shape (N,).
"""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """
Accuracy is the fraction of predictions equal to their reference label:
(TP + TN) / (TP + TN + FP + FN) in the binary case, sum_i [pred_i == ref_i] / N in general.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `int`): predicted class ids, shape (N,).
    references (`list` of `int`): true class ids, shape (N,).
    normalize (`bool`, default True): return the fraction correct; False returns the (weighted) count.
    sample_weight (`list` of `float`, optional): per-example weights, shape (N,), all >= 0.
Returns:
    accuracy (`float`): in [0, 1] when normalize is True.
Raises:
    ValueError: if the inputs are empty, sample_weight has the wrong length or a negative weight.
Examples:
    >>> metric = evaluate.load("hf_attn/metrics/accuracy")
    >>> metric.compute(predictions=[0, 1, 1, 2], references=[0, 1, 2, 2])
    {'accuracy': 0.75}
"""

_CITATION = """
@article{scikit-learn,
  title={Scikit-learn: Machine Learning in {P}ython},
  author={Pedregosa, F. and others},
  journal={Journal of Machine Learning Research},
  volume={12}, pages={2825--2830}, year={2011}
}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Accuracy(evaluate.Metric):
    """Fraction (or weighted count) of predictions that equal their reference."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}
            ),
        )

    def _compute(self, predictions, references, normalize: bool = True, sample_weight=None) -> dict:
        preds = np.asarray(predictions, dtype=np.int64)
        refs = np.asarray(references, dtype=np.int64)
        if preds.size == 0:
            raise ValueError("predictions: expected at least one example, got an empty list")
        weights = np.ones(preds.shape[0], dtype=np.float64)
        if sample_weight is not None:
            weights = np.asarray(sample_weight, dtype=np.float64)
            if weights.shape != preds.shape:
                raise ValueError(
                    f"sample_weight: expected {preds.shape[0]} weights (one per prediction), got {weights.shape}"
                )
            if (weights < 0).any():
                raise ValueError("sample_weight: weights must be >= 0")
        correct = float(np.sum(weights * (preds == refs)))
        if normalize:
            total = float(weights.sum())
            if total == 0:
                raise ValueError("sample_weight: the weights sum to 0, accuracy is undefined")
            return {"accuracy": correct / total}
        return {"accuracy": correct}
