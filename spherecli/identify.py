"""Name the faces of photos, folders of photos or videos from a gallery, and draw the answers."""

from __future__ import annotations

import hashlib
from pathlib import Path

import cv2
import numpy as np

from spherecli import UserError
from spherecli.calibration import Calibration
from spherecli.images import decode, describe_error, is_image_name, walk_images
from spherecli.recognize import FaceEmbedder

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg")


def _frames(probe: Path, every: int):
    """(source name, frame number or None, RGB image or the error reading it) for a photo,
    a folder of photos or every `every`-th frame of a video; and how many to expect."""
    if probe.is_dir():
        rels = list(walk_images(probe))

        def photos():
            for rel in rels:
                try:
                    yield rel, None, decode(probe / rel)[0]
                except (OSError, ValueError) as e:  # a bad probe file is reported, not fatal
                    yield rel, None, e
        return photos(), len(rels)
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
                    yield probe.name, n, np.ascontiguousarray(bgr[:, :, ::-1])
                n += 1
            video.release()
        return frames(), -(-int(video.get(cv2.CAP_PROP_FRAME_COUNT)) // every) or None
    if probe.is_file() and is_image_name(probe.name):
        return iter([(probe.name, None, decode(probe)[0])]), 1
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


def identify(embedder: FaceEmbedder, names: list[str], tmpl: np.ndarray, probe: str | Path,
             calibration: Calibration, *, every: int = 1, annotate: str | Path | None = None,
             progress: bool = False):
    """Yield one row per detected probe face: source, frame, box, identity, score, best match;
    a photo or frame without a face gets one row with identity "no_face", and one that
    cannot be read a row with its "error".

    A face takes the best gallery identity when its cosine clears the
    threshold, otherwise "unknown". With annotate, boxes and names are drawn
    into copies of the photos (same relative names under that folder) or
    into a video file at the source's frame rate over `every`.
    """
    from tqdm import tqdm

    probe = Path(probe)
    check_annotate(probe, annotate)
    frames, total = _frames(probe, every)
    writer = None
    for source, frame, rgb in tqdm(frames, total=total, unit="frame" if is_video(probe) else "photo",
                                   desc="identify", disable=not progress, dynamic_ncols=True):
        empty = {"source": source, "frame": frame, "box": None, "score": None, "best_match": None}
        if isinstance(rgb, Exception):
            yield {**empty, "identity": "error", "error": describe_error(rgb)}
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
        yield from rows or [{**empty, "identity": "no_face"}]
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
                                             video_rate(probe, every), (picture.shape[1], picture.shape[0]))
                writer.write(picture)
    if writer is not None:
        writer.release()


def check_annotate(probe: Path, annotate: str | Path | None) -> None:
    if annotate and is_video(Path(probe)) and not is_video(Path(annotate)):
        raise UserError(f"--annotate {annotate}: a video probe is drawn into a video file "
                        f"({', '.join(VIDEO_EXTENSIONS)})")


CSV_COLUMNS = ("source", "frame", "x1", "y1", "x2", "y2", "identity", "score", "best_match")


def write_csv(rows, sink) -> list[str]:
    """The rows as CSV (CSV_COLUMNS) into an open text file; returns the read errors met."""
    import csv

    writer = csv.writer(sink)
    writer.writerow(CSV_COLUMNS)
    errors = []
    for row in rows:
        if row.get("error"):
            errors.append(f"{row['source']}: {row['error']}")
        box = [f"{v:.1f}" for v in row["box"]] if row["box"] else [""] * 4
        writer.writerow([row["source"], "" if row["frame"] is None else row["frame"], *box, row["identity"],
                         "" if row["score"] is None else f"{row['score']:.4f}", row["best_match"] or ""])
        sink.flush()
    return errors
