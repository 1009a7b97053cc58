"""A gallery of known people: one folder per person, one feature per photo, cached
next to the photos and keyed by the model, and one template per person."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from spherecli.core.errors import UserError
from spherecli.recognition.calibration import Calibration
from spherecli.core.formats import read_gallery_cache, write_gallery_cache
from spherecli.core.images import describe_error, walk_images
from spherecli.core.outputs import Outputs
from spherecli.recognition.recognize import FaceEmbedder


def _file_key(path: Path) -> str:
    st = path.stat()
    return f"{st.st_size}:{st.st_mtime_ns}"


def gallery(embedder: FaceEmbedder, root: str | Path, key: str, *,
            cache: str | Path | None = None, select: str = "center"):
    """One feature per gallery photo (folders = people), reusing a cache made with the same
    key (`api.Model.key`: the model file, flip, detection settings and input spec).

    Returns (person of each photo, features, notes). Photos with no face
    are left out with a note.
    """
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"gallery {root}: no such directory")
    with Outputs([root]) as outputs:
        cache = outputs.file(cache or root / ".sphereface-gallery.npz", "gallery cache")
    known, notes = _read_cache(cache, key)
    people, paths, keys, feats = [], [], [], []
    for rel in walk_images(root):
        person = rel.split("/")[0] if "/" in rel else None
        if person is None:
            continue
        try:
            k = _file_key(root / rel)
        except OSError as e:
            notes.append(f"{root / rel}: {describe_error(e)}")
            continue
        if (rel, k) in known:
            f = known[(rel, k)]
        else:
            try:
                f, _, note = embedder.photo_face(root / rel, select)
            except (UserError, OSError, ValueError) as e:
                notes.append(str(e) if isinstance(e, UserError) else f"{root / rel}: {describe_error(e)}")
                continue
            if note:
                notes.append(note)
        people.append(person)
        paths.append(rel)
        keys.append(k)
        feats.append(f)
    if not feats:
        raise UserError(f"gallery {root}: no face found in any person's folder (expected PERSON/photo.jpg)")
    feats = np.stack(feats)
    try:
        write_gallery_cache(cache, key, paths, keys, feats)
    except UserError as e:
        notes.append(f"the gallery cache was not saved: {e}")
    return people, feats, notes


def _read_cache(cache: Path, key: str) -> tuple[dict, list[str]]:
    """The cached features of this model's gallery photos; a cache that cannot be read is
    ignored with a note, and made again."""
    if not cache.is_file():
        return {}, []
    try:
        return read_gallery_cache(cache, key), []
    except UserError as e:
        return {}, [f"{e}; ignored and made again"]


def templates(people: list[str], features: np.ndarray, calibration: Calibration):
    """One unit template per person: the mean of their photos' unit features."""
    names, owner = np.unique(np.asarray(people, dtype=str), return_inverse=True)
    t = np.zeros((len(names), features.shape[1]))
    np.add.at(t, owner, calibration.unit(features))
    return [str(n) for n in names], t / np.maximum(np.linalg.norm(t, axis=1, keepdims=True), 1e-12)


