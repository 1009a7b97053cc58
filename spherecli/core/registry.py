"""Everything a user chooses by name, each name typed once: here.

Torch-free, so that `sphereface --help`, click's choices and config
validation stay instant. Networks and heads register their builders from
their own modules with `@NETWORKS.register` (timm's `@register_model`);
this module only knows which module defines each name, and imports it on
first use.
"""

from __future__ import annotations

import importlib

from spherecli.core.errors import UserError


class Registry:
    """Names of one kind of thing, the module that defines each, and their builders."""

    def __init__(self, what: str, modules: dict[str, str]):
        self.what, self.modules, self.builders = what, modules, {}

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self.modules)

    def register(self, fn):
        """Decorator: the builder's (or class's) own name, lower-cased, is its registered name."""
        name = fn.__name__.lower()
        if self.modules.get(name) != fn.__module__:
            raise RuntimeError(f"{fn.__module__}.{fn.__name__}: declare {name!r} in "
                               f"spherecli/core/registry.py's {self.what} table first")
        self.builders[name] = fn
        return fn

    def get(self, name: str):
        if name not in self.modules:
            raise UserError(f"unknown {self.what} {name!r}; choose one of {', '.join(self.modules)}")
        if name not in self.builders:
            importlib.import_module(self.modules[name])
        return self.builders[name]

    def all(self) -> dict:
        return {name: self.get(name) for name in self.modules}


NETWORKS = Registry("network", {
    "sphere4": "spherecli.models.sphereface",
    "sphere10": "spherecli.models.sphereface",
    "sphere20": "spherecli.models.sphereface",
    "sphere36": "spherecli.models.sphereface",
    "sphere64": "spherecli.models.sphereface",
    "mobilefacenet": "spherecli.models.mobilefacenet",
})

HEADS = Registry("head", {
    "asoftmax": "spherecli.training.heads",
    "softmax": "spherecli.training.heads",
    "cosface": "spherecli.training.heads",
    "arcface": "spherecli.training.heads",
    "spherefacer": "spherecli.training.heads",
    "sphereface2": "spherecli.training.heads",
})

# Where the five landmarks are put in an aligned crop: (height, width) and the
# (x, y) points in Matlab's convention, where the first pixel's centre is
# (1, 1), as MTCNN's landmarks are.
REFERENCES = {
    # SphereFace's reference points (the original release's alignment code).
    "sphereface": ((112, 96), ((30.2946, 51.6963), (65.5318, 51.5014), (48.0252, 71.7366),
                               (33.5493, 92.3655), (62.7299, 92.2041))),
    # insightface's arcface_dst, given with the first pixel's centre at (0, 0),
    # hence +1: SphereFace's points moved 8 px right on a square crop, minus one
    # pixel of convention.
    "arcface": ((112, 112), ((39.2946, 52.6963), (74.5318, 52.5014), (57.0252, 72.7366),
                             (42.5493, 93.3655), (71.7299, 93.2041))),
}

CHANNEL_ORDERS = ("bgr", "rgb")

# What `sphereface import` converts (spherecli/models/convert.py).
IMPORT_FORMATS = ("caffe", "sphere20a", "mobilefacenet")

# How `detect` treats faces that fill the frame (spherecli/preprocess/detect.py, FaceDetector.detect).
BORDER_MODES = ("redetect", "pad", "none")

# Smaller choices, each made on the command line and in recipes.
A_SOFTMAX_BACKWARD = ("exact", "original")       # autograd, or the Caffe layer's normalised gradient
SPHEREFACE_R_VERSIONS = ("v0", "v1")           # psi as the original's, or cos(min(m theta, pi))
MHE_DISTANCES = ("euclidean", "angular")          # SphereFace+: MHE's distance, or A-MHE's angle
MHE_PAIRS = ("batch", "all")                      # SphereFace+: the batch's classes against all, or all pairs
AMP_MODES = ("auto", "none", "bf16", "fp16")     # mixed precision; none is fp32
FLIP_MODES = ("concat", "sum", "none")           # an image's feature with its mirror's
SELECT_RULES = ("center", "largest", "confident")  # which face of several detect keeps
NO_FACE_RULES = ("skip", "mean")                  # align: images without a face
STALL_ACTIONS = ("warn", "stop", "ignore")        # when training looks stalled
RUNTIMES = ("auto", "torch", "onnxruntime")       # what runs a model file in evaluate
SEARCH_BY = ("template", "photo")                # a gallery: a template per person, or every photo
FEATURE_DTYPES = ("float32", "float16")          # how a gallery stores features
ACCUMULATE_RULES = ("template", "vote")          # a video track's identity: its best views' mean, or a vote

# LFW's image path for (name, number) under an aligned folder, as pairs.txt names them.
LFW_PATTERN = "{name}/{name}_{num:04d}.jpg"
