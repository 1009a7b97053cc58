"""Keeping a GPU fed: how fast the training data path delivers 112x96 faces on this CPU.

    .venv/bin/python benchmarks/loader.py --list out/demo/celeba-112X96.txt [--images 4000]

- one worker: what one DataLoader worker does per image (read the JPEG, decode it,
  flip half of them), in one process, and the normalisation the trainer does after;
- the DataLoader with 1 and 2 workers, batches of 256;
- the decoded-image cache file (`train --cache-file`): batches of 256 random
  images read from the memory-mapped file, warm in the page cache.
It prints how many workers a GPU at 3,000 and 10,000 images/s would need.
"""

import argparse
import math
import tempfile
import time
from pathlib import Path

import torch

from common import machine
from spherecli.core.data import CachedFaces, EpochBatches, FaceList, batches
from spherecli.models.features import prepare
from spherecli.core.formats import InputSpec, read_list


def rate(n: int, fn) -> float:
    start = time.perf_counter()
    fn()
    return n / (time.perf_counter() - start)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--list", required=True, help="a training list of aligned 112x96 faces")
    ap.add_argument("--images", type=int, default=4000)
    args = ap.parse_args()
    print(f"machine: {machine()}\n")
    items = read_list(args.list)[:args.images]
    n = len(items)
    faces = FaceList(items)
    one = rate(n, lambda: [faces[(i, i % 2 == 1)] for i in range(n)])
    batch = torch.stack([faces[(i, False)][0] for i in range(256)])
    norm = rate(256 * 20, lambda: [prepare(batch, InputSpec()) for _ in range(20)])
    sampler = EpochBatches(n, 256, stop=n // 256)
    loaders = {w: rate(256 * len(sampler), lambda w=w: list(batches(items, (112, 96), sampler, w, False)))
               for w in (1, 2)}
    cache = Path(tempfile.mkdtemp()) / "faces.npy"
    CachedFaces.in_file(items, cache, workers=2)
    store = CachedFaces.in_file(items, cache, build=False)
    store.batch([(i, False) for i in range(n)])  # warm the page cache
    keys = list(EpochBatches(n, 256, seed=1, stop=4 * (n // 256)))
    cached = rate(256 * len(keys), lambda: [store.batch(k) for k in keys])
    print("| path | images/s | workers for 3,000 images/s | workers for 10,000 images/s |")
    print("| --- | --- | --- | --- |")
    print(f"| one worker: read, decode, flip (one process) | {one:.0f} | {math.ceil(3000 / one)} | "
          f"{math.ceil(10000 / one)} |")
    print(f"| normalise a uint8 batch on the CPU ((x - 127.5) / 128) | {norm:.0f} | | |")
    for w, r in loaders.items():
        print(f"| DataLoader, {w} worker{'s' if w > 1 else ''}, batch 256 | {r:.0f} | | |")
    print(f"| cache file, memory-mapped, random batches of 256 | {cached:.0f} | 0 | 0 |")
    print(f"\n({n} images of {args.list}; cache file {cache.stat().st_size / n / 1024:.1f} KB per image)")


if __name__ == "__main__":
    main()
