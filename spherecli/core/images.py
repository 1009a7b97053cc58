"""Finding and decoding images, robustly: every stage reads pictures through here."""

from __future__ import annotations

import os
import stat
import warnings
from pathlib import Path
from typing import Iterator

import cv2
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from spherecli.core.errors import UserError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".pgm", ".ppm", ".webp")
VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg")
EXIF_ORIENTATION = 0x0112

# The largest image decoded: a 100-megapixel camera photo passes, a few-kilobyte
# PNG that would decode to gigabytes (a "decompression bomb") does not. Pillow's
# own guard is left as it is, for the programs that import spherecli.
MAX_PIXELS = 100_000_000


def is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def walk_images(root: str | Path) -> Iterator[str]:
    """Yield the image paths under root, relative to it, in sorted order.

    Directory symlinks are followed (datasets are often assembled from links)
    but each real directory is entered at most once per branch, so a link
    loop ends instead of recursing forever. Entries that cannot be examined
    (dangling links, self-referencing links) are still yielded when their
    name looks like an image, so the caller can report them.
    """
    root = Path(root)

    def visit(directory: Path, prefix: str, ancestors: frozenset) -> Iterator[str]:
        try:
            entries = sorted(os.scandir(directory), key=lambda e: e.name)
        except OSError:
            return
        for entry in entries:
            rel = prefix + entry.name
            try:
                is_dir = entry.is_dir(follow_symlinks=True)
            except OSError:
                is_dir = False
            if is_dir:
                try:
                    st = os.stat(entry.path)
                except OSError:
                    continue
                key = (st.st_dev, st.st_ino)
                if key not in ancestors:
                    yield from visit(Path(entry.path), rel + "/", ancestors | {key})
            elif is_image_name(entry.name):
                yield rel

    st = os.stat(root)
    yield from visit(root, "", frozenset({(st.st_dev, st.st_ino)}))


def identity_of(rel_path: str) -> str | None:
    """The identity is the first folder level (CASIA, LFW: identity/image.jpg)."""
    head, sep, _ = rel_path.partition("/")
    return head if sep else None


def _open(path: str | Path, max_pixels: int = MAX_PIXELS) -> Image.Image:
    # A FIFO or device named *.jpg would block or stream forever; only
    # regular files are images.
    st = os.stat(path)
    if not stat.S_ISREG(st.st_mode):
        raise OSError("not a regular file")
    if st.st_size == 0:
        raise OSError("empty file (0 bytes)")
    # Pillow's own pixel guard is lifted while the header is read, so that max_pixels (ours,
    # checked below before any pixel is decoded) is the one limit, and put back after.
    pillow_limit = Image.MAX_IMAGE_PIXELS
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            Image.MAX_IMAGE_PIXELS = None
            im = Image.open(path)
        finally:
            Image.MAX_IMAGE_PIXELS = pillow_limit
    w, h = im.size
    if max_pixels and w * h > max_pixels:
        im.close()
        raise OSError(f"image is {w}x{h} = {w * h / 1e6:.0f} megapixels, over the limit of "
                      f"{max_pixels / 1e6:.0f} (`max_pixels`)")
    return im


def oriented_size(path: str | Path, exif: bool = True) -> tuple[int, int]:
    """(width, height) as decode() will return them, read from the header only (no pixel
    limit: a header costs nothing, and decode() refuses what is too large)."""
    with _open(path, max_pixels=0) as im:
        w, h = im.size
        if exif and im.getexif().get(EXIF_ORIENTATION, 1) in (5, 6, 7, 8):
            w, h = h, w
    return w, h


def _to_rgb_array(im: Image.Image) -> np.ndarray:
    if im.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        # 16-bit (or float) grayscale: scale the full range to 8 bits rather
        # than clipping everything above 255 to white.
        a = np.asarray(im, dtype=np.float64)
        top = 65535.0 if a.max() > 255 else 255.0
        a = np.clip(a * (255.0 / top), 0, 255).astype(np.uint8)
        return np.repeat(a[:, :, None], 3, axis=2)
    # convert() drops alpha, maps palettes and CMYK, and replicates gray
    # to three channels, as the original pipeline did for gray photos.
    return np.asarray(im.convert("RGB"))


def fit_side(rgb: np.ndarray, max_side: int | None) -> tuple[np.ndarray, float]:
    """An image no longer than max_side on its long side (area-averaged down), and the factor."""
    if not max_side or max(rgb.shape[:2]) <= max_side:
        return rgb, 1.0
    s = max_side / max(rgb.shape[:2])
    size = (max(1, round(rgb.shape[1] * s)), max(1, round(rgb.shape[0] * s)))
    return cv2.resize(rgb, size, interpolation=cv2.INTER_AREA), size[0] / rgb.shape[1]


def decode(path: str | Path, exif: bool = True, max_side: int | None = None, max_pixels: int = MAX_PIXELS):
    """Decode an image file to an RGB uint8 array (H, W, 3).

    Returns (array, info) where info holds the EXIF orientation tag found and
    the factor the image was downscaled by to fit max_side (1.0 if not):
    coordinates found on the array are divided by it to map them back.
    Raises OSError or ValueError with a readable message on any bad file.
    """
    with _open(path, max_pixels) as im:
        orientation = int(im.getexif().get(EXIF_ORIENTATION, 1) or 1)
        full_w, full_h = im.size
        if max_side and max(full_w, full_h) > max_side:
            # JPEG can decode at 1/2, 1/4, 1/8 size directly: a 12000x8000
            # photo never has to exist in memory at full size.
            im.draft("RGB", (max_side, max_side))
        im.load()
        if exif and orientation != 1:
            im = ImageOps.exif_transpose(im)
            if orientation in (5, 6, 7, 8):
                full_w, full_h = full_h, full_w
        rgb = _to_rgb_array(im)
    rgb, _ = fit_side(rgb, max_side)
    scale = rgb.shape[1] / full_w if rgb.shape[1] != full_w else 1.0
    return np.ascontiguousarray(rgb), {"orientation": orientation, "scale": scale,
                                       "width": full_w, "height": full_h}


def as_rgb(image, name: str = "image") -> np.ndarray:
    """A numpy array (H, W, 3) uint8 in RGB order (or (H, W) grey), or a PIL image, as the
    contiguous RGB array every stage works on; anything else is one error naming it."""
    if isinstance(image, Image.Image):
        return np.ascontiguousarray(_to_rgb_array(image))
    if not isinstance(image, np.ndarray):
        raise UserError(f"{name}: expected a path, a PIL image or a numpy array, got {type(image).__name__}")
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8 or min(image.shape[:2]) < 1:
        raise UserError(f"{name}: expected an (H, W, 3) uint8 RGB array, got {image.dtype} {image.shape}")
    return np.ascontiguousarray(image)


def write_atomic(path: str | Path, data: bytes) -> None:
    """Write bytes so that the file is either absent or complete, even after a kill."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def encode(bgr: np.ndarray, suffix: str, jpeg_quality: int = 95) -> bytes:
    ext = suffix.lower() if suffix.lower() in IMAGE_EXTENSIONS else ".jpg"
    params = [cv2.IMWRITE_JPEG_QUALITY, jpeg_quality] if ext in (".jpg", ".jpeg") else []
    if ext == ".pgm":  # a grey format: its photos decode to three equal channels
        bgr = cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY)
    ok, buf = cv2.imencode(ext, bgr, params)
    if not ok:
        raise OSError(f"could not encode {ext}")
    return buf.tobytes()


def describe_error(e: Exception) -> str:
    """A short reason for a per-file failure, for an `error` record."""
    if isinstance(e, UnidentifiedImageError):
        return "not a recognisable image (unknown format or corrupt header)"
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return str(e) or type(e).__name__
