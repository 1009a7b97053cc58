"""A model used on photos and video: seconds per photo (`verify`'s path: detect, align,
embed one face) and frames per second (`identify`'s per-frame loop on a 640 x 480 video),
with torch's threads at 1 and at every core, on an idle machine and beside two busy
processes; and a 6000 x 4000 photo with and without detect's downscaling (max_side).

    .venv/bin/python benchmarks/recognize.py [--model MODEL] [--photos 10] [--frames 100]

Each measurement runs in a fresh process (its threads, its peak memory). Without
--model a MobileFaceNet with random weights stands in: speed does not depend on them.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

from common import DATA, machine, need_data


def photos(n: int) -> list[Path]:
    wild = need_data() / "wild"
    return [wild / p / sorted(os.listdir(wild / p))[0] for p in sorted(os.listdir(wild))][:n]


def make_video(path: Path, frames: int) -> None:
    """640 x 480 at 25 fps: wild photos, each held for 10 frames and drifting sideways."""
    stills = [cv2.imread(str(p)) for p in photos(10)]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 25, (640, 480))
    for i in range(frames):
        still = stills[(i // 10) % len(stills)]
        scale = 400 / max(still.shape[:2])
        small = cv2.resize(still, None, fx=scale, fy=scale)
        frame = np.zeros((480, 640, 3), np.uint8)
        x = 40 + 4 * (i % 10)
        frame[40:40 + small.shape[0], x:x + small.shape[1]] = small
        writer.write(frame)
    writer.release()


def one(args) -> dict:
    """One measurement, in this process."""
    import torch

    from spherecli.core.config import DetectSettings
    from spherecli.recognition.recognize import FaceEmbedder

    torch.set_num_threads(args.threads)
    settings = DetectSettings(max_side=args.max_side) if args.max_side else None
    emb = FaceEmbedder(args.model, settings=settings)
    if args.what == "photo":
        paths = [Path(p) for p in args.paths]
        emb.photo_face(paths[0])  # warm-up: weights, first calls
        start = time.perf_counter()
        for p in paths:
            emb.photo_face(p)
        value = (time.perf_counter() - start) / len(paths)
    else:
        video = cv2.VideoCapture(args.paths[0])
        n, start = 0, None
        while True:
            ok, bgr = video.read()
            if not ok:
                break
            rgb = np.ascontiguousarray(bgr[:, :, ::-1])
            faces = emb.faces(rgb)
            if faces:
                emb.embed(emb.crops(rgb, faces))
            if start is None:
                start = time.perf_counter()  # after the first frame: warm-up
            else:
                n += 1
        value = n / (time.perf_counter() - start)
    return {"value": value, "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def measure(what: str, paths, model: str, threads: int, max_side: int = 0) -> dict:
    cmd = [sys.executable, __file__, "--one", what, "--model", model, "--threads", str(threads),
           "--max-side", str(max_side), "--paths", *map(str, paths)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def busy(n: int) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model")
    ap.add_argument("--photos", type=int, default=10)
    ap.add_argument("--frames", type=int, default=100)
    ap.add_argument("--one", choices=("photo", "video"))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--max-side", type=int, default=0)
    ap.add_argument("--paths", nargs="*")
    args = ap.parse_args()
    if args.one:
        args.what = args.one
        print(json.dumps(one(args)))
        return
    work = Path(tempfile.mkdtemp(prefix="bench-recognize-"))
    model = args.model
    if model is None:
        from spherecli.core.formats import InputSpec, ModelFile
        from spherecli.models import create_model

        net = create_model("mobilefacenet")
        model = str(work / "mobilefacenet.pt")
        ModelFile("mobilefacenet", net.model_args, net.state_dict(), InputSpec(channels="rgb")).save(model)
    video = work / "clip.mp4"
    make_video(video, args.frames)
    big = work / "big.jpg"
    still = cv2.imread(str(photos(1)[0]))
    cv2.imwrite(str(big), cv2.resize(still, (6000, 4000), interpolation=cv2.INTER_CUBIC))
    cores = os.cpu_count() or 1
    print(f"{machine()}; model {model}; {DATA}\n")
    print("| machine | torch threads | seconds per photo (verify's path) | video fps (640 x 480, "
          "per frame) |")
    print("| --- | --- | --- | --- |")
    for load in ("idle", "2 busy processes"):
        others = busy(2) if load != "idle" else []
        try:
            for threads in sorted({1, cores}):
                p = measure("photo", photos(args.photos), model, threads)
                v = measure("video", [video], model, threads)
                print(f"| {load} | {threads} | {p['value']:.3f} | {v['value']:.1f} |", flush=True)
        finally:
            for proc in others:
                proc.kill()
    print("\n| 6000 x 4000 photo | seconds | peak memory (MB) |")
    print("| --- | --- | --- |")
    for name, side in (("detected at full size (before)", 100_000),
                       ("downscaled to 2,000 px (detect's max_side)", 0)):
        r = measure("photo", [big], model, 1, side)
        print(f"| {name} | {r['value']:.2f} | {r['peak_mb']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
