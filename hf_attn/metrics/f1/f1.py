"""F1 score as a local `evaluate` metric module (loaded by path, so no Hub access is needed).

Per class c: P_c = TP_c / (TP_c + FP_c), R_c = TP_c / (TP_c + FN_c), F1_c = 2 P_c R_c / (P_c + R_c),
with 0 where a denominator is 0 (scikit-learn's zero_division=0). Averages: "binary" (F1 of
pos_label), "macro" (unweighted mean over classes), "micro" (from pooled TP/FP/FN), "weighted"
(mean weighted by each class's support), None (per-class list). Inputs are int class ids, shape (N,).
"""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """
The F1 score is the harmonic mean of precision and recall: F1 = 2 * (precision * recall) / (precision + recall).
For several classes it is averaged over classes ("macro", "weighted") or computed from pooled counts ("micro").
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `int`): predicted class ids, shape (N,).
    references (`list` of `int`): true class ids, shape (N,).
    average (`str` or None, default "binary"): one of "binary", "macro", "micro", "weighted" or None
        (returns one score per class in `labels` order).
    pos_label (`int`, default 1): the positive class when average="binary".
    labels (`list` of `int`, optional): classes to score; default: the sorted union of predictions and
        references. Give it explicitly when a class may be absent from a small evaluation set.
Returns:
    f1 (`float`, or `list` of `float` when average is None): in [0, 1].
Raises:
    ValueError: on an unknown average, an empty input, or average="binary" with more than two classes.
Examples:
    >>> metric = evaluate.load("hf_attn/metrics/f1")
    >>> metric.compute(predictions=[0, 1, 1, 0], references=[0, 1, 0, 0])
    {'f1': 0.6666666666666666}
"""

_CITATION = """
@article{scikit-learn,
  title={Scikit-learn: Machine Learning in {P}ython},
  author={Pedregosa, F. and others},
  journal={Journal of Machine Learning Research},
  volume={12}, pages={2825--2830}, year={2011}
}
"""

_AVERAGES = ("binary", "macro", "micro", "weighted", None)


def _safe_divide(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    # zero_division=0: a class never predicted (or never present) scores 0, as scikit-learn does by default
    out = np.zeros_like(num, dtype=np.float64)
    np.divide(num, den, out=out, where=den != 0)
    return out


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class F1(evaluate.Metric):
    """Binary, macro, micro, weighted or per-class F1 from integer class ids."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}
            ),
        )

    def _compute(self, predictions, references, average="binary", pos_label: int = 1, labels=None) -> dict:
        if average not in _AVERAGES:
            raise ValueError(f"average: got {average!r}, expected one of {list(_AVERAGES)}")
        preds = np.asarray(predictions, dtype=np.int64)
        refs = np.asarray(references, dtype=np.int64)
        if preds.size == 0:
            raise ValueError("predictions: expected at least one example, got an empty list")
        classes = np.unique(np.concatenate([preds, refs])) if labels is None else np.asarray(labels, np.int64)
        if average == "binary":
            if len(np.unique(np.concatenate([preds, refs]))) > 2:
                raise ValueError(
                    "average: 'binary' needs at most two classes; use 'macro', 'micro' or 'weighted'"
                )
            classes = np.asarray([pos_label], dtype=np.int64)
        # (C, N) one-hot comparisons -> per-class counts of shape (C,)
        pred_is = preds[None, :] == classes[:, None]
        ref_is = refs[None, :] == classes[:, None]
        tp = np.sum(pred_is & ref_is, axis=1).astype(np.float64)
        fp = np.sum(pred_is & ~ref_is, axis=1).astype(np.float64)
        fn = np.sum(~pred_is & ref_is, axis=1).astype(np.float64)
        if average == "micro":
            tp, fp, fn = tp.sum(keepdims=True), fp.sum(keepdims=True), fn.sum(keepdims=True)
        # F1 = 2TP / (2TP + FP + FN) equals 2PR / (P + R) and is 0 when the class is absent everywhere
        per_class = _safe_divide(2 * tp, 2 * tp + fp + fn)
        if average is None:
            return {"f1": per_class.tolist()}
        if average == "weighted":
            support = tp + fn
            total = support.sum()
            return {"f1": float(np.sum(per_class * support) / total) if total > 0 else 0.0}
        return {"f1": float(per_class.mean())}
