"""Charts with matplotlib (headless): training curves and ROC curves."""

from __future__ import annotations

from pathlib import Path

from spherecli.core.errors import UserError


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise UserError("charts need matplotlib: pip install 'spherecli[plots]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(fig, path: str | Path) -> None:
    try:
        fig.savefig(path, dpi=120, bbox_inches="tight")
    except OSError as e:
        raise UserError(f"cannot write {path}: {e.strerror or e}") from None
    finally:
        fig.clf()
        _pyplot().close(fig)


def line_chart(path: str | Path, series: dict[str, tuple], *, title: str = "", xlabel: str = "",
               ylabel: str = "", logy: bool = False) -> None:
    """Named (xs, ys) curves in one chart."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.2, 4.5))
    for name, (xs, ys) in series.items():
        ax.plot(xs, ys, label=name, linewidth=1.5)
    if logy:
        ax.set_yscale("log")
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    _save(fig, path)


def roc_chart(path: str | Path, curves: dict[str, tuple], *, title: str = "ROC") -> None:
    """True-accept rate against false-accept rate on a log axis: named (far, tar) curves."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    for name, (far, tar) in curves.items():
        keep = far > 0
        ax.plot(far[keep], tar[keep], label=name, linewidth=1.5)
    ax.set_xscale("log")
    ax.set(title=title, xlabel="false accept rate", ylabel="true accept rate", ylim=(0, 1.01))
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right", fontsize="small")
    _save(fig, path)
