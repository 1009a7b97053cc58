"""How a model's features are scored: the calibration that `evaluate` measures.

Features are compared by cosine similarity after subtracting the mean feature
that `evaluate` measured on its benchmark, so that the threshold chosen there
means the same thing in `verify` and `identify`. The benchmark's impostor
(different-person) scores say what false-accept rate any threshold has.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from spherecli.core.errors import UserError
from spherecli.models.features import unit
from spherecli.core.formats import read_result, result_path
from spherecli.core.validate import COSINE, FRACTION

# The threshold of a model that was never evaluated, whose features are therefore
# not centred either: on LFW, without mean subtraction, both CelebA-trained models
# of docs/results.md had their best threshold at 0.20 (`sphereface evaluate
# --no-mean-subtract`). `sphereface evaluate` calibrates a model properly.
DEFAULT_THRESHOLD = 0.2


@dataclass
class Calibration:
    """How to score: the mean feature to subtract, the threshold, the flip mode, and the
    impostor scores of the calibration set, which say what a threshold's false-accept
    rate is."""
    mean: np.ndarray | None
    threshold: float
    flip: str
    source: str
    impostors: np.ndarray | None = None   # sorted different-person scores of the calibration set
    notes: list = field(default_factory=list)  # what the user should know about how scores are read

    @classmethod
    def load(cls, model: str | Path, result: str | Path | None = None,
             threshold: float | None = None, far: float | None = None) -> "Calibration":
        """From an evaluation JSON (given, or MODEL.lfw.json next to the model); far
        chooses the threshold that accepts at most that fraction of its impostors."""
        if far is not None and threshold is not None:
            raise UserError("give `far` (a threshold chosen by false-accept rate) or `threshold`, not both")
        far = None if far is None else FRACTION.check(far, "`far`")
        threshold = None if threshold is None else COSINE.check(threshold, "`threshold`")
        path = Path(result) if result else result_path(model)
        cal = cls(None, DEFAULT_THRESHOLD, "concat", "default")
        if path.is_file():
            c = read_result(path, ("calibration",))["calibration"]
            try:
                cal = cls(np.array(c["mean"]) if c["mean"] is not None else None, c["threshold"],
                          c["flip"], str(path),
                          np.array(c["impostors"]) if "impostors" in c else None)
            except (ValueError, KeyError, TypeError):
                raise UserError(f"{path}: not an evaluation result with a calibration") from None
        elif result:
            raise UserError(f"{path}: no such file")
        if far is not None:
            cal.threshold, cal.source = cal.threshold_at_far(far), f"FAR {far:g} on {cal.source}"
        if threshold is not None:
            cal.threshold, cal.source = threshold, "the given threshold"
        elif cal.mean is None and far is None and cal.source == "default":
            cal.notes.append(f"{path.name} not found: the model is not calibrated, so features are not "
                             f"centred and the threshold is the uncalibrated {DEFAULT_THRESHOLD}; "
                             "`sphereface evaluate` on LFW calibrates it")
        return cal

    def far_of(self, threshold: float) -> float | None:
        """The fraction of the calibration set's impostor pairs that score at or above threshold."""
        if self.impostors is None or not len(self.impostors):
            return None
        return float(len(self.impostors) - np.searchsorted(self.impostors, threshold, side="left")) \
            / len(self.impostors)

    def threshold_at_far(self, far: float) -> float:
        """The lowest threshold that accepts at most far of the calibration set's impostors."""
        if self.impostors is None or not len(self.impostors):
            raise UserError(f"{self.source}: no impostor scores to choose a threshold by false-accept "
                            "rate; run `sphereface evaluate` again to calibrate the model")
        n = len(self.impostors)
        if 0 < far and far * n < 1:
            self.notes.append(f"`far` {far:g}: {self.source} holds {n:,} impostor pairs, too few to resolve "
                              f"that rate (it takes at least {int(np.ceil(1 / far)):,}); the threshold is "
                              "above every one of them, a false-accept rate of 0 measured on them")
        allowed = int(np.floor(far * n + 1e-9))
        if allowed >= n:
            return -1.0
        return float(np.nextafter(self.impostors[n - allowed - 1], np.inf))

    def describe(self) -> str:
        """The threshold, what it means, and where it came from."""
        far = self.far_of(self.threshold)
        meaning = "" if far is None else f"false-accept rate {far:.2%} on its calibration set; "
        if self.source == "default":
            return (f"threshold {self.threshold:.4f} (uncalibrated default; `sphereface evaluate` on LFW "
                    "calibrates the model)")
        return f"threshold {self.threshold:.4f} ({meaning}{self.source})"

    def unit(self, features: np.ndarray) -> np.ndarray:
        """Features made ready for cosine scoring: centred, then unit length."""
        return unit(features, self.mean)


