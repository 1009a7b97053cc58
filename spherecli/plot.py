"""Small line charts drawn with OpenCV (ROC curves, loss curves), so that
pictures need no plotting library."""

from __future__ import annotations

import math

import cv2
import numpy as np

COLOURS = [(180, 119, 31), (14, 127, 255), (44, 160, 44), (40, 39, 214), (189, 103, 148),
           (75, 86, 140), (194, 119, 227), (127, 127, 127)]  # BGR


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    step = 10 ** math.floor(math.log10((hi - lo) / n or 1))
    step *= min((m for m in (1, 2, 5, 10) if (hi - lo) / (step * m) <= n), default=10)
    return [v * step for v in range(math.ceil(lo / step), math.floor(hi / step) + 1)]


def line_chart(path, series: dict[str, tuple], *, title: str = "", xlabel: str = "",
               ylabel: str = "", logx: bool = False, size: tuple[int, int] = (720, 480)) -> None:
    """Draw named (xs, ys) series into a PNG at path."""
    w, h = size
    left, right, top, bottom = 70, 20, 40, 50
    img = np.full((h, w, 3), 255, np.uint8)
    tx = (lambda v: np.log10(v)) if logx else (lambda v: np.asarray(v, dtype=float))
    xs = np.concatenate([tx(np.asarray(x, dtype=float)) for x, _ in series.values()])
    ys = np.concatenate([np.asarray(y, dtype=float) for _, y in series.values()])
    ok = np.isfinite(xs) & np.isfinite(ys)
    x0, x1, y0, y1 = xs[ok].min(), xs[ok].max(), ys[ok].min(), ys[ok].max()
    x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + 1)

    def px(x, y):
        return (left + (x - x0) / (x1 - x0) * (w - left - right),
                h - bottom - (y - y0) / (y1 - y0) * (h - top - bottom))

    font, grey = cv2.FONT_HERSHEY_SIMPLEX, (200, 200, 200)
    for v in _ticks(y0, y1):
        _, py = px(x0, v)
        cv2.line(img, (left, int(py)), (w - right, int(py)), grey, 1)
        cv2.putText(img, f"{v:g}", (5, int(py) + 4), font, 0.4, (0, 0, 0), 1, cv2.LINE_AA)
    for v in _ticks(x0, x1):
        qx, _ = px(v, y0)
        cv2.line(img, (int(qx), top), (int(qx), h - bottom), grey, 1)
        label = f"1e{v:g}" if logx else f"{v:g}"
        cv2.putText(img, label, (int(qx) - 12, h - bottom + 16), font, 0.4, (0, 0, 0), 1, cv2.LINE_AA)
    cv2.rectangle(img, (left, top), (w - right, h - bottom), (0, 0, 0), 1)
    for i, (name, (x, y)) in enumerate(series.items()):
        x, y = tx(np.asarray(x, dtype=float)), np.asarray(y, dtype=float)
        keep = np.isfinite(x) & np.isfinite(y)
        pts = np.array([px(a, b) for a, b in zip(x[keep], y[keep])], np.int32)
        colour = COLOURS[i % len(COLOURS)]
        cv2.polylines(img, [pts], False, colour, 2, cv2.LINE_AA)
        cv2.putText(img, name, (w - right - 230, top + 18 + 18 * i), font, 0.45, colour, 1, cv2.LINE_AA)
    cv2.putText(img, title, (left, 25), font, 0.6, (0, 0, 0), 1, cv2.LINE_AA)
    cv2.putText(img, xlabel, (w // 2 - 40, h - 12), font, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
    cv2.putText(img, ylabel, (5, top - 8), font, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
    ok, buf = cv2.imencode(".png", img)
    with open(path, "wb") as f:
        f.write(buf.tobytes())
