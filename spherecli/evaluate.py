"""Stage 5: LFW verification, exactly as the original evaluation.m computes it.

Per fold k of the pair list: subtract the mean feature of the other folds'
pairs, L2-normalise, score each pair by cosine similarity, choose the
threshold on the other folds over the grid -1:1e-4:1 (the mean of tied
best thresholds) and report fold k's accuracy at it. Then the numbers
later papers add: ROC AUC, EER, TAR at fixed FAR, best single threshold.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from spherecli import UserError
from spherecli.features import unit
from spherecli.registry import LFW_PATTERN

THRESHOLDS = np.arange(-10000, 10001) / 10000.0  # Matlab's (-thrNum:thrNum) / thrNum


@dataclass
class Pairs:
    folds: int
    per_fold: int           # pairs of each kind per fold (300 in LFW)
    left: list[str]         # image paths, relative to the data folder
    right: list[str]
    same: np.ndarray        # bool per pair


def read_pairs(path: str | Path, pattern: str = LFW_PATTERN) -> Pairs:
    """The standard LFW pairs file: a 'folds<TAB>n' header, then 2 n lines per fold."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise UserError(f"cannot read pairs {path}: {e.strerror or e}") from None
    head = lines[0].split() if lines else []
    if len(head) != 2 or not all(v.isdigit() for v in head):
        raise UserError(f"{path}:1: expected a header '<folds> <pairs per fold and kind>', "
                        f"got {lines[0][:60] if lines else 'an empty file'!r}")
    folds, per_fold = int(head[0]), int(head[1])
    left, right, same = [], [], []
    for lineno, line in enumerate(lines[1:], 2):
        f = line.split()
        if not f:
            continue
        try:
            if len(f) == 3:
                a, b, s = (f[0], int(f[1])), (f[0], int(f[2])), True
            elif len(f) == 4:
                a, b, s = (f[0], int(f[1])), (f[2], int(f[3])), False
            else:
                raise ValueError
        except ValueError:
            raise UserError(f"{path}:{lineno}: expected 'name i j' or 'name1 i name2 j', "
                            f"got {line.strip()[:80]!r}") from None
        left.append(pattern.format(name=a[0], num=a[1]))
        right.append(pattern.format(name=b[0], num=b[1]))
        same.append(s)
    if len(same) != 2 * folds * per_fold:
        raise UserError(f"{path}: the header promises {folds} folds x {2 * per_fold} pairs = "
                        f"{2 * folds * per_fold}, the file has {len(same)}")
    return Pairs(folds, per_fold, left, right, np.array(same))


# --------------------------------------------------------------------------- the protocol

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


def evaluate_features(features: np.ndarray, index: dict[str, int], pairs: Pairs,
                      mean_subtract: bool = True) -> dict:
    """Run the protocol given one feature row per image and the pair list."""
    left = features[[index[p] for p in pairs.left]]
    right = features[[index[p] for p in pairs.right]]
    result = verification(left, right, pairs.same, pairs.folds, mean_subtract)
    result.update(roc(result["scores"], pairs.same))
    result["calibration"] = calibrate(left, right, pairs.same, mean_subtract)
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


def distinct_images(pairs: Pairs) -> list[str]:
    return sorted(set(pairs.left) | set(pairs.right))


def _missing(missing: list[str], where: str) -> UserError:
    shown = "\n  ".join(missing[:10]) + ("\n  ..." if len(missing) > 10 else "")
    return UserError(f"{len(missing)} pair images are missing from {where}:\n  {shown}\n"
                     "(--skip-missing scores their pairs as failures)")


def evaluate(pairs_path: str | Path, *, model: str | Path | None = None, data: str | Path | None = None,
             features: str | Path | None = None, save_features: str | Path | None = None,
             pattern: str = LFW_PATTERN, flip: str = "concat", mean_subtract: bool = True,
             skip_missing: bool = False, arch: str | None = None, input_spec: str | None = None,
             batch_size: int = 128, workers: int = 2, device: str = "cpu", amp: str = "none",
             progress: bool = True) -> dict:
    """Features (from a model and aligned images, or from a file), then the protocol."""
    pairs = read_pairs(pairs_path, pattern)
    names = distinct_images(pairs)
    if features is not None:
        with np.load(features) as f:
            index = {str(n): i for i, n in enumerate(f["names"])}
            stored = f["features"].astype(np.float64)
            # How the features were made, not how this call would make them.
            flip = str(f["flip"]) if "flip" in f else flip
            amp = str(f["amp"]) if "amp" in f else amp
        missing = [n for n in names if n not in index]
        where = str(features)
    else:
        if model is None or data is None:
            raise UserError("give --model and --data (aligned images), or --features")
        from spherecli.features import extract, load_network

        net = load_network(model, device=device, amp=amp, arch=arch, input_spec=input_spec)
        data = Path(data)
        missing = [n for n in names if not (data / n).is_file()]
        where = str(data)
    if missing and not skip_missing:
        raise _missing(missing, where)
    absent = set(missing)
    present = [n for n in names if n not in absent]
    if features is None:
        stored = extract(net, [str(data / n) for n in present], flip=flip, batch_size=batch_size,
                         workers=workers, progress=progress)
        index = {n: i for i, n in enumerate(present)}
    row = {n: i for i, n in enumerate(names)}
    table = np.full((len(names), stored.shape[1]), np.nan)  # a missing image scores NaN: a failure
    for n in present:
        table[row[n]] = stored[index[n]]
    if save_features is not None:
        np.savez(save_features, names=np.array(present), flip=flip, amp=amp,
                 features=table[[row[n] for n in present]].astype(np.float32))
    result = evaluate_features(table, row, pairs, mean_subtract)
    result["calibration"]["flip"] = flip
    result.update(pairs_file=str(pairs_path), model=None if model is None else str(model),
                  data=None if data is None else str(data), features_file=None if features is None
                  else str(features), images=len(names), missing=len(missing),
                  settings={"flip": flip, "mean_subtract": mean_subtract, "pattern": pattern, "amp": amp,
                            "protocol": "evaluation.m: mean of other folds subtracted, cosine, "
                                        "threshold grid -1:1e-4:1 chosen on the other folds"})
    return result


def fold_table(result: dict) -> list[tuple[str, str]]:
    """The original's per-fold print-out: fold 1..10, ACC, then AVE."""
    rows = [(str(r["fold"]), f"{100 * r['accuracy']:.2f}") for r in result["folds"]]
    return rows + [("AVE", f"{100 * result['mean']:.2f}")]


def std_text(result: dict) -> str:
    return f"{100 * result['mean']:.2f}% +- {100 * result['std']:.2f}"


def json_ready(result: dict) -> dict:
    return {k: v for k, v in result.items() if k not in ("scores", "roc")}
