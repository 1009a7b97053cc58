"""A gallery of known people: one folder per person, one feature per photo, cached
next to the photos and keyed by the model, and one template per person."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from spherecli import UserError
from spherecli.calibration import Calibration
from spherecli.images import describe_error, walk_images
from spherecli.recognize import FaceEmbedder


def _file_key(path: Path) -> str:
    st = path.stat()
    return f"{st.st_size}:{st.st_mtime_ns}"


def _model_key(model: str | Path, embedder: FaceEmbedder) -> str:
    h = hashlib.sha1()
    with open(model, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    h.update(json.dumps([embedder.flip, embedder.settings.as_json(), embedder.net.spec.as_json()]).encode())
    return h.hexdigest()


def gallery(embedder: FaceEmbedder, root: str | Path, model: str | Path, *,
            cache: str | Path | None = None, select: str = "center"):
    """One feature per gallery photo (folders = people), reusing a cache keyed by the model.

    Returns (person of each photo, features, notes). Photos with no face
    are left out with a note.
    """
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"gallery {root}: no such directory")
    cache = Path(cache) if cache else root / ".sphereface-gallery.npz"
    key = _model_key(model, embedder)
    known = {}
    if cache.is_file():
        with np.load(cache) as c:
            if str(c["model"]) == key:
                known = {(str(p), str(k)): f for p, k, f in zip(c["paths"], c["keys"], c["features"])}
    people, paths, keys, feats, notes = [], [], [], [], []
    for rel in walk_images(root):
        person = rel.split("/")[0] if "/" in rel else None
        if person is None:
            continue
        k = _file_key(root / rel)
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
        np.savez(cache, model=key, paths=np.array(paths), keys=np.array(keys), features=feats)
    except OSError:
        notes.append(f"could not write the gallery cache {cache}")
    return people, feats, notes


def templates(people: list[str], features: np.ndarray, calibration: Calibration):
    """One unit template per person: the mean of their photos' unit features."""
    names = sorted(set(people))
    unit = calibration.unit(features)
    t = np.stack([unit[[p == n for p in people]].mean(axis=0) for n in names])
    return names, t / np.linalg.norm(t, axis=1, keepdims=True)


