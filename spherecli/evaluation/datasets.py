"""Verification benchmarks beyond LFW's pairs.txt: CFP-FF and CFP-FP in CFP's own
protocol layout, insightface's `.bin` verification sets, and a small TOML file that
names several benchmarks so that one `evaluate` runs them all.

Every benchmark becomes the same thing: a pair list of 10 contiguous folds
(Pairs, below) over named images, and a way to get the aligned crop
of each name. The protocol that scores them is LFW's (spherecli.evaluation.metrics).
"""

from __future__ import annotations

import hashlib
import pickle
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from spherecli.core.errors import UserError
from spherecli.core.formats import read_toml
from spherecli.core.registry import LFW_PATTERN

CFP_SPLITS = ("FF", "FP")

# The official LFW view-2 pairs.txt, lines with their whitespace normalised: only a
# result on exactly these pairs is named MODEL.lfw.json, the calibration of a model.
LFW_PAIRS_SHA1 = "ef3ca5828e409d11fc3b3d01b8b7cbe55eb549a9"


@dataclass
class Pairs:
    folds: int
    per_fold: int           # pairs of each kind per fold (300 in LFW)
    left: list[str]         # image paths, relative to the data folder
    right: list[str]
    same: np.ndarray        # bool per pair
    name: str = "lfw"       # what results on them are called: lfw for the official list


def read_pairs(path: str | Path, pattern: str = LFW_PATTERN) -> Pairs:
    """The standard LFW pairs file: a 'folds<TAB>n' header, then 2 n lines per fold."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read pairs {path}: {getattr(e, 'strerror', None) or e}") from None
    head = lines[0].split() if lines else []
    if len(head) != 2 or not all(v.isdigit() for v in head):
        raise UserError(f"{path}:1: expected a header '<folds> <pairs per fold and kind>', "
                        f"got {lines[0][:60] if lines else 'an empty file'!r}")
    folds, per_fold = int(head[0]), int(head[1])
    left, right, same = [], [], []
    for lineno, line in enumerate(lines[1:], 2):
        f = line.split()
        if not f:
            continue
        try:
            if len(f) == 3:
                a, b, s = (f[0], int(f[1])), (f[0], int(f[2])), True
            elif len(f) == 4:
                a, b, s = (f[0], int(f[1])), (f[2], int(f[3])), False
            else:
                raise ValueError
        except ValueError:
            raise UserError(f"{path}:{lineno}: expected 'name i j' or 'name1 i name2 j', "
                            f"got {line.strip()[:80]!r}") from None
        left.append(pattern.format(name=a[0], num=a[1]))
        right.append(pattern.format(name=b[0], num=b[1]))
        same.append(s)
    if len(same) != 2 * folds * per_fold:
        raise UserError(f"{path}: the header promises {folds} folds x {2 * per_fold} pairs = "
                        f"{2 * folds * per_fold}, the file has {len(same)}")
    digest = hashlib.sha1("\n".join(" ".join(x.split()) for x in lines if x.strip()).encode()).hexdigest()
    return Pairs(folds, per_fold, left, right, np.array(same),
                 "lfw" if digest == LFW_PAIRS_SHA1 else Path(path).stem)


def distinct_images(pairs: Pairs) -> list[str]:
    return sorted(set(pairs.left) | set(pairs.right))


@dataclass
class Benchmark:
    """A pair list and where its aligned crops are: a folder (`data`), or encoded images
    held in memory (`images`, name -> bytes) aligned to `reference` at `size`."""
    name: str
    pairs: Pairs
    data: Path | None = None
    images: dict[str, bytes] = field(default_factory=dict)
    reference: str = "sphereface"
    size: tuple[int, int] = (112, 96)
    source: str = ""


# --------------------------------------------------------------------------- CFP

def _cfp_index(path: Path) -> dict[int, str]:
    """Pair_list_F.txt / Pair_list_P.txt: `index path` per line, the path relative to the
    Protocol folder (../Data/Images/001/frontal/01.jpg); names are kept from Images/ on."""
    index = {}
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror or e}") from None
    for lineno, line in enumerate(lines, 1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 2 or not fields[0].isdigit():
            raise UserError(f"{path}:{lineno}: expected 'index path', got {line.strip()[:80]!r}")
        rel = fields[1].replace("\\", "/")
        index[int(fields[0])] = rel.split("Images/", 1)[1] if "Images/" in rel else rel.lstrip("./")
    return index


def read_cfp(protocol: str | Path, split: str) -> Pairs:
    """CFP's official protocol: Split/{FF,FP}/01..10/{same,diff}.txt, `i,j` per line, i an
    index of Pair_list_F and j of Pair_list_F (FF) or Pair_list_P (FP); 350 + 350 pairs
    per fold. Folds are laid out one after the other, each its same pairs then its
    different ones, as LFW's are."""
    protocol, split = Path(protocol), split.upper()
    if split not in CFP_SPLITS:
        raise UserError(f"CFP split must be one of {', '.join(CFP_SPLITS)}, got {split!r}")
    frontal = _cfp_index(protocol / "Pair_list_F.txt")
    second = frontal if split == "FF" else _cfp_index(protocol / "Pair_list_P.txt")
    folds = sorted(p for p in (protocol / "Split" / split).iterdir() if p.is_dir()) \
        if (protocol / "Split" / split).is_dir() else []
    if not folds:
        raise UserError(f"{protocol / 'Split' / split}: no fold folders (01 .. 10)")
    left, right, same, per_fold = [], [], [], None
    for fold in folds:
        counts = []
        for kind in ("same", "diff"):
            path = fold / f"{kind}.txt"
            try:
                lines = [x for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]
            except OSError as e:
                raise UserError(f"cannot read {path}: {e.strerror or e}") from None
            for lineno, line in enumerate(lines, 1):
                try:
                    i, j = (int(v) for v in line.replace(",", " ").split())
                    left.append(frontal[i])
                    right.append(second[j])
                except (ValueError, KeyError):
                    raise UserError(f"{path}:{lineno}: expected 'i,j' with indices of the pair lists, "
                                    f"got {line.strip()[:40]!r}") from None
            same += [kind == "same"] * len(lines)
            counts.append(len(lines))
        if counts[0] != counts[1] or per_fold not in (None, counts[0]):
            raise UserError(f"{fold}: {counts[0]} same and {counts[1]} different pairs; every fold of "
                            f"CFP holds as many of each as the others")
        per_fold = counts[0]
    return Pairs(len(folds), per_fold, left, right, np.array(same), f"cfp-{split.lower()}")


# --------------------------------------------------------------------------- insightface .bin

class _BinUnpickler(pickle.Unpickler):
    """Admits only what verification .bin files hold: lists, tuples, bytes, booleans (and
    numpy's booleans and arrays, as some writers store the flags). Anything else, such
    as a callable that a crafted file would run, is refused before it is looked up."""

    SAFE = {("_codecs", "encode"), ("numpy", "dtype"), ("numpy", "ndarray"),
            ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
            ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct")}

    def find_class(self, module, name):
        if (module, name) in self.SAFE:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"a .bin file holds no {module}.{name}")


def read_bin(path: str | Path, folds: int = 10) -> tuple[Pairs, dict[str, bytes]]:
    """insightface's verification set (lfw.bin, cfp_fp.bin, agedb_30.bin, calfw.bin,
    cplfw.bin): a pickle of (encoded images, same flags), images 2k and 2k+1 a pair,
    pairs in 10 contiguous folds; the images are 112x112 crops on ArcFace's points."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            bins, flags = _BinUnpickler(f, encoding="bytes").load()
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror or e}") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as e:
        raise UserError(f"{path}: not an insightface verification .bin file ({e})") from None
    flags = [bool(v) for v in np.asarray(flags).ravel()]
    if len(bins) != 2 * len(flags) or len(flags) % folds:
        raise UserError(f"{path}: {len(bins)} images for {len(flags)} pairs; expected two images per "
                        f"pair and {folds} folds of equal size")
    names = [f"{i:06d}" for i in range(len(bins))]
    images = {n: bytes(b) for n, b in zip(names, bins)}
    pairs = Pairs(folds, len(flags) // folds // 2, names[0::2], names[1::2], np.array(flags),
                  path.stem.replace("_", "-"))
    return pairs, images


def decode_crops(images: list[bytes], where: str) -> np.ndarray:
    """Encoded crops -> uint8 (N, 3, H, W) BGR, as aligned crops travel."""
    import cv2

    out = []
    for i, data in enumerate(images):
        img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
        if img is None:
            raise UserError(f"{where}: image {i} cannot be decoded")
        out.append(img.transpose(2, 0, 1))
    return np.stack(out)


def fit_crops(crops: np.ndarray, reference: str, size: tuple[int, int], spec) -> np.ndarray:
    """Crops aligned one way, for a network that takes another. A 112x96 SphereFace-aligned
    network takes the middle 96 columns of a 112x112 ArcFace crop: ArcFace's points are
    SphereFace's moved 8 px right, so the crop puts them on SphereFace's points but one
    pixel off in x and y (the conventions differ by one pixel, which no crop of 112 rows
    can undo). Anything else must be aligned for the network."""
    if (reference, tuple(size)) == (spec.reference, tuple(spec.size)):
        return crops
    if (reference, tuple(size), spec.reference, tuple(spec.size)) == ("arcface", (112, 112), "sphereface",
                                                                       (112, 96)):
        return crops[..., 8:104]
    raise UserError(f"the benchmark's crops are {size[0]}x{size[1]} on the {reference} points, the model "
                    f"takes {spec.describe()}: align the benchmark's photos for it")


# --------------------------------------------------------------------------- several at once

def load_benchmarks(path: str | Path, names: list[str] | None = None) -> list[Benchmark]:
    """A TOML file with one table per benchmark, named as results are:

        [lfw]
        pairs = "data/pairs.txt"          # LFW's format
        data = "out/lfw-112X96"           # its aligned crops
        [cfp-fp]
        cfp = "data/cfp/Protocol"         # CFP's protocol folder
        split = "FP"
        data = "out/cfp-112X96"
        [agedb-30]
        bin = "data/agedb_30.bin"         # insightface's verification set

    Relative paths are relative to the file. names chooses some of the tables."""
    path = Path(path)
    tables = read_toml(path)
    unknown = [n for n in names or [] if n not in tables]
    if unknown:
        raise UserError(f"{path}: no benchmark {', '.join(unknown)} (it names {', '.join(tables)})")
    out = []
    for name in names or list(tables):
        t = tables[name]
        if not isinstance(t, dict):
            raise UserError(f"{path}: {name} must be a table, [{name}]")

        def where(key, t=t):
            return (path.parent / t[key]) if key in t else None
        if "bin" in t:
            pairs, images = read_bin(where("bin"))
            out.append(Benchmark(name, pairs, images=images, reference="arcface", size=(112, 112),
                                 source=str(where("bin"))))
            continue
        if "data" not in t or not ("pairs" in t or "cfp" in t):
            raise UserError(f"{path}: [{name}] needs data = aligned folder, and pairs = a pairs.txt or "
                            "cfp = CFP's Protocol folder; or bin = an insightface .bin file")
        pairs = (read_cfp(where("cfp"), t.get("split", name.rsplit("-", 1)[-1])) if "cfp" in t
                 else read_pairs(where("pairs"), t.get("pattern", LFW_PATTERN)))
        pairs.name = name
        out.append(Benchmark(name, pairs, data=where("data"), source=str(where("cfp") or where("pairs"))))
    return out
