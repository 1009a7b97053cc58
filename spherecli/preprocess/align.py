"""Stage 2: warp each face onto the reference landmarks (112x96 by default).

The transform is the least-squares non-reflective similarity (rotation,
uniform scale, translation) taking the five detected points onto the five
reference points, as Matlab's `cp2tform(..., 'similarity')` fits it; the
image is then warped with bilinear interpolation.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from spherecli.core.errors import UserError
from spherecli.core.formats import is_manifest, read_landmark_file, read_manifest
from spherecli.core.images import decode, describe_error, encode, is_image_name, write_atomic
from spherecli.core.outputs import Outputs
from spherecli.core.parallel import cpu_count, map_batches
from spherecli.core.registry import NO_FACE_RULES, REFERENCES
from spherecli.core.validate import Range

# The original's reference points for a 112 (rows) x 96 (columns) crop, (x, y).
REFERENCE_112x96 = np.array(REFERENCES["sphereface"][1], dtype=np.float64)


# A crop's side, in pixels: 8 is less than any network takes, 1024 already a 3 MB crop.
CROP_SIDE = Range(8, 1024, integer=True)


def parse_size(text: str) -> tuple[int, int]:
    """'112x96' -> (112, 96): height by width, as the original names its crops."""
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise UserError(f"size {text!r}: expected HEIGHTxWIDTH, e.g. 112x96") from None
    return check_size((h, w))


def check_size(size) -> tuple[int, int]:
    return tuple(CROP_SIDE.check(v, f"crop size {size[0]}x{size[1]}") for v in size)


def reference_points(size: tuple[int, int] = (112, 96), reference: str = "sphereface") -> np.ndarray:
    """Reference landmarks for a crop of (height, width).

    A reference set's points are scaled by the height ratio and centred
    horizontally: the SphereFace points at 112x112 move 8 px right, at
    224x192 they double.
    """
    (h0, w0), points = REFERENCES[reference]
    h, w = size
    s = h / h0
    return np.array(points, dtype=np.float64) * s + np.array([(w - w0 * s) / 2.0, 0.0])


def similarity_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """2x3 matrix of the least-squares non-reflective similarity taking src onto dst.

    Closed form on centred points: the linear part is [[a, -b], [b, a]] with
    (a, b) the normalised dot and cross sums, which is the solution of the
    over-determined system cp2tform solves; a reflection is never produced.
    """
    src = np.asarray(src, dtype=np.float64)
    dst = np.asarray(dst, dtype=np.float64)
    ms, md = src.mean(axis=0), dst.mean(axis=0)
    s, d = src - ms, dst - md
    norm = (s ** 2).sum()
    if norm < 1e-12:
        raise ValueError("landmarks are all at one point")
    a = (s * d).sum() / norm
    b = (s[:, 0] * d[:, 1] - s[:, 1] * d[:, 0]).sum() / norm
    linear = np.array([[a, -b], [b, a]])
    return np.hstack([linear, (md - linear @ ms)[:, None]])


# Landmarks and reference points are in Matlab's pixel convention, where the
# first pixel's centre is (1, 1): the original's reference points are, and
# so are MTCNN's outputs (facenet-pytorch kept the Matlab code's arithmetic).
# OpenCV puts the first pixel's centre at (0, 0), so both shift by one.
MATLAB_ORIGIN = 1.0


def align_face(rgb: np.ndarray, landmarks, size: tuple[int, int] = (112, 96),
               reference: str = "sphereface") -> np.ndarray:
    """Crop one face: RGB image + its five (x, y) landmarks -> aligned RGB crop."""
    m = similarity_transform(np.asarray(landmarks, dtype=np.float64) - MATLAB_ORIGIN,
                             reference_points(size, reference) - MATLAB_ORIGIN)
    return cv2.warpAffine(rgb, m, (size[1], size[0]), flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=0)


# --------------------------------------------------------------------------- whole trees

def _records(source: Path, root: str | None):
    """(root, records) of a manifest or a landmark text file."""
    if not source.is_file():
        raise UserError(f"{source}: no such file")
    if is_image_name(source.name):
        raise UserError(f"{source} is a photo; align reads the landmarks that `sphereface detect "
                        "FOLDER` writes (FOLDER.landmarks.jsonl), or a landmark text file")
    if is_manifest(source):
        header, records = read_manifest(source)
        return (root or header["root"]), header["settings"].get("exif", True), records
    if root is None:
        raise UserError(f"{source} is a landmark text file: pass `root`, the folder its paths "
                        "are relative to")
    return root, True, read_landmark_file(source)


_job: dict = {}


def _init_worker(job: dict) -> None:
    cv2.setNumThreads(1)
    _job.update(job)


def _align_batch(batch: list[tuple[str, bool, str, list]]) -> list[tuple[str, str]]:
    """Align a batch of (root, exif, path, landmarks); returns (path, outcome) pairs."""
    out, size, quality, reference = Path(_job["out"]), _job["size"], _job["jpeg_quality"], _job["reference"]
    results = []
    for root, exif, rel, landmarks in batch:
        try:
            rgb, _ = decode(os.path.join(root, rel), exif=exif)
            face = align_face(rgb, landmarks, size, reference)
            target = out / rel
            write_atomic(target, encode(face[:, :, ::-1], target.suffix, quality))
            results.append((rel, "aligned"))
        except Exception as e:  # noqa: BLE001 - one bad file must not stop the run
            results.append((rel, f"error: {describe_error(e)}"))
    return results


def default_output(source: Path, root: str | None, size: tuple[int, int], reference: str) -> Path:
    """<image root>-112X96, as the original names its aligned trees (other references are named)."""
    if root is None and not (source.is_file() and is_manifest(source)):
        raise UserError("pass -o OUTPUT: landmark text files do not say where their images are")
    base = str(root or read_manifest(source)[0]["root"]).rstrip("/")
    return Path(f"{base}-{size[0]}X{size[1]}" + ("" if reference == "sphereface" else f"-{reference}"))


def align_manifests(sources: list[str | Path], out: str | Path | None = None, *, root: str | None = None,
                    size: tuple[int, int] | None = None, reference: str = "sphereface",
                    jpeg_quality: int = 95, workers: int | None = None, overwrite: bool = False,
                    no_face: str = "skip", progress: bool = True) -> dict:
    """Align every face with landmarks in the given manifests or landmark files into out.

    Images where detection found no face are skipped and counted (the
    original's rule), or with no_face="mean" cropped at the mean landmark
    position of the same source's images, scaled to the image: for
    benchmark sets of similar framing (LFW) where every image must be scored.
    """
    if no_face not in NO_FACE_RULES:
        raise UserError(f"no_face must be one of {', '.join(NO_FACE_RULES)}, got {no_face!r}")
    if reference not in REFERENCES:
        raise UserError(f"reference must be one of {', '.join(REFERENCES)}, got {reference!r}")
    size = check_size(size or REFERENCES[reference][0])
    opened = [_records(Path(source), root) for source in sources]
    out = Path(out) if out is not None else default_output(Path(sources[0]), root, size, reference)
    with Outputs([*sources, *{r for r, _, _ in opened}], overwrite) as outputs:
        outputs.folder(out)
        return _align(opened, out, size, reference, jpeg_quality, workers, overwrite, no_face, progress)


def _align(opened, out: Path, size, reference, jpeg_quality, workers, overwrite, no_face, progress) -> dict:
    counts = {"faces": 0, "aligned": 0, "existing": 0, "no_landmarks": 0, "mean_landmarks": 0,
              "error": 0}
    todo = []

    def add(src_root, exif, rel, landmarks):
        if not overwrite and (out / rel).exists():
            counts["existing"] += 1
        else:
            todo.append((src_root, exif, rel, landmarks))

    for src_root, exif, records in opened:
        # Where faces sit in this source's images, as fractions of the image size.
        relative_sum, sized, faceless = np.zeros((5, 2)), 0, []
        for rec in records:
            if rec["status"] == "ok" and rec.get("landmarks"):
                counts["faces"] += 1
                add(src_root, exif, rec["path"], rec["landmarks"])
                if "width" in rec:
                    relative_sum += np.array(rec["landmarks"]) / (rec["width"], rec["height"])
                    sized += 1
            elif no_face == "mean" and rec["status"] == "no_face":
                faceless.append(rec)
            else:
                counts["no_landmarks"] += 1
        if faceless and not sized:
            counts["no_landmarks"] += len(faceless)  # no face in this source to take the mean of
            faceless = []
        for rec in faceless:
            counts["mean_landmarks"] += 1
            mean = relative_sum / sized * (rec["width"], rec["height"])
            add(src_root, exif, rec["path"], mean.tolist())

    batches = [todo[i:i + 64] for i in range(0, len(todo), 64)]
    workers = 1 if len(batches) < 2 else (workers or cpu_count())
    job = {"out": str(out), "size": size, "reference": reference, "jpeg_quality": jpeg_quality}
    errors = []
    start = time.perf_counter()
    with tqdm(total=len(todo), unit="img", desc="align", disable=not progress or not todo,
              dynamic_ncols=True) as bar, \
            map_batches(_align_batch, batches, workers, _init_worker, (job,)) as results:
        for batch in results:
            for rel, outcome in batch:
                if outcome == "aligned":
                    counts["aligned"] += 1
                else:
                    counts["error"] += 1
                    errors.append(f"{rel}: {outcome.removeprefix('error: ')}")
            bar.update(len(batch))
    seconds = time.perf_counter() - start
    if todo and not counts["aligned"]:
        raise UserError(f"none of the {len(todo)} images could be aligned ({errors[0]}); "
                        "are the images where the manifest's root or `root` says?")
    counts.update(output=str(out), seconds=round(seconds, 2),
                  images_per_s=round(counts["aligned"] / seconds, 1) if counts["aligned"] else 0.0,
                  errors=errors[:20])
    return counts
