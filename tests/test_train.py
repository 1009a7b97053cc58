import json
import math
import signal
import subprocess
import sys
import time

import pytest
import torch

from spherecli import UserError
from spherecli.config import TrainConfig, load_config, resolve, to_toml
from spherecli.report import read_log
from spherecli.train import Log, Stopped, launch, learning_rate, train


def run_cfg(celeba_list, out, **kw):
    base = dict(list=str(celeba_list), out=str(out), arch="sphere4", batch_size=32, workers=0,
                cache=True, display=5, snapshot=1000, device="cpu", lr=0.01, lr_steps=(0.8,),
                max_iter=40)
    base.update(kw)
    return TrainConfig(**base)


def log_rows(out):
    return [json.loads(line) for line in open(out / "log.jsonl") if '"iter"' in line]


def weights(path):
    return torch.load(path, weights_only=True)["model"]


@pytest.mark.parametrize("head", ["softmax", "asoftmax"])
def test_short_real_training_run_lowers_the_loss(celeba_list, tmp_path, head):
    cfg = run_cfg(celeba_list, tmp_path / head, head=head, max_iter=60, warmup=10, clip_grad=5)
    summary = launch(cfg)
    rows = log_rows(tmp_path / head)
    assert [r["iter"] for r in rows] == list(range(5, 61, 5))
    assert rows[0]["loss"] > 2.0, "16 identities start near ln 16 = 2.77"
    assert rows[-1]["loss"] < 0.6 * rows[0]["loss"], [r["loss"] for r in rows]
    assert summary["iter"] == 60
    if head == "asoftmax":
        assert rows[-1]["lambda"] < rows[0]["lambda"]
    # Both files load without unpickling arbitrary objects.
    model = torch.load(tmp_path / head / "model.pt", weights_only=True)
    assert (model["format"], model["arch"]) == ("spherecli.model", "sphere4")
    assert model["model_args"] == {"input_size": [112, 96], "feature_dim": 512}
    assert model["input"] == {"size": [112, 96], "reference": "sphereface", "channels": "bgr",
                              "mean": 127.5, "std": 128.0}
    ckpt = torch.load(tmp_path / head / "checkpoint.pt", weights_only=True)
    assert ckpt["iteration"] == 60 and "optimizer" in ckpt and "head" in ckpt
    saved = load_config(tmp_path / head / "config.toml")
    assert saved == cfg


def test_killed_run_resumes_onto_the_uninterrupted_curve(celeba_list, tmp_path):
    options = ["--list", str(celeba_list), "--arch", "sphere4", "--batch-size", "16", "--workers",
               "0", "--cache", "--display", "1", "--snapshot", "5", "--max-iter", "60",
               "--device", "cpu", "--lr", "0.01", "--lr-steps", "30", "-q"]
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    subprocess.run([sys.executable, "-m", "spherecli", "train", "--out", str(whole)] + options,
                   check=True)
    proc = subprocess.Popen([sys.executable, "-m", "spherecli", "train", "--out", str(broken)] + options)
    deadline = time.time() + 120
    while not (broken / "checkpoint.pt").exists() and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (broken / "model.pt").exists(), "the run finished before it could be killed"
    killed_at = torch.load(broken / "checkpoint.pt", weights_only=True)["iteration"]
    assert killed_at < 60
    subprocess.run([sys.executable, "-m", "spherecli", "train", "--out", str(broken), "--resume",
                    "-q"], check=True)
    a, b = log_rows(whole), log_rows(broken)
    resumed = {r["iter"]: r["loss"] for r in b if r["iter"] > killed_at}
    assert len(resumed) == 60 - killed_at
    for r in a:
        if r["iter"] in resumed:
            assert resumed[r["iter"]] == pytest.approx(r["loss"], rel=1e-5, abs=1e-6)
    for k, v in weights(whole / "model.pt").items():
        torch.testing.assert_close(weights(broken / "model.pt")[k], v, rtol=1e-5, atol=1e-6)
    # Curves and summaries see each iteration once, the redone ones as redone.
    rows = read_log(broken)
    assert [r["iter"] for r in rows] == list(range(1, 61))
    assert all(r["loss"] == resumed[r["iter"]] for r in rows if r["iter"] > killed_at)


def test_two_gloo_processes_make_the_update_of_one_process_on_both_batches(celeba_list, tmp_path):
    common = dict(amp="none", lr=0.1, lr_steps=(100,), display=1, seed=3)
    launch(run_cfg(celeba_list, tmp_path / "init", batch_size=16, max_iter=0, **common))
    launch(run_cfg(celeba_list, tmp_path / "one", batch_size=16, max_iter=2, **common))
    launch(run_cfg(celeba_list, tmp_path / "two", batch_size=8, nproc=2, max_iter=2, **common))
    init = weights(tmp_path / "init" / "model.pt")
    one, two = weights(tmp_path / "one" / "model.pt"), weights(tmp_path / "two" / "model.pt")
    assert not torch.equal(one["fc5.weight"], init["fc5.weight"]), "two steps at lr 0.1 must move"
    for k, v in one.items():
        torch.testing.assert_close(two[k], v, rtol=1e-4, atol=1e-6)
    assert log_rows(tmp_path / "two")[-1]["loss"] == pytest.approx(log_rows(tmp_path / "one")[-1]["loss"],
                                                                  rel=1e-4)


def test_diverging_loss_stops_with_the_last_good_checkpoint(celeba_list, tmp_path):
    cfg = run_cfg(celeba_list, tmp_path / "nan", head="softmax", amp="none", lr=0.01,
                  lr_steps=(6,), lr_factor=1e6, display=1, snapshot=3, max_iter=40)
    with pytest.raises(Stopped, match="loss became"):
        train(cfg)
    state = torch.load(tmp_path / "nan" / "checkpoint.pt", weights_only=True)
    assert 3 <= state["iteration"] < 40
    assert all(torch.isfinite(v).all() for v in state["model"].values())
    assert not (tmp_path / "nan" / "model.pt").exists()


def test_init_from_copies_the_network_and_checks_its_shape(celeba_list, tmp_path):
    launch(run_cfg(celeba_list, tmp_path / "soft", head="softmax", max_iter=5))
    launch(run_cfg(celeba_list, tmp_path / "fine", head="asoftmax", max_iter=0,
                   init_from=str(tmp_path / "soft" / "model.pt")))
    for k, v in weights(tmp_path / "soft" / "model.pt").items():
        assert torch.equal(weights(tmp_path / "fine" / "model.pt")[k], v)
    with pytest.raises(UserError, match="does not match sphere10"):
        launch(run_cfg(celeba_list, tmp_path / "bad", arch="sphere10", max_iter=0,
                       init_from=str(tmp_path / "soft" / "model.pt")))


def test_list_errors_name_the_line(celeba_list, tmp_path):
    lines = celeba_list.read_text().splitlines()
    broken = tmp_path / "broken.txt"
    broken.write_text("\n".join(lines[:3] + [lines[3].rsplit(" ", 1)[0]] + lines[4:]) + "\n")
    with pytest.raises(UserError, match=r"broken\.txt:4: expected"):
        train(run_cfg(broken, tmp_path / "a"))
    missing = tmp_path / "missing.txt"
    missing.write_text("\n".join(lines[:5] + ["/nowhere/face.jpg 0"] + lines[5:]) + "\n")
    with pytest.raises(UserError, match=r"missing\.txt:6: image not found"):
        train(run_cfg(missing, tmp_path / "b"))
    train(run_cfg(missing, tmp_path / "c", skip_missing=True, max_iter=1))
    assert "1 missing images skipped" in (tmp_path / "c" / "log.jsonl").read_text()
    with pytest.raises(UserError, match="already holds a run"):
        train(run_cfg(missing, tmp_path / "c", skip_missing=True, max_iter=1))


def test_config_file_flags_and_resume_resolution(tmp_path):
    toml = tmp_path / "recipe.toml"
    toml.write_text('arch = "sphere10"\nlr = 0.03\nlr_steps = [0.6, 0.85]\nout = "%s"\n' % (tmp_path / "r"))
    cfg, resuming = resolve(toml, {"lr": 0.05}, resume=True)
    assert (cfg.arch, cfg.lr, cfg.lr_steps, resuming) == ("sphere10", 0.05, (0.6, 0.85), False)
    assert load_config(None, {"lr_steps": "16000,24000"}).lr_steps == (16000, 24000)
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "config.toml").write_text(to_toml(cfg))
    (tmp_path / "r" / "checkpoint.pt").write_bytes(b"")
    again, resuming = resolve(None, {"out": str(tmp_path / "r"), "max_iter": 99}, resume=True)
    assert resuming and again.lr == 0.05 and again.max_iter == 99
    with pytest.raises(UserError, match="unknown training option"):
        load_config(None, {"learning_rate": 1})
    with pytest.raises(UserError, match="head must be one of"):
        load_config(None, {"head": "triplet"})


def test_learning_rate_schedule():
    cfg = TrainConfig()
    assert [learning_rate(cfg, i) for i in (0, 15999, 16000, 23999, 24000, 27999)] == pytest.approx(
        [0.1, 0.1, 0.01, 0.01, 0.001, 0.001])
    warm = TrainConfig(warmup=100, lr_steps=(0.6,), max_iter=1000)
    assert learning_rate(warm, 0) == pytest.approx(0.001) and learning_rate(warm, 99) == pytest.approx(0.1)
    assert learning_rate(warm, 599) == pytest.approx(0.1) and learning_rate(warm, 600) == pytest.approx(0.01)


def test_stall_watch_flags_a_collapsing_run(tmp_path):
    log = Log(tmp_path / "log.jsonl", TrainConfig(max_iter=1000), num_classes=998, world=1,
              start=0, show=False)
    chance = math.log(998)
    assert log.record(20, chance, 0.0, 1.6, 0.1, 900.0) is None
    assert log.record(60, chance, 0.0, 0.3, 0.1, 600.0) is None  # too early to judge
    verdict = log.record(120, chance - 0.01, 0.0, 0.1, 0.1, 400.0)
    assert verdict and "--lambda-hold" in verdict and "--init-from" in verdict
    exploding = Log(tmp_path / "log3.jsonl", TrainConfig(max_iter=1000), 998, 1, 0, False)
    exploding.record(20, chance, 0.0, 5.0, 0.1, 900.0)
    assert exploding.record(200, 3.0, 0.4, 60.0, 0.1, 40.0) is None
    verdict = exploding.record(700, 2 * chance, 0.3, 4500.0, 0.1, 7.0)
    assert verdict and "unstable" in verdict and "--backward exact" in verdict
    healthy = Log(tmp_path / "log2.jsonl", TrainConfig(max_iter=1000), 998, 1, 0, False)
    healthy.record(20, chance, 0.0, 1.6, 0.1, 900.0)
    assert healthy.record(200, 4.0, 0.2, 1.5, 0.1, 100.0) is None
