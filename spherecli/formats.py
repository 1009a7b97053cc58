"""Every file layout spherecli reads or writes, defined here and nowhere else.

- landmark manifest (JSON Lines, written by `detect`, read by `align`)
- landmark text file (`path x1 y1 ... x5 y5`, the form published landmark files take)
- training list (`path label`, written by `list`, read by `train`)
- model file and training checkpoint (`model.pt`, `checkpoint.pt`), and the input spec
  of a network (in a model file, or beside an ONNX model)
- a training run's folder and its log.jsonl
- features (`.npz`, from `evaluate --save-features` and `embed`) and where results go

docs/formats.md describes them for people; this module is the definition.
"""

from __future__ import annotations

import json
import os
import re
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from spherecli import UserError, __version__

MANIFEST_FORMAT = "spherecli.manifest"
MANIFEST_VERSION = 1


# --------------------------------------------------------------------------- outputs

def writable(path: str | Path) -> Path:
    """An output file's path, its folder made and checked before any work is done for it."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot write {path}: {e.strerror or e}") from None
    if path.is_dir():
        raise UserError(f"cannot write {path}: it is a folder")
    if not os.access(path.parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise UserError(f"cannot write {path}: permission denied")
    return path


def refuse_overwrite(path: str | Path, overwrite: bool, source: str | Path | None = None) -> Path:
    """An output that must not replace what is there: the input itself never, another
    existing file only with --overwrite."""
    path = writable(path)
    if source is not None and path.exists() and path.resolve() == Path(source).resolve():
        raise UserError(f"{path} is the input itself; write the output elsewhere")
    if path.exists() and not overwrite:
        raise UserError(f"{path} exists; add --overwrite to replace it, or write elsewhere")
    return path


@contextmanager
def locked(path: str | Path, what: str):
    """Hold PATH.lock while writing PATH: a second process writing the same output is
    refused, saying who holds it; a lock whose process is gone is taken over."""
    import socket
    import sys
    import time

    lock = writable(str(path) + ".lock")
    me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
          "command": " ".join(sys.argv)[:300]}
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            break
        except FileExistsError:
            try:
                holder = json.loads(lock.read_text())
            except (OSError, ValueError):
                holder = {}
            alive = holder.get("host") != me["host"] or _running(holder.get("pid"))
            if alive:
                raise UserError(f"{path} is being written by another {what} (pid {holder.get('pid')} on "
                                f"{holder.get('host')}, since {holder.get('started')}: "
                                f"{holder.get('command')}); wait for it to finish, or remove {lock} if that "
                                "process is gone") from None
            lock.unlink(missing_ok=True)  # its process is gone: a stale lock
    else:
        raise UserError(f"could not take {lock}")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        yield
    finally:
        lock.unlink(missing_ok=True)


def _running(pid) -> bool:
    try:
        os.kill(int(pid), 0)
    except (TypeError, ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return True


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


def write_list(path: str | Path, items: Iterable[tuple[str, int]]) -> None:
    text = "".join(f"{p} {label}\n" for p, label in items)
    tmp = Path(str(path) + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


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
    with torch.load(weights_only=True).
    """
    import torch

    path = writable(path)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


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
        detail = next((line for line in lines if line and not line.startswith(("Check the", "Please file"))),
                      str(e).splitlines()[0] if str(e) else "unreadable")[:120]
        if "global" in detail.lower():
            raise UserError(f"{path}: holds Python objects other than tensors, numbers and "
                            f"containers ({detail}); spherecli never executes code from a "
                            "model file, so it does not load it") from None
        raise UserError(f"{path}: not a PyTorch model or checkpoint file ({detail})") from None
    except Exception as e:  # noqa: BLE001 - zip, pickle and format errors come in many types
        raise UserError(f"{path}: not a PyTorch model or checkpoint file "
                        f"({(str(e).splitlines() or [type(e).__name__])[0][:120]})") from None


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
        from spherecli.registry import CHANNEL_ORDERS, REFERENCES

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
            raise UserError(f"--input-spec {text!r}: expected a preset ({', '.join(INPUT_PRESETS)}), a "
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
    Path(path).write_text(json.dumps({"format": "spherecli.input", "input": spec.as_json()}, indent=1)
                          + "\n", encoding="utf-8")


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

def save_features(path: str | Path, names, features, *, flip: str, amp: str = "none") -> None:
    """`.npz` of image names (paths under the data folder), float32 features (one row per
    name), and how they were made: flip mode and precision. Written by `evaluate
    --save-features` and `embed`; read by `evaluate --features`."""
    try:
        np.savez(path, names=np.array(list(names), dtype=str), features=np.asarray(features, np.float32),
                 flip=flip, amp=amp)
    except OSError as e:
        raise UserError(f"cannot write {path}: {e.strerror or e}") from None


def load_features(path: str | Path) -> tuple[list[str], np.ndarray, dict]:
    """(names, float64 features, {"flip": ..., "amp": ...}) of a features file."""
    try:
        with np.load(path) as f:
            names, feats = [str(n) for n in f["names"]], f["features"].astype(np.float64)
            made = {k: str(f[k]) for k in ("flip", "amp") if k in f}
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"{path}: not a features file of names and features ({e})") from None
    return names, feats, made


def result_path(model: str | Path, benchmark: str = "lfw") -> Path:
    """Where `evaluate` writes a model's result on a benchmark, next to the model:
    MODEL.lfw.json is the one `verify` and `identify` calibrate with."""
    return Path(str(Path(model).with_suffix("")) + f".{benchmark}.json")


# --------------------------------------------------------------------------- image cache

def cache_key(items) -> str:
    """What a decoded-image cache was made from: its list's paths and labels, in order."""
    import hashlib

    h = hashlib.sha1()
    for path, label in items:
        h.update(f"{path}\t{label}\n".encode("utf-8", "surrogateescape"))
    return h.hexdigest()


def cache_matches(path: str | Path, key: str) -> bool:
    """A cache file (`.npy` of uint8 (N, 3, H, W)) is used only with its key file beside it,
    PATH.json, naming the same list; it is written last, so a half-made cache never counts."""
    try:
        return json.loads(Path(str(path) + ".json").read_text())["list_sha1"] == key and Path(path).is_file()
    except (OSError, ValueError, KeyError):
        return False


def write_cache_key(path: str | Path, key: str, images: int, size) -> None:
    meta = {"format": "spherecli.cache", "version": 1, "list_sha1": key, "images": images,
            "size": [int(v) for v in size]}
    tmp = Path(str(path) + ".json.tmp")
    tmp.write_text(json.dumps(meta) + "\n")
    os.replace(tmp, str(path) + ".json")
