import numpy as np
import pytest
from PIL import Image

from spherecli import UserError
from spherecli.preprocess.align import (REFERENCE_112x96, align_face, align_manifests, reference_points,
                                        similarity_transform)
from spherecli.preprocess.detect import detect_tree
from spherecli.core.formats import read_manifest

from conftest import copy_images


def lstsq_similarity(src, dst):
    """cp2tform's formulation: solve [x y 1 0; y -x 0 1] [sc ss tx ty]' = [u; v]."""
    x, y = src[:, 0], src[:, 1]
    one, zero = np.ones_like(x), np.zeros_like(x)
    A = np.vstack([np.stack([x, y, one, zero], 1), np.stack([y, -x, zero, one], 1)])
    sc, ss, tx, ty = np.linalg.lstsq(A, np.concatenate([dst[:, 0], dst[:, 1]]), rcond=None)[0]
    # u = sc x + ss y + tx ; v = -ss x + sc y + ty
    return np.array([[sc, ss, tx], [-ss, sc, ty]])


@pytest.mark.parametrize("seed", range(20))
def test_similarity_matches_least_squares_and_never_reflects(seed):
    rng = np.random.default_rng(seed)
    src = rng.uniform(0, 250, size=(5, 2))
    angle, scale, shift = rng.uniform(-np.pi, np.pi), rng.uniform(0.2, 3), rng.uniform(-100, 100, 2)
    rot = scale * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    dst = src @ rot.T + shift + rng.normal(0, 2.0, size=(5, 2))
    m = similarity_transform(src, dst)
    np.testing.assert_allclose(m, lstsq_similarity(src, dst), rtol=1e-9, atol=1e-9)
    assert np.linalg.det(m[:, :2]) > 0
    # Without noise the transform is recovered exactly.
    exact = similarity_transform(src, src @ rot.T + shift)
    np.testing.assert_allclose(exact[:, :2], rot, atol=1e-9)
    np.testing.assert_allclose(exact[:, 2], shift, atol=1e-7)
    # A mirrored point set still gets a rotation, never a reflection.
    mirrored = similarity_transform(src * [-1, 1], dst)
    assert np.linalg.det(mirrored[:, :2]) > 0


def test_reference_points_for_other_sizes():
    np.testing.assert_allclose(reference_points((112, 96)), REFERENCE_112x96)
    np.testing.assert_allclose(reference_points((112, 112)), REFERENCE_112x96 + [8, 0])
    np.testing.assert_allclose(reference_points((224, 192)), REFERENCE_112x96 * 2)


def test_align_face_puts_landmarks_on_the_reference():
    # A synthetic picture with dots at known "landmarks": after alignment the
    # dots must sit on the reference points.
    rng = np.random.default_rng(0)
    angle, scale = 0.3, 2.2
    rot = scale * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    pts = REFERENCE_112x96 @ rot.T + [120, 40]
    img = np.zeros((400, 400, 3), np.uint8)
    for x, y in pts:
        img[int(round(y)) - 2:int(round(y)) + 3, int(round(x)) - 2:int(round(x)) + 3] = 255
    # Both point sets are in Matlab's 1-based pixel convention.
    crop = align_face(img, pts + 1 + rng.normal(0, 0.01, pts.shape))
    assert crop.shape == (112, 96, 3)
    for x, y in REFERENCE_112x96 - 1:
        assert crop[int(round(y)), int(round(x))].max() > 128


def test_real_faces_redetected_on_the_reference_points(data, tmp_path):
    # 200 faces: a five-point similarity cannot fit every face exactly (on
    # LFW the fit itself leaves 2.6 px on average), so small samples are noisy.
    lfw = data / "lfw"
    rel = [f"{p.parent.name}/{p.name}" for p in sorted(lfw.glob("*/*.jpg"))[:200]]
    copy_images(lfw, tmp_path / "raw", rel)
    detect_tree(tmp_path / "raw", tmp_path / "m.jsonl", progress=False)
    summary = align_manifests([tmp_path / "m.jsonl"], tmp_path / "aligned", progress=False)
    assert summary["aligned"] == summary["faces"] >= 195
    assert Image.open(next((tmp_path / "aligned").glob("*/*.jpg"))).size == (96, 112)
    # MTCNN needs some context around a face: on a crop with none its
    # landmarks drift outwards by several pixels, so the crops get a black
    # border for the second detection, which is then subtracted.
    border = 32
    for crop in (tmp_path / "aligned").glob("*/*.jpg"):
        out = tmp_path / "padded" / crop.relative_to(tmp_path / "aligned")
        out.parent.mkdir(parents=True, exist_ok=True)
        padded = Image.new("RGB", (96 + 2 * border, 112 + 2 * border))
        padded.paste(Image.open(crop), (border, border))
        padded.save(out, quality=95)
    detect_tree(tmp_path / "padded", tmp_path / "again.jsonl", progress=False)
    _, recs = read_manifest(tmp_path / "again.jsonl")
    found = [np.array(r["landmarks"]) - border for r in recs if r["status"] == "ok"]
    assert len(found) >= 0.9 * summary["aligned"]
    found = np.array(found)
    # On average the landmarks land within 3 px of their reference points,
    # with no systematic shift beyond 2 px.
    dist = np.linalg.norm(found - REFERENCE_112x96, axis=2).mean()
    assert dist < 3.0, f"landmarks land {dist:.2f} px from the reference on average"
    bias = np.linalg.norm(found.mean(axis=0) - REFERENCE_112x96, axis=1)
    assert bias.max() < 2.0, f"systematic shift of {bias.max():.2f} px"


def test_text_landmarks_resume_overwrite_and_atomic_output(lfw_sample, tmp_path):
    detect_tree(lfw_sample, tmp_path / "m.jsonl", progress=False)
    _, recs = read_manifest(tmp_path / "m.jsonl")
    ok = [r for r in recs if r["status"] == "ok"][:10]
    text = tmp_path / "landmarks.txt"
    text.write_text("".join(r["path"] + " " + " ".join(f"{v:.4f}" for xy in r["landmarks"] for v in xy)
                            + "\n" for r in ok))
    a = align_manifests([text], tmp_path / "from_text", root=str(lfw_sample), progress=False)
    b = align_manifests([tmp_path / "m.jsonl"], tmp_path / "from_manifest", progress=False)
    assert a["aligned"] == 10
    for r in ok:
        x = np.asarray(Image.open(tmp_path / "from_text" / r["path"]), dtype=int)
        y = np.asarray(Image.open(tmp_path / "from_manifest" / r["path"]), dtype=int)
        assert np.abs(x - y).max() <= 1
    again = align_manifests([tmp_path / "m.jsonl"], tmp_path / "from_manifest", progress=False)
    assert again["aligned"] == 0 and again["existing"] == b["aligned"]
    redo = align_manifests([tmp_path / "m.jsonl"], tmp_path / "from_manifest", overwrite=True,
                           progress=False, workers=2)
    assert redo["aligned"] == b["aligned"]
    assert not list((tmp_path / "from_manifest").rglob("*.tmp"))


def test_malformed_landmark_file_names_the_line(tmp_path):
    text = tmp_path / "l.txt"
    text.write_text("a/b.jpg 1 2 3 4 5 6 7 8 9 10\na/c.jpg 1 2 3\n")
    with pytest.raises(UserError, match=r"l\.txt:2: expected"):
        align_manifests([text], tmp_path / "out", root=str(tmp_path), progress=False)
    with pytest.raises(UserError, match="pass `root`"):
        align_manifests([text], tmp_path / "out", progress=False)


def test_no_face_mean_is_each_manifests_own_mean(tmp_path):
    """Two shards, each with its faces at its own place; a faceless image of the second
    shard, listed before any of that shard's faces, is cropped at the second shard's
    mean landmarks, not at a mean diluted by the first shard's face count."""
    import json

    def shard(name, points, faces, faceless):
        root = tmp_path / name
        (root / "p").mkdir(parents=True)
        lines = [{"type": "header", "format": "spherecli.manifest", "version": 1, "root": str(root),
                  "settings": {}}]
        for rel in faceless:
            lines.append({"type": "image", "path": rel, "status": "no_face", "width": 400, "height": 400})
        for rel in faces:
            lines.append({"type": "image", "path": rel, "status": "ok", "width": 400, "height": 400,
                          "landmarks": points.tolist()})
        for rel in faceless + faces:
            img = np.zeros((400, 400, 3), np.uint8)
            for x, y in points - 1:  # dots where the landmarks are (Matlab's 1-based pixels)
                img[int(round(y)) - 2:int(round(y)) + 3, int(round(x)) - 2:int(round(x)) + 3] = 255
            Image.fromarray(img).save(root / rel)
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
        return tmp_path / f"{name}.jsonl"

    first = shard("a", REFERENCE_112x96 * 2.0 + [40, 60], [f"p/{i}.png" for i in range(3)], [])
    second = shard("b", REFERENCE_112x96 * 2.5 + [100, 80], ["p/face.png"], ["p/none.png"])
    summary = align_manifests([first, second], tmp_path / "out", no_face="mean", root=None, progress=False)
    assert summary["mean_landmarks"] == 1 and summary["aligned"] == 5
    crop = np.asarray(Image.open(tmp_path / "out" / "p" / "none.png"))
    for x, y in REFERENCE_112x96 - 1:
        assert crop[int(round(y)), int(round(x))].max() > 128
