"""Stage 5: verification on LFW view 2 and other benchmarks, as the original evaluation.m.

Reads a benchmark's pairs (spherecli.evaluation.datasets), extracts one feature per
distinct image (or reads saved features), runs the protocol of
spherecli.evaluation.metrics and writes the result JSON, and on request the ROC picture,
the per-pair scores and the features.
Every output is checked for writability before the features are extracted,
so a long run is never lost to a typo in a path.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from spherecli.core.config import EvalSettings
from spherecli.core.errors import UserError
from spherecli.evaluation.datasets import (Benchmark, Pairs, decode_crops, distinct_images, fit_crops,
                                           read_pairs)
from spherecli.core.formats import load_features, result_path, save_features, write_result, write_scores
from spherecli.evaluation.metrics import calibrate, roc, verification
from spherecli.core.outputs import Outputs
from spherecli.core.registry import LFW_PATTERN


def evaluate_features(features: np.ndarray, index: dict[str, int], pairs: Pairs,
                      mean_subtract: bool = True) -> dict:
    """Run the protocol given one feature row per image and the pair list."""
    if pairs.folds < 2:
        raise UserError(f"{pairs.name}: {pairs.folds} fold; the protocol chooses each fold's threshold on "
                        "the other folds, so it needs at least 2 (LFW has 10)")
    left = features[[index[p] for p in pairs.left]]
    right = features[[index[p] for p in pairs.right]]
    result = verification(left, right, pairs.same, pairs.folds, mean_subtract)
    result.update(roc(result["scores"], pairs.same))
    result["calibration"] = calibrate(left, right, pairs.same, mean_subtract)
    return result


def _missing(missing: list[str], where: str) -> UserError:
    shown = "\n  ".join(missing[:10]) + ("\n  ..." if len(missing) > 10 else "")
    return UserError(f"{len(missing)} pair images are missing from {where}:\n  {shown}\n"
                     "(`skip_missing` scores their pairs as failures)")


def evaluate(pairs_path: str | Path, *, model: str | Path | None = None, data: str | Path | None = None,
             features: str | Path | None = None, settings: EvalSettings | None = None,
             pattern: str = LFW_PATTERN, output: str | Path | None = None, roc_png: str | Path | None = None,
             scores_csv: str | Path | None = None, save_features_to: str | Path | None = None,
             progress: bool = True) -> dict:
    """One pair list in LFW's format: features (from a model and aligned images, or from a
    file), the protocol, and the files asked for. The result JSON goes to output, by
    default next to the model: MODEL.lfw.json for the official LFW pairs,
    MODEL.<pairs file name>.json for others."""
    pairs = read_pairs(pairs_path, pattern)
    if features is None and (model is None or data is None):
        raise UserError("give a model and its data (aligned images), or saved features")
    if features is not None and data is not None:
        raise UserError("give data (aligned images, with a model) or saved features, not both")
    bench = Benchmark(pairs.name, pairs, data=None if data is None else Path(data), source=str(pairs_path))
    with Outputs([pairs_path, model, data, features]) as outputs:
        output = outputs.file(output or result_path(model or features, pairs.name), "result")
        roc_png, scores_csv, save_features_to = (
            path if path is None else outputs.file(path, kind)
            for path, kind in ((roc_png, "png"), (scores_csv, "scores"), (save_features_to, "features")))
        settings = settings or EvalSettings()
        net = None if features is not None else _network(model, settings)
        result = run_benchmark(bench, settings, net=net, features=features, save_features_to=save_features_to,
                               progress=progress)
        result["settings"]["pattern"] = pattern
        write_outputs(result, pairs, output, roc_png, scores_csv)
        return result


def evaluate_many(benchmarks: list[Benchmark], model: str | Path, settings: EvalSettings | None = None,
                  progress: bool = True) -> list[dict]:
    """Several benchmarks with one model, each result next to the model as MODEL.<name>.json."""
    settings = settings or EvalSettings()
    with Outputs([model] + [p for b in benchmarks for p in (b.data, b.source or None)]) as outputs:
        paths = [outputs.file(result_path(model, b.name), "result") for b in benchmarks]
        net = _network(model, settings)
        results = []
        for bench, output in zip(benchmarks, paths):
            result = run_benchmark(bench, settings, net=net, progress=progress)
            write_outputs(result, bench.pairs, output)
            results.append(result)
        return results


def _network(model: str | Path, settings: EvalSettings):
    from spherecli.models.features import load_network

    return load_network(model, device=settings.device, amp=settings.amp, arch=settings.arch,
                        input_spec=settings.input_spec, runtime=settings.runtime)


def run_benchmark(bench: Benchmark, settings: EvalSettings, *, net=None, features: str | Path | None = None,
                  save_features_to: str | Path | None = None, progress: bool = True) -> dict:
    """The protocol on one benchmark, with features from the network or from a file."""
    pairs, names = bench.pairs, distinct_images(bench.pairs)
    flip, amp = settings.flip, settings.amp
    if features is not None:
        stored_names, stored, made = load_features(features)
        index = {n: i for i, n in enumerate(stored_names)}
        # How the features were made, not how this call would make them.
        flip, amp = made.get("flip", flip), made.get("amp", amp)
        missing, where = [n for n in names if n not in index], str(features)
    elif bench.data is not None:
        missing, where = [n for n in names if not (bench.data / n).is_file()], str(bench.data)
    else:
        missing, where = [], bench.source
    if missing and not settings.skip_missing:
        raise _missing(missing, where)
    absent = set(missing)
    present = [n for n in names if n not in absent]
    if features is None:
        stored = _extract(bench, net, present, flip, settings.batch_size, settings.workers, progress)
        index = {n: i for i, n in enumerate(present)}
    row = {n: i for i, n in enumerate(names)}
    table = np.full((len(names), stored.shape[1]), np.nan)  # a missing image scores NaN: a failure
    for n in present:
        table[row[n]] = stored[index[n]]
    if save_features_to is not None:
        save_features(save_features_to, present, table[[row[n] for n in present]], flip=flip, amp=amp)
    result = evaluate_features(table, row, pairs, settings.mean_subtract)
    result["calibration"]["flip"] = flip
    result.update(benchmark=bench.name, pairs_file=bench.source,
                  model=None if net is None else net.name,
                  data=None if bench.data is None else str(bench.data),
                  features_file=None if features is None else str(features), images=len(names),
                  missing=len(missing),
                  settings={"flip": flip, "mean_subtract": settings.mean_subtract, "amp": amp,
                            "runtime": None if net is None else type(net).__name__,
                            "crops": f"{bench.size[0]}x{bench.size[1]} {bench.reference}",
                            "protocol": "evaluation.m: mean of other folds subtracted, cosine, "
                                        "threshold grid -1:1e-4:1 chosen on the other folds"})
    return result


def _extract(bench: Benchmark, net, names: list[str], flip: str, batch_size: int, workers: int,
             progress: bool) -> np.ndarray:
    """Features of a benchmark's crops: read by DataLoader workers from its folder, or
    decoded from the encoded images it holds and fitted to the network's input."""
    import torch

    from spherecli.models.features import embed, extract

    if bench.data is not None:
        return extract(net, [str(bench.data / n) for n in names], flip=flip, batch_size=batch_size,
                       workers=workers, progress=progress, desc=bench.name)
    out = []
    for i in range(0, len(names), batch_size):
        crops = decode_crops([bench.images[n] for n in names[i:i + batch_size]], bench.source)
        batch = np.ascontiguousarray(fit_crops(crops, bench.reference, bench.size, net.spec))
        out.append(embed(net, torch.from_numpy(batch), flip))
    return np.concatenate(out).astype(np.float64)


def write_outputs(result: dict, pairs: Pairs, output: Path, roc_png=None, scores_csv=None) -> None:
    write_result(output, result)
    result["output"] = str(output)
    if roc_png:
        from spherecli.evaluation.plot import roc_chart

        roc_chart(roc_png, {f"AUC {result['roc_auc']:.4f}": (result["roc"]["far"], result["roc"]["tar"])},
                  title=f"ROC on {pairs.name}")
    if scores_csv:
        write_scores(scores_csv, pairs.left, pairs.right, pairs.same, result["scores"])


def fold_table(result: dict) -> list[tuple[str, str]]:
    """The original's per-fold print-out: fold 1..10, ACC, then AVE."""
    rows = [(str(r["fold"]), f"{100 * r['accuracy']:.2f}") for r in result["folds"]]
    return rows + [("AVE", f"{100 * result['mean']:.2f}")]


SUMMARY_COLUMNS = ("benchmark", "accuracy (%)", "ROC AUC", "EER (%)", "TAR@FAR=1e-3 (%)", "images", "missing")


def summary_row(result: dict) -> tuple[str, ...]:
    """One benchmark's line of the table `evaluate --benchmarks` prints."""
    return (result["benchmark"], f"{100 * result['mean']:.2f} +- {100 * result['std']:.2f}",
            f"{result['roc_auc']:.4f}", f"{100 * result['eer']:.2f}",
            f"{100 * result['tar_at_far_0.001']:.2f}",
            str(result["images"]), str(result["missing"]))


def summary_lines(result: dict) -> str:
    return (f"{result['benchmark'].upper()} accuracy {100 * result['mean']:.2f}% "
            f"+- {100 * result['std']:.2f}  ({result['images']} images, {result['missing']} missing)\n"
            f"ROC AUC {result['roc_auc']:.4f}  EER {100 * result['eer']:.2f}%  "
            f"TAR@FAR=1e-3 {100 * result['tar_at_far_0.001']:.2f}%  "
            f"TAR@FAR=1e-2 {100 * result['tar_at_far_0.01']:.2f}%  "
            f"best-threshold accuracy {100 * result['best_accuracy']:.2f}%")


