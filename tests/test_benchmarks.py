"""Benchmarks beyond LFW: CFP's protocol, insightface's .bin sets, several at once."""

import json
import os
import pickle
import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch

from spherecli import UserError
from spherecli.core.config import EvalSettings
from spherecli.evaluation.datasets import Benchmark, Pairs, load_benchmarks, read_bin, read_cfp
from spherecli.evaluation.evaluate import run_benchmark
from spherecli.core.formats import InputSpec, ModelFile, save_features
from spherecli.models import create_model

from conftest import DATA, write_synthetic_faces

SPHEREFACE = [sys.executable, "-m", "spherecli"]


def write_cfp_protocol(root, people=20, per_fold=5, folds=10):
    """CFP's layout: Protocol/Pair_list_{F,P}.txt naming ../Data/Images/ID/{frontal,profile}/NN.jpg,
    Protocol/Split/{FF,FP}/01..10/{same,diff}.txt of `i,j` lines."""
    protocol = root / "Protocol"
    (protocol / "Split").mkdir(parents=True)
    frontal = [f"../Data/Images/{p:03d}/frontal/{i:02d}.jpg" for p in range(1, people + 1)
               for i in range(1, 11)]
    profile = [f"../Data/Images/{p:03d}/profile/{i:02d}.jpg" for p in range(1, people + 1)
               for i in range(1, 5)]
    for name, paths in (("F", frontal), ("P", profile)):
        (protocol / f"Pair_list_{name}.txt").write_text("".join(f"{k} {p}\n" for k, p in enumerate(paths, 1)))
    rng = np.random.default_rng(0)
    for split in ("FF", "FP"):
        for fold in range(1, folds + 1):
            d = protocol / "Split" / split / f"{fold:02d}"
            d.mkdir(parents=True)
            same, diff = [], []
            for _ in range(per_fold):
                p, q = rng.choice(people, 2, replace=False)
                a = p * 10 + rng.integers(1, 11)
                b = (p * 10 + rng.integers(1, 11)) if split == "FF" else p * 4 + rng.integers(1, 5)
                c = (q * 10 + rng.integers(1, 11)) if split == "FF" else q * 4 + rng.integers(1, 5)
                same.append(f"{a},{b}")
                diff.append(f"{a},{c}")
            (d / "same.txt").write_text("\n".join(same) + "\n")
            (d / "diff.txt").write_text("\n".join(diff) + "\n")
    return protocol


def test_cfp_protocol_parses_into_ten_folds_of_same_then_different(tmp_path):
    protocol = write_cfp_protocol(tmp_path)
    for split in ("FF", "FP"):
        pairs = read_cfp(protocol, split)
        assert (pairs.folds, pairs.per_fold, len(pairs.same)) == (10, 5, 100)
        assert pairs.name == f"cfp-{split.lower()}"
        for k in range(10):
            block = pairs.same[10 * k:10 * (k + 1)]
            assert block[:5].all() and not block[5:].any()
        assert all(p.split("/")[1] == "frontal" for p in pairs.left)
        kind = "frontal" if split == "FF" else "profile"
        assert all(p.split("/")[1] == kind for p in pairs.right)
        assert pairs.left[0].startswith("0") and not pairs.left[0].startswith("..")
    (protocol / "Split" / "FP" / "03" / "diff.txt").write_text("1,2\n1,notanumber\n")
    with pytest.raises(UserError, match=r"Split/FP/03/diff.txt:2: expected 'i,j'"):
        read_cfp(protocol, "FP")


def test_real_cfp_split_files(tmp_path):
    protocol = DATA / "cfp" / "Protocol"
    if not protocol.is_dir():
        pytest.skip(f"the CFP benchmark is not at {DATA / 'cfp'} (set SPHERECLI_DATA)")
    images = DATA / "cfp" / "Data" / "Images"
    for split in ("FF", "FP"):
        pairs = read_cfp(protocol, split)
        assert (pairs.folds, pairs.per_fold, len(pairs.same)) == (10, 350, 7000)
        assert all((images / n).is_file() for n in set(pairs.left) | set(pairs.right))


def test_protocol_on_cfp_shaped_pairs_with_a_known_answer(tmp_path):
    """10 folds of 5 same then 5 different pairs, as CFP's are laid out. Same pairs score
    0.9, different ones 0.1, but one different pair of fold 3 scores 0.95: every fold is
    perfect but fold 3, which gets 9 of 10 right with the threshold of the other nine."""
    same = np.tile(np.r_[np.ones(5, bool), np.zeros(5, bool)], 10)
    cos = np.where(same, 0.9, 0.1)
    cos[25] = 0.95  # fold 3, a different pair
    names = [f"a{i}" for i in range(100)] + [f"b{i}" for i in range(100)]
    feats = np.zeros((200, 2))
    feats[:100, 0] = 1.0
    feats[100:] = np.stack([cos, np.sqrt(1 - cos ** 2)], 1)
    save_features(tmp_path / "f.npz", names, feats, flip="none")
    pairs = Pairs(10, 5, names[:100], names[100:], same, "cfp-fp")
    result = run_benchmark(Benchmark("cfp-fp", pairs), EvalSettings(mean_subtract=False),
                           features=tmp_path / "f.npz")
    assert [f["accuracy"] for f in result["folds"]] == [1.0, 1.0, 0.9] + [1.0] * 7
    assert result["mean"] == pytest.approx(0.99) and result["roc_auc"] < 1.0


def write_bin(path, crops, flags, protocol=2):
    """A verification .bin as insightface writes one: a pickle of (encoded images, flags)."""
    bins = [cv2.imencode(".jpg", c, [cv2.IMWRITE_JPEG_QUALITY, 95])[1].tobytes() for c in crops]
    with open(path, "wb") as f:
        pickle.dump((bins, flags), f, protocol=protocol)


class Payload:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


@pytest.mark.parametrize("protocol", [2, 4])
def test_bin_reader_reads_pairs_and_refuses_code(tmp_path, protocol):
    rng = np.random.default_rng(1)
    crops = [cv2.resize(rng.integers(0, 255, (7, 7, 3), dtype=np.uint8), (112, 112),
                        interpolation=cv2.INTER_CUBIC) for _ in range(40)]
    flags = [bool(i % 2) for i in range(20)]
    write_bin(tmp_path / "agedb_30.bin", crops, flags, protocol)
    pairs, images = read_bin(tmp_path / "agedb_30.bin")
    assert (pairs.folds, pairs.per_fold, pairs.name, len(images)) == (10, 1, "agedb-30", 40)
    assert list(pairs.same) == flags and pairs.left[3] == "000006" and pairs.right[3] == "000007"
    decoded = cv2.imdecode(np.frombuffer(images["000006"], np.uint8), cv2.IMREAD_COLOR)
    assert np.abs(decoded.astype(int) - crops[6]).mean() < 10
    with open(tmp_path / "evil.bin", "wb") as f:
        pickle.dump(([Payload()], [True]), f, protocol=protocol)
    os.chdir(tmp_path)
    with pytest.raises(UserError, match="not an insightface verification .bin file .*posix.system"):
        read_bin(tmp_path / "evil.bin")
    assert not (tmp_path / "pwned").exists()


def test_several_benchmarks_in_one_command(tmp_path):
    """An LFW-format pair list over aligned crops and a .bin of 112x112 ArcFace-aligned crops,
    scored by one 112x96 model: one table, one JSON per benchmark."""
    torch.manual_seed(0)
    net = create_model("sphere4")
    ModelFile("sphere4", net.model_args, net.state_dict(), InputSpec()).save(tmp_path / "m.pt")
    aligned = write_synthetic_faces(tmp_path / "aligned", people=4, per_person=6)
    people = sorted(os.listdir(aligned))
    lines = []
    for k in range(2):
        lines += [f"{people[k]} {1 + 2 * i} {2 + 2 * i}" for i in range(2)]
        lines += [f"{people[k]} {i + 1} {people[k + 2]} {i + 1}" for i in range(2)]
    for p in people:
        for i, name in enumerate(sorted(os.listdir(aligned / p)), 1):
            os.rename(aligned / p / name, aligned / p / f"{p}_{i:04d}.jpg")
    (tmp_path / "pairs.txt").write_text("2\t2\n" + "\n".join(lines) + "\n")
    square = [cv2.copyMakeBorder(cv2.imread(str(f)), 0, 0, 8, 8, cv2.BORDER_REPLICATE)
              for f in sorted(aligned.rglob("*.jpg"))[:20]]
    write_bin(tmp_path / "cplfw.bin", square, [True, False] * 5)
    (tmp_path / "bench.toml").write_text('[lfw-like]\npairs = "pairs.txt"\ndata = "aligned"\n\n'
                                         '[cplfw]\nbin = "cplfw.bin"\n')
    assert [b.name for b in load_benchmarks(tmp_path / "bench.toml", ["cplfw"])] == ["cplfw"]
    with pytest.raises(UserError, match="no benchmark cfp-fp"):
        load_benchmarks(tmp_path / "bench.toml", ["cfp-fp"])
    r = subprocess.run(SPHEREFACE + ["evaluate", "--model", str(tmp_path / "m.pt"), "--benchmarks",
                                     str(tmp_path / "bench.toml"), "--workers", "0", "-q"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "lfw-like" in r.stdout and "cplfw" in r.stdout and "TAR@FAR=1e-3" in r.stdout
    for name, folds, images in (("lfw-like", 2, 12), ("cplfw", 10, 20)):
        result = json.loads((tmp_path / f"m.{name}.json").read_text())
        assert (result["benchmark"], len(result["folds"]), result["images"]) == (name, folds, images)
    assert json.loads((tmp_path / "m.cplfw.json").read_text())["settings"]["crops"] == "112x112 arcface"
