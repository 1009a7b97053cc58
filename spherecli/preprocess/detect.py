"""Stage 1: find faces and their five landmarks with MTCNN, writing a JSON Lines manifest.

The detector is MTCNN with facenet-pytorch's weights and the original
SphereFace settings (spherecli/preprocess/mtcnn.py). What this module adds is
throughput and safety on real trees: images of similar sizes are batched through
MTCNN, several worker processes run at once, records are appended per batch
so a killed run resumes where it stopped, and a bad file becomes an `error`
record instead of a crash.
"""

from __future__ import annotations

import ctypes
import os
import time
import zlib
from pathlib import Path

import cv2
import numpy as np
import torch
from tqdm import tqdm

from spherecli.core.errors import UserError
from spherecli.core.devices import resolve_device
from spherecli.core.formats import (JsonlAppender, latest_status, manifest_header, manifest_summary,
                                    read_manifest)
from spherecli.core.images import (IMAGE_EXTENSIONS, MAX_PIXELS, as_rgb, decode, describe_error, fit_side,
                                   identity_of, oriented_size, walk_images)
from spherecli.preprocess.mtcnn import MTCNN
from spherecli.core.outputs import Outputs, locked
from spherecli.core.parallel import cpu_count, map_batches
from spherecli.core.config import DetectSettings

# A face whose box runs past the frame by more than this fraction of the image's
# side is detected again on a padded copy; the copy gets this fraction of the
# long side in black on every side.
BORDER_TRIGGER = 0.05
BORDER_PAD = 0.25
# Images whose sizes differ by less than this many pixels are batched together, padded
# to the largest (CelebA's photos come in 90 sizes between 178 and 230 pixels).
SIZE_STEP = 32
# What manifests written before a setting existed meant by it.
LEGACY_SETTINGS = {"border": "none"}


class FaceDetector:
    """MTCNN (spherecli/preprocess/mtcnn.py) with the original settings, border handling and face
    selection."""

    def __init__(self, settings: DetectSettings | None = None, device: str = "cpu"):
        self.settings = settings or DetectSettings()
        s = self.settings
        self.mtcnn = MTCNN(s.min_face, s.thresholds, s.factor, device)

    def detect(self, images: list[np.ndarray]) -> list[list[dict]]:
        """All faces in each of a list of RGB arrays (similar sizes batch best).

        MTCNN regresses a face that fills the frame to a box that runs far
        past the image, and its landmarks slide up the face (eyes on the
        forehead, the mouth on the nose), or misses it. With border
        "redetect" an image where a box leaves the frame by more than
        BORDER_TRIGGER of the side, or where no face was found, is detected
        again on a copy with a black border of BORDER_PAD of its long side;
        "pad" detects every image that way; "none" is the original's plain
        detection. Faces found on a padded copy are marked `padded`, their
        coordinates those of the original image.
        """
        if self.settings.border == "pad":
            return self._padded(images)
        found = self._detect(images)
        if self.settings.border == "redetect":
            redo = [i for i, (image, faces) in enumerate(zip(images, found))
                    if not faces or any(outside(f["box"], image.shape[1], image.shape[0]) > BORDER_TRIGGER
                                        for f in faces)]
            for i, faces in zip(redo, self._padded([images[i] for i in redo]) if redo else []):
                if faces:
                    found[i] = faces
        return found

    def _padded(self, images: list[np.ndarray]) -> list[list[dict]]:
        pads = [round(BORDER_PAD * max(im.shape[:2])) for im in images]
        copies = [cv2.copyMakeBorder(image, pad, pad, pad, pad, cv2.BORDER_CONSTANT, value=0)
                  for image, pad in zip(images, pads)]
        return [[{"box": [round(v - pad, 2) for v in f["box"]], "score": f["score"],
                  "landmarks": [[round(x - pad, 4), round(y - pad, 4)] for x, y in f["landmarks"]],
                  "padded": True} for f in faces]
                for pad, faces in zip(pads, self._detect(copies))]

    def _detect(self, images: list[np.ndarray]) -> list[list[dict]]:
        return [[{"box": [round(float(v), 2) for v in box],
                  "score": round(float(score), 6),
                  "landmarks": [[round(float(x), 4), round(float(y), 4)] for x, y in marks]}
                 for box, score, marks in zip(*found)]
                for found in self.mtcnn(images)]

    def detect_one(self, image: np.ndarray) -> list[dict]:
        h, w = image.shape[:2]
        if min(h, w) < self.settings.min_face:
            return []
        return self.detect([image])[0]

    def photo(self, source) -> tuple[np.ndarray, list[dict]]:
        """A photo and all its faces, exactly as `detect` and `align` see it: EXIF
        orientation applied, detected at most max_side pixels long, the faces in the photo's
        full-size coordinates, which `align` crops from. A path, or an RGB array or PIL
        image (downscaled for detection the same way)."""
        s = self.settings
        if not isinstance(source, (str, Path)):
            rgb = as_rgb(source)
            small, scale = fit_side(rgb, s.max_side)
        else:
            try:
                small, info = decode(source, exif=s.exif, max_side=s.max_side)
                rgb = small if info["scale"] == 1.0 else decode(source, exif=s.exif)[0]
            except (OSError, ValueError) as e:
                raise UserError(f"{source}: {describe_error(e)}") from None
            scale = info["scale"]
        return rgb, [scale_face(f, scale) for f in self.detect_one(small)]


def outside(box, width: int, height: int) -> float:
    """How far a box runs past the frame, as a fraction of the image side it crosses."""
    x1, y1, x2, y2 = box
    return max(-x1 / width, (x2 - width) / width, -y1 / height, (y2 - height) / height, 0.0)


def select_face(faces: list[dict], width: int, height: int, rule: str = "center") -> int:
    """Index of the face to keep when several are found."""
    if rule == "largest":
        return max(range(len(faces)), key=lambda i: (faces[i]["box"][2] - faces[i]["box"][0])
                   * (faces[i]["box"][3] - faces[i]["box"][1]))
    if rule == "confident":
        return max(range(len(faces)), key=lambda i: faces[i]["score"])
    cx, cy = width / 2, height / 2
    return min(range(len(faces)), key=lambda i: ((faces[i]["box"][0] + faces[i]["box"][2]) / 2 - cx) ** 2
               + ((faces[i]["box"][1] + faces[i]["box"][3]) / 2 - cy) ** 2)


def scale_face(face: dict, scale: float) -> dict:
    if scale == 1.0:
        return face
    return {**face, "box": [round(v / scale, 2) for v in face["box"]],
            "landmarks": [[round(x / scale, 4), round(y / scale, 4)] for x, y in face["landmarks"]]}


# --------------------------------------------------------------------------- worker side

_worker: dict = {}


def _init_worker(settings: dict, device: str, threads: int | None, max_pixels: int) -> None:
    if threads:
        torch.set_num_threads(threads)
    _keep_freed_memory()
    _worker["detector"] = FaceDetector(DetectSettings(**settings), device)
    _worker["max_pixels"] = max_pixels


def _keep_freed_memory() -> None:
    """Let glibc's malloc keep freed blocks of up to 32 MB for reuse in this process.

    MTCNN allocates and frees its activations, megabytes each, hundreds of times per
    batch; by default glibc hands many of them back to the kernel and the next call
    page-faults them in again. Keeping them made single-threaded detection 7-20%
    faster (docs/benchmarks.md); a process keeps the memory of its largest batch.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc: nothing to tune
        return
    libc.mallopt(-3, 32 << 20)    # M_MMAP_THRESHOLD: larger blocks are mapped afresh each time
    libc.mallopt(-1, 512 << 20)   # M_TRIM_THRESHOLD: free memory kept at the heap's top


def _detect_batch(job: tuple[str, list[str]]) -> list[dict]:
    """Decode and detect a batch of images; returns one record per image."""
    root, rel_paths = job
    detector: FaceDetector = _worker["detector"]
    s = detector.settings
    records, decoded = [], []
    for rel in rel_paths:
        rec = {"type": "image", "path": rel, "identity": identity_of(rel)}
        records.append(rec)
        try:
            rgb, info = decode(os.path.join(root, rel), exif=s.exif, max_side=s.max_side,
                               max_pixels=_worker["max_pixels"])
        except Exception as e:  # noqa: BLE001 - any failure of one file is that file's record
            rec.update(status="error", error=describe_error(e))
            continue
        rec.update(width=info["width"], height=info["height"], orientation=info["orientation"])
        if info["scale"] != 1.0:
            rec["scale"] = round(info["scale"], 6)
        if min(rgb.shape[:2]) < s.min_face:
            rec.update(status="error", error=f"image is {rgb.shape[1]}x{rgb.shape[0]}, smaller "
                                            f"than the minimum face size ({s.min_face} px)")
            continue
        decoded.append((rec, rgb, info["scale"]))

    try:
        found = detector.detect([rgb for _, rgb, _ in decoded]) if decoded else []
    except Exception:  # noqa: BLE001 - find which image breaks the batch
        found = []
        for _, rgb, _ in decoded:
            try:
                found.append(detector.detect([rgb])[0])
            except Exception as e:  # noqa: BLE001
                found.append(e)
    for (rec, _, scale), faces in zip(decoded, found):
        if isinstance(faces, Exception):
            rec.update(status="error", error=f"detector failed: {describe_error(faces)}")
            continue
        faces = [scale_face(f, scale) for f in faces]
        rec["faces"] = len(faces)
        if not faces:
            rec.update(status="no_face")
            continue
        best = faces[select_face(faces, rec["width"], rec["height"], s.select)]
        rec.update(status="ok", **best)
        if s.all_faces:
            rec["all"] = faces
    return records


# --------------------------------------------------------------------------- main side

def _in_shard(rel: str, shard: tuple[int, int] | None) -> bool:
    # A hash of the path, not its position, so every process agrees on the
    # split without coordinating, whatever order it walks the tree in.
    return shard is None or zlib.crc32(rel.encode("utf-8")) % shard[1] == shard[0] - 1


def _size_batches(root: str, paths: list[str], settings: DetectSettings, batch_size: int):
    """Group paths by decoded image size (from headers), to within SIZE_STEP pixels, so
    MTCNN sees full batches that waste little on padding.

    Memory stays bounded: at most `window` paths wait for their batch to fill.
    """
    window = 64 * batch_size
    buckets: dict = {}
    waiting = 0
    for rel in paths:
        try:
            w, h = oriented_size(os.path.join(root, rel), settings.exif)
            s = min(1.0, settings.max_side / max(w, h))
            key = (-(-round(w * s) // SIZE_STEP), -(-round(h * s) // SIZE_STEP))
        except Exception:  # noqa: BLE001 - the worker will report it
            key = None
        bucket = buckets.setdefault(key, [])
        bucket.append(rel)
        waiting += 1
        if len(bucket) >= batch_size:
            waiting -= len(bucket)
            yield root, buckets.pop(key)
        elif waiting > window:
            key = max(buckets, key=lambda k: len(buckets[k]))
            waiting -= len(buckets[key])
            yield root, buckets.pop(key)
    for bucket in buckets.values():
        for i in range(0, len(bucket), batch_size):
            yield root, bucket[i:i + batch_size]


def default_workers(device: str) -> int:
    # On CPU one single-threaded MTCNN per core beats one MTCNN using every
    # core (small convolutions parallelise badly); on a GPU two processes
    # keep it fed while each decodes its next batch.
    return cpu_count() if device == "cpu" else 2


def _resume_state(manifest: Path, header: dict, retry_errors: bool) -> set[str]:
    """Paths already done in an existing manifest, after checking it matches this run."""
    if not manifest.exists() or manifest.stat().st_size == 0:
        return set()
    old, _ = read_manifest(manifest)
    if old.get("root") != header["root"]:
        raise UserError(f"{manifest} was written for another folder ({old.get('root')}); "
                        "use another output file")
    before = {**LEGACY_SETTINGS, **old.get("settings", {})}
    now = header["settings"]
    changed = [f"{k} {before.get(k)} -> {now.get(k)}" for k in {**before, **now}
               if before.get(k) != now.get(k)]
    if changed:
        raise UserError(f"{manifest} was written with other settings ({'; '.join(changed)}); give the "
                        "same options to continue it, or another output file to detect anew")
    return {p for p, status in latest_status(manifest).items()
            if not (retry_errors and status == "error")}


def parse_shard(text: str | tuple | None) -> tuple[int, int] | None:
    """'K/N' -> (K, N): the K-th of N parts."""
    if text is None or isinstance(text, tuple):
        shard = text
    else:
        try:
            shard = tuple(int(v) for v in text.split("/"))
        except ValueError:
            shard = ()
        if len(shard) != 2:
            raise UserError(f"`shard`: expected K/N, e.g. 1/4, got {text!r}")
    if shard is not None and not 1 <= shard[0] <= shard[1]:
        raise UserError(f"`shard` {shard[0]}/{shard[1]}: K must be between 1 and N")
    return shard


def detect_tree(root: str | Path, manifest: str | Path | None = None, settings: DetectSettings | None = None,
                *, device: str = "cpu", batch_size: int = 16, workers: int | None = None,
                shard: str | tuple[int, int] | None = None, strict: bool = False,
                retry_errors: bool = False, max_pixels: int = MAX_PIXELS, progress: bool = True) -> dict:
    """Detect faces in every image under root, appending to manifest (by default
    ROOT.landmarks.jsonl). Returns the summary, with the manifest's path."""
    settings = settings or DetectSettings()
    root = Path(root)
    manifest = Path(manifest or str(root).rstrip("/") + ".landmarks.jsonl")
    if not root.is_dir():
        raise UserError(f"{root}: no such directory")
    shard = parse_shard(shard)
    device = resolve_device(device)
    header_settings = settings.as_json() | ({"shard": f"{shard[0]}/{shard[1]}"} if shard else {})
    header = manifest_header(root, header_settings)
    images = [p for p in walk_images(root) if _in_shard(p, shard)]
    if not images:
        raise UserError(f"{root}: no images ({', '.join(IMAGE_EXTENSIONS)}) under it"
                        + (f" in shard {shard[0]}/{shard[1]}" if shard else ""))
    with Outputs([root]) as outputs, locked(outputs.file(manifest, "manifest"), "detect"):
        done = _resume_state(manifest, header, retry_errors)
        writer = JsonlAppender(manifest)
        if manifest.stat().st_size == 0:
            writer.write([header])
        pending = [p for p in images if p not in done]
        # A handful of images is done before worker processes would have started.
        workers = 1 if len(pending) <= batch_size else (workers or default_workers(device))
        jobs = _size_batches(str(root), pending, settings, batch_size)
        init_args = (settings.as_json(), device, 1 if workers > 1 and device == "cpu" else None, max_pixels)
        start, written = time.perf_counter(), 0
        bar = tqdm(total=len(pending), unit="img", desc="detect", disable=not progress or not pending,
                   dynamic_ncols=True)
        threads = torch.get_num_threads()  # this process detects too while the workers start
        try:
            with map_batches(_detect_batch, jobs, workers, _init_worker, init_args,
                             start_here=True) as results:
                for records in results:
                    writer.write(records)
                    written += len(records)
                    bar.update(len(records))
                    bad = next((r for r in records if r["status"] == "error"), None)
                    if strict and bad:
                        raise UserError(f"{root / bad['path']}: {bad['error']} (`strict` stops at the "
                                        "first bad file; the records so far are saved)")
            seconds = time.perf_counter() - start
            summary = manifest_summary(manifest)
            summary.update(new=written, seconds=round(seconds, 2),
                           images_per_s=round(written / seconds, 2) if written else 0.0)
            writer.write([{"type": "summary", **summary}])
            return {"manifest": str(manifest), **summary}
        finally:
            torch.set_num_threads(threads)
            bar.close()
            writer.close()
