"""Helpers shared by the benchmarks: where the data is, and a small aligned set."""

import os
import sys
import tempfile
from pathlib import Path

DATA = Path(os.environ.get("SPHERECLI_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


def need_data() -> Path:
    if not DATA.exists():
        sys.exit(f"benchmark data not found at {DATA} (set SPHERECLI_DATA)")
    return DATA


def first_images(dataset: str, n: int) -> list[str]:
    """The first n images of a dataset in sorted order, relative to it."""
    root = need_data() / dataset
    return [f"{p}/{f}" for p in sorted(os.listdir(root)) for f in sorted(os.listdir(root / p))][:n]


def sample_tree(dataset: str, n: int) -> Path:
    """A temporary tree of links to the first n images."""
    tmp = Path(tempfile.mkdtemp(prefix=f"bench-{dataset}-"))
    for rel in first_images(dataset, n):
        (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
        os.symlink(DATA / dataset / rel, tmp / rel)
    return tmp


def machine() -> str:
    import platform

    import torch
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {gpu}, "
            f"torch {torch.__version__}")
