"""A model used on photos: each photo's faces detected and aligned exactly as training
data was, then embedded; `verify` two photos, or embed a whole folder."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from spherecli import UserError
from spherecli.align import align_face
from spherecli.calibration import Calibration
from spherecli.data import load_face, to_chw
from spherecli.detect import DetectSettings, FaceDetector, select_face
from spherecli.devices import resolve_device
from spherecli.features import embed, feature_width, load_network
from spherecli.images import decode, describe_error, walk_images


class FaceEmbedder:
    """Photo -> faces -> aligned crops -> features, with one network and one detector."""

    def __init__(self, model: str | Path, *, device: str = "cpu", flip: str = "concat",
                 settings: DetectSettings | None = None, batch_size: int = 64,
                 input_spec: str | None = None):
        self.net = load_network(model, device=device, input_spec=input_spec)
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
        return self.detector.detect_one(rgb)

    def crops(self, rgb: np.ndarray, faces: list[dict]) -> list[np.ndarray]:
        """Aligned BGR crops, as `align` writes them and training reads them."""
        spec = self.net.spec
        return [align_face(rgb, f["landmarks"], spec.size, spec.reference)[:, :, ::-1] for f in faces]

    def embed(self, crops: list[np.ndarray]) -> np.ndarray:
        out = [embed(self.net, torch.stack([to_chw(c) for c in crops[i:i + self.batch_size]]), self.flip)
               for i in range(0, len(crops), self.batch_size)]
        return np.concatenate(out) if out else np.zeros((0, feature_width(self.net, self.flip)))

    def photo_face(self, path: str | Path, select: str = "center") -> tuple[np.ndarray, dict, str]:
        """The feature of the one face of a photo, its face record, and a note.

        No face is an error; several faces pick one by `select` and say so.
        """
        try:
            rgb, _ = decode(path)
        except (OSError, ValueError) as e:
            raise UserError(f"{path}: {describe_error(e)}") from None
        faces = self.faces(rgb)
        if not faces:
            raise UserError(f"{path}: no face found")
        note = ""
        if len(faces) > 1:
            note = (f"{path}: {len(faces)} faces found; using the one chosen by --select {select}")
        face = faces[select_face(faces, rgb.shape[1], rgb.shape[0], select)]
        return self.embed(self.crops(rgb, [face]))[0], face, note


def verify(embedder: FaceEmbedder, a: str | Path, b: str | Path, calibration: Calibration,
           select: str = "center") -> dict:
    fa, face_a, note_a = embedder.photo_face(a, select)
    fb, face_b, note_b = embedder.photo_face(b, select)
    ua, ub = calibration.unit(np.stack([fa, fb]))
    score = float(ua @ ub)
    return {"a": str(a), "b": str(b), "score": score, "threshold": calibration.threshold,
            "same": score >= calibration.threshold, "calibration": calibration.source,
            "notes": [n for n in (note_a, note_b) if n], "box_a": face_a["box"], "box_b": face_b["box"]}


def embed_folder(embedder: FaceEmbedder, root: str | Path, *, aligned: bool = False, select: str = "center",
                 progress: bool = True, desc: str = "embed") -> tuple[list[str], np.ndarray, list[str]]:
    """Features of every image under root: raw photos are detected and aligned
    first (one face each, by select); with aligned=True they are used as they are."""
    from tqdm import tqdm

    root = Path(root)
    if not root.is_dir():
        raise UserError(f"{root}: no such directory")
    rels = list(walk_images(root))
    names, feats, notes = [], [], []
    batch: list[tuple[str, np.ndarray]] = []

    def flush():
        if batch:
            feats.append(embedder.embed([c for _, c in batch]))
            names.extend(r for r, _ in batch)
            batch.clear()

    for rel in tqdm(rels, unit="img", desc=desc, disable=not progress, dynamic_ncols=True):
        try:
            if aligned:
                crop = load_face(str(root / rel))
            else:
                rgb, _ = decode(root / rel)
                faces = embedder.faces(rgb)
                if not faces:
                    notes.append(f"{rel}: no face found")
                    continue
                crop = embedder.crops(rgb, [faces[select_face(faces, rgb.shape[1], rgb.shape[0], select)]])[0]
        except OSError as e:
            notes.append(f"{rel}: {describe_error(e)}")
            continue
        batch.append((rel, crop))
        if len(batch) == embedder.batch_size:
            flush()
    flush()
    width = feature_width(embedder.net, embedder.flip)
    return names, (np.concatenate(feats) if feats else np.zeros((0, width))), notes
