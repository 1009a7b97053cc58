import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from spherecli import UserError
from spherecli.core.config import DetectSettings, TrainConfig
from spherecli.preprocess.detect import detect_tree
from spherecli.models.export import export
from spherecli.core.formats import read_manifest
from spherecli.recognition.calibration import Calibration
from spherecli.evaluation.metrics import angular_fisher_score
from spherecli.recognition.gallery import gallery
from spherecli.api import load
from spherecli.recognition.recognize import FaceEmbedder, embed_folder
from spherecli.training.train import launch

from conftest import copy_images

SPHEREFACE = [sys.executable, "-m", "spherecli"]


@pytest.fixture(scope="module")
def model(celeba_list, tmp_path_factory):
    """A small SphereFace-4 trained for a few seconds on real aligned faces."""
    out = tmp_path_factory.mktemp("model") / "run"
    launch(TrainConfig(list=str(celeba_list), out=str(out), arch="sphere4", head="softmax",
                       batch_size=32, workers=0, cache=True, max_iter=40, warmup=10, clip_grad=5,
                       lr=0.01, device="cpu"), progress=False)
    return out / "model.pt"


@pytest.fixture(scope="module")
def wild_split(data, tmp_path_factory):
    """Gallery: the first photo of each of the 25 people. Probes: the other 7 photos of 3 people."""
    wild = data / "wild"
    root = tmp_path_factory.mktemp("wild")
    people = sorted(p.name for p in wild.iterdir())
    for person in people:
        photos = sorted(f.name for f in (wild / person).iterdir())
        copy_images(wild, root / "gallery", [f"{person}/{photos[0]}"])
        if person in people[:3]:
            copy_images(wild, root / "probe", [f"{person}/{p}" for p in photos[1:]])
    return root


def test_identify_photos_one_row_per_detected_face(model, wild_split, tmp_path):
    out = tmp_path / "ids.csv"
    cmd = SPHEREFACE + ["identify", "--gallery", str(wild_split / "gallery"), "--probe",
                        str(wild_split / "probe"), "--model", str(model), "-o", str(out),
                        "--annotate", str(tmp_path / "annotated"), "--threshold", "0.2"]
    r = subprocess.run(cmd, capture_output=True, text=True, check=True)
    assert "gallery: 25 people, 25 photos" in r.stderr
    rows = list(csv.DictReader(open(out)))
    # The same detector run on its own finds exactly as many faces.
    detect_tree(wild_split / "probe", tmp_path / "m.jsonl", progress=False)
    _, recs = read_manifest(tmp_path / "m.jsonl")
    faces = {r["path"]: r.get("faces", 0) for r in recs}
    assert len(rows) == sum(faces.values()) >= 18
    for path, n in faces.items():
        assert sum(row["source"] == path for row in rows) == n
    people = {p.name for p in (wild_split / "gallery").iterdir()}
    for row in rows:
        assert row["best_match"] in people
        assert (row["identity"] == row["best_match"]) == (float(row["score"]) >= 0.2)
        assert row["identity"] in people | {"unknown"}
    drawn = sorted(p.relative_to(tmp_path / "annotated").as_posix()
                   for p in (tmp_path / "annotated").rglob("*.jpg"))
    assert drawn == sorted(faces)
    # Boxes were drawn: the annotated pictures differ from the originals.
    first = drawn[0]
    a = np.asarray(Image.open(tmp_path / "annotated" / first), dtype=int)
    b = np.asarray(Image.open(wild_split / "probe" / first).convert("RGB"), dtype=int)
    assert a.shape == b.shape and np.abs(a - b).max() > 100
    # The second run reads the gallery from its cache: an embedder that cannot detect
    # faces still gets every gallery photo's feature.
    assert (wild_split / "gallery" / ".sphereface-gallery.npz").exists()

    class Blind(FaceEmbedder):
        def photo(self, path):
            raise AssertionError("the cache should have answered")

    people, feats, notes = gallery(Blind(model), wild_split / "gallery", load(model).key)
    assert len(people) == 25 and feats.shape[0] == 25 and not notes


def test_identify_a_video(model, wild_split, tmp_path):
    photos = sorted((wild_split / "probe").rglob("*.jpg"))[:4]
    video = tmp_path / "clip.mp4"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"mp4v"), 5, (300, 400))
    for p in photos:
        for _ in range(2):
            writer.write(cv2.resize(cv2.imread(str(p)), (300, 400)))
    writer.release()
    out = tmp_path / "ids.csv"
    subprocess.run(SPHEREFACE + ["identify", "--gallery", str(wild_split / "gallery"), "--probe",
                                 str(video), "--model", str(model), "--every", "2", "-o", str(out),
                                 "--annotate", str(tmp_path / "annotated.mp4")], check=True,
                   capture_output=True)
    rows = list(csv.DictReader(open(out)))
    assert rows and {int(r["frame"]) for r in rows} <= {0, 2, 4, 6}
    cap = cv2.VideoCapture(str(tmp_path / "annotated.mp4"))
    assert int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) == 4
    assert cap.get(cv2.CAP_PROP_FPS) == pytest.approx(5 / 2), "the source's rate over --every"
    r = subprocess.run(SPHEREFACE + ["identify", "--gallery", str(wild_split / "gallery"), "--probe",
                                     str(video), "--model", str(model), "--annotate",
                                     str(tmp_path / "folder")], capture_output=True, text=True)
    assert r.returncode == 2 and "a video is written to a file named .mp4" in r.stderr


def test_verify_same_and_different_people(model, data, tmp_path):
    wild = data / "wild"
    a, b = sorted((wild / "7212").iterdir())[:2]
    other = sorted((wild / "7222").iterdir())[0]
    m = load(model, threshold=0.5)
    # A photo and a copy of it at 1.5 times the size are the same face.
    copy = tmp_path / "copy.jpg"
    photo = Image.open(a)
    photo.resize((photo.width * 3 // 2, photo.height * 3 // 2)).save(copy, quality=95)
    itself = m.verify(a, copy)
    same, different = m.verify(a, b), m.verify(a, other)
    assert itself.score > 0.9 and itself.same and itself.calibration == "the given threshold"
    for r in (same, different):
        assert -1 <= r.score <= 1 and r.same == (r.score >= 0.5)
    assert different.score < itself.score
    # Photos as arrays and PIL images give the features of their files.
    rgb = np.asarray(Image.open(a).convert("RGB"))
    np.testing.assert_allclose(m.embed([rgb, Image.open(a)]), m.embed([a, a]), atol=1e-5)
    r = subprocess.run(SPHEREFACE + ["verify", str(a), str(copy), "--model", str(model),
                                     "--threshold", "0.5"], capture_output=True, text=True, check=True)
    assert r.stdout.startswith("same\tscore 0.9") or r.stdout.startswith("same\tscore 1.0")
    blank = tmp_path / "blank.jpg"
    Image.new("RGB", (200, 200), (120, 120, 120)).save(blank)
    r = subprocess.run(SPHEREFACE + ["verify", str(a), str(blank), "--model", str(model)],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "blank.jpg: no face found" in r.stderr


def test_calibration_comes_from_the_evaluation_result(model, tmp_path):
    result = {"calibration": {"mean": [0.5] * 1024, "threshold": 0.27, "flip": "concat"}}
    path = Path(str(model.with_suffix("")) + ".lfw.json")
    path.write_text(json.dumps(result))
    try:
        cal = Calibration.load(model)
        assert cal.threshold == 0.27 and cal.source == str(path) and cal.mean.shape == (1024,)
        assert Calibration.load(model, threshold=0.6).threshold == 0.6
        np.testing.assert_allclose(np.linalg.norm(cal.unit(np.ones((3, 1024))), axis=1), 1.0)
    finally:
        path.unlink()
    assert Calibration.load(model).source == "default"
    with pytest.raises(UserError, match="no such file"):
        Calibration.load(model, tmp_path / "nothing.json")


def test_embed_raw_and_aligned(model, wild_split, celeba_list, tmp_path):
    out = tmp_path / "f.npz"
    subprocess.run(SPHEREFACE + ["embed", str(wild_split / "probe"), "-o", str(out), "--model",
                                 str(model), "-q"], check=True, capture_output=True)
    f = np.load(out)
    assert f["features"].shape == (len(f["names"]), 1024) and len(f["names"]) >= 18
    aligned = celeba_list.parent / "aligned"
    names, feats, notes = embed_folder(FaceEmbedder(model, flip="none"), aligned, aligned=True,
                                       progress=False)
    assert feats.shape == (len(list(aligned.rglob("*.jpg"))), 512) and not notes


@pytest.mark.parametrize("suffix", [".onnx", ".pt2", ".ts"])
def test_export_round_trip(model, celeba_list, tmp_path, suffix):
    result = export(model, tmp_path / f"model{suffix}", check_dir=celeba_list.parent / "aligned")
    assert result["checked"] and "aligned faces" in result["inputs"]
    assert result["max_abs_diff"] < 1e-4 * max(1.0, result["max_abs_feature"])


def test_angular_fisher_score_known_value():
    x = np.array([[2.0, 0], [0, 2], [3, 0]])
    labels = ["a", "a", "b"]
    within = 2 * (1 - 1 / math.sqrt(2))
    between = 2 * (1 - 7 / math.sqrt(58)) + (1 - 5 / math.sqrt(29))
    assert angular_fisher_score(x, labels) == pytest.approx(within / between)
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(5, 16))
    tight = np.repeat(centres, 10, 0) + 0.05 * rng.normal(size=(50, 16))
    loose = np.repeat(centres, 10, 0) + 0.5 * rng.normal(size=(50, 16))
    labels = np.repeat(np.arange(5), 10)
    assert angular_fisher_score(tight, labels) < angular_fisher_score(loose, labels)
    exact = angular_fisher_score(np.repeat(centres, 3, 0), np.repeat(np.arange(5), 3))
    assert exact == pytest.approx(0, abs=1e-12)


def test_threshold_by_false_accept_rate(tmp_path):
    impostors = np.arange(1, 11) / 10.0            # ten different-person scores 0.1 .. 1.0
    path = tmp_path / "m.lfw.json"
    path.write_text(json.dumps({"calibration": {"mean": None, "threshold": 0.35, "flip": "concat",
                                                "impostors": impostors.tolist()}}))
    cal = Calibration.load(tmp_path / "m.pt")
    assert cal.threshold == 0.35 and cal.far_of(0.35) == pytest.approx(0.7)
    one_in_ten = cal.threshold_at_far(0.1)
    assert 0.9 < one_in_ten < 0.9 + 1e-9 and cal.far_of(one_in_ten) == pytest.approx(0.1)
    assert cal.far_of(cal.threshold_at_far(0.0)) == 0.0 and cal.threshold_at_far(0.0) > 1.0
    at_far = Calibration.load(tmp_path / "m.pt", far=0.25)
    assert at_far.far_of(at_far.threshold) == pytest.approx(0.2) and "FAR 0.25" in at_far.source
    path.write_text(json.dumps({"calibration": {"mean": None, "threshold": 0.3, "flip": "concat"}}))
    with pytest.raises(UserError, match="run `sphereface evaluate` again"):
        Calibration.load(tmp_path / "m.pt", far=1e-3)


def test_a_gallery_cache_that_cannot_be_read_is_made_again_and_a_dangling_link_is_noted(model, wild_split,
                                                                                       tmp_path):
    import shutil

    root = tmp_path / "gallery"
    shutil.copytree(wild_split / "gallery", root)
    (root / ".sphereface-gallery.npz").unlink(missing_ok=True)
    people = sorted(p.name for p in root.iterdir() if p.is_dir())[:3]
    for person in sorted(p.name for p in root.iterdir() if p.is_dir())[3:]:
        shutil.rmtree(root / person)
    (root / people[0] / "gone.jpg").symlink_to(tmp_path / "nowhere.jpg")
    # Object arrays would unpickle: a cache that holds them is refused, never loaded.
    np.savez(root / ".sphereface-gallery.npz", model=np.array([{"a": 1}], dtype=object),
             paths=np.array(["x"], dtype=object))
    emb, key = FaceEmbedder(model), load(model).key
    found, feats, notes = gallery(emb, root, key)
    assert sorted(set(found)) == people and len(feats) == 3
    assert any("not a readable gallery cache" in n and "made again" in n for n in notes), notes
    assert any("gone.jpg" in n for n in notes), notes
    again, _, notes = gallery(emb, root, key)
    assert again == found and not [n for n in notes if "gallery cache" in n]
    # A file of the user's where the cache would go is left alone.
    (tmp_path / "mine.npz").write_bytes(b"my own bytes")
    with pytest.raises(UserError, match="exists and is not a gallery cache"):
        gallery(emb, root, key, cache=tmp_path / "mine.npz")
    assert (tmp_path / "mine.npz").read_bytes() == b"my own bytes"


def test_a_photo_is_detected_as_detect_does_large_ones_downscaled(model, data, tmp_path):
    """The one path from photo to faces: a photo over detect's max_side gets the faces,
    in its own coordinates, that `detect` writes into the manifest."""
    photo = sorted((data / "wild" / "7212").iterdir())[0]
    big = tmp_path / "big" / "p" / "big.jpg"
    big.parent.mkdir(parents=True)
    img = cv2.imread(str(photo))
    cv2.imwrite(str(big), cv2.resize(img, (img.shape[1] * 7, img.shape[0] * 7),
                                     interpolation=cv2.INTER_CUBIC))
    rgb, faces = FaceEmbedder(model).photo(big)
    assert max(rgb.shape[:2]) > 2000 and faces
    detect_tree(tmp_path / "big", tmp_path / "m.jsonl", settings=DetectSettings(all_faces=True),
                progress=False)
    _, records = read_manifest(tmp_path / "m.jsonl")
    (record,) = list(records)
    assert record["scale"] < 1
    assert np.allclose([f["landmarks"] for f in faces], [f["landmarks"] for f in record["all"]])


def test_embed_of_a_photo_is_detect_align_evaluate_of_it(model, data, tmp_path):
    """One path from photo to feature: `embed` of raw photos gives the features that
    detect -> align -> evaluate --save-features give (PNG, so no JPEG between them)."""
    people = sorted(p for p in (data / "wild").iterdir())[:2]
    raw = tmp_path / "raw"
    for person in people:
        (raw / person.name).mkdir(parents=True)
        for i, photo in enumerate(sorted(person.iterdir())[:2], 1):
            cv2.imwrite(str(raw / person.name / f"{person.name}_{i:04d}.png"), cv2.imread(str(photo)))
    a, b = (p.name for p in people)
    pairs = tmp_path / "pairs.txt"
    pairs.write_text("10 1\n" + f"{a}\t1\t2\n{a}\t1\t{b}\t1\n" * 10)

    def run(*args):
        subprocess.run(SPHEREFACE + [*map(str, args), "-q"], check=True, capture_output=True)

    run("detect", raw, "-o", tmp_path / "m.jsonl")
    run("align", tmp_path / "m.jsonl", "-o", tmp_path / "crops")
    run("evaluate", "--pairs", pairs, "--model", model, "--data", tmp_path / "crops",
        "-o", tmp_path / "r.json", "--pattern", "{name}/{name}_{num:04d}.png",
        "--save-features", tmp_path / "pipeline.npz")
    run("embed", raw, "-o", tmp_path / "embed.npz", "--model", model)
    pipeline, embedded = np.load(tmp_path / "pipeline.npz"), np.load(tmp_path / "embed.npz")
    by_name = dict(zip(embedded["names"], embedded["features"]))
    assert len(pipeline["names"]) == 3  # a_1, a_2, b_1
    for name, feature in zip(pipeline["names"], pipeline["features"]):
        np.testing.assert_allclose(by_name[name], feature, rtol=1e-4, atol=1e-4)


def test_the_readme_python_section_runs_as_written(model, wild_split, tmp_path, monkeypatch, capsys):
    text = (Path(__file__).parents[1] / "README.md").read_text(encoding="utf-8")
    section = text.split("## From Python", 1)[1].split("\n## ", 1)[0]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    (tmp_path / "out/demo/celeba-sphere4-asoftmax").mkdir(parents=True)
    (tmp_path / "out/demo/celeba-sphere4-asoftmax/model.pt").symlink_to(model)
    (tmp_path / "people").symlink_to(wild_split / "gallery")
    person = sorted((wild_split / "probe").iterdir())[0]
    a, b = sorted(person.iterdir())[:2]
    for name, photo in (("a.jpg", a), ("b.jpg", b), ("party.jpg", a)):
        (tmp_path / name).symlink_to(photo)
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {})
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith("Model(") and "same=" in printed[1]
    names = {p.name for p in (wild_split / "gallery").iterdir()} | {"unknown"}
    assert printed[2:] and all(line.split()[0] in names for line in printed[2:]), printed
