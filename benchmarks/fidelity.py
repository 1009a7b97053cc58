"""Where LFW accuracy goes between the photo and the score: one model, the full
protocol, and one pipeline choice changed at a time.

    .venv/bin/python benchmarks/fidelity.py --model MODEL --manifest lfw.landmarks.jsonl \
        [--plain-manifest lfw-border-none.landmarks.jsonl] [--resample]

Every variant aligns the 7,701 LFW images in memory from a landmark manifest
and runs the 10-fold protocol with the same network:

- pipeline: what `align` writes (bilinear warp, JPEG quality 95), the reference;
- lossless: the same crops never JPEG-encoded;
- jpeg75: JPEG quality 75, Matlab imwrite's default, which the original's
  alignment script used;
- cubic: a bicubic warp instead of bilinear;
- border none: the landmarks of `detect --border none` (--plain-manifest);
- bilinear pyramid: MTCNN run with bilinear image-pyramid resampling, as the
  original Matlab MTCNN's imResample, instead of facenet-pytorch's area
  resampling (--resample: detects LFW once more, a few minutes).

For each: LFW accuracy, the change against the reference with the standard
error of the 10 paired per-fold differences, the mean cosine between each
image's feature and its reference feature, and how far the landmarks moved.
"""

import argparse
import os
import time
from pathlib import Path

import cv2
import numpy as np
import torch

from common import DATA, need_data
from spherecli.preprocess.align import MATLAB_ORIGIN, reference_points, similarity_transform
from spherecli.preprocess.detect import DetectSettings, FaceDetector, select_face
from spherecli.evaluation.datasets import distinct_images, read_pairs
from spherecli.evaluation.evaluate import evaluate_features
from spherecli.models.features import embed, load_network
from spherecli.core.formats import read_manifest
from spherecli.core.images import decode


def landmarks_of(manifest: Path, names: list[str]) -> dict:
    """Each image's landmarks; an image without a face gets the set's mean position, as
    `align --no-face mean` gives it."""
    _, records = read_manifest(manifest)
    recs = {r["path"]: r for r in records}
    ok = [r for r in recs.values() if r["status"] == "ok"]
    mean = np.mean([np.array(r["landmarks"]) / (r["width"], r["height"]) for r in ok], axis=0)
    return {n: (np.array(recs[n]["landmarks"]) if recs[n]["status"] == "ok"
                else mean * (recs[n]["width"], recs[n]["height"])) for n in names}


def crops(root: Path, names, landmarks, spec, quality=95, interpolation=cv2.INTER_LINEAR):
    """Aligned BGR crops as `align` makes them (see align_face), with the choices varied."""
    ref = reference_points(spec.size, spec.reference) - MATLAB_ORIGIN
    out = []
    for n in names:
        bgr = np.ascontiguousarray(decode(root / n)[0][:, :, ::-1])
        m = similarity_transform(landmarks[n] - MATLAB_ORIGIN, ref)
        crop = cv2.warpAffine(bgr, m, spec.size[::-1], flags=interpolation, borderMode=cv2.BORDER_CONSTANT)
        if quality:
            crop = cv2.imdecode(cv2.imencode(".jpg", crop, [cv2.IMWRITE_JPEG_QUALITY, quality])[1],
                                cv2.IMREAD_COLOR)
        out.append(torch.from_numpy(np.ascontiguousarray(crop.transpose(2, 0, 1))))
    return torch.stack(out)


def features(net, batch, size=256):
    parts = [embed(net, batch[i:i + size]) for i in range(0, len(batch), size)]
    return np.concatenate(parts).astype(np.float64)


class BilinearMTCNN:
    """facenet-pytorch's MTCNN with bilinear resampling of the image pyramid and the
    R-/O-Net crops, in the place of FaceDetector's cascade (its border handling kept)."""

    def __init__(self, settings: DetectSettings):
        import torch.nn.functional as F
        from facenet_pytorch import MTCNN
        from facenet_pytorch.models.utils import detect_face

        detect_face.imresample = lambda img, size: F.interpolate(img, size=size, mode="bilinear",
                                                                 align_corners=False)
        self.mtcnn = MTCNN(min_face_size=settings.min_face, thresholds=list(settings.thresholds),
                           factor=settings.factor, keep_all=True, select_largest=False)

    def __call__(self, images):
        out = []
        for image in images:
            boxes, probs, points = self.mtcnn.detect(image, landmarks=True)
            out.append((np.zeros((0, 4)), np.zeros(0), np.zeros((0, 5, 2))) if boxes is None
                       else (boxes, probs, points))
        return out


def bilinear_pyramid_landmarks(root: Path, names) -> dict:
    detector = FaceDetector(DetectSettings())
    detector.mtcnn = BilinearMTCNN(detector.settings)
    out = {}
    for n in names:
        rgb, _ = decode(root / n)
        faces = detector.detect_one(rgb)
        if faces:
            out[n] = np.array(faces[select_face(faces, rgb.shape[1], rgb.shape[0])]["landmarks"])
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--input-spec")
    ap.add_argument("--manifest", type=Path, required=True, help="LFW landmarks of `detect` (default border)")
    ap.add_argument("--plain-manifest", type=Path, help="LFW landmarks of `detect --border none`")
    ap.add_argument("--resample", action="store_true", help="also the bilinear-pyramid MTCNN variant")
    args = ap.parse_args()
    need_data()
    torch.set_num_threads(os.cpu_count() or 1)
    pairs = read_pairs(DATA / "pairs.txt")
    names = distinct_images(pairs)
    index = {n: i for i, n in enumerate(names)}
    root = Path(read_manifest(args.manifest)[0]["root"])
    net = load_network(args.model, input_spec=args.input_spec)
    spec = net.spec
    marks = landmarks_of(args.manifest, names)
    variants = {"pipeline (bilinear, JPEG 95)": dict(),
                "lossless (no JPEG)": dict(quality=0),
                "JPEG 75 (Matlab imwrite)": dict(quality=75),
                "bicubic warp": dict(interpolation=cv2.INTER_CUBIC)}
    other_marks = {}
    if args.plain_manifest:
        other_marks["border none (the original's plain detection)"] = landmarks_of(args.plain_manifest, names)
    if args.resample:
        start = time.perf_counter()
        found = bilinear_pyramid_landmarks(root, names)
        other_marks["bilinear MTCNN pyramid"] = {n: found.get(n, marks[n]) for n in names}
        print(f"(bilinear-pyramid detection: {time.perf_counter() - start:.0f} s)")
    print(f"model {args.model}: {spec.describe()}\n")
    print("| variant | LFW % | change vs pipeline (points) | feature cosine to pipeline | "
          "landmarks moved (mean px, images > 1 px) |")
    print("| --- | --- | --- | --- | --- |")
    reference = None
    runs = [(name, marks, kw) for name, kw in variants.items()] + \
        [(name, m, {}) for name, m in other_marks.items()]
    for name, lm, kw in runs:
        f = features(net, crops(root, names, lm, spec, **kw))
        result = evaluate_features(f, index, pairs)
        accs = np.array([r["accuracy"] for r in result["folds"]])
        moved = np.array([np.linalg.norm(lm[n] - marks[n], axis=1).mean() for n in names])
        if reference is None:
            reference = (f, accs)
            change, cosine = "", ""
        else:
            d = 100 * (accs - reference[1])
            change = f"{d.mean():+.2f} +- {d.std(ddof=1) / np.sqrt(len(d)):.2f}"
            a, b = f / np.linalg.norm(f, axis=1, keepdims=True), reference[0] / np.linalg.norm(
                reference[0], axis=1, keepdims=True)
            cosine = f"{np.mean(np.sum(a * b, axis=1)):.4f}"
        shift = f"{moved.mean():.2f}, {(moved > 1).sum()}" if lm is not marks else ""
        print(f"| {name} | {100 * accs.mean():.2f} | {change} | {cosine} | {shift} |", flush=True)


if __name__ == "__main__":
    main()
