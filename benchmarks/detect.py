"""Detection throughput: `sphereface detect` against a plain facenet-pytorch loop.

    .venv/bin/python benchmarks/detect.py [--images 500]

Both run on the same images with the original settings (min face 20, factor
0.85, thresholds 0.6/0.7/0.9), in a fresh process for each set; the baseline
is the obvious code: one MTCNN.detect call per PIL image, default torch threads.
"""

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image

from common import machine, sample_tree
from spherecli.preprocess.detect import DetectSettings, detect_tree


def naive(root: Path, paths: list[Path]) -> float:
    from facenet_pytorch import MTCNN
    s = DetectSettings()
    mtcnn = MTCNN(min_face_size=s.min_face, thresholds=list(s.thresholds), factor=s.factor,
                  keep_all=True)
    start = time.perf_counter()
    for p in paths:
        mtcnn.detect(Image.open(p).convert("RGB"), landmarks=True)
    return len(paths) / (time.perf_counter() - start)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=500)
    ap.add_argument("--datasets", default="lfw,celeba")
    ap.add_argument("--row", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if not args.row:
        print(f"machine: {machine()}\n")
        print("| data | images | naive loop (img/s) | sphereface detect (img/s) | speed-up |")
        print("| --- | --- | --- | --- | --- |", flush=True)
        # Each set in a fresh process: a second pool in one process reuses the first's
        # fork server, which has already imported torch, and starts faster.
        for dataset in args.datasets.split(","):
            subprocess.run([sys.executable, __file__, "--row", "--images", str(args.images),
                            "--datasets", dataset], check=True)
        return
    root = sample_tree(args.datasets, args.images)
    paths = sorted(root.glob("*/*"))
    base = naive(root, paths)
    manifest = Path(tempfile.mkdtemp()) / "m.jsonl"
    start = time.perf_counter()  # whole command: worker start-up included
    detect_tree(root, manifest, progress=False)
    ours = len(paths) / (time.perf_counter() - start)
    print(f"| {args.datasets} | {len(paths)} | {base:.1f} | {ours:.1f} | {ours / base:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
