"""Using a trained model on photos: verify two faces, identify against a gallery,
embed a folder, and the angular Fisher score.

Raw photos go through the same detect and align steps as training data;
features are compared by cosine similarity after subtracting the mean
feature that `evaluate` measured on its benchmark (its "calibration"),
so the threshold chosen there means the same thing here.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch

from spherecli import UserError
from spherecli.align import align_face
from spherecli.config import DEFAULT_THRESHOLD
from spherecli.data import load_face, to_chw
from spherecli.detect import DetectSettings, FaceDetector, select_face
from spherecli.features import embed, feature_width, load_network, unit
from spherecli.images import decode, describe_error, is_image_name, walk_images

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg")


@dataclass
class Calibration:
    """How to score: the mean feature to subtract, the threshold, the flip mode, and the
    impostor scores of the calibration set, which say what a threshold's false-accept
    rate is."""
    mean: np.ndarray | None
    threshold: float
    flip: str
    source: str
    impostors: np.ndarray | None = None   # sorted different-person scores of the calibration set

    @classmethod
    def load(cls, model: str | Path, result: str | Path | None = None,
             threshold: float | None = None, far: float | None = None) -> "Calibration":
        """From an evaluation JSON (given, or MODEL.lfw.json next to the model); far
        chooses the threshold that accepts at most that fraction of its impostors."""
        path = Path(result) if result else Path(str(Path(model).with_suffix("")) + ".lfw.json")
        cal = cls(None, DEFAULT_THRESHOLD, "concat", "default")
        if path.is_file():
            try:
                c = json.loads(path.read_text())["calibration"]
                cal = cls(np.array(c["mean"]) if c["mean"] is not None else None, c["threshold"],
                          c["flip"], str(path),
                          np.array(c["impostors"]) if "impostors" in c else None)
            except (ValueError, KeyError, TypeError):
                raise UserError(f"{path}: not an evaluation result with a calibration") from None
        elif result:
            raise UserError(f"{path}: no such file")
        if far is not None:
            cal.threshold, cal.source = cal.threshold_at_far(far), f"FAR {far:g} on {cal.source}"
        if threshold is not None:
            cal.threshold, cal.source = threshold, "--threshold"
        return cal

    def far_of(self, threshold: float) -> float | None:
        """The fraction of the calibration set's impostor pairs that score at or above threshold."""
        if self.impostors is None or not len(self.impostors):
            return None
        return float(len(self.impostors) - np.searchsorted(self.impostors, threshold, side="left")) \
            / len(self.impostors)

    def threshold_at_far(self, far: float) -> float:
        """The lowest threshold that accepts at most far of the calibration set's impostors."""
        if self.impostors is None or not len(self.impostors):
            raise UserError(f"{self.source}: no impostor scores to choose a threshold by false-accept "
                            "rate; run `sphereface evaluate` again to calibrate the model")
        n = len(self.impostors)
        allowed = int(np.floor(far * n + 1e-9))
        if allowed >= n:
            return -1.0
        return float(np.nextafter(self.impostors[n - allowed - 1], np.inf))

    def unit(self, features: np.ndarray) -> np.ndarray:
        """Features made ready for cosine scoring: centred, then unit length."""
        return unit(features, self.mean)


class FaceEmbedder:
    """Photo -> faces -> aligned crops -> features, with one network and one detector."""

    def __init__(self, model: str | Path, *, device: str = "cpu", flip: str = "concat",
                 settings: DetectSettings | None = None, batch_size: int = 64,
                 input_spec: str | None = None):
        self.net = load_network(model, device=device, input_spec=input_spec)
        self.device = device
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
        rgb, _ = decode(path)
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


# --------------------------------------------------------------------------- gallery

def _file_key(path: Path) -> str:
    st = path.stat()
    return f"{st.st_size}:{st.st_mtime_ns}"


def _model_key(model: str | Path, embedder: FaceEmbedder) -> str:
    h = hashlib.sha1()
    with open(model, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    h.update(json.dumps([embedder.flip, embedder.settings.as_json(), embedder.net.spec.as_json()]).encode())
    return h.hexdigest()


def gallery(embedder: FaceEmbedder, root: str | Path, model: str | Path, *,
            cache: str | Path | None = None, select: str = "center"):
    """One feature per gallery photo (folders = people), reusing a cache keyed by the model.

    Returns (person of each photo, features, notes). Photos with no face
    are left out with a note.
    """
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"gallery {root}: no such directory")
    cache = Path(cache) if cache else root / ".sphereface-gallery.npz"
    key = _model_key(model, embedder)
    known = {}
    if cache.is_file():
        with np.load(cache) as c:
            if str(c["model"]) == key:
                known = {(str(p), str(k)): f for p, k, f in zip(c["paths"], c["keys"], c["features"])}
    people, paths, keys, feats, notes = [], [], [], [], []
    for rel in walk_images(root):
        person = rel.split("/")[0] if "/" in rel else None
        if person is None:
            continue
        k = _file_key(root / rel)
        if (rel, k) in known:
            f = known[(rel, k)]
        else:
            try:
                f, _, note = embedder.photo_face(root / rel, select)
            except (UserError, OSError, ValueError) as e:
                notes.append(str(e) if isinstance(e, UserError) else f"{root / rel}: {describe_error(e)}")
                continue
            if note:
                notes.append(note)
        people.append(person)
        paths.append(rel)
        keys.append(k)
        feats.append(f)
    if not feats:
        raise UserError(f"gallery {root}: no face found in any person's folder (expected PERSON/photo.jpg)")
    feats = np.stack(feats)
    try:
        np.savez(cache, model=key, paths=np.array(paths), keys=np.array(keys), features=feats)
    except OSError:
        notes.append(f"could not write the gallery cache {cache}")
    return people, feats, notes


def templates(people: list[str], features: np.ndarray, calibration: Calibration):
    """One unit template per person: the mean of their photos' unit features."""
    names = sorted(set(people))
    unit = calibration.unit(features)
    t = np.stack([unit[[p == n for p in people]].mean(axis=0) for n in names])
    return names, t / np.linalg.norm(t, axis=1, keepdims=True)


# --------------------------------------------------------------------------- identify

def _frames(probe: Path, every: int):
    """(source name, frame number or None, RGB image) for a photo, a folder or a video."""
    if probe.is_dir():
        for rel in walk_images(probe):
            try:
                yield rel, None, decode(probe / rel)[0]
            except Exception as e:  # noqa: BLE001 - a bad probe file is reported, not fatal
                yield rel, None, e
    elif probe.suffix.lower() in VIDEO_EXTENSIONS:
        video = cv2.VideoCapture(str(probe))
        if not video.isOpened():
            raise UserError(f"{probe}: cannot open the video")
        n = 0
        while True:
            ok, bgr = video.read()
            if not ok:
                break
            if n % every == 0:
                yield probe.name, n, np.ascontiguousarray(bgr[:, :, ::-1])
            n += 1
        video.release()
    elif probe.is_file() and is_image_name(probe.name):
        yield probe.name, None, decode(probe)[0]
    else:
        raise UserError(f"{probe}: not a photo, a folder or a video ({', '.join(VIDEO_EXTENSIONS)})")


def colour(name: str) -> tuple[int, int, int]:
    """A stable, bright BGR colour per identity; unknown faces are grey."""
    if name == "unknown":
        return (160, 160, 160)
    hue = int(hashlib.md5(name.encode()).hexdigest()[:4], 16) % 180
    hsv = np.uint8([[[hue, 200, 255]]])
    return tuple(int(v) for v in cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)[0, 0])


def draw(rgb: np.ndarray, rows: list[dict]) -> np.ndarray:
    bgr = np.ascontiguousarray(rgb[:, :, ::-1])
    thick = max(1, round(max(bgr.shape[:2]) / 300))
    for r in rows:
        c = colour(r["identity"])
        x1, y1, x2, y2 = (int(round(v)) for v in r["box"])
        cv2.rectangle(bgr, (x1, y1), (x2, y2), c, thick)
        label = f"{r['identity']} {r['score']:.2f}"
        cv2.putText(bgr, label, (x1, max(12, y1 - 4)), cv2.FONT_HERSHEY_SIMPLEX, 0.4 * thick, c,
                    thick, cv2.LINE_AA)
    return bgr


def identify(embedder: FaceEmbedder, names: list[str], tmpl: np.ndarray, probe: str | Path,
             calibration: Calibration, *, every: int = 1, annotate: str | Path | None = None):
    """Yield one row per detected probe face: source, frame, box, identity, score.

    A face takes the best gallery identity when its cosine clears the
    threshold, otherwise "unknown". With annotate, boxes and names are drawn
    into copies of the photos (same relative names under that folder) or
    into a video file.
    """
    probe = Path(probe)
    writer = None
    for source, frame, rgb in _frames(probe, every):
        if isinstance(rgb, Exception):
            yield {"source": source, "frame": None, "box": None, "identity": None, "score": None,
                   "error": describe_error(rgb)}
            continue
        faces = embedder.faces(rgb)
        feats = calibration.unit(embedder.embed(embedder.crops(rgb, faces))) if faces else []
        rows = []
        for face, f in zip(faces, feats):
            scores = tmpl @ f
            best = int(np.argmax(scores))
            score = float(scores[best])
            rows.append({"source": source, "frame": frame, "box": face["box"],
                         "identity": names[best] if score >= calibration.threshold else "unknown",
                         "score": score, "best_match": names[best]})
        yield from rows
        if annotate:
            picture = draw(rgb, rows)
            if frame is None:
                # A folder of probes gets a folder of pictures; one photo, a picture
                # (or a folder, if annotate names no image file).
                single = not probe.is_dir() and is_image_name(str(annotate))
                target = Path(annotate) if single else Path(annotate) / source
                target.parent.mkdir(parents=True, exist_ok=True)
                cv2.imwrite(str(target), picture)
            else:
                if writer is None:
                    Path(annotate).parent.mkdir(parents=True, exist_ok=True)
                    writer = cv2.VideoWriter(str(annotate), cv2.VideoWriter_fourcc(*"mp4v"),
                                             25.0 / every, (picture.shape[1], picture.shape[0]))
                writer.write(picture)
    if writer is not None:
        writer.release()


# --------------------------------------------------------------------------- embed, AFS

def embed_folder(embedder: FaceEmbedder, root: str | Path, *, aligned: bool = False,
                 select: str = "center", progress: bool = True) -> tuple[list[str], np.ndarray, list[str]]:
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

    for rel in tqdm(rels, unit="img", desc="embed", disable=not progress, dynamic_ncols=True):
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


def angular_fisher_score(features: np.ndarray, labels) -> float:
    """The paper appendix's AFS = S_w / S_b (lower is more discriminative).

    S_w = sum_i sum_{x in class i} (1 - cos(x, m_i)), S_b = sum_i n_i (1 - cos(m_i, m)),
    m_i the mean feature of class i, m the mean of all features.
    """
    features = np.asarray(features, dtype=np.float64)
    labels = np.asarray(labels)

    def cos(a, b):
        return (a @ b) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b))

    overall = features.mean(axis=0)
    within = between = 0.0
    for c in np.unique(labels):
        x = features[labels == c]
        centre = x.mean(axis=0)
        within += np.sum(1 - cos(x, centre))
        between += len(x) * (1 - cos(centre, overall))
    if between <= 0:
        raise UserError("the angular Fisher score needs at least two classes with different means")
    return float(within / between)
