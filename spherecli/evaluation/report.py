"""Compare training runs: their numbers side by side, each benchmark's accuracy fold by fold
against a baseline run's, and their curves in one picture."""

from __future__ import annotations

import inspect
import math
from pathlib import Path

from spherecli.core.errors import UserError
from spherecli.core.config import load_config
from spherecli.core.formats import RunFolder, read_log, read_result, result_path
from spherecli.core.registry import HEADS


def run_rows(run: Path) -> list[dict]:
    folder = RunFolder(Path(run))
    if not folder.log.is_file():
        raise UserError(f"{run}: no log.jsonl (not a training run folder)")
    return read_log(folder.log)


def wall_seconds(rows: list[dict]) -> float:
    total, previous = 0.0, 0.0
    for r in rows:
        if r["elapsed_s"] < previous:  # a resumed run restarts its clock
            total += previous
        previous = r["elapsed_s"]
    return total + previous


def summarize(run: str | Path, benchmarks: tuple[str, ...] = ("lfw",)) -> dict:
    """Final numbers of a run, and its result on each benchmark that `evaluate` wrote one for
    next to model.pt ({name}_mean, _std, _folds). A run that stopped before its first log line
    has no numbers, only its settings."""
    folder = RunFolder(Path(run))
    rows = run_rows(folder.path)
    cfg = load_config(folder.config) if folder.config.is_file() else None
    last = rows[-1] if rows else {}
    margin = None
    if cfg is not None:
        default = inspect.signature(HEADS.get(cfg.head)).parameters.get("margin")
        margin = cfg.head_args.get("margin", None if default is None else default.default)
    out = {"run": folder.path.name, "arch": cfg and cfg.arch, "head": cfg and cfg.head, "margin": margin,
           "iterations": last.get("iter", 0), "wall_min": round(wall_seconds(rows) / 60, 1),
           "images_per_s": round(sum(r["images_per_s"] for r in rows) / len(rows), 1) if rows else None,
           "final_loss": last.get("loss"), "train_acc": last.get("acc"),
           "feature_norm": last.get("feature_norm")}
    for name in benchmarks:
        result = result_path(folder.model, name)
        if result.is_file():
            r = read_result(result, ("mean", "std", "folds"))
            out.update({f"{name}_mean": r["mean"], f"{name}_std": r["std"],
                        f"{name}_folds": [f["accuracy"] for f in r["folds"]]})
    return out


def paired(folds: list[float], baseline: list[float], what: str) -> dict:
    """The mean of the per-fold differences (points), its standard error, and the folds better:
    both models scored on the same folds, so the paired difference is far more precise than
    either model's spread over the folds."""
    if len(folds) != len(baseline):
        raise UserError(f"{what}: {len(folds)} folds against the baseline's {len(baseline)}; "
                        "paired differences need the same protocol")
    d = [100 * (a - b) for a, b in zip(folds, baseline)]
    mean = sum(d) / len(d)
    se = math.sqrt(sum((x - mean) ** 2 for x in d) / (len(d) - 1) / len(d)) if len(d) > 1 else float("nan")
    return {"diff": mean, "se": se, "better": sum(x > 0 for x in d), "folds": len(d)}


def against(rows: list[dict], baseline: dict, benchmarks: tuple[str, ...]) -> None:
    """Each row gains {name}_vs: its paired difference from the baseline run on that benchmark."""
    for name in benchmarks:
        if f"{name}_folds" not in baseline:
            raise UserError(f"baseline {baseline['run']}: no {name} result next to its model.pt "
                            f"(run `sphereface evaluate` on it first)")
        for r in rows:
            if f"{name}_folds" in r:
                r[f"{name}_vs"] = paired(r[f"{name}_folds"], baseline[f"{name}_folds"],
                                         f"{r['run']} on {name}")


def curves(runs: list[str | Path], key: str = "loss", drawing: bool = True) -> dict[str, tuple[list, list]]:
    """(iterations, values) of `key` (loss, acc, feature_norm, lambda, lr ...) per run. A key
    no log has is an error; so is nothing to draw yet, when drawing."""
    series = {}
    for run in runs:
        rows = run_rows(Path(run))
        known = sorted({k for r in rows for k in r if k not in ("iter", "note")})
        points = [(r["iter"], r[key]) for r in rows if r.get(key) is not None]
        if rows and key not in known:
            raise UserError(f"{run}: its log has no {key!r} (it has {', '.join(known)})")
        if points:
            series[Path(run).name] = ([i for i, _ in points], [v for _, v in points])
    if not series and drawing:
        raise UserError(f"no run has {key!r} values to draw yet")
    return series


COLUMNS = ("run", "arch", "head", "m", "iters", "min", "img/s", "loss", "train acc", "|x|")


def columns(benchmarks: tuple[str, ...], baseline: str | None) -> tuple[str, ...]:
    names = []
    for name in benchmarks:
        names.append(name.upper() if name == "lfw" else name)
        if baseline:
            names.append(f"vs {baseline}, folds better")
    return COLUMNS + tuple(names)


def table_row(r: dict, benchmarks: tuple[str, ...] = ("lfw",), baseline: bool = False) -> tuple[str, ...]:
    """A summary as the columns of the comparison table; what a run does not have yet is blank."""
    def num(v, form):
        return "" if v is None else form.format(v)
    cells = [r["run"], r["arch"] or "", r["head"] or "", num(r["margin"], "{:g}"), str(r["iterations"]),
             str(r["wall_min"]), num(r["images_per_s"], "{}"), num(r["final_loss"], "{:.3f}"),
             num(r["train_acc"], "{:.1%}"), num(r["feature_norm"], "{:.1f}")]
    for name in benchmarks:
        cells.append(f"{100 * r[f'{name}_mean']:.2f} +- {100 * r[f'{name}_std']:.2f}"
                     if f"{name}_mean" in r else "")
        if baseline:
            v = r.get(f"{name}_vs")
            cells.append(f"{v['diff']:+.2f} +- {v['se']:.2f}, {v['better']} / {v['folds']}" if v else "")
    return tuple(cells)
