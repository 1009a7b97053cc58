"""Known people, enrolled once and searched many times.

A gallery is a folder (docs/formats.md): gallery.sqlite holds the people, their photos,
each photo's unit feature and what made the features (the network's bytes, flip, input
spec, calibration mean), so that a gallery is never searched with features of another
model; FAISS index files beside it answer searches. Enrolment embeds only new or changed
photos and commits every batch in one transaction: a killed enrolment keeps every batch
committed before it, and the same command resumes.

A face is searched against one template per person (the normalised mean of their photos'
unit features) by default, or against every photo with a person's score their best
photo's (`by="photo"`); docs/results.md has the measurement that chose the default.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
import uuid
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from spherecli.core.errors import UserError
from spherecli.core.formats import (GALLERY_FORMAT, GALLERY_VERSION, blob_features,
                                    feature_blob, gallery_index_path, is_gallery, open_gallery_db,
                                    write_gallery_meta)
from spherecli.core.images import describe_error, is_image_name, walk_images
from spherecli.core.outputs import locked
from spherecli.core.registry import FEATURE_DTYPES, SEARCH_BY
from spherecli.recognition import search as faiss_search

# What must match for features to be comparable; the detection settings are recorded, not
# required (they move landmarks, not the feature space).
MUST_MATCH = ("network", "flip", "input_spec", "mean")
BATCH = 32


@dataclass
class Candidate:
    """A gallery person a face may be: their score, and (searching by photo) the photo."""
    name: str
    score: float
    photo: str | None = None


class Gallery:
    """An enrolled gallery; `Gallery.create`, `Gallery.open`, or `Gallery.memory` (held in
    memory, for people given as images)."""

    def __init__(self, folder: Path | None, db: sqlite3.Connection, meta: dict):
        self.folder, self.db, self.meta = folder, db, meta
        self.notes: list[str] = []
        self._index: _Index | None = None

    # ------------------------------------------------------------------ making and opening

    @classmethod
    def create(cls, folder: str | Path, model, *, index: str = "auto", by: str = "template",
               dtype: str = "float32") -> "Gallery":
        """A new, empty gallery for this model (an `api.Model`) in folder (new or empty)."""
        folder = Path(folder)
        if is_gallery(folder):
            raise UserError(f"{folder} is a gallery already; enrol into it, or create the new one elsewhere")
        if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
            raise UserError(f"{folder} exists and is not an empty folder; a gallery is made in a new one")
        _check_choice("index", index, faiss_search.INDEX_CHOICES)
        _check_choice("by", by, SEARCH_BY)
        _check_choice("dtype", dtype, FEATURE_DTYPES)
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"cannot write {folder}: {e.strerror or e}") from None
        db, _ = open_gallery_db(folder, create=True)
        return cls._start(folder, db, model, index, by, dtype)

    @classmethod
    def memory(cls, model, *, by: str = "template") -> "Gallery":
        from spherecli.core.formats import GALLERY_SCHEMA

        _check_choice("by", by, SEARCH_BY)
        db = sqlite3.connect(":memory:", isolation_level=None)
        db.execute("PRAGMA foreign_keys = ON")
        db.executescript(GALLERY_SCHEMA)
        return cls._start(None, db, model, "flat", by, "float32")

    @classmethod
    def _start(cls, folder, db, model, index, by, dtype) -> "Gallery":
        meta = {"format": GALLERY_FORMAT, "version": GALLERY_VERSION, "model": str(model.path.resolve()),
                "calibration": model.calibration.source, "made": model.identity, "index": index,
                "by": by, "dtype": dtype, "dim": None, "generation": 0, "index_file": None}
        with transaction(db):
            write_gallery_meta(db, meta)
        return cls(folder, db, meta)

    @classmethod
    def open(cls, folder: str | Path) -> "Gallery":
        folder = Path(folder)
        db, meta = open_gallery_db(folder)
        return cls(folder, db, meta)

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> "Gallery":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Gallery({str(self.folder or ':memory:')!r}: {len(self)} people, {self.photos} photos)"

    def check(self, model) -> None:
        """Refuse a model whose features are not this gallery's, saying what differs."""
        made, now = self.meta["made"], model.identity
        differ = [k for k in MUST_MATCH if made.get(k) != now.get(k)]
        if differ:
            words = {"network": "network weights", "flip": "flip mode", "input_spec": "input spec",
                     "mean": "calibration mean feature"}
            raise UserError(f"{self.folder}: enrolled with {self.meta['model']} (calibration "
                            f"{self.meta['calibration']}); {model.path} differs in its "
                            f"{', '.join(words[k] for k in differ)}, so its features cannot be searched "
                            "here; use that model, or enrol the people into a new gallery")

    # ------------------------------------------------------------------ what it holds

    def __len__(self) -> int:
        return self.db.execute("SELECT COUNT(DISTINCT person) FROM photos WHERE feature IS NOT NULL") \
            .fetchone()[0]

    @property
    def photos(self) -> int:
        return self.db.execute("SELECT COUNT(*) FROM photos WHERE feature IS NOT NULL").fetchone()[0]

    def people(self) -> list[tuple[str, int, int]]:
        """(name, photos with a face, photos without one) of every enrolled person."""
        return [tuple(r) for r in self.db.execute(
            "SELECT name, COUNT(feature), COUNT(*) - COUNT(feature) FROM people "
            "JOIN photos ON photos.person = people.id GROUP BY people.id ORDER BY name")]

    def info(self) -> dict:
        m = self.meta
        n = self.photos
        kind = faiss_search.resolve_kind(m["index"], self._vector_count(n))
        return {"gallery": str(self.folder), "people": len(self), "photos": n,
                "photos_without_a_face": self.db.execute(
                    "SELECT COUNT(*) FROM photos WHERE feature IS NULL").fetchone()[0],
                "model": m["model"], "calibration": m["calibration"], "feature": f"{m['dim']} x {m['dtype']}",
                "search": f"by {m['by']}, {kind} index ({faiss_search.INDEX_KINDS[kind].what})"
                          + (" [auto]" if m["index"] == "auto" else ""),
                "generation": m["generation"]}

    # ------------------------------------------------------------------ changing it

    def enrol(self, model, sources, name: str | None = None, *, prune: bool = False,
              progress: bool = False) -> dict:
        """Enrol photos: folders of one folder per person (PERSON/photo.jpg), or, with name,
        photos and folders of that one person; arrays and PIL images need a name too (an
        array of the model's input size is an aligned crop, used as it is). Only
        new or changed photos are embedded. prune: photos of these folders that are gone
        from them are removed (a gallery kept in step with a folder). Returns counts."""
        from tqdm import tqdm

        self.check(model)
        started, storing = time.perf_counter(), 0.0
        items, notes = _items(sources, name)
        with self._writing():
            known = {s: (st, p) for s, st, p in self.db.execute(
                "SELECT photos.source, photos.stamp, people.name FROM photos JOIN people "
                "ON photos.person = people.id")}
            todo, kept = [], 0
            for person, source, stamp, image in items:
                if stamp is not None and known.get(source) == (stamp, person):
                    kept += 1
                else:
                    todo.append((person, source, stamp, image))
            added = unreadable = 0
            bar = tqdm(total=len(todo), desc="enrol", unit="photo", disable=not progress, dynamic_ncols=True)
            for start in range(0, len(todo), BATCH):
                rows = []
                for person, source, stamp, image in todo[start:start + BATCH]:
                    try:
                        crop, box, note = model.crop(image)
                        rows.append((person, source, stamp, crop, json.dumps(box), note))
                    except UserError as e:
                        rows.append((person, source, stamp, None, None, str(e)))
                    except (OSError, ValueError) as e:
                        notes.append(f"{source}: {describe_error(e)}")
                        unreadable += 1
                    bar.update()
                crops = [r[3] for r in rows if r[3] is not None]
                units = iter(model.calibration.unit(model.embedder.embed(crops)) if crops else [])
                t0 = time.perf_counter()
                with transaction(self.db):
                    for person, source, stamp, crop, box, note in rows:
                        feature = None if crop is None else next(units)
                        self._put(person, source, stamp or "", feature, box, note)
                        if note:
                            notes.append(note)
                        added += feature is not None
                    self._bump()
                storing += time.perf_counter() - t0
            bar.close()
            removed = 0
            if prune:
                roots = [str(Path(s).resolve()) + os.sep for s in sources if isinstance(s, (str, Path))]
                present = {item[1] for item in items}
                gone = [s for s in known if s not in present and any(s.startswith(r) for r in roots)]
                removed = self._delete("source", gone)
            t0 = time.perf_counter()
            if self.folder is not None:  # saved for the next search; one in memory is built when searched
                self._refresh_index(write=True)
            storing += time.perf_counter() - t0
        self.notes = notes
        seconds = time.perf_counter() - started
        return {"enrolled": added, "without_a_face": len(todo) - added - unreadable,
                "unchanged": kept, "unreadable": unreadable, "removed": removed, "people": len(self),
                "photos": self.photos, "seconds": round(seconds, 2),
                "gallery_share": f"{storing / seconds:.1%}" if seconds else "0%"}

    def remove(self, people=(), photos=()) -> int:
        """Remove people (by name) and photos (by path); returns the photos removed."""
        missing = [p for p in people if not self.db.execute(
            "SELECT 1 FROM people WHERE name = ?", (p,)).fetchone()]
        sources = [str(Path(p).resolve()) for p in photos]
        missing += [p for p, s in zip(photos, sources) if not self.db.execute(
            "SELECT 1 FROM photos WHERE source = ?", (s,)).fetchone()]
        if missing:
            raise UserError(f"{self.folder}: no enrolled {', '.join(map(repr, missing))}; nothing was "
                            "removed (`sphereface gallery list` shows who is enrolled)")
        with self._writing():
            n = self._delete("source", sources)
            ids = [r[0] for p in people
                   for r in self.db.execute("SELECT id FROM people WHERE name = ?", (p,))]
            n += self._delete("person", ids)
            if self.folder is not None:
                self._refresh_index(write=True)
        return n

    def _put(self, person: str, source: str, stamp: str, feature, box, note) -> None:
        self.db.execute("INSERT OR IGNORE INTO people (name) VALUES (?)", (person,))
        pid = self.db.execute("SELECT id FROM people WHERE name = ?", (person,)).fetchone()[0]
        blob = None
        if feature is not None:
            if self.meta["dim"] is None:
                self.meta["dim"] = int(len(feature))
                write_gallery_meta(self.db, {"dim": self.meta["dim"]})
            blob = feature_blob(feature, self.meta["dtype"])
        self.db.execute("DELETE FROM photos WHERE source = ?", (source,))
        self.db.execute("INSERT INTO photos (person, source, stamp, feature, box, note) "
                        "VALUES (?, ?, ?, ?, ?, ?)", (pid, source, stamp, blob, box, note or None))

    def _delete(self, column: str, values) -> int:
        values = list(values)
        if not values:
            return 0
        with transaction(self.db):
            n = 0
            for v in values:
                n += self.db.execute(f"DELETE FROM photos WHERE {column} = ?", (v,)).rowcount
            self.db.execute("DELETE FROM people WHERE id NOT IN (SELECT person FROM photos)")
            self._bump()
        return n

    def _bump(self) -> None:
        self.meta["generation"] += 1
        write_gallery_meta(self.db, {"generation": self.meta["generation"]})

    def _writing(self):
        """One writer at a time: a second enrolment is refused, saying who holds the gallery."""
        if self.folder is None:
            return nullcontext()
        return locked(self.folder / "gallery.sqlite", "gallery enrolment")

    # ------------------------------------------------------------------ searching it

    def _vector_count(self, photos: int) -> int:
        return photos if self.meta["by"] == "photo" else len(self)

    def _vectors(self) -> tuple[np.ndarray, np.ndarray]:
        """(ids, unit vectors) the index holds: photo ids and features, or person ids and
        templates."""
        rows = self.db.execute("SELECT id, person, feature FROM photos WHERE feature IS NOT NULL "
                               "ORDER BY id").fetchall()
        if not rows:
            return np.zeros(0, np.int64), np.zeros((0, self.meta["dim"] or 1), np.float32)
        feats = blob_features([r[2] for r in rows], self.meta["dtype"], self.meta["dim"])
        if self.meta["by"] == "photo":
            return np.array([r[0] for r in rows], np.int64), feats
        people, owner = np.unique(np.array([r[1] for r in rows], np.int64), return_inverse=True)
        t = np.zeros((len(people), feats.shape[1]), np.float64)
        np.add.at(t, owner, feats)
        t /= np.maximum(np.linalg.norm(t, axis=1, keepdims=True), 1e-12)
        return people, t.astype(np.float32)

    def _refresh_index(self, write: bool = False) -> "_Index":
        """The FAISS index of the current generation: held, read from its file, or built (and,
        by a writer, saved for the next search)."""
        generation = self.meta["generation"]
        if self._index is not None and self._index.generation == generation:
            return self._index
        ids, vectors = self._vectors()
        kind = faiss_search.resolve_kind(self.meta["index"], len(ids))
        index = None
        if self.folder is not None:
            path = gallery_index_path(self.folder, self.meta["by"], kind)
            current = self.meta.get("index_file") == [path.name, generation]
            if current and path.is_file():
                try:
                    index = faiss_search.load(path, kind)
                except RuntimeError:
                    index = None  # a damaged index file is built again
        if index is None and len(ids):
            index = faiss_search.build(vectors, ids, kind)
            if write and self.folder is not None:
                tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
                faiss_search.save(index, tmp)
                os.replace(tmp, path)
                with transaction(self.db):
                    self.meta["index_file"] = [path.name, generation]
                    write_gallery_meta(self.db, {"index_file": self.meta["index_file"]})
        most = self.db.execute("SELECT MAX(n) FROM (SELECT COUNT(*) AS n FROM photos WHERE feature IS NOT "
                               "NULL GROUP BY person)").fetchone()[0] if self.meta["by"] == "photo" else 1
        self._index = _Index(generation, kind, index, ids, vectors, most or 1)
        return self._index

    def _reload_meta(self) -> None:
        """Another process may have enrolled since this gallery was opened."""
        if self.folder is not None:
            self.meta.update({k: json.loads(v) for k, v in self.db.execute("SELECT key, value FROM meta")})

    def search(self, units: np.ndarray, k: int = 1) -> list[list[Candidate]]:
        """The k best people for each unit feature (N, D), best first."""
        self._reload_meta()
        held = self._refresh_index()
        if held.index is None:
            raise UserError(f"{self.folder or 'the gallery'}: nobody is enrolled (no photo with a face)")
        units = np.atleast_2d(np.asarray(units, np.float32))
        if units.shape[1] != held.index.d:
            raise UserError(f"features of size {units.shape[1]} cannot be searched in a gallery of "
                            f"size {held.index.d}")
        # ids are sorted (photo ids in order, person ids from np.unique): a search finds rows
        scores, ids = faiss_search.search(held.index, held.kind, units, min(k * held.most, 1024),
                                          lambda found: held.vectors[np.searchsorted(held.ids, found)])
        names = self._names(ids, self.meta["by"] == "photo")
        out = []
        for row_scores, row_ids in zip(scores, ids):
            best: dict[str, Candidate] = {}
            for s, i in zip(row_scores.tolist(), row_ids.tolist()):
                if i < 0:
                    continue
                person, source = names[i]
                if person not in best:  # results come best first: a person's first is their best
                    best[person] = Candidate(person, s, source)
            out.append(list(best.values())[:k])
        return out

    def _names(self, ids: np.ndarray, photo: bool) -> dict[int, tuple[str, str | None]]:
        wanted = sorted({int(i) for i in ids.ravel() if i >= 0})
        if photo:
            query = ("SELECT photos.id, people.name, photos.source FROM photos JOIN people "
                     "ON photos.person = people.id WHERE photos.id IN ({})")
        else:
            query = "SELECT id, name, NULL FROM people WHERE id IN ({})"
        out = {}
        for start in range(0, len(wanted), 900):  # SQLite's limit on bound values
            part = wanted[start:start + 900]
            out.update({r[0]: (r[1], r[2]) for r in self.db.execute(query.format(",".join("?" * len(part))),
                                                                    part)})
        return out


@dataclass
class _Index:
    """A gallery's search index as held for one generation: the FAISS index and the sorted ids
    and vectors it was built from (for rescoring), and the most photos any person has (a
    search by photo asks for that many candidates a person)."""
    generation: int
    kind: str
    index: object
    ids: np.ndarray
    vectors: np.ndarray
    most: int


@contextmanager
def transaction(db: sqlite3.Connection):
    """BEGIN IMMEDIATE ... COMMIT, rolled back on any error: an update is all or nothing."""
    if db.in_transaction:  # nested: the outer transaction decides
        yield
        return
    db.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")


def _check_choice(name: str, value: str, choices) -> None:
    if value not in choices:
        raise UserError(f"`{name}` must be one of {', '.join(choices)}, got {value!r}")


def _items(sources, name: str | None) -> tuple[list[tuple], list[str]]:
    """(person, source, file stamp, image) of each photo to enrol; stamp None for an image
    given in memory (always embedded: it has no file to compare)."""
    if not isinstance(sources, (list, tuple)):
        sources = [sources]
    items, notes = [], []
    for source in sources:
        if not isinstance(source, (str, Path)):
            if name is None:
                raise UserError("an image given as an array needs the name of the person it shows")
            items.append((name, f"{name}/<image {uuid.uuid4().hex[:12]}>", None, source))
            continue
        path = Path(source)
        if path.is_dir():
            rels = list(walk_images(path))
            for rel in rels:
                person = name or (rel.split("/")[0] if "/" in rel else None)
                if person is None:
                    notes.append(f"{path / rel}: not in a person's folder (PERSON/photo.jpg); left out")
                    continue
                _add(items, notes, person, path / rel)
            if not rels:
                raise UserError(f"{path}: no photos under it")
        elif path.is_file() and is_image_name(path.name):
            if name is None:
                raise UserError(f"{path}: a photo needs the name of the person it shows (`name`)")
            _add(items, notes, name, path)
        else:
            raise UserError(f"{path}: not a photo or a folder of photos")
    return items, notes


def _add(items: list, notes: list, person: str, path: Path) -> None:
    try:
        st = path.stat()
    except OSError as e:
        notes.append(f"{path}: {describe_error(e)}")
        return
    items.append((person, str(path.resolve()), f"{st.st_size}:{st.st_mtime_ns}", path))


def cached(model, folder: str | Path, cache: str | Path | None = None, progress: bool = False) -> Gallery:
    """A folder of one folder per person as a gallery, kept in step with the folder in
    FOLDER/.sphereface-gallery/<model key> (or cache): its photos enrolled once, changed ones
    again, gone ones removed."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"gallery {folder}: no such directory")
    where = Path(cache) if cache else folder / ".sphereface-gallery" / model.key[:16]
    notes = []
    try:
        gallery = Gallery.open(where) if is_gallery(where) else Gallery.create(where, model)
    except UserError as e:
        if cache:  # a folder the user named is never replaced
            raise
        import shutil

        if where.is_dir() and os.access(where, os.W_OK):
            notes.append(f"{e}; the cached gallery was made again")
            shutil.rmtree(where)
            gallery = Gallery.create(where, model)
        else:  # a folder that cannot be written: its photos are embedded on every call
            notes.append(f"{e}; the gallery is held in memory and not cached")
            gallery = Gallery.memory(model)
    summary = gallery.enrol(model, [folder], prune=True, progress=progress)
    gallery.notes = notes + gallery.notes
    if not summary["people"]:
        raise UserError(f"gallery {folder}: no face found in any person's folder (expected PERSON/photo.jpg)")
    return gallery
