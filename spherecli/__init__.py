"""spherecli: the SphereFace face-recognition pipeline as a command-line toolkit and a Python API.

    import spherecli
    model = spherecli.load("model.pt")
    print(model.verify("a.jpg", "b.jpg"))

UserError is what every expected failure raises. The API (spherecli/api.py: load, detect,
align, evaluate, train, Model, ...) is imported on first use, so that `sphereface --help`
and `import spherecli` stay free of torch.
"""

import importlib

from spherecli.core.errors import Interrupted, UserError, __version__  # noqa: F401


def __getattr__(name):
    if not name.startswith("_"):  # dunder lookups (inspect, pickle) do not load torch
        api = importlib.import_module("spherecli.api")
        if name in api.__all__:
            return getattr(api, name)
    raise AttributeError(f"module 'spherecli' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(importlib.import_module("spherecli.api").__all__))
