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
