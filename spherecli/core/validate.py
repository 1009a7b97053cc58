"""What a value may be, said once where an option or setting is declared.

A `Range` is attached to a settings field (`setting(...)`) or to a command-line
option, and the command line, a TOML recipe and a Python caller all check
through it: a number outside it, not a number, NaN or infinite is one error
line naming the option. Torch-free and numpy-free, so that `--help` stays
instant.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

from spherecli.core.errors import UserError


@dataclass(frozen=True)
class Range:
    """lo <= value <= hi (an end of None is open-ended; lo_open / hi_open exclude the end
    itself); integer: whole numbers only. NaN and infinities are never in a range."""
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    integer: bool = False

    def describe(self) -> str:
        kind = "a whole number" if self.integer else "a number"
        parts = []
        if self.lo is not None:
            parts.append(f"{'above' if self.lo_open else 'at least'} {self.lo:g}")
        if self.hi is not None:
            parts.append(f"{'below' if self.hi_open else 'at most'} {self.hi:g}")
        return kind + (" " + " and ".join(parts) if parts else "")

    def check(self, value, name: str):
        """value (a number, or its text) as an int or float inside the range, or an error."""
        bad = UserError(f"{name}: expected {self.describe()}, got {value!r}")
        if isinstance(value, bool):
            raise bad
        if isinstance(value, str):
            try:
                value = float(value.strip()) if not self.integer else _whole(value.strip())
            except ValueError:
                raise bad from None
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            raise bad
        if self.integer:
            if value != int(value):
                raise bad
            value = int(value)
        lo_fails = self.lo is not None and (value <= self.lo if self.lo_open else value < self.lo)
        hi_fails = self.hi is not None and (value >= self.hi if self.hi_open else value > self.hi)
        if lo_fails or hi_fails:
            raise bad
        return value

    def samples(self) -> tuple[list, list]:
        """(values inside, values outside) near the ends: what a test of the declaration tries."""
        inside, outside = [], [math.nan, math.inf, -math.inf]
        for end, is_open, step in ((self.lo, self.lo_open, -1), (self.hi, self.hi_open, 1)):
            if end is None:
                continue
            (outside if is_open else inside).append(end)
            outside.append(end + step * (1 if self.integer else max(1e-3, abs(end) * 1e-3)))
        return inside, outside


def _whole(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        number = float(text)
        if not math.isfinite(number) or number != int(number):
            raise ValueError(text) from None
        return int(number)


def setting(default, help: str, range: Range | None = None, choices: tuple | None = None):
    """A settings field: its default, its help (the flag's help on the command line), and
    what it may be."""
    kw = {"default_factory": lambda: default} if isinstance(default, (dict, list)) else {"default": default}
    return field(**kw, metadata={"help": help, "range": range, "choices": choices})


def check_settings(obj, where: str = "") -> None:
    """Every field of a settings dataclass against its declaration (range, choices); a
    field whose value is None keeps None (an unset optional setting)."""
    for f in fields(obj):
        value = getattr(obj, f.name)
        if value is None:
            continue
        setattr(obj, f.name, check_value(f, value, where))


def check_value(f, value, where: str = ""):
    name = f"{where}{f.name}"
    choices, rng = f.metadata.get("choices"), f.metadata.get("range")
    if choices is not None and value not in choices:
        raise UserError(f"{name}: expected one of {', '.join(map(str, choices))}, got {value!r}")
    if rng is not None:
        if isinstance(value, (tuple, list)):
            return tuple(rng.check(v, name) for v in value)
        return rng.check(value, name)
    return value


# Ranges shared by several options.
COUNT = Range(1, integer=True)              # batch sizes, every-N, processes
NOT_NEGATIVE_INT = Range(0, integer=True)   # worker processes (0: in this process), iterations
FRACTION = Range(0, 1, lo_open=True)        # a false-accept rate
COSINE = Range(-1, 1)                       # a cosine threshold
