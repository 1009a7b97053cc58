"""Compare training runs: their numbers side by side and their loss curves in one picture."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

from spherecli import UserError
from spherecli.plot import line_chart


def read_log(run: Path) -> list[dict]:
    path = run / "log.jsonl"
    if not path.is_file():
        raise UserError(f"{run}: no log.jsonl (not a training run folder)")
    rows: list[dict] = []
    for r in (json.loads(line) for line in open(path, encoding="utf-8")):
        if "iter" not in r:
            continue
        while rows and rows[-1]["iter"] >= r["iter"]:
            rows.pop()  # a resumed run redid the iterations after its checkpoint
        rows.append(r)
    return rows


def default_margin(head: str):
    import inspect

    from spherecli.losses import HEADS

    m = inspect.signature(HEADS[head]).parameters.get("m")
    return None if m is None else m.default


def wall_seconds(rows: list[dict]) -> float:
    total, previous = 0.0, 0.0
    for r in rows:
        if r["elapsed_s"] < previous:  # a resumed run restarts its clock
            total += previous
        previous = r["elapsed_s"]
    return total + previous


def summarize(run: str | Path) -> dict:
    """Final numbers of a run, and its LFW result when `evaluate` wrote one next to model.pt."""
    run = Path(run)
    rows = read_log(run)
    with open(run / "config.toml", "rb") as f:
        cfg = tomllib.load(f)
    last = rows[-1] if rows else {}
    head = cfg.get("head", "asoftmax")
    m = default_margin(head)  # None for heads without a margin (softmax)
    out = {"run": run.name, "arch": cfg.get("arch"), "head": head,
           "margin": None if m is None else cfg.get("margin", m), "iterations": last.get("iter", 0),
           "wall_min": round(wall_seconds(rows) / 60, 1),
           "images_per_s": round(sum(r["images_per_s"] for r in rows) / max(len(rows), 1), 1),
           "final_loss": last.get("loss"), "train_acc": last.get("acc"),
           "feature_norm": last.get("feature_norm")}
    result = run / "model.lfw.json"
    if result.is_file():
        r = json.loads(result.read_text())
        out.update(lfw_mean=r["mean"], lfw_std=r["std"], lfw_folds=[f["accuracy"] for f in r["folds"]])
    return out


def plot(runs: list[str | Path], path: str | Path, key: str = "loss", logy: bool = False) -> None:
    """One curve of `key` (loss, acc, feature_norm, lambda ...) per run against iterations."""
    import numpy as np

    series = {}
    for run in runs:
        rows = [r for r in read_log(Path(run)) if r.get(key) is not None]
        ys = np.array([r[key] for r in rows], dtype=float)
        series[Path(run).name] = ([r["iter"] for r in rows], np.log10(ys) if logy else ys)
    line_chart(path, series, title=f"{'log10 ' if logy else ''}{key}", xlabel="iteration",
               ylabel=key)
