"""spherecli: the SphereFace face-recognition pipeline as a command-line toolkit and a Python API.

    import spherecli
    model = spherecli.load("model.pt")
    print(model.verify("a.jpg", "b.jpg"))

The API (spherecli/api.py: load, detect, align, evaluate, train, Model, ...) is imported
on first use, so that `sphereface --help` and `import spherecli` stay free of torch.
"""

__version__ = "0.1.0"

_API = ("DetectSettings", "Face", "Gallery", "Match", "Model", "TrainConfig", "Verification", "align",
        "detect", "evaluate", "load", "train")


def __getattr__(name):
    if name in _API:
        from spherecli import api

        return getattr(api, name)
    raise AttributeError(f"module 'spherecli' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_API))


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
