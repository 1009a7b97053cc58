"""The Makefile's pipelines, wired end to end on a tiny stand-in so they cannot rot."""

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT, copy_images

MAKE = ["make", "-C", str(ROOT), "-o", ".venv/.installed", f"SF={sys.executable} -m spherecli"]


@pytest.fixture(scope="module")
def standin(data, tmp_path_factory):
    """4 CelebA people as 'CASIA', and 8 LFW pairs (2 folds) with their images as 'LFW'."""
    work = tmp_path_factory.mktemp("standin")
    celeba = data / "celeba"
    people = sorted(os.listdir(celeba))[:4]
    copy_images(celeba, work / "casia",
                [f"{p}/{f}" for p in people for f in sorted(os.listdir(celeba / p))[:6]])
    lines = (data / "pairs.txt").read_text().splitlines()[1:]
    pairs = lines[0:2] + lines[300:302] + lines[600:602] + lines[900:902]
    (work / "pairs.txt").write_text("2\t2\n" + "\n".join(pairs) + "\n")
    names = set()
    for line in pairs:
        f = line.split()
        a, b = ((f[0], f[1]), (f[0], f[2])) if len(f) == 3 else ((f[0], f[1]), (f[2], f[3]))
        names |= {f"{n}/{n}_{int(i):04d}.jpg" for n, i in (a, b)}
    copy_images(data / "lfw", work / "lfw", sorted(names))
    return work


def test_make_reproduce_runs_end_to_end(standin, tmp_path):
    out = tmp_path / "reproduce"
    args = ["reproduce", f"CASIA={standin / 'casia'}", f"LFW={standin / 'lfw'}",
            f"PAIRS={standin / 'pairs.txt'}", "GPUS=", f"ROUT={out}",
            "TRAIN_ARGS=--arch sphere4 --batch-size 8 --max-iter 3 --workers 0 --lr-steps 2 -q"]
    subprocess.run(MAKE + args, check=True, capture_output=True)
    listed = json.loads((out / "CASIA-WebFace-112X96.txt.json").read_text())
    assert listed["identities"] == 4
    assert (out / "sphereface20" / "model.pt").exists()
    # Not LFW's own pair list, so the result is named after its file, not model.lfw.json.
    result = json.loads((out / "sphereface20" / "model.pairs.json").read_text())
    assert len(result["folds"]) == 2 and result["missing"] == 0
    config = (out / "sphereface20" / "config.toml").read_text()
    assert 'lr_steps = [2]' in config and "max_iter = 3" in config
    # Running it again finds every stage done: nothing detected twice.
    subprocess.run(MAKE + args, check=True, capture_output=True)
    lines = [json.loads(line) for line in open(out / "casia.landmarks.jsonl")]
    assert sum(r["type"] == "image" for r in lines) == 24 and lines[-1]["new"] == 0


def test_missing_data_says_what_to_get(tmp_path):
    r = subprocess.run(MAKE + ["reproduce", f"CASIA={tmp_path}/none", f"ROUT={tmp_path}/r"],
                       capture_output=True, text=True)
    assert r.returncode != 0
    assert "CASIA-WebFace" in r.stdout and "pairs.txt" in r.stdout and "lfw" in r.stdout.lower()
    r = subprocess.run(MAKE + ["demo", f"DATA={tmp_path}/none", f"OUT={tmp_path}/d"],
                       capture_output=True, text=True)
    assert r.returncode != 0
    assert "make reproduce" in r.stdout and "not there" in r.stdout


def test_make_published_imports_and_evaluates(standin, tmp_path):
    """A MobileFaceNet checkpoint in the published layout (random weights) through
    `make published`: imported once, evaluated on the stand-in LFW."""
    import torch

    from spherecli.models import create_model

    net = create_model("mobilefacenet")
    torch.save({"iters": 68, "net_state_dict": net.state_dict()}, tmp_path / "068.ckpt")
    args = ["published", f"MODEL={tmp_path / '068.ckpt'}", f"DATA={standin}", f"OUT={tmp_path / 'out'}"]
    subprocess.run(MAKE + args, check=True, capture_output=True)
    result = json.loads((tmp_path / "out" / "published" / "068.lfw.json").read_text())
    assert len(result["folds"]) == 2 and result["missing"] == 0
    assert result["model"].endswith("published/068.pt")
