"""Shared fixtures. Real face data comes from ../shared/data (see its README);
tests that need it skip, saying why, when it is absent."""

import os
import shutil
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
    from spherecli.align import align_manifests
    from spherecli.detect import detect_tree
    from spherecli.lists import build_list

    celeba = data / "celeba"
    people = [p for p in sorted(os.listdir(celeba)) if len(os.listdir(celeba / p)) >= 10][:16]
    rel = [f"{p}/{f}" for p in people for f in sorted(os.listdir(celeba / p))[:10]]
    work = tmp_path_factory.mktemp("celeba")
    copy_images(celeba, work / "raw", rel)
    detect_tree(work / "raw", work / "m.jsonl", progress=False)
    align_manifests([work / "m.jsonl"], work / "aligned", progress=False)
    build_list([work / "aligned"], work / "train.txt")
    return work / "train.txt"
