"""Evaluation metrics, pure Python and numpy, each returning a plain float.

``metrics_for(kind)`` gives the metrics of a task kind by name, and
``HIGHER_IS_BETTER`` says which way each improves (for best-checkpoint choice
and for reports).
"""

from typing import Callable, Sequence

import numpy as np


def edit_distance(a: Sequence, b: Sequence) -> int:
    """Returns the Levenshtein distance between two sequences (unit costs)."""
    if len(a) < len(b):
        a, b = b, a  # keep the row, over the shorter one, short
    previous = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        current = [i]
        for j, y in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (x != y)))
        previous = current
    return previous[-1]


def _check_pair(preds: Sequence, refs: Sequence) -> None:
    if len(preds) != len(refs):
        raise ValueError(f"Got {len(preds)} predictions for {len(refs)} references; they must match.")


def exact_match(preds: Sequence[str], refs: Sequence[str]) -> float:
    """Returns the fraction of predictions equal to their reference.

    Whitespace is collapsed first, so ``"HH  AH0 "`` matches ``"HH AH0"``;
    nothing else is forgiven. An empty list scores 0.0.
    """
    _check_pair(preds, refs)
    if not refs:
        return 0.0
    return float(np.mean([p.split() == r.split() for p, r in zip(preds, refs)]))


def _error_rate(pred_units: list[Sequence], ref_units: list[Sequence]) -> float:
    errors = sum(edit_distance(p, r) for p, r in zip(pred_units, ref_units))
    total = sum(len(r) for r in ref_units)
    return float(errors / max(total, 1))


def token_error_rate(preds: Sequence[str], refs: Sequence[str]) -> float:
    """Returns edit distance over whitespace tokens, summed, over reference tokens.

    For g2p this is the phoneme error rate. It can exceed 1 when predictions
    are longer than the references.
    """
    _check_pair(preds, refs)
    return _error_rate([p.split() for p in preds], [r.split() for r in refs])


def char_error_rate(preds: Sequence[str], refs: Sequence[str]) -> float:
    """Returns edit distance over characters, summed, over reference characters."""
    _check_pair(preds, refs)
    return _error_rate(list(preds), list(refs))


def accuracy(pred_ids: Sequence[int], label_ids: Sequence[int]) -> float:
    """Returns the fraction of predicted class ids equal to the label ids."""
    _check_pair(pred_ids, label_ids)
    if len(label_ids) == 0:
        return 0.0
    return float(np.mean(np.asarray(pred_ids) == np.asarray(label_ids)))


def macro_f1(pred_ids: Sequence[int], label_ids: Sequence[int]) -> float:
    """Returns the unweighted mean F1 over classes seen in labels or predictions.

    A rare class counts as much as a common one, so a model that ignores it
    is penalised where accuracy would hardly move.
    """
    _check_pair(pred_ids, label_ids)
    pred, gold = np.asarray(pred_ids), np.asarray(label_ids)
    classes = np.union1d(pred, gold)
    if len(classes) == 0:
        return 0.0
    scores = []
    for c in classes:
        tp = np.sum((pred == c) & (gold == c))
        fp = np.sum((pred == c) & (gold != c))
        fn = np.sum((pred != c) & (gold == c))
        scores.append(2 * tp / (2 * tp + fp + fn))  # > 0 denominator: c occurs somewhere
    return float(np.mean(scores))


_BY_KIND: dict[str, dict[str, Callable[..., float]]] = {
    # generate metrics take (predicted texts, reference texts).
    "generate": {
        "exact_match": exact_match,
        "token_error_rate": token_error_rate,
        "char_error_rate": char_error_rate,
    },
    # classify metrics take (predicted class ids, label ids).
    "classify": {"accuracy": accuracy, "macro_f1": macro_f1},
}

HIGHER_IS_BETTER = {
    "exact_match": True,
    "token_error_rate": False,
    "char_error_rate": False,
    "accuracy": True,
    "macro_f1": True,
}


def metrics_for(kind: str) -> dict[str, Callable[..., float]]:
    """Returns the metrics of a task kind, by name.

    generate: ``exact_match``, ``token_error_rate``, ``char_error_rate``, each
    ``f(predicted_texts, reference_texts)``. classify: ``accuracy``,
    ``macro_f1``, each ``f(predicted_ids, label_ids)``.

    Raises:
      ValueError: a kind with no metrics yet.
    """
    if kind not in _BY_KIND:
        raise ValueError(f"Task kind {kind!r} has no metrics yet; accepted kinds are {', '.join(_BY_KIND)}.")
    return dict(_BY_KIND[kind])
