"""Video: the tracked pipeline of `identify` against the per-frame loop (detect, align and
embed every face of every frame), in one run, on test videos made from `wild` photos.

    .venv/bin/python benchmarks/video.py --model out/demo/published/068.pt [--seconds 8]

The test video (tests/conftest.py, write_test_video): 12 wild people cross the frame one
after another, at most six in view, each at its own height and speed; six are in the
gallery with one other photo each (the original's video demo: six people, a photo each),
six are strangers. Thresholds: the calibration's FAR 1e-3. Every row runs the whole path:
decode (on its thread), detect, track, align, embed, search, draw and write the annotated
video. Accuracy: per frame, the share of face rows (matched to the person whose sprite
holds the box's centre) named right (the name, or unknown for strangers); per track, its
final identity; identity switches per track. The live row reads the video at its own rate
(`--live`, as a camera) beside two busy processes: frames dropped, and how far behind the
source clock the frames handed out were.
"""

import argparse
import json
import multiprocessing
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import DATA, person_at, score_tracks, write_test_video  # noqa: E402

import spherecli  # noqa: E402
from spherecli.core.config import DetectSettings, VideoSettings  # noqa: E402
from spherecli.recognition.identify import identify  # noqa: E402
from spherecli.recognition.video import VideoRun  # noqa: E402


def per_frame_right(rows, truth, known):
    right = []
    for r in rows:
        person = None if r.get("box") is None else person_at(truth, r["frame"], r["box"])
        if person is not None:
            right.append(r["identity"] == (person if person in known else "unknown"))
    return float(np.mean(right)) if right else float("nan")


def busy():
    while True:
        pass


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--sizes", default="640x480,1280x720")
    args = ap.parse_args()
    wild = DATA / "wild"
    people = sorted(p.name for p in wild.iterdir())[:12]
    known = set(people[:6])
    model = spherecli.load(args.model, far=1e-3)
    gallery = model.gallery({p: [sorted((wild / p).iterdir())[0]] for p in sorted(known)})
    loop_model = spherecli.load(args.model, far=1e-3, settings=DetectSettings(min_face=40, border="none"))
    print(f"threshold {model.calibration.describe()}")
    print("| size | pipeline | fps | x per-frame loop | ms p50 | ms p99 | faces right (per frame) | "
          "tracks right | known tracks named | stranger tracks rejected | switches per track | ms by part |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    work = Path(tempfile.mkdtemp(prefix="bench-video-"))
    for size in args.sizes.split(","):
        w, h = map(int, size.split("x"))
        clip = work / f"clip-{size}.mp4"
        truth = write_test_video(clip, wild, people, size=(w, h), seconds=args.seconds)
        frames = int(round(args.seconds * 25))
        base = None
        for name, m in (("per-frame loop (min face 20, border redetect: as before)", model),
                        ("per-frame loop (min face 40, no border)", loop_model)):
            t = time.perf_counter()
            rows = list(identify(m, gallery, clip, annotate=work / f"loop-{size}.mp4"))
            fps = frames / (time.perf_counter() - t)
            base = base or fps
            print(f"| {size} | {name} | {fps:.1f} | {fps / base:.2f} | | | "
                  f"{per_frame_right(rows, truth, known):.3f} | | | | | |", flush=True)
        for every, accumulate in ((1, "template"), (2, "template"), (3, "template"), (5, "template"),
                                  (3, "vote")):
            settings = VideoSettings(detect_every=every, accumulate=accumulate)
            run = VideoRun(model, gallery, str(clip), settings, annotate=work / f"tracked-{size}.mp4")
            rows = list(run.rows())
            run.close()
            summary = run.summary()
            source, tracks = summary[-1], [r for r in summary if r["type"] == "track"]
            right = score_tracks(tracks, rows, truth, known)
            named = [ok for p, ok in right.values() if p in known]
            rejected = [ok for p, ok in right.values() if p not in known]
            switches = np.mean([t["identity_switches"] for t in tracks]) if tracks else 0
            fps = source["frames_per_second"]
            parts = ", ".join(f"{k} {v}" for k, v in source["ms_per_frame_by_part"].items())
            tracks_right = np.mean([ok for _, ok in right.values()])
            print(f"| {size} | tracked, detect every {every}, {accumulate} | {fps:.1f} | {fps / base:.2f} | "
                  f"{source['ms_per_frame_p50']} | {source['ms_per_frame_p99']} | "
                  f"{per_frame_right(rows, truth, known):.3f} | {tracks_right:.3f} ({len(tracks)} tracks, "
                  f"{len(right)} matched) | {np.mean(named):.3f} | {np.mean(rejected):.3f} | "
                  f"{switches:.2f} | {parts} |", flush=True)
    # A live source on a loaded machine: two busy processes beside it.
    clip = work / f"clip-{args.sizes.split(',')[0]}.mp4"  # the first size
    hogs = [multiprocessing.Process(target=busy, daemon=True) for _ in range(2)]
    for p in hogs:
        p.start()
    try:
        run = VideoRun(model, gallery, str(clip), VideoSettings(detect_every=3), live=True)
        for _ in run.rows():
            pass
        run.close()
        s = run.summary()[-1]
    finally:
        for p in hogs:
            p.terminate()
    print(json.dumps({"live, 2 busy processes": {k: s[k] for k in ("frames_read", "frames_done", "dropped",
                                                                    "frames_per_second", "ms_per_frame_p50",
                                                                    "ms_per_frame_p99")}}))


if __name__ == "__main__":
    main()
