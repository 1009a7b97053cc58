"""Stage 5: verification on a pair list (LFW view 2), as the original evaluation.m.

Reads the pairs, extracts one feature per distinct image (or reads saved
features), runs the protocol of spherecli.metrics and writes the result
JSON, and on request the ROC picture, the per-pair scores and the features.
Every output is checked for writability before the features are extracted,
so a long run is never lost to a typo in a path.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from spherecli import UserError
from spherecli.formats import load_features, result_path, save_features, writable
from spherecli.metrics import calibrate, roc, verification
from spherecli.registry import LFW_PATTERN

# The official LFW view-2 pairs.txt, lines with their whitespace normalised: only a
# result on exactly these pairs is named MODEL.lfw.json, the calibration of a model.
LFW_PAIRS_SHA1 = "ef3ca5828e409d11fc3b3d01b8b7cbe55eb549a9"


@dataclass
class Pairs:
    folds: int
    per_fold: int           # pairs of each kind per fold (300 in LFW)
    left: list[str]         # image paths, relative to the data folder
    right: list[str]
    same: np.ndarray        # bool per pair
    name: str = "lfw"       # what results on them are called: lfw for the official list


def read_pairs(path: str | Path, pattern: str = LFW_PATTERN) -> Pairs:
    """The standard LFW pairs file: a 'folds<TAB>n' header, then 2 n lines per fold."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read pairs {path}: {getattr(e, 'strerror', None) or e}") from None
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
    digest = hashlib.sha1("\n".join(" ".join(x.split()) for x in lines if x.strip()).encode()).hexdigest()
    return Pairs(folds, per_fold, left, right, np.array(same),
                 "lfw" if digest == LFW_PAIRS_SHA1 else Path(path).stem)


def distinct_images(pairs: Pairs) -> list[str]:
    return sorted(set(pairs.left) | set(pairs.right))


def evaluate_features(features: np.ndarray, index: dict[str, int], pairs: Pairs,
                      mean_subtract: bool = True) -> dict:
    """Run the protocol given one feature row per image and the pair list."""
    left = features[[index[p] for p in pairs.left]]
    right = features[[index[p] for p in pairs.right]]
    result = verification(left, right, pairs.same, pairs.folds, mean_subtract)
    result.update(roc(result["scores"], pairs.same))
    result["calibration"] = calibrate(left, right, pairs.same, mean_subtract)
    return result


def _missing(missing: list[str], where: str) -> UserError:
    shown = "\n  ".join(missing[:10]) + ("\n  ..." if len(missing) > 10 else "")
    return UserError(f"{len(missing)} pair images are missing from {where}:\n  {shown}\n"
                     "(--skip-missing scores their pairs as failures)")


def evaluate(pairs_path: str | Path, *, model: str | Path | None = None, data: str | Path | None = None,
             features: str | Path | None = None, save_features_to: str | Path | None = None,
             output: str | Path | None = None, roc_png: str | Path | None = None,
             scores_csv: str | Path | None = None, pattern: str = LFW_PATTERN, flip: str = "concat",
             mean_subtract: bool = True, skip_missing: bool = False, arch: str | None = None,
             input_spec: str | None = None, batch_size: int = 128, workers: int = 2, device: str = "cpu",
             amp: str = "none", progress: bool = True) -> dict:
    """Features (from a model and aligned images, or from a file), the protocol, and the
    files asked for. The result JSON goes to output, by default next to the model:
    MODEL.lfw.json for the official LFW pairs, MODEL.<pairs file name>.json for others."""
    pairs = read_pairs(pairs_path, pattern)
    if features is None and (model is None or data is None):
        raise UserError("give --model and --data (aligned images), or --features")
    output = writable(output or result_path(model or features, pairs.name))
    for path in (roc_png, scores_csv, save_features_to):
        if path is not None:
            writable(path)
    names = distinct_images(pairs)
    if features is not None:
        stored_names, stored, made = load_features(features)
        index = {n: i for i, n in enumerate(stored_names)}
        # How the features were made, not how this call would make them.
        flip, amp = made.get("flip", flip), made.get("amp", amp)
        missing = [n for n in names if n not in index]
        where = str(features)
    else:
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
    if save_features_to is not None:
        save_features(save_features_to, present, table[[row[n] for n in present]], flip=flip, amp=amp)
    result = evaluate_features(table, row, pairs, mean_subtract)
    result["calibration"]["flip"] = flip
    result.update(benchmark=pairs.name, pairs_file=str(pairs_path),
                  model=None if model is None else str(model), data=None if data is None else str(data),
                  features_file=None if features is None else str(features), images=len(names),
                  missing=len(missing),
                  settings={"flip": flip, "mean_subtract": mean_subtract, "pattern": pattern, "amp": amp,
                            "protocol": "evaluation.m: mean of other folds subtracted, cosine, "
                                        "threshold grid -1:1e-4:1 chosen on the other folds"})
    write_outputs(result, pairs, output, roc_png, scores_csv)
    return result


def write_outputs(result: dict, pairs: Pairs, output: Path, roc_png=None, scores_csv=None) -> None:
    output.write_text(json.dumps(json_ready(result), indent=1) + "\n")
    result["output"] = str(output)
    if roc_png:
        from spherecli.plot import roc_chart

        roc_chart(roc_png, {f"AUC {result['roc_auc']:.4f}": (result["roc"]["far"], result["roc"]["tar"])},
                  title=f"ROC on {pairs.name}")
    if scores_csv:
        with open(scores_csv, "w", encoding="utf-8") as f:
            f.write("left,right,same,score\n")
            for a, b, same, score in zip(pairs.left, pairs.right, pairs.same, result["scores"]):
                f.write(f"{a},{b},{int(same)},{score:.6f}\n")


def fold_table(result: dict) -> list[tuple[str, str]]:
    """The original's per-fold print-out: fold 1..10, ACC, then AVE."""
    rows = [(str(r["fold"]), f"{100 * r['accuracy']:.2f}") for r in result["folds"]]
    return rows + [("AVE", f"{100 * result['mean']:.2f}")]


def summary_lines(result: dict) -> str:
    return (f"{result['benchmark'].upper()} accuracy {100 * result['mean']:.2f}% "
            f"+- {100 * result['std']:.2f}  ({result['images']} images, {result['missing']} missing)\n"
            f"ROC AUC {result['roc_auc']:.4f}  EER {100 * result['eer']:.2f}%  "
            f"TAR@FAR=1e-3 {100 * result['tar_at_far_0.001']:.2f}%  "
            f"TAR@FAR=1e-2 {100 * result['tar_at_far_0.01']:.2f}%  "
            f"best-threshold accuracy {100 * result['best_accuracy']:.2f}%")


def json_ready(result: dict) -> dict:
    return {k: v for k, v in result.items() if k not in ("scores", "roc")}
