import struct

import numpy as np
import pytest

from spherecli.core.formats import write_devkit_feature
from spherecli.evaluation.identification import distractor_sizes, megaface, open_set, tar_at_far


def at(*degrees):
    r = np.radians(degrees)
    return np.stack([np.cos(r), np.sin(r)], axis=1).astype(np.float32)


# Person A at 0 and 20 degrees, B at 90 and 130; distractors at 45, 100 and 200 degrees.
PROBES, LABELS, DISTRACTORS = at(0, 20, 90, 130), ["A", "A", "B", "B"], at(45, 100, 200)


def test_megaface_ranks_and_tar_on_a_case_checked_by_hand():
    """A's searches: mate cos 20 = 0.940 beats every distractor (best cos 25 = 0.906): rank 1.
    B's: mate cos 40 = 0.766, but the distractor at 100 scores cos 10 = 0.985 for B at 90
    and cos 30 = 0.866 for B at 130: rank 2. So rank-1 is 1/2 and rank-2 is 1."""
    r = megaface(PROBES, LABELS, DISTRACTORS, sizes=[3])
    assert r["mated_searches"] == 4 and r["distractors"] == 3
    assert r["rank1"] == {"3": 0.5}
    assert r["cmc"]["3"][:3] == [0.5, 1.0, 1.0]
    # 12 impostor pairs cannot resolve FAR 1e-6: the threshold is above every impostor
    # (0.985), which no genuine pair reaches.
    assert r["verification"]["1e-06"]["tar"] == 0.0 and not r["verification"]["1e-06"]["resolvable"]


def test_tar_at_far_by_hand():
    genuine = np.array([0.940, 0.940, 0.766, 0.766])
    impostors = np.array([.985, .906, .866, .707, .707, .342, .174, .087, -.174, -.342, -.94, -1])
    # FAR 3/12: the threshold lies just above the fourth impostor (0.707), so three
    # impostors pass and every genuine pair does.
    quarter = tar_at_far(genuine, impostors, 0.25, 12)
    assert quarter["tar"] == 1.0 and 0.707 < quarter["threshold"] < 0.7071
    # FAR 1/12: just above 0.906; only A's pairs (0.940) pass.
    assert tar_at_far(genuine, impostors, 1 / 12, 12)["tar"] == 0.5


def test_fnir_at_fpir_by_hand():
    """A is enrolled (its photo at 0 degrees), B is not. A's mated search (20 degrees)
    scores its mate 0.940 over the best distractor (0.906). B's non-mated searches reach
    0.985 and 0.866. FPIR 1/2: the threshold sits above 0.866, the mate clears it: FNIR 0.
    FPIR 1e-2: above 0.985, the mate does not: FNIR 1."""
    best = (PROBES @ DISTRACTORS.T).max(axis=1)
    r = open_set(PROBES, np.array(LABELS), PROBES, np.array(LABELS), best, True, fpirs=(0.5, 1e-2))
    assert r["mated_searches"] == 1 and r["non_mated_searches"] == 2
    assert r["fnir_at_fpir"]["0.5"]["fnir"] == 0.0
    assert r["fnir_at_fpir"]["0.01"]["fnir"] == 1.0 and not r["fnir_at_fpir"]["0.01"]["resolvable"]


def test_ranks_at_nested_distractor_counts_follow_the_definition():
    """On random features, each rank-1 rate is what searching each mate against the first N
    distractors of the shuffled set gives, counted one search at a time."""
    rng = np.random.default_rng(3)
    centres = rng.normal(size=(6, 8))
    labels = np.repeat(np.arange(6), 3).astype(str)
    probes = centres[np.repeat(np.arange(6), 3)] + 0.8 * rng.normal(size=(18, 8))
    distractors = rng.normal(size=(300, 8))
    probes /= np.linalg.norm(probes, axis=1, keepdims=True)
    distractors /= np.linalg.norm(distractors, axis=1, keepdims=True)
    r = megaface(probes, labels, distractors, sizes=[10, 100, 300], seed=5)
    shuffled = distractors[np.random.default_rng(5).permutation(300)].astype(np.float32)
    for n in (10, 100, 300):
        hits = []
        for j in range(18):
            for i in range(18):
                if i != j and labels[i] == labels[j]:
                    mate = np.float32(probes[j]) @ np.float32(probes[i])
                    hits.append(not (shuffled[:n] @ np.float32(probes[j]) >= mate).any())
        assert r["rank1"][str(n)] == pytest.approx(np.mean(hits))
    assert r["rank1"]["10"] >= r["rank1"]["100"] >= r["rank1"]["300"]


def test_distractor_counts():
    assert distractor_sizes(17_476) == [10, 100, 1000, 10000, 17476]
    assert distractor_sizes(1000) == [10, 100, 1000]


def test_devkit_feature_file_byte_for_byte(tmp_path):
    """The MegaFace devkit's matio layout: int32 rows, cols, element size, CV_32F (5), then
    the float32 values, little-endian."""
    path = tmp_path / "Adam_Brody" / "Adam_Brody_277.png_sphereface.bin"
    write_devkit_feature(path, np.array([1.0, -2.0, 0.5]))
    assert path.read_bytes() == struct.pack("<4i", 3, 1, 4, 5) + struct.pack("<3f", 1.0, -2.0, 0.5)


def test_megaface_command_from_folders_and_from_embedded_features(tmp_path):
    """`sphereface megaface` on aligned folders writes the result, the CMC chart and one devkit
    file per face; the same run on `sphereface embed` features gives the same numbers, and
    features of another flip mode are refused."""
    import json

    import torch

    from conftest import sphereface_here as call, write_synthetic_faces
    from spherecli.core.formats import InputSpec, ModelFile
    from spherecli.models import create_model

    probes = write_synthetic_faces(tmp_path / "probes", people=4, per_person=3)
    distractors = write_synthetic_faces(tmp_path / "distractors", people=6, per_person=2, seed=1)
    torch.manual_seed(0)
    net = create_model("sphere4")
    ModelFile("sphere4", net.model_args, net.state_dict(), InputSpec()).save(tmp_path / "m.pt")
    m = str(tmp_path / "m.pt")
    assert call(["megaface", "--probes", str(probes), "--distractors", str(distractors), "--model", m,
                 "-o", str(tmp_path / "r.json"), "--cmc", str(tmp_path / "cmc.png"), "--devkit-features",
                 str(tmp_path / "devkit"), "-q"]) == 0
    r = json.loads((tmp_path / "r.json").read_text())
    assert r["distractors"] == 12 and r["mated_searches"] == 4 * 3 * 2 and list(r["rank1"]) == ["10", "12"]
    assert (tmp_path / "cmc.png").read_bytes()[:4] == b"\x89PNG"
    bins = sorted((tmp_path / "devkit").rglob("*_sphereface.bin"))
    assert len(bins) == 12 + 12
    assert (tmp_path / "devkit/probes/person00/000.jpg_sphereface.bin") in bins
    header = np.frombuffer(bins[0].read_bytes()[:16], "<i4")
    assert list(header[1:]) == [1, 4, 5] and bins[0].stat().st_size == 16 + 4 * header[0]
    for role, folder in (("p", probes), ("d", distractors)):
        assert call(["embed", str(folder), "--aligned", "--model", m, "-o", str(tmp_path / f"{role}.npz"),
                     "-q"]) == 0
    assert call(["megaface", "--probes", str(tmp_path / "p.npz"), "--distractors", str(tmp_path / "d.npz"),
                 "--model", m, "-o", str(tmp_path / "again.json"), "-q"]) == 0
    again = json.loads((tmp_path / "again.json").read_text())
    assert again["rank1"] == r["rank1"] and again["verification"] == r["verification"]
    assert call(["embed", str(distractors), "--aligned", "--model", m, "--flip", "sum",
                 "-o", str(tmp_path / "sum.npz"), "-q"]) == 0
    assert call(["megaface", "--probes", str(tmp_path / "p.npz"), "--distractors", str(tmp_path / "sum.npz"),
                 "--model", m, "-o", str(tmp_path / "no.json"), "-q"]) == 2
    assert not (tmp_path / "no.json").exists()


def test_each_index_kind_finds_the_exact_nearest_photo_of_a_face_like_gallery():
    """10,000 unit vectors around 2,500 identity centres under ids that are not positions:
    each approximate index returns the exact search's best id for nearly every mated
    query, with the exact score; an ivfpq gallery too small to train is searched exactly."""
    from spherecli.recognition import search

    rng = np.random.default_rng(0)
    centres = rng.normal(size=(2500, 16)).astype(np.float32)
    owners = np.repeat(np.arange(2500), 4)
    gallery = centres[owners] + 0.4 * rng.normal(size=(10000, 16)).astype(np.float32)
    gallery /= np.linalg.norm(gallery, axis=1, keepdims=True)
    queries = centres[rng.integers(0, 2500, 300)] + 0.4 * rng.normal(size=(300, 16)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    ids = np.arange(10000) * 7 + 100
    exact = ids[np.argmax(queries @ gallery.T, axis=1)]
    for kind in search.INDEX_KINDS:
        index = search.build(gallery, ids, kind)
        scores, found = search.search(index, kind, queries, 3, lambda i: gallery[(i - 100) // 7])
        assert np.mean(found[:, 0] == exact) >= 0.97, kind
        hit = found[:, 0] == exact
        np.testing.assert_allclose(scores[hit, 0], (queries @ gallery.T).max(axis=1)[hit], atol=1e-5)
        assert (np.diff(scores, axis=1) <= 1e-6).all(), "best first"
    assert search.resolve_kind("ivfpq", 200) == "flat" and search.resolve_kind("auto", 10**6) == "hnsw"
