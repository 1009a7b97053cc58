"""spherecli from Python: a handful of plain functions and one model object.

    import spherecli
    model = spherecli.load("out/demo/celeba-sphere4-asoftmax/model.pt")
    model.verify("a.jpg", "b.jpg")            # Verification(score=0.61, same=True, ...)
    faces = spherecli.detect("party.jpg")      # [Face(box, score, landmarks), ...]
    crop = spherecli.align("party.jpg", faces[0].landmarks)
    model.embed("a.jpg")                       # the feature of its face
    people = model.gallery("people/")          # one folder per person, enrolled and cached
    model.identify("party.jpg", people)        # [Match(face, identity, score, best_match), ...]
    g = spherecli.Gallery.create("staff.gallery", model)   # a gallery enrolled once, kept
    g.enrol(model, "photos/")                  # photos/PERSON/*.jpg; only new photos are embedded

An image is a path, a PIL image, or a numpy array (H, W, 3) of uint8 in RGB order, as
PIL gives it (OpenCV's imread gives BGR: pass `img[:, :, ::-1]`). A photo goes through
the same path as `sphereface detect` and `align` (EXIF orientation, downscaled to
max_side for detection, the face nearest the centre); every command of the CLI is a call
into this module or the stage functions below it. Bad input is a `spherecli.UserError`
naming it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np

from spherecli.core.errors import UserError
from spherecli.recognition.calibration import Calibration
from spherecli.core.config import DetectSettings, EvalSettings, TrainConfig
from spherecli.core.images import as_rgb, decode, describe_error
from spherecli.recognition.gallery import Gallery


@dataclass
class Face:
    """A face as `detect` records it: box (x1, y1, x2, y2), score, five (x, y) landmarks
    (eyes, nose, mouth corners; Matlab's convention, the first pixel's centre at 1, 1)."""
    box: list
    score: float
    landmarks: list

    @classmethod
    def of(cls, record: dict) -> "Face":
        return cls(record["box"], record["score"], record["landmarks"])


@dataclass
class Verification:
    """Two faces compared: the cosine score, the decision at the threshold, and what the
    threshold means (its false-accept rate on the calibration set, and where it is from)."""
    score: float
    same: bool
    threshold: float
    far: float | None
    calibration: str
    notes: list = field(default_factory=list)


@dataclass
class Match:
    """A face of a probe named from a gallery: the best-matching person when the score clears
    the threshold, else "unknown"; candidates are the k best people, best first."""
    face: Face
    identity: str
    score: float
    best_match: str
    candidates: list = field(default_factory=list)


def _image(image, settings: DetectSettings) -> np.ndarray:
    if isinstance(image, (str, Path)):
        try:
            return decode(image, exif=settings.exif)[0]
        except (OSError, ValueError) as e:
            raise UserError(f"{image}: {describe_error(e)}") from None
    return as_rgb(image)


_detectors: dict = {}


def _detector(settings: DetectSettings, device: str):
    from spherecli.preprocess.detect import FaceDetector

    key = (json.dumps(settings.as_json()), device)
    if key not in _detectors:  # MTCNN's weights are read once per settings
        _detectors[key] = FaceDetector(settings, device)
    return _detectors[key]


def detect(image, settings: DetectSettings | None = None, device: str = "cpu") -> list[Face]:
    """Every face of a photo, found as `sphereface detect` finds them; the first is the
    one `detect` keeps (settings.select: nearest the centre by default)."""
    settings = settings or DetectSettings()
    rgb, faces = _detector(settings, device).photo(image)
    return [Face.of(f) for f in _kept_first(rgb, faces, settings.select)]


def _kept_first(rgb: np.ndarray, faces: list[dict], rule: str) -> list[dict]:
    """The faces with the one `detect` keeps (by the select rule) first."""
    from spherecli.preprocess.detect import select_face

    if not faces:
        return faces
    first = select_face(faces, rgb.shape[1], rgb.shape[0], rule)
    return [faces[first]] + faces[:first] + faces[first + 1:]


def align(image, landmarks, size: tuple[int, int] = (112, 96), reference: str = "sphereface") -> np.ndarray:
    """The aligned RGB crop of a face, as `sphereface align` makes it (without its JPEG)."""
    from spherecli.preprocess.align import align_face, check_size
    from spherecli.core.registry import REFERENCES

    if reference not in REFERENCES:
        raise UserError(f"reference must be one of {', '.join(REFERENCES)}, got {reference!r}")
    marks = np.asarray(landmarks, dtype=np.float64)
    if marks.shape != (5, 2) or not np.isfinite(marks).all():
        raise UserError(f"landmarks: expected five (x, y) points, got {marks.shape}")
    return align_face(_image(image, DetectSettings()), marks, check_size(size), reference)


class Model:
    """A face network with its input contract, calibration and detector, loaded once.

    `network` runs aligned crops, `spec` says what crops it takes, `calibration` how its
    scores are read (mean feature, threshold, the threshold's false-accept rate), `key`
    names this model and these settings for caches.
    """

    def __init__(self, path: str | Path, *, device: str = "cpu", calibration: str | Path | None = None,
                 threshold: float | None = None, far: float | None = None, input_spec: str | None = None,
                 settings: DetectSettings | None = None, select: str | None = None,
                 flip: str | None = None, threads: int | None = 1):
        """flip: an image's feature with its mirror's (concat, sum, none; by default as the
        calibration was measured); threads: see FaceEmbedder."""
        from spherecli.recognition.recognize import FaceEmbedder

        self.path = Path(path)
        self.calibration = Calibration.load(self.path, calibration, threshold, far)
        self.embedder = FaceEmbedder(self.path, device=device, flip=flip or self.calibration.flip,
                                     settings=settings, input_spec=input_spec, threads=threads)
        self.select = select or self.embedder.settings.select
        self.network, self.spec = self.embedder.net, self.embedder.net.spec

    @cached_property
    def identity(self) -> dict:
        """What this model's unit features are made with: the network file's SHA-1, the flip
        mode, the input spec, the calibration's mean feature (SHA-1 of its float64 bytes) and
        the detection settings. A gallery records it and refuses features made otherwise."""
        h = hashlib.sha1()
        with open(self.path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        mean = self.calibration.mean
        return {"network": h.hexdigest(), "flip": self.embedder.flip, "input_spec": self.spec.as_json(),
                "mean": None if mean is None else hashlib.sha1(np.asarray(mean, "<f8").tobytes()).hexdigest(),
                "detection": self.embedder.settings.as_json()}

    @cached_property
    def key(self) -> str:
        """A name for `identity`, for caches of this model's features."""
        return hashlib.sha1(json.dumps(self.identity, sort_keys=True).encode()).hexdigest()

    def __repr__(self) -> str:
        return f"Model({str(self.path)!r}: {self.spec.describe()}; {self.calibration.describe()})"

    def crops(self, images) -> tuple[list[np.ndarray], list[str]]:
        """The aligned BGR crop of each image's face (the one the select rule keeps; an image
        of the model's input size is taken as an aligned crop already), and notes (which of
        several faces was taken)."""
        crops, notes = [], []
        for image in images:
            crop, _, note = self.crop(image)
            crops.append(crop)
            notes += [note] if note else []
        return crops, notes

    def crop(self, image) -> tuple[np.ndarray, list | None, str]:
        """One image's aligned BGR crop, its face's box (None for an aligned crop given as
        it is) and a note; no face is a UserError."""
        if not isinstance(image, (str, Path)) and as_rgb(image).shape[:2] == tuple(self.spec.size):
            return as_rgb(image)[:, :, ::-1], None, ""
        crop, face, note = self.embedder.photo_crop(image, self.select)
        return crop, face["box"], note

    def embed(self, images) -> np.ndarray:
        """Features (not normalised; `calibration.unit` makes them ready for cosine) of one
        image (D,) or of a list (N, D): photos are detected and aligned, aligned crops of
        the model's input size used as they are."""
        single = not isinstance(images, (list, tuple))
        features = self.embedder.embed(self.crops([images] if single else images)[0])
        return features[0] if single else features

    def verify(self, a, b) -> Verification:
        """Are the faces of two images the same person?"""
        crops, notes = self.crops([a, b])
        ua, ub = self.calibration.unit(self.embedder.embed(crops))
        score = float(ua @ ub)
        cal = self.calibration
        return Verification(score, score >= cal.threshold, cal.threshold, cal.far_of(cal.threshold),
                            cal.source, notes + cal.notes)

    def gallery(self, people, cache: str | Path | None = None, progress: bool = False) -> Gallery:
        """Known people: an enrolled gallery's folder (`Gallery.create`), a folder of one
        folder per person (enrolled into FOLDER/.sphereface-gallery/<key>, or cache, and kept
        in step with the folder), or a dict of name -> images (held in memory)."""
        from spherecli.core.formats import is_gallery
        from spherecli.recognition.gallery import cached

        if isinstance(people, dict):
            gallery = Gallery.memory(self)
            notes = []
            for name, images in people.items():
                gallery.enrol(self, list(images), name)
                notes += gallery.notes
            if not len(gallery):
                raise UserError("gallery: no face found in any person's images")
            gallery.notes = notes
            return gallery
        if is_gallery(people):
            gallery = Gallery.open(people)
            gallery.check(self)
            return gallery
        return cached(self, people, cache, progress)

    def identify(self, image, gallery: Gallery, k: int = 1) -> list[Match]:
        """Every face of an image named from the gallery, or called unknown; the first is the
        face the select rule keeps (nearest the centre by default)."""
        rgb, faces = self.embedder.photo(image)
        return self.match(rgb, _kept_first(rgb, faces, self.select), gallery, k)

    def match(self, rgb: np.ndarray, faces: list[dict], gallery: Gallery, k: int = 1) -> list[Match]:
        """Faces found on an RGB image, named from the gallery, with their k best candidates."""
        if not faces:
            return []
        unit = self.calibration.unit(self.embedder.embed(self.embedder.crops(rgb, faces)))
        out = []
        for face, found in zip(faces, gallery.search(unit, k)):
            best = found[0]
            known = best.score >= self.calibration.threshold
            out.append(Match(Face.of(face), best.name if known else "unknown", best.score, best.name, found))
        return out


def load(path: str | Path, **options) -> Model:
    """A model file (`sphereface train` or `import`), a checkpoint, or an ONNX network (with
    input_spec=...); options as Model's."""
    return Model(path, **options)


def evaluate(pairs: str | Path, model: str | Path, data: str | Path, settings: EvalSettings | None = None,
             **outputs) -> dict:
    """The verification protocol (LFW's evaluation.m) of a model on a pair list and a folder
    of aligned crops; outputs (output, roc_png, scores_csv, save_features_to, pattern) as
    `spherecli.evaluation.evaluate.evaluate`'s. Returns every number."""
    from spherecli.evaluation.evaluate import evaluate as run

    return run(pairs, model=model, data=data, settings=settings, progress=outputs.pop("progress", False),
               **outputs)


def train(config: TrainConfig | dict | str | Path, resume: bool = False, progress: bool = False) -> dict:
    """Train from a TrainConfig, a dict of its fields (the head's under "head"), or a TOML
    recipe; returns the last log row. model.pt lands in the config's `out`."""
    from spherecli.core.config import resolve
    from spherecli.training.train import launch

    if isinstance(config, TrainConfig):
        return launch(config, resume, progress)
    if isinstance(config, dict):
        cfg, resuming = resolve(None, config, resume)
    else:
        cfg, resuming = resolve(config, {}, resume)
    return launch(cfg, resuming, progress)


__all__ = ["DetectSettings", "EvalSettings", "Face", "Gallery", "Match", "Model", "TrainConfig",
           "Verification", "align", "detect", "evaluate", "load", "train"]
