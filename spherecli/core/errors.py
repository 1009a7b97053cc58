"""What goes wrong in a way the user can mend: one clear line, not a traceback."""

from __future__ import annotations

__version__ = "0.1.0"


class UserError(Exception):
    """A problem with the user's input that deserves one clear line, not a traceback."""


class Interrupted(UserError):
    """Stopped by Ctrl-C, with what was finished saved (exit status 130)."""


def excerpt(text: str, limit: int = 120) -> str:
    """The first line of a message from elsewhere, shortened at a word boundary (with ...)."""
    line = (str(text).splitlines() or [""])[0].strip()
    if len(line) <= limit:
        return line
    cut = line[:limit].rsplit(" ", 1)[0]
    return (cut if len(cut) > limit // 2 else line[:limit]) + " ..."
