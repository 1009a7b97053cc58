"""Alignment throughput: `sphereface align` against a plain PIL + numpy loop.

    .venv/bin/python benchmarks/align.py [--images 500]

Landmarks come from one `sphereface detect` pass (not timed). The baseline
fits each similarity with numpy's least squares, warps with PIL (bilinear)
and saves a JPEG, one image at a time.
"""

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from common import machine, sample_tree
from spherecli.preprocess.align import REFERENCE_112x96, align_manifests
from spherecli.preprocess.detect import detect_tree
from spherecli.core.formats import read_manifest


def naive(root: Path, records: list[dict], out: Path) -> float:
    start = time.perf_counter()
    for rec in records:
        src = np.array(rec["landmarks"]) - 1
        dst = REFERENCE_112x96 - 1
        # Solve for the inverse map (output -> input), which PIL's transform wants.
        x, y = dst[:, 0], dst[:, 1]
        A = np.vstack([np.stack([x, y, np.ones(5), np.zeros(5)], 1),
                       np.stack([y, -x, np.zeros(5), np.ones(5)], 1)])
        sc, ss, tx, ty = np.linalg.lstsq(A, np.concatenate([src[:, 0], src[:, 1]]), rcond=None)[0]
        img = Image.open(root / rec["path"]).convert("RGB")
        face = img.transform((96, 112), Image.AFFINE, (sc, ss, tx, -ss, sc, ty), Image.BILINEAR)
        target = out / rec["path"]
        target.parent.mkdir(parents=True, exist_ok=True)
        face.save(target, quality=95)
    return len(records) / (time.perf_counter() - start)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=500)
    args = ap.parse_args()
    print(f"machine: {machine()}\n")
    root = sample_tree("lfw", args.images)
    work = Path(tempfile.mkdtemp())
    detect_tree(root, work / "m.jsonl", progress=False)
    records = [r for r in read_manifest(work / "m.jsonl")[1] if r["status"] == "ok"]
    base = naive(root, records, work / "naive")
    start = time.perf_counter()  # whole call: worker start-up included
    summary = align_manifests([work / "m.jsonl"], work / "ours", progress=False)
    ours = summary["aligned"] / (time.perf_counter() - start)
    print("| images | naive loop (img/s) | sphereface align (img/s) | speed-up |")
    print("| --- | --- | --- | --- |")
    print(f"| {len(records)} | {base:.0f} | {ours:.0f} | {ours / base:.1f}x |")


if __name__ == "__main__":
    main()
