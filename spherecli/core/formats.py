"""Every file layout spherecli reads or writes, defined here and nowhere else.

- landmark manifest (JSON Lines, written by `detect`, read by `align`)
- landmark text file (`path x1 y1 ... x5 y5`, the form published landmark files take)
- training list (`path label`, written by `list`, read by `train`)
- model file and training checkpoint (`model.pt`, `checkpoint.pt`), and the input spec
  of a network (in a model file, or beside an ONNX model)
- a training run's folder and its log.jsonl
- features (`.npz`, from `evaluate --save-features` and `embed`), evaluation results
  (`MODEL.lfw.json`) and where they go, per-pair scores, identities
- a gallery (`gallery.sqlite` and its FAISS index files), and features in the MegaFace
  devkit's binary layout

docs/formats.md describes them for people; this module is the definition.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from spherecli.core.errors import UserError, __version__, excerpt
from spherecli.core.images import IMAGE_EXTENSIONS, VIDEO_EXTENSIONS, is_image_name

MANIFEST_FORMAT = "spherecli.manifest"
MANIFEST_VERSION = 1


def read_toml(path: str | Path) -> dict:
    """A TOML file (a training recipe, a run's config, a benchmarks file), or one error line."""
    import tomllib

    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except OSError as e:
        raise UserError(f"{path}: {e.strerror or e}") from None
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"{path}: not valid TOML ({e})") from None
    except UnicodeDecodeError:
        raise UserError(f"{path}: not a text file (TOML is UTF-8)") from None


# --------------------------------------------------------------------------- JSON Lines

def repair_tail(path: str | Path) -> None:
    """Drop an unterminated last line, the only damage a killed appender can leave."""
    with open(path, "rb+") as f:
        size = f.seek(0, os.SEEK_END)
        if size == 0:
            return
        f.seek(size - 1)
        if f.read(1) == b"\n":
            return
        pos = size
        while pos > 0:
            step = min(65536, pos)
            f.seek(pos - step)
            chunk = f.read(step)
            cut = chunk.rfind(b"\n")
            if cut >= 0:
                f.truncate(pos - step + cut + 1)
                return
            pos -= step
        f.truncate(0)


def read_jsonl(path: str | Path) -> Iterator[tuple[int, dict]]:
    """Yield (line number, object); a bad line is an error naming file and line.

    An unterminated last line is skipped silently: it is what a run killed in
    the middle of a write leaves, and the next appender removes it.
    """
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if not raw.endswith(b"\n"):
                return
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw)
            except ValueError as e:
                raise UserError(f"{path}:{lineno}: not valid JSON ({e})") from None
            if not isinstance(obj, dict):
                raise UserError(f"{path}:{lineno}: expected a JSON object")
            yield lineno, obj


class JsonlAppender:
    """Appends records, one flushed and fsynced write per batch."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if self.path.exists():
                repair_tail(self.path)
            self.file = open(self.path, "a", encoding="utf-8")
        except OSError as e:
            raise UserError(f"cannot write {self.path}: {e.strerror or e}") from None

    def write(self, records: Iterable[dict]) -> None:
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        if text:
            self.file.write(text)
            self.file.flush()
            os.fsync(self.file.fileno())

    def close(self) -> None:
        self.file.close()


# --------------------------------------------------------------------------- manifest

def manifest_header(root: str | Path, settings: dict) -> dict:
    return {"type": "header", "format": MANIFEST_FORMAT, "version": MANIFEST_VERSION,
            "tool": f"spherecli {__version__}", "root": str(Path(root).resolve()),
            "settings": settings}


def read_manifest(path: str | Path) -> tuple[dict, Iterator[dict]]:
    """Return (header, iterator over image records) of a manifest."""
    lines = read_jsonl(path)
    first = next(lines, None)
    if first is None or first[1].get("format") != MANIFEST_FORMAT:
        raise UserError(f"{path}:1: not a spherecli landmark manifest (no header line)")
    header = first[1]
    if header.get("version", 0) > MANIFEST_VERSION:
        raise UserError(f"{path}:1: manifest version {header['version']} is newer than this "
                        f"spherecli ({__version__}) understands")

    def records():
        for lineno, rec in lines:
            if rec.get("type") == "image":
                if "path" not in rec or "status" not in rec:
                    raise UserError(f"{path}:{lineno}: image record without path or status")
                yield rec

    return header, records()


def latest_status(path: str | Path) -> dict[str, str]:
    """Each image's status in a manifest; when an image was retried, its last record counts."""
    _, records = read_manifest(path)
    return {rec["path"]: rec["status"] for rec in records}


def manifest_summary(path: str | Path) -> dict:
    """Counts over a whole manifest (all runs that appended to it)."""
    counts = {"images": 0, "ok": 0, "no_face": 0, "error": 0}
    for status in latest_status(path).values():
        counts["images"] += 1
        counts[status] = counts.get(status, 0) + 1
    return counts


# --------------------------------------------------------------------------- landmark text file

def is_manifest(path: str | Path) -> bool:
    with open(path, "rb") as f:
        return f.read(1) == b"{"


def read_landmark_file(path: str | Path) -> Iterator[dict]:
    """Records from a `relative/path.jpg x1 y1 ... x5 y5` text file.

    The path is everything before the last ten fields, so names with spaces work.
    """
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            fields = line.rsplit(None, 10)
            if len(fields) != 11:
                raise UserError(f"{path}:{lineno}: expected 'path x1 y1 ... x5 y5' "
                                f"(a path and 10 numbers), got {len(fields)} fields")
            try:
                xy = [float(v) for v in fields[1:]]
            except ValueError:
                raise UserError(f"{path}:{lineno}: landmark coordinates must be numbers") from None
            yield {"path": fields[0], "status": "ok",
                   "landmarks": [xy[i:i + 2] for i in range(0, 10, 2)]}


# --------------------------------------------------------------------------- training list

LIST_LINE = re.compile(r"^(.*?\S)[ \t]+(-?\d+)[ \t]*$")


def summary_path(list_path: str | Path) -> Path:
    """A list's counts and label -> name table: LIST.txt.json beside LIST.txt."""
    return Path(str(list_path) + ".json")


def write_list(path: str | Path, items: Iterable[tuple[str, int]]) -> None:
    write_text_atomic(path, "".join(f"{p} {label}\n" for p, label in items))


class ImageList:
    """A training list as two arrays, not a Python object per image: CASIA-WebFace's
    494,414 images take 30 MB instead of 100, and DataLoader workers share the arrays
    instead of copying the objects page by page as they touch their reference counts.
    Reads as a sequence of (path, label)."""

    def __init__(self, paths, labels):
        self.paths = paths if isinstance(paths, np.ndarray) else \
            np.array([p.encode("utf-8", "surrogateescape") for p in paths], dtype=bytes)
        self.labels = np.asarray(labels, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return ImageList(self.paths[i], self.labels[i])
        return self.paths[i].decode("utf-8", "surrogateescape"), int(self.labels[i])

    def __iter__(self):
        return (self[i] for i in range(len(self)))


def read_list(path: str | Path, root: str | Path | None = None) -> ImageList:
    """Read a `path label` list. Relative paths resolve against root, by
    default the list file's own folder. Paths may contain spaces."""
    path = Path(path)
    base = Path(root) if root is not None else path.parent
    items = []
    try:
        f = open(path, encoding="utf-8")
    except OSError as e:
        raise UserError(f"cannot read list {path}: {e.strerror or e}") from None
    with f:
        try:
            for lineno, line in enumerate(f, 1):
                line = line.rstrip("\r\n")
                if not line.strip() or line.startswith("#"):
                    continue
                # The label is the last field; the path is everything before it, spaces and all.
                match = LIST_LINE.match(line)
                if match is None:
                    raise UserError(f"{path}:{lineno}: expected '<image path> <integer label>', "
                                    f"got {line[:80]!r}")
                p, label = match.group(1), int(match.group(2))
                if label < 0:
                    raise UserError(f"{path}:{lineno}: labels start at 0, got {label}")
                items.append((p if os.path.isabs(p) else str(base / p), label))
        except UnicodeDecodeError:
            raise UserError(f"{path}: not a text file of '<image path> <label>' lines") from None
    if not items:
        raise UserError(f"{path}: the list is empty")
    return ImageList([p for p, _ in items], [label for _, label in items])


# --------------------------------------------------------------------------- checkpoints

CHECKPOINT_FORMAT = "spherecli.checkpoint"   # everything needed to resume training
MODEL_FORMAT = "spherecli.model"             # the feature network alone, for inference


def save_checkpoint(path: str | Path, state: dict) -> None:
    """torch.save, atomically: a kill mid-write leaves the previous file intact.

    Only tensors, numbers, strings, lists and dicts go in, so both kinds load
    with torch.load(weights_only=True). The caller has checked the path
    (spherecli.core.outputs).
    """
    import torch

    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(state, tmp)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise UserError(f"cannot write {path}: {e.strerror or e}") from None


def torch_load(path: str | Path):
    """torch.load that never runs code from the file, with errors a person can act on."""
    import pickle

    import torch

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise UserError(f"{path}: empty file (0 bytes), not a model")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # PyTorch's message suggests weights_only=False: exactly what would run the file's code.
        lines = (line.strip() for line in str(e).splitlines()[1:])
        detail = excerpt(next((line for line in lines if line and not line.startswith(("Check the",
                                                                                        "Please file"))),
                              str(e) or "unreadable"))
        if "global" in detail.lower():
            raise UserError(f"{path}: holds Python objects other than tensors, numbers and "
                            f"containers ({detail}); spherecli never executes code from a "
                            "model file, so it does not load it") from None
        raise UserError(f"{path}: not a PyTorch model or checkpoint file ({detail})") from None
    except Exception as e:  # noqa: BLE001 - zip, pickle and format errors come in many types
        raise UserError(f"{path}: not a PyTorch model or checkpoint file "
                        f"({excerpt(e) or type(e).__name__})") from None


def load_checkpoint(path: str | Path, expect: str | None = None) -> dict:
    """Load a checkpoint or model file; expect limits it to one of the two formats."""
    state = torch_load(path)
    kind = state.get("format") if isinstance(state, dict) else None
    if kind not in (CHECKPOINT_FORMAT, MODEL_FORMAT) or (expect and kind != expect):
        what = "training checkpoint" if expect == CHECKPOINT_FORMAT else "model"
        raise UserError(f"{path}: not a spherecli {what}"
                        + ("" if expect else " (`sphereface import` converts published ones)"))
    return state


# --------------------------------------------------------------------------- input contract

@dataclass
class InputSpec:
    """What a network expects of a face crop: the `input` block of a model file, and an
    ONNX model's sidecar `MODEL.onnx.json`.

    The crop is aligned to the named reference points at size (height, width);
    its channels come in `channels` order and each value is scaled as
    (pixel - mean) / std.
    """
    size: tuple = (112, 96)
    reference: str = "sphereface"
    channels: str = "bgr"
    mean: float = 127.5
    std: float = 128.0

    def __post_init__(self):
        from spherecli.core.registry import CHANNEL_ORDERS, REFERENCES

        try:
            self.size = tuple(int(v) for v in self.size)
            self.mean, self.std = float(self.mean), float(self.std)
        except (TypeError, ValueError):
            raise UserError(f"input spec: size must be two integers and mean, std numbers, got "
                            f"{self.size!r}, {self.mean!r}, {self.std!r}") from None
        if len(self.size) != 2 or min(self.size) < 8:
            raise UserError(f"input spec: size must be (height, width), got {self.size}")
        if self.reference not in REFERENCES:
            raise UserError(f"input spec: reference must be one of {', '.join(REFERENCES)}, "
                            f"got {self.reference!r}")
        if self.channels not in CHANNEL_ORDERS:
            raise UserError(f"input spec: channels must be one of {', '.join(CHANNEL_ORDERS)}, "
                            f"got {self.channels!r}")
        if self.std == 0:
            raise UserError("input spec: std must not be 0")

    def as_json(self) -> dict:
        d = asdict(self)
        d["size"] = list(self.size)
        return d

    def describe(self) -> str:
        h, w = self.size
        return (f"{h}x{w} {self.channels.upper()} crops aligned to the {self.reference} points, "
                f"(pixel - {self.mean:g}) / {self.std:g}")


INPUT_PRESETS = {
    # Our networks and the original release: Caffe reads BGR.
    "sphereface": InputSpec(),
    # insightface's model packs and most ONNX face networks since ArcFace.
    "insightface": InputSpec((112, 112), "arcface", "rgb", 127.5, 127.5),
}


def parse_input_spec(text: str) -> InputSpec:
    """An input spec from the command line: a preset name, a JSON file, or
    `preset,key=value,...` / `key=value,...` on top of the sphereface preset."""
    if text in INPUT_PRESETS:
        return INPUT_PRESETS[text]
    if text.endswith(".json"):
        return read_input_spec(text)
    fields_ = {}
    base = INPUT_PRESETS["sphereface"]
    for i, part in enumerate(p.strip() for p in text.split(",") if p.strip()):
        if i == 0 and part in INPUT_PRESETS:
            base = INPUT_PRESETS[part]
            continue
        key, sep, value = part.partition("=")
        if not sep or key not in InputSpec.__dataclass_fields__:
            raise UserError(f"`input_spec` {text!r}: expected a preset ({', '.join(INPUT_PRESETS)}), a "
                            f".json file, or key=value pairs of {', '.join(InputSpec.__dataclass_fields__)}")
        fields_[key] = value.lower().split("x") if key == "size" else value
    return InputSpec(**{**asdict(base), **fields_})


def read_input_spec(path: str | Path) -> InputSpec:
    try:
        d = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as e:
        raise UserError(f"{path}: {e.strerror or e}") from None
    except ValueError as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None
    d = d.get("input", d) if isinstance(d, dict) else d
    if not isinstance(d, dict) or set(d) - set(InputSpec.__dataclass_fields__):
        raise UserError(f"{path}: expected an object with {', '.join(InputSpec.__dataclass_fields__)}")
    try:
        return InputSpec(**d)
    except UserError as e:
        raise UserError(f"{path}: {e}") from None


def write_input_spec(path: str | Path, spec: InputSpec) -> None:
    spec_file = {"format": "spherecli.input", "input": spec.as_json()}
    write_text_atomic(path, json.dumps(spec_file, indent=1) + "\n")


def onnx_sidecar(model: str | Path) -> Path:
    """Where an ONNX model's input spec lives: next to it, MODEL.onnx.json."""
    return Path(str(model) + ".json")


# --------------------------------------------------------------------------- model file

@dataclass
class ModelFile:
    """The feature network alone (`model.pt`): what `create_model(arch, **model_args)`
    builds, its weights, and its input spec. A training checkpoint holds the same
    keys, so it reads as a model file too."""
    arch: str
    model_args: dict
    weights: dict
    input: InputSpec
    origin: dict = field(default_factory=dict)   # the training config, or where it was imported from

    def save(self, path: str | Path) -> None:
        save_checkpoint(path, {"format": MODEL_FORMAT, "version": 2, "tool": f"spherecli {__version__}",
                               **self.header(), "model": self.weights})

    def header(self) -> dict:
        """Every key but the weights, shared with the training checkpoint."""
        return {"arch": self.arch, "model_args": self.model_args, "input": self.input.as_json(),
                "origin": self.origin}

    @classmethod
    def load(cls, path: str | Path) -> "ModelFile":
        return cls.from_state(load_checkpoint(path), path)

    @classmethod
    def from_state(cls, state: dict, path: str | Path) -> "ModelFile":
        try:
            # Files written before version 2 kept the constructor's arguments at the top
            # level and always meant SphereFace's 112x96 BGR input.
            args = state.get("model_args") or {"input_size": state["input_size"],
                                               "feature_dim": state["feature_dim"]}
            spec = InputSpec(**state["input"]) if "input" in state else InputSpec(size=args["input_size"])
            origin = state.get("origin") or {"config": state.get("config")}
            return cls(state["arch"], dict(args), state["model"], spec, origin)
        except (KeyError, TypeError) as e:
            raise UserError(f"{path}: a spherecli model file without {e}") from None


# --------------------------------------------------------------------------- training run

@dataclass
class Checkpoint:
    """Everything needed to resume training (`checkpoint.pt`): the model file's keys,
    so that a checkpoint reads as a model file too, and the training state."""
    model: ModelFile
    head_name: str
    num_classes: int
    head: dict
    optimizer: dict
    scaler: dict
    iteration: int
    rng: dict

    def save(self, path: str | Path) -> None:
        save_checkpoint(path, {"format": CHECKPOINT_FORMAT, "version": 2, "tool": f"spherecli {__version__}",
                               **self.model.header(), "model": self.model.weights,
                               "head_name": self.head_name, "num_classes": self.num_classes,
                               "head": self.head, "optimizer": self.optimizer, "scaler": self.scaler,
                               "iteration": self.iteration, "rng": self.rng})

    @classmethod
    def load(cls, path: str | Path) -> "Checkpoint":
        state = load_checkpoint(path, CHECKPOINT_FORMAT)
        try:
            return cls(ModelFile.from_state(state, path), state["head_name"], state["num_classes"],
                       state["head"], state["optimizer"], state["scaler"], state["iteration"], state["rng"])
        except KeyError as e:
            raise UserError(f"{path}: a training checkpoint without {e}") from None


class RunFolder:
    """The files of a training run (`train --out`)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.config, self.log, self.checkpoint, self.model = (
            self.path / name for name in ("config.toml", "log.jsonl", "checkpoint.pt", "model.pt"))


def read_log(path: str | Path) -> list[dict]:
    """A run's log.jsonl: its iteration rows, each iteration once. A resumed run redid
    the iterations after its checkpoint; the later rows count."""
    rows: list[dict] = []
    for _, r in read_jsonl(path):
        if "iter" not in r:
            continue
        while rows and rows[-1]["iter"] >= r["iter"]:
            rows.pop()
        rows.append(r)
    return rows


# --------------------------------------------------------------------------- features and results

def save_features(path: str | Path, names, features, *, flip: str, amp: str = "none",
                  network: str = "") -> None:
    """`.npz` of image names (paths under the data folder), float32 features (one row per
    name), and how they were made: flip mode, precision and (from `embed`) the network
    file's SHA-1. Written by `evaluate --save-features` and `embed`; read by `evaluate
    --features` and `megaface`."""
    write_npz(path, names=np.array(list(names), dtype=str), features=np.asarray(features, np.float32),
              flip=flip, amp=amp, network=network)


def write_npz(path: str | Path, **arrays) -> None:
    """np.savez to exactly this path (np.savez itself adds .npz to a name without it), atomically."""
    tmp = Path(str(path) + f".{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise UserError(f"cannot write {path}: {e.strerror or e}") from None


def load_features(path: str | Path) -> tuple[list[str], np.ndarray, dict]:
    """(names, float64 features, {"flip": ..., "amp": ...}) of a features file."""
    try:
        with np.load(path) as f:
            names, feats = [str(n) for n in f["names"]], f["features"].astype(np.float64)
            made = {k: str(f[k]) for k in ("flip", "amp", "network") if k in f}
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"{path}: not a features file of names and features ({e})") from None
    return names, feats, made


def result_path(model: str | Path, benchmark: str = "lfw") -> Path:
    """Where `evaluate` writes a model's result on a benchmark, next to the model:
    MODEL.lfw.json is the one `verify` and `identify` calibrate with."""
    return Path(str(Path(model).with_suffix("")) + f".{benchmark}.json")


# --------------------------------------------------------------------------- scores and identities

SCORES_COLUMNS = ("left", "right", "same", "score")
# candidates: the k best people, best first, as name=score;name=score; track: a video's
# tracked face (empty for photos and untracked frames)
IDENTITY_COLUMNS = ("source", "frame", "track", "x1", "y1", "x2", "y2", "identity", "score", "best_match",
                    "candidates")


def write_scores(path: str | Path, left, right, same, scores) -> None:
    """`evaluate --scores`: every pair's held-out cosine, one CSV row per pair."""
    lines = [",".join(SCORES_COLUMNS)] + [f"{a},{b},{int(s)},{v:.6f}"
                                          for a, b, s, v in zip(left, right, same, scores)]
    write_text_atomic(path, "\n".join(lines) + "\n")


def write_result(path: str | Path, result: dict) -> None:
    """An evaluation result (`MODEL.lfw.json`): every number of the protocol and the
    calibration; the per-pair scores and the ROC points stay out (--scores, --roc)."""
    kept = {k: v for k, v in result.items() if k not in ("scores", "roc", "output")}
    write_text_atomic(path, json.dumps(kept, indent=1) + "\n")


def read_result(path: str | Path, needs: tuple[str, ...]) -> dict:
    """An evaluation result (write_result's), checked for the keys the reader needs."""
    try:
        result = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: not an evaluation result ({excerpt(e, 80)})") from None
    missing = [k for k in needs if not isinstance(result, dict) or k not in result]
    if missing:
        raise UserError(f"{path}: not an evaluation result with {', '.join(missing)}")
    return result


# --------------------------------------------------------------------------- gallery

GALLERY_FORMAT, GALLERY_VERSION = "spherecli.gallery", 1
GALLERY_DB = "gallery.sqlite"
# people and their photos; a photo's feature is its unit (centred, normalised) feature as
# little-endian float32 or float16 bytes, NULL where no face was found (so that enrolling
# the photo again is skipped until the file changes); stamp is the file's size:mtime_ns.
GALLERY_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS people (id INTEGER PRIMARY KEY, name TEXT UNIQUE NOT NULL);
CREATE TABLE IF NOT EXISTS photos (
    id INTEGER PRIMARY KEY,
    person INTEGER NOT NULL REFERENCES people(id) ON DELETE CASCADE,
    source TEXT UNIQUE NOT NULL,
    stamp TEXT NOT NULL,
    feature BLOB,
    box TEXT,
    note TEXT);
CREATE INDEX IF NOT EXISTS photos_person ON photos(person);
"""

def is_gallery(folder: str | Path) -> bool:
    return (Path(folder) / GALLERY_DB).is_file()


def gallery_index_path(folder: str | Path, by: str, kind: str) -> Path:
    """A gallery's FAISS index of its templates or photos; it is current when the gallery's
    meta `index` names this file and the gallery's generation (written after the file)."""
    return Path(folder) / f"index.{by}.{kind}.faiss"


def open_gallery_db(folder: str | Path, create: bool = False):
    """The gallery's SQLite database (WAL: searches read while an enrolment writes; every
    update one transaction), its layout checked. Returns (connection, meta)."""
    import sqlite3

    path = Path(folder) / GALLERY_DB
    if not create and not path.is_file():
        raise UserError(f"{folder}: not a gallery (no {GALLERY_DB}; `sphereface gallery create` makes one)")
    try:
        db = sqlite3.connect(path, timeout=30, isolation_level=None)
        db.execute("PRAGMA foreign_keys = ON")
        db.execute("PRAGMA journal_mode = WAL")
        db.execute("PRAGMA synchronous = FULL")
        if create:
            db.executescript(GALLERY_SCHEMA)
        meta = {k: json.loads(v) for k, v in db.execute("SELECT key, value FROM meta")}
    except (sqlite3.Error, ValueError) as e:
        raise UserError(f"{path}: not a readable gallery database ({excerpt(e, 80)})") from None
    if not create and (meta.get("format") != GALLERY_FORMAT or meta.get("version") != GALLERY_VERSION):
        raise UserError(f"{path}: not a spherecli gallery of version {GALLERY_VERSION} "
                        f"(format {meta.get('format')!r}, version {meta.get('version')!r})")
    return db, meta


def write_gallery_meta(db, values: dict) -> None:
    """Meta values (JSON text), inside the caller's transaction."""
    db.executemany("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)",
                   [(k, json.dumps(v)) for k, v in values.items()])


def feature_blob(vector: np.ndarray, dtype: str) -> bytes:
    return np.asarray(vector, dtype="<f4" if dtype == "float32" else "<f2").tobytes()


def blob_features(blobs: list[bytes], dtype: str, dim: int) -> np.ndarray:
    """(N, dim) float32 features of feature_blob's bytes."""
    raw = np.frombuffer(b"".join(blobs), dtype="<f4" if dtype == "float32" else "<f2")
    return raw.reshape(len(blobs), dim).astype(np.float32)


# --------------------------------------------------------------------------- MegaFace devkit features

def write_devkit_feature(path: str | Path, vector: np.ndarray) -> None:
    """One feature in the MegaFace devkit's binary layout (an OpenCV matrix as its matio
    writes it): int32 rows (the dimension), cols (1), element size (4) and type (5,
    CV_32F), then the float32 values, all little-endian. The devkit reads
    FEATURE_DIR/<image path>_<algorithm>.bin."""
    v = np.asarray(vector, dtype="<f4").ravel()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(np.array([len(v), 1, 4, 5], dtype="<i4").tobytes() + v.tobytes())


def write_text_atomic(path: str | Path, text: str) -> None:
    tmp = Path(str(path) + f".{os.getpid()}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise UserError(f"cannot write {path}: {e.strerror or e}") from None


# --------------------------------------------------------------------------- what a file is

def _first_line(path: Path, limit: int = 1 << 16) -> str:
    with open(path, "rb") as f:
        return f.read(limit).split(b"\n", 1)[0].decode("utf-8", "replace").strip()


def _json_object(path: Path) -> dict:
    if path.stat().st_size > 256 << 20:
        return {}
    try:
        obj = json.loads(path.read_bytes())
    except ValueError:
        return {}
    return obj if isinstance(obj, dict) else {}


def _zip_members(path: Path) -> set[str]:
    import zipfile

    try:
        with zipfile.ZipFile(path) as z:
            return set(z.namelist())
    except (zipfile.BadZipFile, OSError):
        return set()


def _is_list(path: Path) -> bool:
    """Lines of `<image path> <label>`: the first twenty say (a pair list or a landmark
    file also ends its lines in numbers, but not after an image name)."""
    with open(path, "rb") as f:
        head = f.read(1 << 16).decode("utf-8", "replace").splitlines()[:20]
    lines = [x for x in head if x.strip() and not x.startswith("#")]
    matches = [LIST_LINE.match(x) for x in lines]
    return bool(lines) and all(m and is_image_name(m.group(1)) for m in matches)


def _is_image_cache(path: Path) -> bool:
    """A `.npy` of uint8 (N, 3, H, W), as `train --cache-file` makes (its key file may be
    missing: a kill between the two writes)."""
    try:
        with open(path, "rb") as f:
            major, _ = np.lib.format.read_magic(f)
            read = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
            shape, _, dtype = read(f)
    except (ValueError, OSError):
        return False
    return dtype == np.uint8 and len(shape) == 4 and shape[1] == 3


def _is_run_config(path: Path) -> bool:
    """A run folder's config.toml, as `train` writes it."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return False
    return "\nmax_iter = " in text and "\n[head]\n" in text


@dataclass(frozen=True)
class Kind:
    """A kind of output: what it is called, how an existing file of the kind is known (by its
    contents where it has a layout of ours; None: never replaced without --overwrite), and
    the names it must end in (None: any)."""
    what: str
    test: object = None
    suffixes: tuple | None = None


EXPORT_SUFFIXES = (".onnx", ".pt2", ".ts")

KINDS = {
    "manifest": Kind("a landmark manifest", lambda p: _first_line(p).startswith("{")
                     and f'"format": "{MANIFEST_FORMAT}"' in _first_line(p)),
    "list": Kind("a training list", _is_list),
    "list summary": Kind("a training list's summary (LIST.txt.json)",
                         lambda p: {"list", "identities", "names"} <= set(_json_object(p))),
    "result": Kind("an evaluation result", lambda p: {"benchmark", "folds"} <= set(_json_object(p))),
    "scores": Kind("a pair scores CSV", lambda p: _first_line(p) == ",".join(SCORES_COLUMNS)),
    "identities": Kind("an identify CSV", lambda p: _first_line(p) == ",".join(IDENTITY_COLUMNS)),
    "video log": Kind("an identify log (JSON Lines of frame and track records)",
                      lambda p: _first_line(p).startswith('{"type": '), (".jsonl",)),
    "features": Kind("a features file", lambda p: {"names.npy", "features.npy"} <= _zip_members(p)),
    "identification": Kind("an identification result", lambda p: _json_object(p).get("protocol")
                           == "megaface"),
    "image cache": Kind("a decoded-image cache", lambda p: _is_image_cache(p)),
    "cache key": Kind("an image cache's key file",
                      lambda p: _json_object(p).get("format") == "spherecli.cache"),
    "input spec": Kind("an input spec", lambda p: _json_object(p).get("format") == "spherecli.input"),
    "png": Kind("a PNG picture", lambda p: p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", (".png",)),
    "image": Kind("an image", lambda p: is_image_name(p.name), IMAGE_EXTENSIONS),
    "video": Kind("a video", lambda p: p.suffix.lower() in VIDEO_EXTENSIONS, VIDEO_EXTENSIONS),
    "run file": Kind("a training run's file", lambda p: _is_run_config(p.parent / "config.toml")),
    "model": Kind("a model file"),
    "export": Kind("an exported network", None, EXPORT_SUFFIXES),
}


def is_kind(path: str | Path, kind: str) -> bool:
    """Whether the existing file at path is an output of this kind."""
    test = KINDS[kind].test
    try:
        return test is not None and bool(test(Path(path)))
    except OSError:
        return False


# --------------------------------------------------------------------------- image cache

def cache_key(items) -> str:
    """What a decoded-image cache was made from: its list's paths and labels, in order."""
    import hashlib

    h = hashlib.sha1()
    for path, label in items:
        h.update(f"{path}\t{label}\n".encode("utf-8", "surrogateescape"))
    return h.hexdigest()


def cache_key_path(path: str | Path) -> Path:
    """The key file of a decoded-image cache: PATH.json beside it."""
    return Path(str(path) + ".json")


def cache_matches(path: str | Path, key: str) -> bool:
    """A cache file (`.npy` of uint8 (N, 3, H, W)) is used only with its key file beside it,
    PATH.json, naming the same list; it is written last, so a half-made cache never counts."""
    try:
        return json.loads(cache_key_path(path).read_text())["list_sha1"] == key and Path(path).is_file()
    except (OSError, ValueError, KeyError):
        return False


def write_cache_key(path: str | Path, key: str, images: int, size) -> None:
    meta = {"format": "spherecli.cache", "version": 1, "list_sha1": key, "images": images,
            "size": [int(v) for v in size]}
    write_text_atomic(cache_key_path(path), json.dumps(meta) + "\n")
