"""spherecli: the SphereFace face-recognition pipeline as a command-line toolkit."""

__version__ = "0.1.0"


class UserError(Exception):
    """A problem with the user's input that deserves one clear line, not a traceback."""


class Interrupted(UserError):
    """Stopped by Ctrl-C, with what was finished saved (exit status 130)."""
