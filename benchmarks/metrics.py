"""Metrics of predicted class probabilities: accuracy, negative log-likelihood, calibration.

Used by the accuracy benchmark to compare SGD, SWA, SWAG and FGE (Maddox et al., 2019, report
NLL and expected calibration error beside accuracy).
"""

import numpy as np

__all__ = ["probability_metrics", "softmax"]


def probability_metrics(probabilities, labels, bins=15):
    """Accuracy, negative log-likelihood and expected calibration error of predicted probabilities.

    ECE (Guo et al., 2017): the predictions are put in `bins` equal-width bins of their
    confidence (the top probability); ECE is the sum over bins of
    `(bin size / n) * |accuracy in the bin - mean confidence in the bin|`.

    Args:
        probabilities: float array `(n, classes)`, rows summing to 1.
        labels: int array `(n,)`.
        bins: number of confidence bins. Defaults to 15.

    Returns:
        A dict with `accuracy`, `nll` (mean of `-log p[label]`, nats) and `ece` (a fraction).
    """
    probabilities = np.asarray(probabilities, np.float64)
    labels = np.asarray(labels).astype(np.int64).reshape(-1)
    n = len(labels)
    confidence = probabilities.max(axis=1)
    correct = (probabilities.argmax(axis=1) == labels).astype(np.float64)
    picked = probabilities[np.arange(n), labels]
    nll = float(-np.mean(np.log(np.maximum(picked, np.finfo(np.float64).tiny))))
    # Bin j holds confidences in (j / bins, (j + 1) / bins]; confidence 0 goes to bin 0.
    index = np.clip(np.ceil(confidence * bins).astype(np.int64) - 1, 0, bins - 1)
    ece = 0.0
    for j in range(bins):
        members = index == j
        if members.any():
            ece += members.sum() / n * abs(correct[members].mean() - confidence[members].mean())
    return {"accuracy": float(correct.mean()), "nll": nll, "ece": float(ece)}


def softmax(logits):
    """Row-wise softmax of a `(n, classes)` array of logits, in float64."""
    logits = np.asarray(logits, np.float64)
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)
