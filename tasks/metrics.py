"""Evaluation metrics, pure Python and numpy, each returning a plain float.

``metrics_for(kind)`` gives the metrics of a task kind by name, and
``HIGHER_IS_BETTER`` says which way each improves (for best-checkpoint choice
and for reports).
"""

from typing import Callable, Sequence

import numpy as np
import sacrebleu


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


def chrf(preds: Sequence[str], refs: Sequence[str]) -> float:
    """Returns corpus chrF (sacrebleu, default settings) on a 0-1 scale."""
    _check_pair(preds, refs)
    return float(sacrebleu.corpus_chrf(list(preds), [list(refs)]).score) / 100.0


def mse(preds: Sequence[float], refs: Sequence[float]) -> float:
    """Returns the mean squared error."""
    _check_pair(preds, refs)
    if len(refs) == 0:
        return 0.0
    return float(np.mean(np.square(np.asarray(preds, np.float64) - np.asarray(refs, np.float64))))


def pearson(preds: Sequence[float], refs: Sequence[float]) -> float:
    """Returns Pearson's r; 0.0 where either side is constant (r is undefined there)."""
    _check_pair(preds, refs)
    x, y = np.asarray(preds, np.float64), np.asarray(refs, np.float64)
    if len(x) < 2 or x.std() == 0 or y.std() == 0:
        return 0.0
    return float(np.corrcoef(x, y)[0, 1])


def _ranks(x: np.ndarray) -> np.ndarray:
    """Ranks from 1, ties given their mean rank."""
    ranks = np.empty(len(x), np.float64)
    ranks[np.argsort(x, kind="stable")] = np.arange(1, len(x) + 1)
    _, group = np.unique(x, return_inverse=True)
    return (np.bincount(group, ranks) / np.bincount(group))[group]


def spearman(preds: Sequence[float], refs: Sequence[float]) -> float:
    """Returns Spearman's rho: Pearson's r of the ranks (ties at their mean rank)."""
    _check_pair(preds, refs)
    return pearson(_ranks(np.asarray(preds, np.float64)), _ranks(np.asarray(refs, np.float64)))


def _flat(rows: Sequence[Sequence[int]]) -> list[int]:
    return [t for row in rows for t in row]


def tag_accuracy(pred_rows: Sequence[Sequence[int]], gold_rows: Sequence[Sequence[int]]) -> float:
    """Returns token-level accuracy over all words of all examples."""
    _check_pair(pred_rows, gold_rows)
    return accuracy(_flat(pred_rows), _flat(gold_rows))


def tag_f1(pred_rows: Sequence[Sequence[int]], gold_rows: Sequence[Sequence[int]]) -> float:
    """Returns token-level macro-F1 over the tags."""
    _check_pair(pred_rows, gold_rows)
    return macro_f1(_flat(pred_rows), _flat(gold_rows))


_BY_KIND: dict[str, dict[str, Callable[..., float]]] = {
    # generate metrics take (predicted texts, reference texts).
    "generate": {
        "exact_match": exact_match,
        "token_error_rate": token_error_rate,
        "char_error_rate": char_error_rate,
        "chrf": chrf,
    },
    # classify metrics take (predicted class ids, label ids).
    "classify": {"accuracy": accuracy, "macro_f1": macro_f1},
    # regress metrics take (predicted values, target values).
    "regress": {"mse": mse, "pearson": pearson, "spearman": spearman},
    # tag metrics take (predicted tag ids a row, gold tag ids a row).
    "tag": {"tag_accuracy": tag_accuracy, "tag_f1": tag_f1},
}

# Each kind's headline metric: the one "mean" best-checkpoint selection averages.
MAIN = {"generate": "exact_match", "classify": "accuracy", "regress": "pearson", "tag": "tag_f1"}

HIGHER_IS_BETTER = {
    "exact_match": True,
    "token_error_rate": False,
    "char_error_rate": False,
    "chrf": True,
    "accuracy": True,
    "macro_f1": True,
    "mse": False,
    "pearson": True,
    "spearman": True,
    "tag_accuracy": True,
    "tag_f1": True,
}


def metrics_for(kind: str) -> dict[str, Callable[..., float]]:
    """Returns the metrics of a task kind, by name.

    generate: ``exact_match``, ``token_error_rate``, ``char_error_rate``,
    ``chrf``, each ``f(predicted_texts, reference_texts)``. classify:
    ``accuracy``, ``macro_f1``, each ``f(predicted_ids, label_ids)``.
    regress: ``mse``, ``pearson``, ``spearman``, each ``f(predicted, target)``.
    tag: ``tag_accuracy``, ``tag_f1``, each ``f(predicted_rows, gold_rows)``.

    Raises:
      ValueError: a kind with no metrics yet.
    """
    if kind not in _BY_KIND:
        raise ValueError(f"Task kind {kind!r} has no metrics yet; accepted kinds are {', '.join(_BY_KIND)}.")
    return dict(_BY_KIND[kind])
