"""Name the faces of photos, folders of photos or videos from a gallery, and draw the answers."""

from __future__ import annotations

import hashlib
from pathlib import Path

import cv2
import numpy as np

from spherecli.core.errors import UserError
from spherecli.core.formats import IDENTITY_COLUMNS
from spherecli.core.images import (IMAGE_EXTENSIONS, VIDEO_EXTENSIONS, describe_error, encode, is_image_name,
                                   walk_images, write_atomic)
from spherecli.core.outputs import Outputs
from spherecli.recognition.recognize import FaceEmbedder

def _frames(embedder: FaceEmbedder, probe: Path, every: int):
    """(source name, frame number or None, RGB image or the error reading it, its faces) for
    a photo, a folder of photos or every `every`-th frame of a video; and how many to expect.
    Photos go through the embedder's one path from file to faces (`FaceEmbedder.photo`)."""
    def photo(path: Path, name: str):
        try:
            return (name, None, *embedder.photo(path))
        except UserError as e:  # a bad probe file is reported, not fatal
            return name, None, OSError(str(e).removeprefix(f"{path}: ")), []

    if probe.is_dir():
        rels = list(walk_images(probe))
        if not rels:
            raise UserError(f"{probe}: no photos ({', '.join(IMAGE_EXTENSIONS)}) under it")
        return (photo(probe / rel, rel) for rel in rels), len(rels)
    if is_video(probe):
        video = cv2.VideoCapture(str(probe))
        if not video.isOpened():
            raise UserError(f"{probe}: cannot open the video")

        def frames():
            n = 0
            while True:
                ok, bgr = video.read()
                if not ok:
                    break
                if n % every == 0:
                    rgb = np.ascontiguousarray(bgr[:, :, ::-1])
                    yield probe.name, n, rgb, embedder.faces(rgb)
                n += 1
            video.release()
        return frames(), -(-int(video.get(cv2.CAP_PROP_FRAME_COUNT)) // every) or None
    if probe.is_file() and is_image_name(probe.name):
        return iter([photo(probe, probe.name)]), 1
    raise UserError(f"{probe}: not a photo, a folder or a video ({', '.join(VIDEO_EXTENSIONS)})")


def is_video(path: Path) -> bool:
    return path.suffix.lower() in VIDEO_EXTENSIONS


def video_rate(probe: Path, every: int) -> float:
    """Frames per second of the annotated video: the source's rate over `every`."""
    video = cv2.VideoCapture(str(probe))
    fps = video.get(cv2.CAP_PROP_FPS) or 25.0
    video.release()
    return fps / every


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


def identify(model, gallery, probe: str | Path, *, every: int = 1, annotate: str | Path | None = None,
             k: int = 1, progress: bool = False):
    """Yield one row per detected probe face: source, frame, box, identity, score, best match
    and the k best candidates;
    a photo or frame without a face gets one row with identity "no_face", and one that
    cannot be read a row with its "error". model is an `api.Model`, gallery its `Gallery`.

    A face takes the best gallery identity when its cosine clears the
    threshold, otherwise "unknown". With annotate, boxes and names are drawn
    into copies of the photos (same relative names under that folder) or
    into a video file at the source's frame rate over `every`.
    """
    from tqdm import tqdm

    probe = Path(probe)
    with Outputs([probe]) as outputs:
        annotate = annotation_target(outputs, probe, annotate)
        frames, total = _frames(model.embedder, probe, every)
        writer = None
        try:
            for source, frame, rgb, faces in tqdm(frames, total=total, desc="identify", disable=not progress,
                                                  unit="frame" if is_video(probe) else "photo",
                                                  dynamic_ncols=True):
                empty = {"source": source, "frame": frame, "box": None, "score": None, "best_match": None,
                         "candidates": []}
                if isinstance(rgb, Exception):
                    yield {**empty, "identity": "error", "error": describe_error(rgb)}
                    continue
                rows = [{"source": source, "frame": frame, "box": m.face.box, "identity": m.identity,
                         "score": m.score, "best_match": m.best_match, "candidates": m.candidates}
                        for m in model.match(rgb, faces, gallery, k)]
                yield from rows or [{**empty, "identity": "no_face"}]
                if annotate is None:
                    continue
                picture = draw(rgb, rows)
                if frame is None:
                    single = not probe.is_dir() and is_image_name(annotate.name)
                    target = annotate if single else annotate / source
                    target.parent.mkdir(parents=True, exist_ok=True)
                    write_atomic(target, encode(picture, target.suffix))
                else:
                    if writer is None:
                        size = (picture.shape[1], picture.shape[0])
                        writer = cv2.VideoWriter(str(annotate), cv2.VideoWriter_fourcc(*"mp4v"),
                                                 video_rate(probe, every), size)
                    writer.write(picture)
        finally:
            if writer is not None:
                writer.release()


def annotation_target(outputs: Outputs, probe: Path, annotate: str | Path | None) -> Path | None:
    """Where the answers are drawn, checked: a video file for a video probe, an image file for
    one photo, else a folder that gets the probes' relative names."""
    if annotate is None:
        return None
    annotate = Path(annotate)
    if is_video(probe):
        return outputs.file(annotate, "video")
    if not probe.is_dir() and is_image_name(annotate.name):
        return outputs.file(annotate, "image")
    return outputs.folder(annotate)


def write_csv(rows, sink) -> list[str]:
    """The rows as CSV (IDENTITY_COLUMNS) into an open text file; returns the read errors met."""
    import csv

    writer = csv.writer(sink)
    writer.writerow(IDENTITY_COLUMNS)
    errors = []
    for row in rows:
        if row.get("error"):
            errors.append(f"{row['source']}: {row['error']}")
        box = [f"{v:.1f}" for v in row["box"]] if row["box"] else [""] * 4
        candidates = ";".join(f"{c.name}={c.score:.4f}" for c in row.get("candidates", ()))
        writer.writerow([row["source"], "" if row["frame"] is None else row["frame"], row.get("track", ""),
                         *box, row["identity"], "" if row["score"] is None else f"{row['score']:.4f}",
                         row["best_match"] or "", candidates])
        sink.flush()
    return errors
