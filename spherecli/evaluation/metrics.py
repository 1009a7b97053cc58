"""Verification and discriminativeness measures on features and scores; numpy only.

The LFW protocol exactly as the original evaluation.m computes it: per fold k,
subtract the mean feature of the other folds' pairs, L2-normalise, score each
pair by cosine similarity, choose the threshold on the other folds over the
grid -1:1e-4:1 (the mean of tied best thresholds) and report fold k's
accuracy at it. Then what later papers add (ROC AUC, EER, TAR at fixed FAR,
best single threshold), the calibration that `verify` and `identify` score
with, and the SphereFace appendix's angular Fisher score.
"""

from __future__ import annotations

import numpy as np

from spherecli.core.errors import UserError
from spherecli.models.features import unit

THRESHOLDS = np.arange(-10000, 10001) / 10000.0  # Matlab's (-thrNum:thrNum) / thrNum


def _counts(scores: np.ndarray, same: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """Correct decisions at each threshold: same pairs scoring above it, different
    pairs below it (a score equal to the threshold is wrong either way, as in
    getAccuracy; NaN scores are always wrong)."""
    pos, neg = np.sort(scores[same]), np.sort(scores[~same])
    pos, neg = pos[~np.isnan(pos)], neg[~np.isnan(neg)]
    return (len(pos) - np.searchsorted(pos, thresholds, side="right")
            + np.searchsorted(neg, thresholds, side="left"))


def best_threshold(scores: np.ndarray, same: np.ndarray) -> float:
    counts = _counts(scores, same, THRESHOLDS)
    return float(np.mean(THRESHOLDS[counts == counts.max()]))


def accuracy(scores: np.ndarray, same: np.ndarray, threshold: float) -> float:
    return float(_counts(scores, same, np.array([threshold]))[0] / len(scores))


def verification(left: np.ndarray, right: np.ndarray, same: np.ndarray, folds: int,
                 mean_subtract: bool = True) -> dict:
    """The 10-fold protocol on pair features (one row per pair side)."""
    n = len(same)
    fold_of = np.arange(n) * folds // n
    rows, test_scores = [], np.empty(n)
    for k in range(folds):
        test, val = fold_of == k, fold_of != k
        mu = np.nanmean(np.concatenate([left[val], right[val]]), axis=0) if mean_subtract else None
        scores = np.sum(unit(left, mu) * unit(right, mu), axis=1)
        threshold = best_threshold(scores[val], same[val])
        rows.append({"fold": k + 1, "accuracy": accuracy(scores[test], same[test], threshold),
                     "threshold": threshold})
        test_scores[test] = scores[test]
    accs = np.array([r["accuracy"] for r in rows])
    return {"folds": rows, "mean": float(accs.mean()), "std": float(accs.std()),
            "scores": test_scores}


def roc(scores: np.ndarray, same: np.ndarray) -> dict:
    """ROC AUC, EER, TAR at FAR 1e-3 and 1e-2, best single-threshold accuracy.

    A missing (NaN) score counts as the lowest possible: a rejection.
    """
    s = np.where(np.isnan(scores), -np.inf, scores)
    pos, neg = np.sort(s[same]), np.sort(s[~same])
    # AUC = P(pos > neg) + P(pos == neg) / 2, from ranks.
    below = np.searchsorted(neg, pos, side="left")
    equal = np.searchsorted(neg, pos, side="right") - below
    auc = float((below + equal / 2).sum() / (len(pos) * len(neg)))
    thresholds = np.unique(np.concatenate([pos, neg, [np.inf]]))
    far = len(neg) - np.searchsorted(neg, thresholds, side="left")   # neg >= t accepted
    tar = len(pos) - np.searchsorted(pos, thresholds, side="left")
    far, tar = far / len(neg), tar / len(pos)
    frr = 1 - tar
    i = np.argmin(np.abs(far - frr))
    result = {"roc_auc": auc, "eer": float((far[i] + frr[i]) / 2)}
    for target in (1e-3, 1e-2):
        ok = far <= target
        result[f"tar_at_far_{target:g}"] = float(tar[ok].max()) if ok.any() else 0.0
    correct = tar * len(pos) + (1 - far) * len(neg)
    best = int(np.argmax(correct))
    result["best_accuracy"] = float(correct[best] / len(s))
    result["best_threshold"] = float(thresholds[best])
    result["roc"] = {"far": far, "tar": tar}
    return result


def calibrate(left: np.ndarray, right: np.ndarray, same: np.ndarray, mean_subtract: bool) -> dict:
    """What `verify` and `identify` need to score new faces like this protocol does:
    the mean feature over all pairs, the best threshold on all pairs scored with it, and
    the different-person scores, from which a threshold's false-accept rate follows."""
    mu = np.nanmean(np.concatenate([left, right]), axis=0) if mean_subtract else None
    scores = np.sum(unit(left, mu) * unit(right, mu), axis=1)
    impostors = np.sort(scores[~same & ~np.isnan(scores)])
    return {"mean": None if mu is None else mu.tolist(), "threshold": best_threshold(scores, same),
            "impostors": [round(float(v), 6) for v in impostors]}


def angular_fisher_score(features: np.ndarray, labels) -> float:
    """The paper appendix's AFS = S_w / S_b (lower is more discriminative).

    S_w = sum_i sum_{x in class i} (1 - cos(x, m_i)), S_b = sum_i n_i (1 - cos(m_i, m)),
    m_i the mean feature of class i, m the mean of all features.
    """
    features = np.asarray(features, dtype=np.float64)
    labels = np.asarray(labels)

    def cos(a, b):
        return (a @ b) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b))

    overall = features.mean(axis=0)
    within = between = 0.0
    for c in np.unique(labels):
        x = features[labels == c]
        centre = x.mean(axis=0)
        within += np.sum(1 - cos(x, centre))
        between += len(x) * (1 - cos(centre, overall))
    if between <= 0:
        raise UserError("the angular Fisher score needs at least two classes with different means")
    return float(within / between)
