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
from spherecli.recognition.gallery import Gallery, cached
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
    # The second run reads the gallery from its cache: a model that cannot detect faces
    # still finds every gallery person, and embeds nothing.
    m = load(model)
    assert list((wild_split / "gallery" / ".sphereface-gallery").glob("*/gallery.sqlite"))

    def blind(path):
        raise AssertionError("the cache should have answered")

    m.embedder.photo = blind
    again = cached(m, wild_split / "gallery")
    assert len(again) == 25 and again.photos == 25 and not again.notes


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
                                 str(video), "--model", str(model), "--no-track", "--every", "2",
                                 "-o", str(out), "--annotate", str(tmp_path / "annotated.mp4")], check=True,
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
    shutil.copytree(wild_split / "gallery", root, ignore=shutil.ignore_patterns(".sphereface-gallery"))
    people = sorted(p.name for p in root.iterdir() if p.is_dir())[:3]
    for person in sorted(p.name for p in root.iterdir() if p.is_dir())[3:]:
        shutil.rmtree(root / person)
    (root / people[0] / "gone.jpg").symlink_to(tmp_path / "nowhere.jpg")
    m = load(model)
    where = root / ".sphereface-gallery" / m.key[:16]
    where.mkdir(parents=True)
    (where / "gallery.sqlite").write_bytes(b"not a database at all" * 100)
    found = cached(m, root)
    assert sorted(n for n, _, _ in found.people()) == people and found.photos == 3
    assert any("not a readable gallery database" in n and "made again" in n for n in found.notes), found.notes
    assert any("gone.jpg" in n for n in found.notes), found.notes
    again = cached(m, root)
    assert again.people() == found.people() and not [n for n in again.notes if "database" in n]
    # A folder of the user's named as the cache is left alone.
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("my own words")
    with pytest.raises(UserError, match="not an empty folder"):
        cached(m, root, tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "my own words"


def test_gallery_enrol_search_remove_and_enrol_again(model, data, tmp_path):
    """A gallery searched by photo: every enrolled photo finds its own person at score 1;
    enrolling again embeds nothing, a changed photo is embedded again, a removed person is
    never answered, and enrolling them again brings them back."""
    import shutil

    wild = data / "wild"
    people = sorted(p.name for p in wild.iterdir())[:4]
    photos = tmp_path / "photos"
    for person in people:
        shutil.copytree(wild / person, photos / person)
    m = load(model, threshold=0.3)
    g = Gallery.create(tmp_path / "g", m, by="photo")
    first = g.enrol(m, photos)
    assert first["enrolled"] + first["without_a_face"] == 32 and len(g) == 4
    assert {n for n, _, _ in g.people()} == set(people)
    probe = sorted((photos / people[1]).iterdir())[0]
    (match,) = m.identify(probe, g, k=3)[:1]
    assert match.identity == people[1] and match.score == pytest.approx(1.0, abs=1e-4)
    assert match.candidates[0].photo == str(probe.resolve()) and len(match.candidates) == 3
    assert first["enrolled"] == g.photos
    assert g.enrol(m, photos)["unchanged"] == 32
    shutil.copy(sorted((wild / people[0]).iterdir())[0], probe)  # the photo now shows someone else
    changed = g.enrol(m, photos)
    assert changed["enrolled"] == 1 and changed["unchanged"] == 31
    n = dict((name, found) for name, found, _ in g.people())[people[2]]
    assert g.remove([people[2]]) == n and len(g) == 3
    for answers in g.search(m.calibration.unit(m.embed(sorted((photos / people[2]).iterdir())[:4])), k=3):
        assert people[2] not in [c.name for c in answers]
    with pytest.raises(UserError, match="no enrolled 'nobody'"):
        g.remove(["nobody", people[0]])
    assert len(g) == 3, "a remove naming someone not enrolled removes nothing"
    assert g.enrol(m, photos)["enrolled"] == n and len(g) == 4
    # Opened again from its folder, the gallery answers as before, from its saved index.
    reopened = Gallery.open(tmp_path / "g")
    assert reopened.info()["people"] == 4 and reopened.meta["index_file"][1] == reopened.meta["generation"]


def test_a_gallery_refuses_a_model_whose_features_differ(model, tmp_path):
    from spherecli.core.formats import ModelFile

    m = load(model)
    g = Gallery.create(tmp_path / "g", m)
    with pytest.raises(UserError, match="differs in its flip mode"):
        g.check(load(model, flip="sum"))
    other = ModelFile.load(model)
    name = next(k for k, v in other.weights.items() if v.is_floating_point())
    other.weights[name] = other.weights[name] + 1e-3
    other.save(tmp_path / "other.pt")
    with pytest.raises(UserError, match="differs in its network weights"):
        g.enrol(load(tmp_path / "other.pt"), tmp_path)
    r = subprocess.run(SPHEREFACE + ["gallery", "enrol", str(tmp_path / "g"), str(tmp_path),
                                     "--model", str(tmp_path / "other.pt")], capture_output=True, text=True)
    assert r.returncode == 2 and "differs in its network weights" in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run(SPHEREFACE + ["gallery", "create", str(tmp_path / "g"), "--model", str(model)],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "is a gallery already" in r.stderr


def test_a_killed_enrolment_loses_nothing_enrolled_before_it(model, data, tmp_path):
    """SIGKILL in the middle of `gallery enrol`: every batch committed before the kill is
    there, the database is whole, and the same command enrols only the rest."""
    import signal
    import sqlite3
    import time

    import shutil

    gallery, photos = tmp_path / "g", tmp_path / "photos"
    for person in sorted(p.name for p in (data / "wild").iterdir())[:12]:
        shutil.copytree(data / "wild" / person, photos / person)
    subprocess.run(SPHEREFACE + ["gallery", "create", str(gallery), "--model", str(model)], check=True,
                   capture_output=True)
    enrol = SPHEREFACE + ["gallery", "enrol", str(gallery), str(photos), "-q"]
    proc = subprocess.Popen(enrol, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    committed, deadline = 0, time.time() + 240
    while committed < 40 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
        try:
            with sqlite3.connect(f"file:{gallery / 'gallery.sqlite'}?mode=ro", uri=True) as db:
                committed = db.execute("SELECT COUNT(*) FROM photos").fetchone()[0]
        except sqlite3.Error:
            pass
    assert proc.poll() is None, "enrolment ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    with sqlite3.connect(gallery / "gallery.sqlite") as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        kept = db.execute("SELECT COUNT(*) FROM photos").fetchone()[0]
    assert 40 <= kept < 96
    r = subprocess.run(enrol, capture_output=True, text=True, check=True)
    assert _row(r.stderr, "unchanged") == kept
    assert _row(r.stderr, "enrolled") + _row(r.stderr, "without a face") == 96 - kept
    with sqlite3.connect(gallery / "gallery.sqlite") as db:
        assert db.execute("SELECT COUNT(*) FROM photos").fetchone()[0] == 96


def _row(table: str, key: str) -> int:
    """A number of one row of a summary table."""
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip("│ ").split("│")]
        if len(cells) == 2 and cells[0] == key:
            return int(cells[1])
    raise AssertionError(f"no {key!r} row in {table}")


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
    assert printed[2:-1] and all(line.split()[0] in names for line in printed[2:-1]), printed
    # The gallery kept on disk: its first people, and the first face's three candidates.
    assert printed[-1].startswith("[('") and printed[-1].count("Candidate(") == 3, printed[-1]
    assert (tmp_path / "staff.gallery" / "gallery.sqlite").is_file()


def test_a_tracked_video_names_each_track_and_writes_a_playable_video(data, tmp_path):
    """Six wild people cross a 640 x 480 video; three are in the gallery (their other seven
    photos). With the published network every track gets its person's name, or unknown for
    the three strangers; the annotated video has every frame; the log ends with a track
    record per track and the source's counts."""
    from conftest import MODELS, score_tracks, write_test_video

    published = MODELS / "mobilefacenet-casia" / "068.ckpt"
    if not published.is_file():
        pytest.skip(f"the published MobileFaceNet is not at {published}")
    model = tmp_path / "068.pt"
    subprocess.run(SPHEREFACE + ["import", str(published), "-o", str(model)], check=True, capture_output=True)
    people = sorted(p.name for p in (data / "wild").iterdir())[:6]
    truth = write_test_video(tmp_path / "clip.mp4", data / "wild", people, seconds=3)
    for person in people[:3]:  # every photo but the one the video shows
        others = [p.name for i, p in enumerate(sorted((data / "wild" / person).iterdir())) if i != 1]
        copy_images(data / "wild", tmp_path / "gallery", [f"{person}/{name}" for name in others])
    # The imported model is not calibrated here (no mean subtracted): its strangers score up
    # to ~0.3 against these templates, its known people ~0.75.
    r = subprocess.run(SPHEREFACE + ["identify", "--gallery", str(tmp_path / "gallery"), "--probe",
                                     str(tmp_path / "clip.mp4"), "--model", str(model), "--threshold", "0.5",
                                     "--annotate", str(tmp_path / "named.mp4"), "--log",
                                     str(tmp_path / "log.jsonl"), "-o", str(tmp_path / "ids.csv"), "-q"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    records = [json.loads(line) for line in open(tmp_path / "log.jsonl")]
    frames = [x for x in records if x["type"] == "frame"]
    tracks = [x for x in records if x["type"] == "track"]
    (source,) = [x for x in records if x["type"] == "source"]
    assert source["frames_done"] == source["frames_read"] == 75 and source["dropped"] == 0
    right = score_tracks(tracks, frames, truth, set(people[:3]))
    assert {p for p, _ in right.values()} == set(people), right
    assert all(ok for _, ok in right.values()), (right, tracks)
    cap = cv2.VideoCapture(str(tmp_path / "named.mp4"))
    assert int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) == 75 and cap.get(cv2.CAP_PROP_FPS) == 25
    rows = list(csv.DictReader(open(tmp_path / "ids.csv")))
    assert len(rows) == len(frames) and all(row["track"] for row in rows)


def _counting_video(path, frames=50, size=(320, 240)):
    """An MJPEG AVI whose frames show their numbers; its byte offsets of each frame's JPEG."""
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 25, size)
    for i in range(frames):
        f = np.full((size[1], size[0], 3), (i * 5) % 255, np.uint8)
        cv2.putText(f, str(i), (40, 120), cv2.FONT_HERSHEY_SIMPLEX, 2, (255, 255, 255), 3)
        writer.write(f)
    writer.release()
    data = path.read_bytes()
    return data, [i for i in range(len(data) - 1) if data[i] == 0xFF and data[i + 1] == 0xD8]


def test_a_corrupt_frame_is_skipped_and_counted_and_a_cut_video_ends_with_what_it_had(model, wild_split,
                                                                                     tmp_path):
    from spherecli.recognition.video import FrameSource

    data, starts = _counting_video(tmp_path / "whole.avi")
    broken = bytearray(data)
    broken[starts[20]:starts[20] + 400] = bytes(400)
    (tmp_path / "corrupt.avi").write_bytes(bytes(broken))
    source = FrameSource(tmp_path / "corrupt.avi")
    seen = [f.index for f in source]
    assert 20 not in seen and {19, 21} <= set(seen) and source.stats.corrupt == 1
    (tmp_path / "cut.avi").write_bytes(data[:starts[30] + 100])
    source = FrameSource(tmp_path / "cut.avi")
    assert [f.index for f in source] == list(range(30)) and "ends early, at frame 30" in source.stats.ended
    # Through identify: the cut video still gives a playable annotated video of its 30
    # frames, a complete log, and says how it ended.
    r = subprocess.run(SPHEREFACE + ["identify", "--gallery", str(wild_split / "gallery"), "--probe",
                                     str(tmp_path / "cut.avi"), "--model", str(model), "--annotate",
                                     str(tmp_path / "named.mp4"), "--log", str(tmp_path / "log.jsonl"),
                                     "-o", str(tmp_path / "ids.csv"), "-q"], capture_output=True, text=True)
    assert r.returncode == 0 and "ends early" in r.stderr, r.stderr
    assert int(cv2.VideoCapture(str(tmp_path / "named.mp4")).get(cv2.CAP_PROP_FRAME_COUNT)) == 30
    last = json.loads(open(tmp_path / "log.jsonl").readlines()[-1])
    assert last["type"] == "source" and last["frames_done"] == 30
    (tmp_path / "notes.txt").write_text("not a video")
    r = subprocess.run(SPHEREFACE + ["identify", "--gallery", str(wild_split / "gallery"), "--probe",
                                     str(tmp_path / "notes.txt"), "--model", str(model)],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "not a photo, a folder or a video" in r.stderr
    r = subprocess.run(SPHEREFACE + ["identify", "--gallery", str(wild_split / "gallery"), "--probe",
                                     "rtsp://127.0.0.1:9/none", "--model", str(model), "--timeout", "2"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "cannot open it as a video" in r.stderr


def test_a_live_source_drops_frames_instead_of_falling_behind(tmp_path):
    """A 25 fps video read live (at its own rate, as a camera) by a consumer that takes 0.1 s
    a frame: about three frames in four are dropped, and each frame handed out is at most
    two frames behind the source's clock."""
    import time

    from spherecli.recognition.video import FrameSource

    _counting_video(tmp_path / "clip.avi")
    source = FrameSource(tmp_path / "clip.avi", live=True)
    taken, behind = [], []
    for frame in source:
        behind.append((time.monotonic() - source.started) * 25 - frame.index)
        taken.append(frame.index)
        time.sleep(0.1)
    assert source.stats.read == 50 and source.stats.dropped == 50 - len(taken)
    assert 10 <= len(taken) <= 30 and source.stats.dropped >= 20
    assert max(behind) <= 3.5, behind


def test_ctrl_c_in_a_live_video_leaves_a_playable_video_and_a_complete_log(model, wild_split, tmp_path):
    """SIGINT while `identify` reads a video as a live camera: exit 130, the annotated video
    plays with every frame done, and the log ends with the tracks and the source's counts."""
    import signal
    import time

    _counting_video(tmp_path / "clip.avi", frames=250)
    log = tmp_path / "log.jsonl"
    proc = subprocess.Popen(SPHEREFACE + ["identify", "--gallery", str(wild_split / "gallery"), "--probe",
                                          str(tmp_path / "clip.avi"), "--model", str(model), "--live",
                                          "--annotate", str(tmp_path / "named.mp4"), "--log", str(log),
                                          "-o", str(tmp_path / "ids.csv"), "-q"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and not (tmp_path / "named.mp4").exists():
        time.sleep(0.2)  # the annotated video is opened at the first frame
    time.sleep(1.0)  # about 25 frames of the live source
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "interrupted: the annotated video" in err, err
    last = json.loads(log.read_text().splitlines()[-1])
    assert last["type"] == "source" and 0 < last["frames_done"] < 250
    assert int(cv2.VideoCapture(str(tmp_path / "named.mp4")).get(cv2.CAP_PROP_FRAME_COUNT)) == \
        last["frames_done"]


def test_ctrl_c_while_a_frame_is_written_waits_for_the_frame(model, wild_split, tmp_path):
    """Ctrl-C that lands while a frame's rows are written (here: by the CSV sink itself, as
    it writes the second row) ends the run after that frame, so the CSV, the log and the
    annotated video hold the same frames. It cut the frame's CSV rows short after the log
    and the video had it."""
    import io
    import os
    import signal

    from spherecli.recognition.video import VideoRun

    video = tmp_path / "clip.avi"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 25, (300, 400))
    for p in sorted((wild_split / "probe").rglob("*.jpg"))[:4]:
        for _ in range(3):
            writer.write(cv2.resize(cv2.imread(str(p)), (300, 400)))
    writer.release()

    class Sink(io.StringIO):
        writes = 0

        def write(self, text):
            self.writes += 1
            if self.writes == 3:  # the header, one row, then Ctrl-C before the next
                os.kill(os.getpid(), signal.SIGINT)
            return super().write(text)

    m = load(model)
    run = VideoRun(m, m.gallery(wild_split / "gallery"), str(video), annotate=tmp_path / "named.mp4")
    sink = Sink()
    summary = run.write(sink, tmp_path / "log.jsonl")
    done = summary[-1]["frames_done"]
    assert run.interrupted and 0 < done < 12
    logged = [json.loads(line) for line in open(tmp_path / "log.jsonl")]
    in_log = [(r["frame"], r["track"]) for r in logged if r["type"] == "frame"]
    in_csv = [(int(r["frame"]), int(r["track"])) for r in csv.DictReader(io.StringIO(sink.getvalue()))]
    assert len(in_csv) >= 2 and in_csv == in_log and max(f for f, _ in in_log) < done
    assert int(cv2.VideoCapture(str(tmp_path / "named.mp4")).get(cv2.CAP_PROP_FRAME_COUNT)) == done


def test_a_folder_of_frames_is_a_source_its_unreadable_frames_counted_and_size_changes_noted(tmp_path):
    from spherecli.recognition.video import FrameSource

    frames = tmp_path / "frames"
    frames.mkdir()
    for i in range(6):
        size = (320, 240) if i < 4 else (640, 480)
        cv2.imwrite(str(frames / f"{i:04d}.png"), np.full((size[1], size[0], 3), 40 * i, np.uint8))
    (frames / "0002.png").write_bytes(b"not a png")
    source = FrameSource(str(frames))
    got = [(f.index, f.rgb.shape[:2]) for f in source]
    assert [i for i, _ in got] == [0, 1, 3, 4, 5] and got[-1][1] == (480, 640)
    assert source.stats.corrupt == 1 and source.stats.size_changes == 1 and not source.live
