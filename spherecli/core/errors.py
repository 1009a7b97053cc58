"""What goes wrong in a way the user can mend: one clear line, not a traceback; and Ctrl-C
held off while work that is written in pieces ends whole."""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager

__version__ = "0.1.0"


class UserError(Exception):
    """A problem with the user's input that deserves one clear line, not a traceback."""


class Interrupted(UserError):
    """Stopped by Ctrl-C, with what was finished saved (exit status 130)."""


class CtrlC:
    """Within `with CtrlC() as ctrl_c`, Ctrl-C raises KeyboardInterrupt as usual, except
    inside `ctrl_c.hold()`, where the first one only sets `pressed`, for the holder to stop
    at its next whole step; a second does not wait. Only the main thread can catch a
    signal: on another, Ctrl-C stays Python's."""

    def __init__(self):
        self.held, self.pressed, self._previous = False, False, None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._on_sigint)
        return self

    def __exit__(self, *_):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None

    def _on_sigint(self, *_):
        if self.held and not self.pressed:
            self.pressed = True
            return
        raise KeyboardInterrupt

    @contextmanager
    def hold(self):
        self.held = True
        try:
            yield
        finally:
            self.held = False


def excerpt(text: str, limit: int = 120) -> str:
    """The first line of a message from elsewhere, shortened at a word boundary (with ...)."""
    line = (str(text).splitlines() or [""])[0].strip()
    if len(line) <= limit:
        return line
    cut = line[:limit].rsplit(" ", 1)[0]
    return (cut if len(cut) > limit // 2 else line[:limit]) + " ..."
