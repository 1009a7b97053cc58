"""Shared fixtures. Real face data comes from ../shared/data (see its README);
tests that need it skip, saying why, when it is absent."""

import os
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("SPHERECLI_DATA", ROOT.parent / "shared" / "data"))
MODELS = Path(os.environ.get("SPHERECLI_MODELS", ROOT.parent / "shared" / "models"))


def need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"real face data not found at {path} (set SPHERECLI_DATA to the folder "
                    "holding lfw/, celeba/, wild/ and pairs.txt)")
    return path


@pytest.fixture(scope="session")
def data() -> Path:
    return need(DATA)


def copy_images(src_root: Path, dst_root: Path, rel_paths) -> Path:
    for rel in rel_paths:
        (dst_root / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src_root / rel, dst_root / rel)
    return dst_root


@pytest.fixture(scope="session")
def lfw_sample(data, tmp_path_factory) -> Path:
    """48 LFW images of 12 people (4 each), copied into a temporary tree."""
    lfw = data / "lfw"
    people = [p for p in sorted(os.listdir(lfw)) if len(os.listdir(lfw / p)) >= 4][:12]
    rel = [f"{p}/{f}" for p in people for f in sorted(os.listdir(lfw / p))[:4]]
    return copy_images(lfw, tmp_path_factory.mktemp("lfw"), rel)


@pytest.fixture(scope="session")
def celeba_list(data, tmp_path_factory) -> Path:
    """A training list of 16 real CelebA identities x 10 faces, detected and aligned by the pipeline."""
    from spherecli.preprocess.align import align_manifests
    from spherecli.preprocess.detect import detect_tree
    from spherecli.preprocess.lists import build_list

    celeba = data / "celeba"
    people = [p for p in sorted(os.listdir(celeba)) if len(os.listdir(celeba / p)) >= 10][:16]
    rel = [f"{p}/{f}" for p in people for f in sorted(os.listdir(celeba / p))[:10]]
    work = tmp_path_factory.mktemp("celeba")
    copy_images(celeba, work / "raw", rel)
    detect_tree(work / "raw", work / "m.jsonl", progress=False)
    align_manifests([work / "m.jsonl"], work / "aligned", progress=False)
    build_list([work / "aligned"], work / "train.txt")
    return work / "train.txt"


def write_synthetic_faces(root: Path, people: int = 16, per_person: int = 10, seed: int = 0,
                          size=(112, 96)) -> Path:
    """Aligned-crop stand-ins that need no outside data: each identity is a smooth random
    colour pattern, each of its images that pattern shifted, brightened and noised.
    Distinct enough for a network to learn in a few dozen iterations, so training,
    resuming and the data path are tested wherever the suite runs."""
    import cv2
    import numpy as np

    rng = np.random.default_rng(seed)
    h, w = size
    for p in range(people):
        pattern = cv2.resize(rng.uniform(0, 255, (7, 6, 3)).astype(np.float32), (w + 8, h + 8),
                             interpolation=cv2.INTER_CUBIC)
        for i in range(per_person):
            dy, dx = rng.integers(0, 9, 2)
            img = pattern[dy:dy + h, dx:dx + w] * rng.uniform(0.8, 1.2) + rng.normal(0, 8, (h, w, 3))
            path = root / f"person{p:02d}" / f"{i:03d}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(path), np.clip(img, 0, 255).astype(np.uint8), [cv2.IMWRITE_JPEG_QUALITY, 95])
    return root


@pytest.fixture(scope="session")
def synthetic_list(tmp_path_factory) -> Path:
    """A training list of 16 synthetic identities x 10 aligned crops."""
    from spherecli.preprocess.lists import build_list

    work = tmp_path_factory.mktemp("synthetic")
    build_list([write_synthetic_faces(work / "aligned")], work / "train.txt")
    return work / "train.txt"


def sphereface_here(args) -> int:
    """`sphereface ARGS` in this process, through cli.main (its error boundary and exit
    statuses), so that one import of torch serves many calls; the exit status."""
    import torch

    from spherecli.cli import main

    argv, threads = sys.argv, torch.get_num_threads()
    sys.argv = ["sphereface", *map(str, args)]
    try:
        main()
        return 0
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 1
    finally:
        sys.argv = argv
        torch.set_num_threads(threads)  # the recognition commands set one thread for the process


def write_test_video(path: Path, wild: Path, people: list[str], *, size=(640, 480), fps: int = 25,
                     seconds: float = 4.0, seed: int = 0) -> list[dict]:
    """A video of moving faces made from `wild` photos: each of the people's second photo,
    cut to the head and shoulders, enters from one side, crosses the frame at its own
    height and speed and leaves; with more than six people, at most six are in view at
    once. Returns the truth: per
    person, the frames where their sprite is wholly inside the frame and its rectangle
    there. The first photo of each person is left for a gallery."""
    import cv2
    import numpy as np

    rng = np.random.default_rng(seed)
    w, h = size
    frames = int(round(seconds * fps))
    sprite_h = h // 3
    sprites = []
    for k, person in enumerate(people):
        photo = cv2.imread(str(sorted((wild / person).iterdir())[1]))
        ph, pw = photo.shape[:2]
        side = min(ph, pw)  # the photo's central square: the face of a wild photo is near its middle
        square = photo[(ph - side) // 2:(ph - side) // 2 + side, (pw - side) // 2:(pw - side) // 2 + side]
        sprite = cv2.resize(square, (sprite_h, sprite_h), interpolation=cv2.INTER_AREA)
        start = int(k * frames / (len(people) + 1))
        # each crossing lasts under six starts' spacing: at most six people in view at once
        span = int(rng.uniform(0.7, 1.0) * 5.9 * frames / (len(people) + 1)) if len(people) > 6 else \
            int(rng.integers(frames // 2, frames))
        leftward = k % 2 == 1
        y = int(rng.integers(0, h - sprite_h))
        sprites.append({"person": person, "sprite": sprite, "start": start, "end": min(frames, start + span),
                        "y": y, "leftward": leftward})
    truth = {s["person"]: {"frames": [], "rects": []} for s in sprites}
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (w, h))
    background = np.full((h, w, 3), 90, np.uint8)
    for f in range(frames):
        frame = background.copy()
        for s in sprites:
            if not s["start"] <= f < s["end"]:
                continue
            t = (f - s["start"]) / max(1, s["end"] - s["start"] - 1)
            x = int(round((1 - t) * w - t * sprite_h)) if s["leftward"] else \
                int(round(t * w - (1 - t) * sprite_h))
            x0, x1 = max(0, x), min(w, x + sprite_h)
            if x1 > x0:
                frame[s["y"]:s["y"] + sprite_h, x0:x1] = s["sprite"][:, x0 - x:x1 - x]
            if x >= 0 and x + sprite_h <= w:
                truth[s["person"]]["frames"].append(f)
                truth[s["person"]]["rects"].append((x, s["y"], x + sprite_h, s["y"] + sprite_h))
        writer.write(frame)
    writer.release()
    return [{"person": p, **t} for p, t in truth.items()]


def person_at(truth: list[dict], frame: int, box) -> str | None:
    """The person of write_test_video's truth whose sprite holds the box's centre there."""
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    for t in truth:
        if frame in t["frames"]:
            x1, y1, x2, y2 = t["rects"][t["frames"].index(frame)]
            if x1 <= cx <= x2 and y1 <= cy <= y2:
                return t["person"]
    return None


def score_tracks(tracks: list[dict], frames: list[dict], truth: list[dict], known: set[str]) -> dict:
    """Each track's person by where its boxes' centres lie (the sprite holding most of them),
    and whether the track's final identity is right: the name for people in the gallery,
    unknown for the others."""
    owner = {}
    for row in frames:
        person = person_at(truth, row["frame"], row["box"])
        if person is not None:
            owner.setdefault(row["track"], []).append(person)
    right = {}
    for track in tracks:
        votes = owner.get(track["track"], [])
        if votes:
            person = max(set(votes), key=votes.count)
            right[track["track"]] = (person, track["identity"] == (person if person in known else "unknown"))
    return right
