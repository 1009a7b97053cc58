"""A model used on photos: each photo's faces detected and aligned exactly as training
data was, then embedded (FaceEmbedder); or a whole folder embedded."""

from __future__ import annotations

import fnmatch
from pathlib import Path

import numpy as np
import torch

from spherecli.core.errors import UserError
from spherecli.preprocess.align import align_face
from spherecli.core.data import load_face, to_chw
from spherecli.core.config import DetectSettings
from spherecli.preprocess.detect import FaceDetector, select_face
from spherecli.core.devices import resolve_device
from spherecli.models.features import embed, feature_width, load_network
from spherecli.core.images import IMAGE_EXTENSIONS, describe_error, walk_images


class FaceEmbedder:
    """Photo -> faces -> aligned crops -> features, with one network and one detector."""

    def __init__(self, model: str | Path, *, device: str = "cpu", flip: str = "concat",
                 settings: DetectSettings | None = None, batch_size: int = 64,
                 input_spec: str | None = None, threads: int | None = None):
        """threads: the CPU threads to compute with, torch's for this whole process and
        onnxruntime's (None: as they are). One is the measured best for a face at a time on
        two cores, idle or not (docs/benchmarks.md, "verify and identify")."""
        if threads is not None:
            torch.set_num_threads(threads)
        self.net = load_network(model, device=device, input_spec=input_spec, threads=threads or 0)
        self.device = resolve_device(device)
        self.flip, self.batch_size = flip, batch_size
        self.settings = settings or DetectSettings()
        self._detector = None

    @property
    def detector(self) -> FaceDetector:
        if self._detector is None:  # MTCNN only when raw photos need it
            self._detector = FaceDetector(self.settings, str(self.device))
        return self._detector

    def faces(self, rgb: np.ndarray) -> list[dict]:
        """The faces of an RGB image, as `detect` finds them."""
        return self.detector.photo(rgb)[1]

    def photo(self, source) -> tuple[np.ndarray, list[dict]]:
        """A photo (path, RGB array or PIL image) and its faces: FaceDetector.photo."""
        return self.detector.photo(source)

    def crops(self, rgb: np.ndarray, faces: list[dict]) -> list[np.ndarray]:
        """Aligned BGR crops, as `align` writes them and training reads them."""
        spec = self.net.spec
        return [align_face(rgb, f["landmarks"], spec.size, spec.reference)[:, :, ::-1] for f in faces]

    def embed(self, crops: list[np.ndarray]) -> np.ndarray:
        out = [embed(self.net, torch.stack([to_chw(c) for c in crops[i:i + self.batch_size]]), self.flip)
               for i in range(0, len(crops), self.batch_size)]
        return np.concatenate(out) if out else np.zeros((0, feature_width(self.net, self.flip)))

    def photo_crop(self, path, select: str = "center") -> tuple[np.ndarray, dict, str]:
        """The aligned crop of the one face of a photo (chosen by select among several, as
        `detect` chooses), its face record, and a note; no face is an error."""
        rgb, faces = self.photo(path)
        where = path if isinstance(path, (str, Path)) else "the image"
        if not faces:
            raise UserError(f"{where}: no face found")
        note = f"{where}: {len(faces)} faces found; using the one the select rule {select!r} chooses" \
            if len(faces) > 1 else ""
        face = faces[select_face(faces, rgb.shape[1], rgb.shape[0], select)]
        return self.crops(rgb, [face])[0], face, note

    def photo_face(self, path, select: str = "center") -> tuple[np.ndarray, dict, str]:
        """The feature of the one face of a photo, its face record, and a note."""
        crop, face, note = self.photo_crop(path, select)
        return self.embed([crop])[0], face, note


def embed_folder(embedder: FaceEmbedder, root: str | Path, *, aligned: bool = False, select: str = "center",
                 progress: bool = True, desc: str = "embed", include: str | None = None
                 ) -> tuple[list[str], np.ndarray, list[str]]:
    """Features of every image under root (or those whose path under it matches the glob
    include): raw photos are detected and aligned first (one face each, by select); with
    aligned=True they are used as they are."""
    from tqdm import tqdm

    root = Path(root)
    if not root.is_dir():
        raise UserError(f"{root}: no such directory")
    rels = [r for r in walk_images(root) if include is None or fnmatch.fnmatchcase(r, include)]
    names, feats, notes = [], [], []
    batch: list[tuple[str, np.ndarray]] = []

    def flush():
        if batch:
            feats.append(embedder.embed([c for _, c in batch]))
            names.extend(r for r, _ in batch)
            batch.clear()

    if not rels:
        which = f" matching {include!r}" if include else ""
        raise UserError(f"{root}: no images ({', '.join(IMAGE_EXTENSIONS)}){which} under it")
    for rel in tqdm(rels, unit="img", desc=desc, disable=not progress, dynamic_ncols=True):
        try:
            crop = load_face(str(root / rel)) if aligned else embedder.photo_crop(root / rel, select)[0]
        except OSError as e:
            notes.append(f"{rel}: {describe_error(e)}")
            continue
        except UserError as e:
            notes.append(str(e))
            continue
        batch.append((rel, crop))
        if len(batch) == embedder.batch_size:
            flush()
    flush()
    width = feature_width(embedder.net, embedder.flip)
    return names, (np.concatenate(feats) if feats else np.zeros((0, width))), notes
