"""Aligned faces in, network-ready batches out; the same preprocessing for train and evaluate.

Channel order is BGR, as in the original: Caffe's ImageData layer reads with
OpenCV, and the Matlab evaluation swaps RGB to BGR before the forward pass.
Images travel as uint8 and are scaled on the device (spherecli.models.features.prepare),
which quarters the bytes moved to a GPU.
"""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from spherecli.core.errors import UserError
from spherecli.core.formats import ImageList, cache_key, cache_matches, write_cache_key


def load_face(path: str) -> np.ndarray:
    """An aligned face as an (H, W, 3) BGR uint8 array."""
    data = np.fromfile(path, dtype=np.uint8)  # np.fromfile + imdecode handles any file name
    img = cv2.imdecode(data, cv2.IMREAD_COLOR) if data.size else None
    if img is None:
        raise OSError(f"{path}: cannot decode image")
    return img


def to_chw(img: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1)))


def worker_errors(batches):
    """Re-raise a UserError from a DataLoader worker as the one line it was, not
    the worker's traceback that DataLoader wraps around it."""
    try:
        yield from batches
    except UserError as e:
        raise UserError(str(e).rstrip().splitlines()[-1].split("UserError: ", 1)[-1]) from None


class FaceList(Dataset):
    """Indexed by (index, flip) pairs, so the sampler owns every random choice.

    With size, an image of another size is an error naming it (raw photos
    where aligned crops belong, or crops aligned for another network).
    """

    def __init__(self, items: list[tuple[str, int]], size: tuple[int, int] | None = None):
        self.items, self.size = items, size

    def __len__(self):
        return len(self.items)

    def __getitem__(self, key):
        index, flip = key
        path, label = self.items[index]
        try:
            img = load_face(path)
        except OSError as e:
            raise UserError(str(e)) from None
        if self.size is not None and img.shape[:2] != tuple(self.size):
            h, w = self.size
            raise UserError(f"{path}: a {img.shape[0]}x{img.shape[1]} image where {h}x{w} aligned "
                            f"face crops are expected (make them with `sphereface detect` and "
                            f"`sphereface align --size {h}x{w}`)")
        if flip:
            img = img[:, ::-1]
        return to_chw(img), label


def check_images(items: ImageList, list_path: str, skip_missing: bool) -> tuple[ImageList, int]:
    """Fail on the first missing image, naming its list line, or drop and count them."""
    exists = np.array([os.path.isfile(path) for path, _ in items], dtype=bool)
    if not exists.all() and not skip_missing:
        lineno = int(np.argmin(exists)) + 1
        raise UserError(f"{list_path}:{lineno}: image not found: {items[lineno - 1][0]} "
                        "(`skip_missing` leaves such lines out)")
    if not exists.any():
        raise UserError(f"{list_path}: none of the listed images exist")
    return ImageList(items.paths[exists], items.labels[exists]), int((~exists).sum())


class EpochBatches:
    """Deterministic, resumable, rank-sharded batches of (index, flip).

    Iteration i belongs to epoch i // per_epoch. Each epoch draws a fresh
    permutation and flip mask from seed + epoch, cuts it into global batches
    of batch_size * world images, and rank r takes the r-th slice of each.
    So a run resumed at iteration i sees exactly the batches an unbroken run
    would, and N processes together see what one process with an N-times
    larger batch would.
    """

    def __init__(self, n: int, batch_size: int, world: int = 1, rank: int = 0, seed: int = 0,
                 start: int = 0, stop: int | None = None, flip: bool = True):
        self.n, self.batch_size, self.world, self.rank = n, batch_size, world, rank
        self.seed, self.start, self.stop, self.flip = seed, start, stop, flip
        self.per_epoch = n // (batch_size * world)
        if self.per_epoch == 0:
            raise UserError(f"{n} images are fewer than one global batch of "
                            f"{batch_size} x {world} processes; lower `batch_size`")

    def __len__(self):
        return (self.stop if self.stop is not None else self.start) - self.start

    def epoch_order(self, epoch: int):
        g = torch.Generator().manual_seed(self.seed * 100003 + epoch)
        perm = torch.randperm(self.n, generator=g)
        flips = torch.randint(0, 2, (self.n,), generator=g).bool() & self.flip
        return perm, flips

    def __iter__(self):
        epoch, order = None, None
        i = self.start
        while self.stop is None or i < self.stop:
            e, pos = divmod(i, self.per_epoch)
            if e != epoch:
                epoch, order = e, self.epoch_order(e)
            lo = (pos * self.world + self.rank) * self.batch_size
            perm, flips = order
            yield list(zip(perm[lo:lo + self.batch_size].tolist(),
                           flips[lo:lo + self.batch_size].tolist()))
            i += 1


class CachedFaces:
    """Every image decoded once into one uint8 array (N, 3, H, W).

    In memory (`--cache`), for data that fits: on a CPU the DataLoader's worker
    processes compete with training for the same few cores, and decoding each
    image once removes that cost from every epoch. Or in a file (`--cache-file`),
    memory-mapped: one copy in the page cache however many processes train, no
    decoding at all after the first run, and batches that are an indexed read.
    """

    def __init__(self, images, labels: np.ndarray):
        self.images, self.labels = images, torch.from_numpy(labels)

    @classmethod
    def in_memory(cls, items: ImageList, size, workers: int = 0) -> "CachedFaces":
        return cls(torch.cat([x for x, _ in _decoder(items, size, workers)]), items.labels)

    @classmethod
    def in_file(cls, items: ImageList, size, path: str | Path, workers: int = 0,
                build: bool = True) -> "CachedFaces":
        """Open the cache file of these items, making it first (when build) if it is
        missing or was made from another list."""
        path = Path(path)
        key = cache_key(items)
        if build and not cache_matches(path, key):
            tmp = path.with_name(path.name + ".tmp")
            out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(len(items), 3, *size))
            at = 0
            for x, _ in _decoder(items, size, workers):
                out[at:at + len(x)] = x.numpy()
                at += len(x)
            out.flush()
            del out
            os.replace(tmp, path)
            write_cache_key(path, key, len(items), size)
        if not cache_matches(path, key):
            raise UserError(f"{path}: the image cache is missing or was made from another list")
        return cls(np.load(path, mmap_mode="r"), items.labels)

    def batch(self, keys):
        index = np.array([k for k, _ in keys])
        flip = torch.tensor([f for _, f in keys])
        x = self.images[torch.from_numpy(index)] if torch.is_tensor(self.images) \
            else torch.from_numpy(self.images[index])
        x[flip] = x[flip].flip(-1)
        return x, self.labels[index]


def _decoder(items, size, workers: int):
    return worker_errors(DataLoader(FaceList(items, size), batch_size=256, num_workers=workers,
                                    sampler=[(i, False) for i in range(len(items))]))


def batches(items, size, sampler: EpochBatches, workers: int, cache: bool, pin: bool = False,
            cache_file: str | None = None, build: bool = True):
    """Iterator of (uint8 images, labels) for the sampler's batches; every image must be
    of size (height, width), the first one's: a list of raw photos is an error naming one."""
    if cache_file or cache:
        store = (CachedFaces.in_file(items, size, cache_file, workers, build) if cache_file
                 else CachedFaces.in_memory(items, size, workers))
        return (store.batch(keys) for keys in sampler)
    return worker_errors(DataLoader(FaceList(items, size), batch_sampler=sampler, num_workers=workers,
                                    pin_memory=pin, persistent_workers=False,
                                    prefetch_factor=4 if workers else None))
