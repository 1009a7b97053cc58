import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from spherecli import UserError
from spherecli.preprocess.detect import (BORDER_PAD, SIZE_STEP, DetectSettings, FaceDetector,
                                         _size_batches, detect_tree, select_face)
from spherecli.core.images import decode
from spherecli.core.formats import read_manifest

from conftest import copy_images

SPHEREFACE = [sys.executable, "-m", "spherecli"]


def records_of(manifest):
    header, records = read_manifest(manifest)
    return header, {r["path"]: r for r in records}


def direct_mtcnn(path, pad=0):
    """facenet-pytorch's MTCNN called the plain way, one image at a time; with pad, on
    the image given a black border of pad pixels, coordinates shifted back."""
    from facenet_pytorch import MTCNN
    settings = DetectSettings()
    mtcnn = MTCNN(min_face_size=settings.min_face, thresholds=list(settings.thresholds),
                  factor=settings.factor, keep_all=True, select_largest=False)
    img = Image.open(path).convert("RGB")
    size = img.size
    if pad:
        padded = Image.new("RGB", (size[0] + 2 * pad, size[1] + 2 * pad))
        padded.paste(img, (pad, pad))
        img = padded
    boxes, probs, points = mtcnn.detect(img, landmarks=True)
    if boxes is None:
        return size, None, None, None
    return size, np.array(boxes.tolist()) - pad, np.array(probs.tolist()), np.array(points.tolist()) - pad


def test_lfw_faces_found_with_plausible_landmarks(lfw_sample, tmp_path):
    summary = detect_tree(lfw_sample, tmp_path / "m.jsonl", progress=False)
    header, recs = records_of(tmp_path / "m.jsonl")
    assert header["settings"]["factor"] == 0.85 and header["settings"]["thresholds"] == [0.6, 0.7, 0.9]
    assert summary["images"] == len(recs) == 48
    assert summary["ok"] >= 46
    for rec in recs.values():
        assert rec["identity"] == rec["path"].split("/")[0]
        if rec["status"] != "ok":
            continue
        (lex, ley), (rex, rey), (nx, ny), (lmx, lmy), (rmx, rmy) = rec["landmarks"]
        x1, y1, x2, y2 = rec["box"]
        assert lex < rex and lmx < rmx, "left/right swapped"
        assert max(ley, rey) < ny < min(lmy, rmy), "eyes, nose, mouth out of order"
        assert x1 - 5 < lex < x2 + 5 and y1 - 5 < ley < y2 + 5


def test_landmarks_equal_direct_facenet_call(data, tmp_path):
    """Batching, worker processes and spherecli's own cascade change nothing but float noise."""
    wild = sorted((data / "wild").glob("*/*.jpg"))[:12]
    lfw = sorted((data / "lfw").glob("*/*.jpg"))[:12]
    tree = tmp_path / "tree"
    for src in wild + lfw:
        dst = tree / src.parent.parent.name / src.parent.name / src.name
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src, dst)
    threads = torch.get_num_threads()
    detect_tree(tree, tmp_path / "m.jsonl", DetectSettings(all_faces=True), workers=2,
                batch_size=4, progress=False)
    # This process detected too while the workers started, single-threaded, and is itself again.
    assert torch.get_num_threads() == threads
    _, recs = records_of(tmp_path / "m.jsonl")
    assert len(recs) == 24
    compared = 0
    for rel, rec in recs.items():
        # Faces that reach past the frame were found on a padded copy: compare with that.
        pad = round(BORDER_PAD * max(rec["width"], rec["height"])) if rec.get("padded") else 0
        size, boxes, probs, points = direct_mtcnn(tree / rel, pad)
        if boxes is None:
            assert rec["status"] == "no_face"
            continue
        assert rec["faces"] == len(boxes)
        ours = np.array([f["landmarks"] for f in rec["all"]])
        np.testing.assert_allclose(ours, points, atol=2e-3)
        faces = [{"box": b.tolist(), "score": p} for b, p in zip(boxes, probs)]
        i = select_face(faces, *size, "center")
        np.testing.assert_allclose(rec["landmarks"], points[i], atol=2e-3)
        compared += 1
    assert compared >= 20


def test_photos_of_similar_sizes_share_batches(data):
    # CelebA's photos come in many sizes a few pixels apart; one batch per exact size
    # left MTCNN with batches of one to five.
    celeba = data / "celeba"
    paths = [f"{p.parent.name}/{p.name}" for p in sorted(celeba.glob("*/*.jpg"))[:96]]
    sizes = {rel: Image.open(celeba / rel).size for rel in paths}
    batches = [batch for _, batch in _size_batches(str(celeba), paths, DetectSettings(), 16)]
    assert sorted(rel for batch in batches for rel in batch) == sorted(paths)
    for batch in batches:
        for side in (0, 1):
            assert max(sizes[r][side] for r in batch) - min(sizes[r][side] for r in batch) < SIZE_STEP
    assert len(batches) <= len(set(sizes.values())) / 3


def test_several_faces_center_largest_confident(data, tmp_path):
    # Find wild photos with more than one face, then check each selection rule.
    tree = copy_images(data / "wild", tmp_path / "wild",
                       [f"{p.parent.name}/{p.name}" for p in sorted((data / "wild").glob("*/*.jpg"))[:60]])
    detect_tree(tree, tmp_path / "all.jsonl", DetectSettings(all_faces=True), progress=False)
    _, recs = records_of(tmp_path / "all.jsonl")
    multi = [r for r in recs.values() if r.get("faces", 0) > 1]
    assert multi, "expected group photos among the wild images"
    for rec in multi:
        faces, w, h = rec["all"], rec["width"], rec["height"]
        centres = [((f["box"][0] + f["box"][2]) / 2, (f["box"][1] + f["box"][3]) / 2) for f in faces]
        dist = [(x - w / 2) ** 2 + (y - h / 2) ** 2 for x, y in centres]
        assert rec["box"] == faces[int(np.argmin(dist))]["box"]
        areas = [(f["box"][2] - f["box"][0]) * (f["box"][3] - f["box"][1]) for f in faces]
        assert faces[select_face(faces, w, h, "largest")]["box"] == faces[int(np.argmax(areas))]["box"]
        scores = [f["score"] for f in faces]
        assert faces[select_face(faces, w, h, "confident")]["score"] == max(scores)


def make_bad_tree(good: Path, root: Path) -> dict:
    """One file per kind of bad input; returns path -> expected status."""
    person = root / "person"
    person.mkdir(parents=True)
    img = Image.open(good).convert("RGB")
    raw = good.read_bytes()
    shutil.copy(good, person / "good.jpg")
    (person / "empty.jpg").write_bytes(b"")
    (person / "truncated.jpg").write_bytes(raw[: len(raw) // 2])
    (person / "text.jpg").write_text("this is not a picture\n")
    rgba = img.convert("RGBA")
    rgba.putalpha(128)
    rgba.save(person / "alpha.png")
    Image.fromarray(np.asarray(img.convert("L"), dtype=np.uint16) * 257).save(person / "gray16.png")
    img.convert("CMYK").save(person / "cmyk.jpg")
    img.convert("L").save(person / "gray.jpg")
    Image.new("RGB", (1, 1)).save(person / "tiny.png")
    (root / "Zoë ñandú").mkdir()
    shutil.copy(good, root / "Zoë ñandú" / "photo with spaces é.jpg")
    os.symlink(".", person / "loop")                     # a directory loop
    os.symlink("self.jpg", person / "self.jpg")          # a link to itself
    os.symlink("missing.jpg", person / "dangling.jpg")
    os.mkfifo(person / "fifo.jpg")                       # would block a naive reader
    ok = ["good.jpg", "alpha.png", "gray16.png", "cmyk.jpg", "gray.jpg"]
    bad = ["empty.jpg", "truncated.jpg", "text.jpg", "tiny.png", "self.jpg", "dangling.jpg", "fifo.jpg"]
    return ({f"person/{n}": "ok" for n in ok} | {f"person/{n}": "error" for n in bad}
            | {"Zoë ñandú/photo with spaces é.jpg": "ok"})


def test_bad_input_becomes_error_records(data, tmp_path):
    good = sorted((data / "lfw").glob("*/*.jpg"))[0]
    root = tmp_path / "bad"
    expected = make_bad_tree(good, root)
    summary = detect_tree(root, tmp_path / "m.jsonl", progress=False, workers=2, batch_size=2)
    _, recs = records_of(tmp_path / "m.jsonl")
    assert {p: r["status"] for p, r in recs.items()} == expected
    for p, r in recs.items():
        if r["status"] == "error":
            assert r["error"], p
    assert recs["person/empty.jpg"]["error"] == "empty file (0 bytes)"
    assert "truncated" in recs["person/truncated.jpg"]["error"]
    assert "recognisable" in recs["person/text.jpg"]["error"]
    assert "regular file" in recs["person/fifo.jpg"]["error"]
    assert "smaller than the minimum face" in recs["person/tiny.png"]["error"]
    assert summary["error"] == sum(s == "error" for s in expected.values())
    assert summary["ok"] == sum(s == "ok" for s in expected.values())


@pytest.mark.skipif(os.geteuid() == 0, reason="root can read a file whatever its mode")
def test_unreadable_file_is_an_error_record(data, tmp_path):
    root = tmp_path / "r" / "p"
    root.mkdir(parents=True)
    shutil.copy(sorted((data / "lfw").glob("*/*.jpg"))[0], root / "locked.jpg")
    os.chmod(root / "locked.jpg", 0)
    detect_tree(root.parent, tmp_path / "m.jsonl", progress=False)
    _, recs = records_of(tmp_path / "m.jsonl")
    assert recs["p/locked.jpg"]["status"] == "error"
    assert "ermission" in recs["p/locked.jpg"]["error"]


def test_strict_missing_root_and_unwritable_output_exit_2(data, tmp_path):
    root = tmp_path / "bad"
    make_bad_tree(sorted((data / "lfw").glob("*/*.jpg"))[0], root)
    r = subprocess.run(SPHEREFACE + ["detect", str(root), "-o", str(tmp_path / "m.jsonl"), "--strict",
                                     "-q", "--workers", "1"], capture_output=True, text=True)
    assert r.returncode == 2 and "--strict" in r.stderr
    r = subprocess.run(SPHEREFACE + ["detect", str(tmp_path / "nowhere")], capture_output=True, text=True)
    assert r.returncode == 2 and "nowhere' does not exist" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    blocker = tmp_path / "file"
    blocker.write_text("")
    r = subprocess.run(SPHEREFACE + ["detect", str(root), "-o", str(blocker / "m.jsonl")],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "cannot write" in r.stderr


def test_exif_orientation_applied_and_recorded(data, tmp_path):
    good = sorted((data / "lfw").glob("*/*.jpg"))[3]
    tree = tmp_path / "t" / "p"
    tree.mkdir(parents=True)
    upright = Image.open(good).convert("RGB").resize((150, 200))
    # Stored rotated, with the tag (6: rotate 90 clockwise to display) that
    # makes viewers show it upright.
    exif = Image.Exif()
    exif[0x0112] = 6
    upright.rotate(90, expand=True).save(tree / "rotated.jpg", exif=exif, quality=95)
    upright.save(tree / "upright.jpg", quality=95)
    detect_tree(tree.parent, tmp_path / "m.jsonl", progress=False)
    _, recs = records_of(tmp_path / "m.jsonl")
    rot, ref = recs["p/rotated.jpg"], recs["p/upright.jpg"]
    assert rot["orientation"] == 6 and ref["orientation"] == 1
    assert (rot["width"], rot["height"]) == (150, 200)
    np.testing.assert_allclose(rot["landmarks"], ref["landmarks"], atol=3)
    detect_tree(tree.parent, tmp_path / "raw.jsonl", DetectSettings(exif=False), progress=False)
    _, raw = records_of(tmp_path / "raw.jsonl")
    assert (raw["p/rotated.jpg"]["width"], raw["p/rotated.jpg"]["height"]) == (200, 150)
    assert raw["p/rotated.jpg"]["orientation"] == 6


def test_huge_photo_is_downscaled_and_landmarks_mapped_back(data, tmp_path):
    face = Image.open(sorted((data / "lfw").glob("*/*.jpg"))[5]).convert("RGB")
    canvas = Image.new("RGB", (12000, 8000), (90, 110, 130))
    canvas.paste(face.resize((3000, 3000)), (6000, 3000))
    tree = tmp_path / "t" / "p"
    tree.mkdir(parents=True)
    canvas.save(tree / "huge.jpg", quality=85)
    small = canvas.resize((2000, 1333), Image.BOX)  # the size detection works at
    small.save(tree / "small.jpg", quality=95)
    detect_tree(tree.parent, tmp_path / "m.jsonl", DetectSettings(max_side=2000), progress=False)
    _, recs = records_of(tmp_path / "m.jsonl")
    huge, ref = recs["p/huge.jpg"], recs["p/small.jpg"]
    assert huge["status"] == "ok" and (huge["width"], huge["height"]) == (12000, 8000)
    assert huge["scale"] < 0.2
    # The face found on the downscaled copy lands on the same spot, x6, within
    # half a percent of the face's size.
    np.testing.assert_allclose(np.array(huge["landmarks"]), np.array(ref["landmarks"]) * 6, atol=15)


def test_shards_partition_the_tree(lfw_sample, tmp_path):
    paths = []
    for k in (1, 2, 3):
        detect_tree(lfw_sample, tmp_path / f"s{k}.jsonl", shard=(k, 3), progress=False, workers=1)
        header, recs = records_of(tmp_path / f"s{k}.jsonl")
        assert header["settings"]["shard"] == f"{k}/3"
        assert recs, "a shard of 48 images should not be empty"
        paths += list(recs)
    assert len(paths) == len(set(paths)) == 48


def test_resume_with_other_settings_is_refused(lfw_sample, tmp_path):
    detect_tree(lfw_sample, tmp_path / "m.jsonl", shard=(1, 8), progress=False)
    with pytest.raises(UserError, match=r"other settings \(factor 0.85 -> 0.7\)"):
        detect_tree(lfw_sample, tmp_path / "m.jsonl", DetectSettings(factor=0.7), shard=(1, 8),
                    progress=False)
    with pytest.raises(UserError, match=r"shard 1/8 -> None"):
        detect_tree(lfw_sample, tmp_path / "m.jsonl", progress=False)
    # A manifest from before border handling meant the original's plain detection.
    lines = (tmp_path / "m.jsonl").read_text().splitlines()
    header = json.loads(lines[0])
    del header["settings"]["border"]
    (tmp_path / "old.jsonl").write_text("\n".join([json.dumps(header)] + lines[1:]) + "\n")
    with pytest.raises(UserError, match="border none -> redetect"):
        detect_tree(lfw_sample, tmp_path / "old.jsonl", shard=(1, 8), progress=False)
    summary = detect_tree(lfw_sample, tmp_path / "old.jsonl", DetectSettings(border="none"), shard=(1, 8),
                          progress=False)
    assert summary["new"] == 0


def test_faces_that_fill_the_frame_keep_their_landmarks(data):
    """Real LFW faces cropped to inside their own box, as CFP's photos and tight
    crops are. The original's plain detection misses many of them and puts the
    landmarks of the rest far up the face; detecting again on a padded copy finds
    them where the whole photo has them."""
    paths = sorted((data / "lfw").glob("*/*.jpg"))[:400:20]
    detectors = {mode: FaceDetector(DetectSettings(border=mode)) for mode in ("none", "redetect")}
    errors = {mode: [] for mode in detectors}
    padded = 0
    for path in paths:
        rgb, _ = decode(path)
        faces = detectors["none"].detect_one(rgb)
        face = faces[select_face(faces, rgb.shape[1], rgb.shape[0])]
        x1, y1, x2, y2 = face["box"]
        w, h = x2 - x1, y2 - y1
        left, top = int(max(0, x1 + 0.1 * w)), int(max(0, y1 + 0.1 * h))
        crop = np.ascontiguousarray(rgb[top:int(y2 - 0.1 * h), left:int(x2 - 0.1 * w)])
        for mode, detector in detectors.items():
            found = detector.detect_one(crop)
            if not found:
                errors[mode].append(np.inf)
                continue
            best = found[select_face(found, crop.shape[1], crop.shape[0])]
            moved = np.array(best["landmarks"]) + [left, top] - np.array(face["landmarks"])
            errors[mode].append(np.abs(moved).max())
            padded += best.get("padded", False)
    none, redetect = np.array(errors["none"]), np.array(errors["redetect"])
    assert np.isinf(none).sum() >= 4, "plain detection misses faces that fill the frame"
    assert np.median(none) > 15 and np.median(redetect) < 6, (none, redetect)
    assert np.isinf(redetect).sum() <= 1
    assert padded >= 0.8 * len(paths), "the faces found again are marked as found on a padded copy"


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT])
def test_killed_run_resumes_to_a_complete_duplicate_free_manifest(lfw_sample, tmp_path, sig):
    manifest = tmp_path / "m.jsonl"
    cmd = SPHEREFACE + ["detect", str(lfw_sample), "-o", str(manifest), "-q", "--workers", "1",
                        "--batch-size", "2"]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline:
        if manifest.exists() and manifest.read_text().count('"type": "image"') >= 6:
            break
        time.sleep(0.05)
    proc.send_signal(sig)
    proc.wait(timeout=60)
    assert proc.returncode == (130 if sig == signal.SIGINT else -signal.SIGKILL)
    done = manifest.read_text().count('"type": "image"')
    assert 6 <= done < 48, "the run should have been stopped part-way"
    if sig == signal.SIGKILL:
        with open(manifest, "a") as f:  # what a kill in the middle of a write leaves
            f.write('{"type": "image", "path": "half-writ')
    subprocess.run(cmd, check=True)
    lines = manifest.read_text().splitlines()
    images = [json.loads(line)["path"] for line in lines if '"type": "image"' in line]
    assert len(images) == len(set(images)) == 48
    assert all(json.loads(line) for line in lines)


def test_retry_errors_redoes_only_failed_images(data, tmp_path):
    good = sorted((data / "lfw").glob("*/*.jpg"))[0]
    root = tmp_path / "r" / "p"
    root.mkdir(parents=True)
    shutil.copy(good, root / "a.jpg")
    (root / "b.jpg").write_bytes(b"")
    first = detect_tree(root.parent, tmp_path / "m.jsonl", progress=False)
    assert (first["ok"], first["error"]) == (1, 1)
    shutil.copy(good, root / "b.jpg")  # the user fixes the file
    assert detect_tree(root.parent, tmp_path / "m.jsonl", progress=False)["new"] == 0
    again = detect_tree(root.parent, tmp_path / "m.jsonl", retry_errors=True, progress=False)
    assert (again["new"], again["ok"], again["error"], again["images"]) == (1, 2, 0, 2)


def test_decompression_bomb_is_an_error_record_and_pillow_is_left_alone(tmp_path):
    """A 144-megapixel PNG of a few kilobytes would decode to hundreds of megabytes (and
    gigabytes inside the detector): it is refused by size, not decoded."""
    before = Image.MAX_IMAGE_PIXELS
    tree = tmp_path / "t" / "p"
    tree.mkdir(parents=True)
    Image.new("1", (12000, 12000)).save(tree / "bomb.png")
    assert (tree / "bomb.png").stat().st_size < 1_000_000
    detect_tree(tree.parent, tmp_path / "m.jsonl", progress=False)
    _, recs = records_of(tmp_path / "m.jsonl")
    assert recs["p/bomb.png"]["status"] == "error"
    assert "12000x12000 = 144 megapixels, over the limit of 100" in recs["p/bomb.png"]["error"]
    assert Image.MAX_IMAGE_PIXELS == before and before is not None
    # A larger limit admits it (and the plain image has no face).
    detect_tree(tree.parent, tmp_path / "m2.jsonl", max_pixels=150_000_000, progress=False)
    assert records_of(tmp_path / "m2.jsonl")[1]["p/bomb.png"]["status"] == "no_face"
