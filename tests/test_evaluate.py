import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from spherecli import UserError
from spherecli.core.config import EvalSettings
from spherecli.evaluation.datasets import read_pairs
from spherecli.evaluation.evaluate import evaluate
from spherecli.evaluation.metrics import THRESHOLDS, accuracy, best_threshold, roc, verification
from spherecli.models.features import extract, load_network
from spherecli.models import create_model

from conftest import copy_images


def matlab_literal(left, right, same, folds):
    """evaluation.m transcribed loop for loop, deliberately slow: the reference."""
    n = len(same)
    accs, thrs = [], []
    for i in range(folds):
        test = list(range(i * n // folds, (i + 1) * n // folds))
        val = [j for j in range(n) if j not in set(test)]
        mu = np.mean(np.vstack([left[val], right[val]]), axis=0)
        fl, fr = left - mu, right - mu
        fl = fl / np.sqrt(np.sum(fl ** 2, axis=1))[:, None]
        fr = fr / np.sqrt(np.sum(fr ** 2, axis=1))[:, None]
        scores = np.sum(fl * fr, axis=1)

        def get_accuracy(s, flags, threshold):
            right_same = sum(1 for v, f in zip(s, flags) if f and v > threshold)
            right_diff = sum(1 for v, f in zip(s, flags) if not f and v < threshold)
            return (right_same + right_diff) / len(s)

        grid = np.arange(-10000, 10001) / 10000.0
        vs, vf = scores[val], same[val]
        # The threshold loop of getThreshold, one threshold at a time.
        pos, neg = vs[vf], vs[~vf]
        accuracies = np.array([(np.count_nonzero(pos > t) + np.count_nonzero(neg < t)) / len(vs)
                               for t in grid])
        threshold = np.mean(grid[accuracies == accuracies.max()])
        accs.append(get_accuracy(scores[test], same[test], threshold))
        thrs.append(threshold)
    return accs, thrs


def synthetic(n_pairs=600, dim=16, noise=1.0, seed=0):
    rng = np.random.default_rng(seed)
    same = np.tile(np.r_[np.ones(n_pairs // 20, bool), np.zeros(n_pairs // 20, bool)], 10)
    left = rng.normal(size=(n_pairs, dim)) + 3
    right = np.where(same[:, None], left + noise * rng.normal(size=left.shape),
                     rng.normal(size=left.shape) + 3)
    return left, right, same


@pytest.mark.parametrize("noise", [0.5, 2.0, 4.0])
def test_protocol_agrees_with_the_literal_matlab_loop(noise):
    left, right, same = synthetic(noise=noise, seed=int(noise * 10))
    ours = verification(left, right, same, folds=10)
    accs, thrs = matlab_literal(left, right, same, 10)
    assert [r["accuracy"] for r in ours["folds"]] == accs
    assert [r["threshold"] for r in ours["folds"]] == pytest.approx(thrs, abs=1e-12)
    assert ours["mean"] == pytest.approx(np.mean(accs), abs=1e-15)


def test_separable_random_and_tied_scores():
    left, right, same = synthetic(noise=0.01)
    assert verification(left, right, same, 10)["mean"] == 1.0
    rng = np.random.default_rng(1)
    random = verification(rng.normal(size=(6000, 32)), rng.normal(size=(6000, 32)),
                          np.tile(np.r_[np.ones(300, bool), np.zeros(300, bool)], 10), 10)
    assert 0.45 < random["mean"] < 0.55
    # Every threshold strictly between the scores 0.2 and 0.5 separates perfectly:
    # the chosen one is the mean of those grid values.
    scores, flags = np.array([0.5, 0.6, 0.1, 0.2]), np.array([True, True, False, False])
    between = THRESHOLDS[(THRESHOLDS > 0.2) & (THRESHOLDS < 0.5)]
    assert best_threshold(scores, flags) == pytest.approx(np.mean(between))
    assert best_threshold(scores, flags) == pytest.approx(0.35)
    # A score equal to the threshold is wrong whichever kind of pair it is.
    assert accuracy(scores, flags, 0.5) == 0.75 and accuracy(scores, flags, 0.2) == 0.75
    assert accuracy(np.array([np.nan, 0.9]), np.array([True, True]), 0.0) == 0.5


def test_roc_numbers_on_known_scores():
    same = np.array([True] * 4 + [False] * 4)
    perfect = roc(np.array([0.9, 0.8, 0.7, 0.6, 0.1, 0.2, 0.3, 0.4]), same)
    assert perfect["roc_auc"] == 1.0 and perfect["eer"] == 0.0 and perfect["best_accuracy"] == 1.0
    assert perfect["tar_at_far_0.001"] == 1.0
    reversed_ = roc(np.array([0.1, 0.2, 0.3, 0.4, 0.9, 0.8, 0.7, 0.6]), same)
    assert reversed_["roc_auc"] == 0.0
    # One impostor above one genuine: AUC 15/16, best accuracy 7/8.
    mixed = roc(np.array([0.9, 0.8, 0.7, 0.3, 0.1, 0.2, 0.5, 0.0]), same)
    assert mixed["roc_auc"] == pytest.approx(15 / 16) and mixed["best_accuracy"] == pytest.approx(7 / 8)
    assert mixed["eer"] == pytest.approx(0.25)


def test_real_pairs_file(data):
    pairs = read_pairs(data / "pairs.txt")
    assert (pairs.folds, pairs.per_fold, len(pairs.same)) == (10, 300, 6000)
    assert pairs.same.sum() == 3000
    for k in range(10):
        block = pairs.same[600 * k:600 * (k + 1)]
        assert block[:300].all() and not block[300:].any()
    assert pairs.left[0] == "Abel_Pacheco/Abel_Pacheco_0001.jpg"
    assert pairs.right[0] == "Abel_Pacheco/Abel_Pacheco_0004.jpg"
    assert len(set(pairs.left) | set(pairs.right)) == 7701


def test_bad_pairs_lines(tmp_path):
    bad = tmp_path / "pairs.txt"
    bad.write_text("1\t1\nA 1 2\nB 1 C two\n")
    with pytest.raises(UserError, match=r"pairs\.txt:3: expected"):
        read_pairs(bad)
    bad.write_text("1\t2\nA 1 2\nB 1 C 2\n")
    with pytest.raises(UserError, match="promises 1 folds x 4 pairs"):
        read_pairs(bad)
    bad.write_text("A 1 2\n")
    with pytest.raises(UserError, match=r"pairs\.txt:1: expected a header"):
        read_pairs(bad)


@pytest.fixture(scope="module")
def lfw_subset(data, tmp_path_factory):
    """300 real LFW pairs (15 same + 15 different per fold), detected and aligned."""
    from spherecli.preprocess.align import align_manifests
    from spherecli.preprocess.detect import detect_tree

    lines = (data / "pairs.txt").read_text().splitlines()[1:]
    keep = [line for k in range(10)
            for line in lines[600 * k:600 * k + 15] + lines[600 * k + 300:600 * k + 315]]
    work = tmp_path_factory.mktemp("lfwpairs")
    (work / "pairs.txt").write_text("10\t15\n" + "\n".join(keep) + "\n")
    pairs = read_pairs(work / "pairs.txt")
    copy_images(data / "lfw", work / "raw", sorted(set(pairs.left) | set(pairs.right)))
    detect_tree(work / "raw", work / "m.jsonl", progress=False)
    align_manifests([work / "m.jsonl"], work / "aligned", no_face="mean", progress=False)
    torch.manual_seed(0)
    model = create_model("sphere4")
    torch.save({"format": "spherecli.model", "arch": "sphere4", "input_size": [112, 96],
                "feature_dim": 512, "model": model.state_dict()}, work / "model.pt")
    return work


def test_end_to_end_on_real_lfw_pairs(lfw_subset, tmp_path):
    w = lfw_subset
    out = tmp_path / "result.json"
    cmd = [sys.executable, "-m", "spherecli", "evaluate", "--pairs", str(w / "pairs.txt"),
           "--model", str(w / "model.pt"), "--data", str(w / "aligned"), "-o", str(out), "-q",
           "--roc", str(tmp_path / "roc.png"), "--scores", str(tmp_path / "scores.csv"),
           "--save-features", str(tmp_path / "f.npz")]
    r = subprocess.run(cmd, capture_output=True, text=True, check=True)
    assert "AVE" in r.stdout
    result = json.loads(out.read_text())
    assert len(result["folds"]) == 10 and 0.5 < result["mean"] < 1.0
    assert result["images"] == len(np.load(tmp_path / "f.npz")["names"]) and result["missing"] == 0
    assert np.load(tmp_path / "f.npz")["features"].shape[1] == 1024  # image ++ mirror
    assert (tmp_path / "roc.png").stat().st_size > 1000
    assert len((tmp_path / "scores.csv").read_text().splitlines()) == 301
    # Saved features give the same numbers without the model.
    again = evaluate(w / "pairs.txt", features=tmp_path / "f.npz", progress=False)
    assert [f["accuracy"] for f in again["folds"]] == [f["accuracy"] for f in result["folds"]]
    summed = evaluate(w / "pairs.txt", model=w / "model.pt", data=w / "aligned",
                      settings=EvalSettings(flip="sum", mean_subtract=False, workers=0), progress=False)
    assert summed["settings"] == {**result["settings"], "flip": "sum", "mean_subtract": False}


def test_bf16_features_stay_close_to_fp32(lfw_subset, tmp_path):
    paths = sorted(str(p) for p in (lfw_subset / "aligned").glob("*/*.jpg"))[:32]
    full = extract(load_network(lfw_subset / "model.pt"), paths, workers=0, progress=False)
    half = extract(load_network(lfw_subset / "model.pt", amp="bf16"), paths, workers=0, progress=False)
    assert not np.array_equal(full, half)  # the network did run in bf16
    cosine = np.sum(full * half, 1) / (np.linalg.norm(full, axis=1) * np.linalg.norm(half, axis=1))
    assert cosine.min() > 0.99
    # Saved features remember their precision; evaluating them reports it.
    saved = tmp_path / "bf16.npz"
    evaluate(lfw_subset / "pairs.txt", model=lfw_subset / "model.pt", data=lfw_subset / "aligned",
             settings=EvalSettings(amp="bf16", workers=0), save_features_to=saved, progress=False)
    again = evaluate(lfw_subset / "pairs.txt", features=saved, progress=False)
    assert again["settings"]["amp"] == "bf16"


def test_missing_images_and_wrong_architecture(lfw_subset, tmp_path):
    w = lfw_subset
    pairs = read_pairs(w / "pairs.txt")
    victim = w / "aligned" / pairs.left[0]
    kept = victim.read_bytes()
    victim.unlink()
    try:
        with pytest.raises(UserError, match=f"(?s)1 pair images are missing.*{pairs.left[0]}"):
            evaluate(w / "pairs.txt", model=w / "model.pt", data=w / "aligned", progress=False)
        result = evaluate(w / "pairs.txt", model=w / "model.pt", data=w / "aligned",
                          settings=EvalSettings(skip_missing=True, workers=0), progress=False)
        assert result["missing"] == 1
        failures = sum(np.isnan(result["scores"]))
        assert failures == sum(1 for a, b in zip(pairs.left, pairs.right) if pairs.left[0] in (a, b))
    finally:
        victim.write_bytes(kept)
    with pytest.raises(UserError, match="holds a sphere4 network, not sphere20"):
        evaluate(w / "pairs.txt", model=w / "model.pt", data=w / "aligned",
                 settings=EvalSettings(arch="sphere20"), progress=False)
    broken = torch.load(w / "model.pt", weights_only=True)
    broken["arch"] = "sphere10"
    torch.save(broken, tmp_path / "broken.pt")
    with pytest.raises(UserError, match="weights do not fit sphere10"):
        evaluate(w / "pairs.txt", model=tmp_path / "broken.pt", data=w / "aligned", progress=False)
