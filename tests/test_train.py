import json
import math
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from spherecli import Interrupted, UserError
from spherecli.core.config import TrainConfig, load_config, resolve, to_toml
from spherecli.core.data import EpochBatches, batches
from spherecli.core.formats import Checkpoint, read_log
from spherecli.training.train import StallWatch, Stopped, Trainer, launch, learning_rate, train


def run_cfg(train_list, out, **kw):
    base = dict(list=str(train_list), out=str(out), arch="sphere4", batch_size=32, workers=0,
                cache=True, display=5, snapshot=1000, device="cpu", lr=0.01, lr_steps=(0.8,),
                max_iter=40)
    base.update(kw)
    return TrainConfig(**base)


def log_rows(out):
    return [json.loads(line) for line in open(out / "log.jsonl") if '"iter"' in line]


def weights(path):
    return torch.load(path, weights_only=True)["model"]


@pytest.mark.parametrize("head", ["softmax", "asoftmax"])
def test_short_training_run_lowers_the_loss(synthetic_list, tmp_path, head):
    cfg = run_cfg(synthetic_list, tmp_path / head, head=head, max_iter=60, warmup=10, clip_grad=5)
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


@pytest.mark.parametrize("head, settings", [("spherefacer", {}), ("sphereface2", {}),
                                            ("asoftmax", {"mhe": 1.0, "lambda_hold": 20})])
def test_sphereface_family_heads_train(synthetic_list, tmp_path, head, settings):
    """SphereFace-R, SphereFace2 and SphereFace+ (A-Softmax + MHE) through the real loop."""
    out = tmp_path / head
    launch(run_cfg(synthetic_list, out, head=head, head_args=settings, max_iter=60, warmup=10,
                   clip_grad=5))
    rows = log_rows(out)
    assert rows[-1]["loss"] < 0.6 * rows[0]["loss"], [r["loss"] for r in rows]
    assert rows[-1]["acc"] > rows[0]["acc"]
    if "mhe" in settings:
        assert all(0 < r["mhe"] < 1 for r in rows), "unit weights of 16 classes in 512-d: energy near 1/2"
    assert load_config(out / "config.toml").head_args == settings


def test_killed_run_resumes_onto_the_uninterrupted_curve(synthetic_list, tmp_path):
    options = ["--list", str(synthetic_list), "--arch", "sphere4", "--batch-size", "16", "--workers",
               "0", "--cache", "--display", "1", "--snapshot", "5", "--max-iter", "30",
               "--device", "cpu", "--lr", "0.01", "--lr-steps", "15", "-q"]
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
    assert killed_at < 30
    subprocess.run([sys.executable, "-m", "spherecli", "train", "--out", str(broken), "--resume",
                    "-q"], check=True)
    a, b = log_rows(whole), log_rows(broken)
    resumed = {r["iter"]: r["loss"] for r in b if r["iter"] > killed_at}
    assert len(resumed) == 30 - killed_at
    for r in a:
        if r["iter"] in resumed:
            assert resumed[r["iter"]] == pytest.approx(r["loss"], rel=1e-5, abs=1e-6)
    for k, v in weights(whole / "model.pt").items():
        torch.testing.assert_close(weights(broken / "model.pt")[k], v, rtol=1e-5, atol=1e-6)
    # Curves and summaries see each iteration once, the redone ones as redone.
    rows = read_log(broken / "log.jsonl")
    assert [r["iter"] for r in rows] == list(range(1, 31))
    assert all(r["loss"] == resumed[r["iter"]] for r in rows if r["iter"] > killed_at)


def test_two_gloo_processes_make_the_update_of_one_process_on_both_batches(synthetic_list, tmp_path):
    common = dict(amp="none", lr=0.1, lr_steps=(100,), display=1, seed=3)
    launch(run_cfg(synthetic_list, tmp_path / "init", batch_size=16, max_iter=0, **common))
    launch(run_cfg(synthetic_list, tmp_path / "one", batch_size=16, max_iter=2, **common))
    launch(run_cfg(synthetic_list, tmp_path / "two", batch_size=8, nproc=2, max_iter=2, **common))
    init = weights(tmp_path / "init" / "model.pt")
    one, two = weights(tmp_path / "one" / "model.pt"), weights(tmp_path / "two" / "model.pt")
    assert not torch.equal(one["fc5.weight"], init["fc5.weight"]), "two steps at lr 0.1 must move"
    # Gloo sums the two halves' gradients in another order than one batch does: float32
    # rounding moves a weight by ~1e-6 (CI saw 2.4e-6), while a wrong update moves it by ~1e-2.
    for k, v in one.items():
        torch.testing.assert_close(two[k], v, rtol=1e-4, atol=1e-5)
    assert log_rows(tmp_path / "two")[-1]["loss"] == pytest.approx(log_rows(tmp_path / "one")[-1]["loss"],
                                                                  rel=1e-4)
    # The same two processes reading one cache file, which rank 0 makes while rank 1 waits.
    launch(run_cfg(synthetic_list, tmp_path / "two-cached", batch_size=8, nproc=2, max_iter=2,
                   cache_file=str(tmp_path / "faces.npy"), **common))
    for k, v in weights(tmp_path / "two-cached" / "model.pt").items():
        torch.testing.assert_close(v, two[k], rtol=1e-5, atol=1e-6)


def test_diverging_loss_stops_and_says_what_is_saved(synthetic_list, tmp_path):
    cfg = run_cfg(synthetic_list, tmp_path / "nan", head="softmax", amp="none", lr=0.01,
                  lr_steps=(6,), lr_factor=1e6, display=1, snapshot=3, max_iter=40)
    with pytest.raises(Stopped, match=r"loss became nan by iteration \d+; the last good checkpoint, "
                                      r"iteration [3-9]\d*, is kept in"):
        train(cfg)
    state = torch.load(tmp_path / "nan" / "checkpoint.pt", weights_only=True)
    assert 3 <= state["iteration"] < 40
    assert all(torch.isfinite(v).all() for v in state["model"].values())
    assert not (tmp_path / "nan" / "model.pt").exists()
    assert "stopped: loss became nan" in (tmp_path / "nan" / "log.jsonl").read_text()
    # Before the first snapshot there is nothing to resume from, and it says so.
    early = run_cfg(synthetic_list, tmp_path / "early", head="softmax", amp="none", lr=0.01,
                    lr_steps=(2,), lr_factor=1e6, display=1, snapshot=1000, max_iter=40)
    with pytest.raises(Stopped, match="no checkpoint was written yet"):
        train(early)


def test_init_from_copies_the_network_and_checks_its_shape(synthetic_list, tmp_path):
    launch(run_cfg(synthetic_list, tmp_path / "soft", head="softmax", max_iter=5))
    launch(run_cfg(synthetic_list, tmp_path / "fine", head="asoftmax", max_iter=0,
                   init_from=str(tmp_path / "soft" / "model.pt")))
    for k, v in weights(tmp_path / "soft" / "model.pt").items():
        assert torch.equal(weights(tmp_path / "fine" / "model.pt")[k], v)
    with pytest.raises(UserError, match="does not match sphere10"):
        launch(run_cfg(synthetic_list, tmp_path / "bad", arch="sphere10", max_iter=0,
                       init_from=str(tmp_path / "soft" / "model.pt")))


def test_list_errors_name_the_line(synthetic_list, tmp_path):
    lines = synthetic_list.read_text().splitlines()
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
    again, resuming = resolve(None, {"out": str(tmp_path / "r"), "max_iter": 99}, resume=True)
    assert not resuming and again.lr == 0.05 and again.max_iter == 99, "config read, no checkpoint yet"
    (tmp_path / "r" / "checkpoint.pt").write_bytes(b"")
    assert resolve(None, {"out": str(tmp_path / "r")}, resume=True)[1]
    with pytest.raises(UserError, match="unknown training option"):
        load_config(None, {"learning_rate": 1})
    with pytest.raises(UserError, match="head: expected one of"):
        load_config(None, {"head": "triplet"})


def test_head_settings_belong_to_the_head(tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text('arch = "sphere4"\n[head]\ntype = "asoftmax"\nmargin = 3\nlambda_hold = 400\n')
    cfg = load_config(recipe)
    assert (cfg.head, cfg.head_args) == ("asoftmax", {"margin": 3.0, "lambda_hold": 400})
    assert load_config(tmp_path / "r.toml") == cfg
    (tmp_path / "saved.toml").write_text(to_toml(cfg))
    assert load_config(tmp_path / "saved.toml") == cfg
    # Another head on the command line drops the recipe's A-Softmax settings...
    assert load_config(recipe, {"head": {"type": "softmax"}}).head_args == {}
    # ...but a setting given with it must be one it takes, said before any work.
    cfg = load_config(None, {"head": {"type": "cosface", "lambda_hold": 400}, "list": "absent.txt"})
    with pytest.raises(UserError, match=r"cosface head does not take lambda_hold \(it takes: scale, "):
        launch(cfg)
    # Recipes and run configs from before the [head] table read the same.
    old = tmp_path / "old.toml"
    old.write_text('head = "cosface"\nmargin = 0.4\nlambda_base = 1000.0\nlambda_hold = 0\n'
                   'backward = "exact"\n')
    assert load_config(old).head_args == {"margin": 0.4}


@pytest.mark.parametrize("text, message", [
    ("batch_size = 16.5\n", "batch_size: expected a whole number, got 16.5"),
    ('lr_steps = "abc"\n', "lr_steps: expected iterations"),
    ('cache = "false"\n', "cache: expected true or false"),
    ("batch-size = 16\n", "unknown training option 'batch-size' \\(did you mean batch_size\\?\\)"),
    ("batch_size = 0\n", "batch_size: expected a whole number at least 1, got 0"),
    ("lr = nan\n", "lr: expected a number above 0, got nan"),
    ("feature_dim = -4\n", "feature_dim: expected a whole number at least 1"),
    ("[head]\ntype = \"cosface\"\nscale = 0\n", "scale: expected a number above 0"),
    ("[head]\ntype = \"asoftmax\"\nmargn = 3\n", "unknown training option 'margn' \\(did you mean margin"),
])
def test_bad_recipe_values_name_the_file(tmp_path, text, message):
    recipe = tmp_path / "bad.toml"
    recipe.write_text(text)
    with pytest.raises(UserError, match=f"bad.toml: {message}"):
        load_config(recipe)


def test_trainer_state_round_trip_continues_exactly(synthetic_list, tmp_path):
    """A checkpoint taken mid-run and loaded into a fresh trainer makes the same next steps."""
    cfg = run_cfg(synthetic_list, tmp_path / "t", batch_size=16, amp="none", max_iter=6)

    def data(start):
        trainer_items = Trainer.build(cfg).items
        sampler = EpochBatches(len(trainer_items), 16, start=start, stop=6)
        return batches(trainer_items, (112, 96), sampler, 0, True)

    a = Trainer.build(cfg)
    stream = data(0)
    for _ in range(3):
        a.step(*next(stream))
    a.save()
    losses = [a.step(*next(stream))[0].item() for _ in range(3)]
    b = Trainer.build(cfg)
    b.load_state_dict(Checkpoint.load(tmp_path / "t" / "checkpoint.pt"))
    assert b.iteration == 3
    stream = data(3)
    assert [b.step(*next(stream))[0].item() for _ in range(3)] == losses


def test_ctrl_c_ends_a_run_at_a_saved_checkpoint(synthetic_list, tmp_path):
    """SIGINT to `sphereface train`: it finishes the step, saves it and exits 130 naming it."""
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "spherecli", "train", "--list", str(synthetic_list),
                             "--out", str(out), "--arch", "sphere4", "--batch-size", "16", "--workers", "0",
                             "--cache", "--snapshot", "5", "--max-iter", "5000", "--device", "cpu", "-q"],
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (out / "checkpoint.pt").exists() and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    saved = Checkpoint.load(out / "checkpoint.pt").iteration
    assert proc.returncode == 130 and f"interrupted: iteration {saved} is saved" in err, err
    assert 5 <= saved < 5000 and not (out / "model.pt").exists()


def test_trainer_run_stops_on_interrupt_with_a_checkpoint(synthetic_list, tmp_path):
    cfg = run_cfg(synthetic_list, tmp_path / "i", batch_size=16, display=100, max_iter=50)
    trainer = Trainer.build(cfg)
    sampler = EpochBatches(len(trainer.items), 16, stop=50)
    with pytest.raises(Interrupted, match="interrupted: iteration 7 is saved"):
        trainer.run(batches(trainer.items, trainer.spec.size, sampler, 0, True),
                    interrupted=lambda: trainer.iteration >= 7)
    assert Checkpoint.load(tmp_path / "i" / "checkpoint.pt").iteration == 7


def test_learning_rate_schedule():
    cfg = TrainConfig()
    assert [learning_rate(cfg, i) for i in (0, 15999, 16000, 23999, 24000, 27999)] == pytest.approx(
        [0.1, 0.1, 0.01, 0.01, 0.001, 0.001])
    warm = TrainConfig(warmup=100, lr_steps=(0.6,), max_iter=1000)
    assert learning_rate(warm, 0) == pytest.approx(0.001) and learning_rate(warm, 99) == pytest.approx(0.1)
    assert learning_rate(warm, 599) == pytest.approx(0.1) and learning_rate(warm, 600) == pytest.approx(0.01)


def test_stall_watch_flags_a_collapsing_run():
    chance = math.log(998)
    watch = StallWatch(chance, settle=100, action="warn")
    assert watch.verdict(20, chance, 1.6) is None
    assert watch.verdict(60, chance, 0.3) is None  # too early to judge
    verdict = watch.verdict(120, chance - 0.01, 0.1)
    assert verdict and "--lambda-hold" in verdict and "--init-from" in verdict
    exploding = StallWatch(chance, 100, "warn")
    exploding.verdict(20, chance, 5.0)
    assert exploding.verdict(200, 3.0, 60.0) is None
    verdict = exploding.verdict(700, 2 * chance, 4500.0)
    assert verdict and "unstable" in verdict and "--backward exact" in verdict
    healthy = StallWatch(chance, 100, "warn")
    healthy.verdict(20, chance, 1.6)
    assert healthy.verdict(200, 4.0, 1.5) is None
    # warn: a note and training goes on; stop: the reason ends the run.
    notes = []
    warner = StallWatch(chance, 100, "warn", (notes.append,))
    stopper = StallWatch(chance, 100, "stop")
    for w in (warner, stopper):
        w.report({"iter": 20, "loss": chance, "feature_norm": 1.6})
    row = {"iter": 120, "loss": chance, "feature_norm": 0.1}
    assert warner.report(row) is None and len(notes) == 1
    assert "stalled" in stopper.report(row)


def test_a_log_line_cut_by_a_kill_is_skipped_and_repaired(synthetic_list, tmp_path):
    from spherecli.evaluation.report import summarize

    out = tmp_path / "run"
    launch(run_cfg(synthetic_list, out, max_iter=10, snapshot=5))
    with open(out / "log.jsonl", "a") as f:
        f.write('{"iter": 12, "lo')  # what a kill in the middle of a write leaves
    assert summarize(out)["iterations"] == 10
    cfg, resuming = resolve(None, {"out": str(out), "max_iter": 15}, resume=True)
    launch(cfg, resuming)
    lines = (out / "log.jsonl").read_text().splitlines()
    assert all(json.loads(line) for line in lines)
    assert [r["iter"] for r in read_log(out / "log.jsonl")] == [5, 10, 15]


def test_report_of_a_run_that_stopped_before_its_first_row(synthetic_list, tmp_path):
    out = tmp_path / "nan"
    with pytest.raises(Stopped):
        train(run_cfg(synthetic_list, out, head="softmax", amp="none", lr_steps=(1,), lr_factor=1e9,
                      display=5, max_iter=20))
    r = subprocess.run([sys.executable, "-m", "spherecli", "report", str(out)], capture_output=True,
                       text=True)
    assert r.returncode == 0 and "nan" in r.stdout
    r = subprocess.run([sys.executable, "-m", "spherecli", "report", str(out), "--key", "foo", "--plot",
                        str(tmp_path / "x.png")], capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.startswith("error:") and not (tmp_path / "x.png").exists()


def test_the_image_cache_file_gives_the_batches_of_the_jpegs(synthetic_list, tmp_path):
    from spherecli.core.data import CachedFaces
    from spherecli.core.formats import read_list

    items = read_list(synthetic_list)
    sampler = EpochBatches(len(items), 16, seed=5, stop=12)
    decoded = list(batches(items, (112, 96), sampler, 0, False))
    cached = list(batches(items, (112, 96), sampler, 0, False, cache_file=tmp_path / "faces.npy"))
    assert len(decoded) == len(cached) == 12
    for (x, y), (cx, cy) in zip(decoded, cached):
        assert torch.equal(x, cx) and torch.equal(y, cy)
    made = (tmp_path / "faces.npy").stat().st_mtime_ns
    CachedFaces.in_file(items, (112, 96), tmp_path / "faces.npy")
    assert (tmp_path / "faces.npy").stat().st_mtime_ns == made, "a valid cache is reused"
    with pytest.raises(UserError, match="made from another list"):
        CachedFaces.in_file(items[:-1], (112, 96), tmp_path / "faces.npy", build=False)
    assert len(CachedFaces.in_file(items[:-1], (112, 96), tmp_path / "faces.npy").images) == len(items) - 1
    # Training from the cache file follows the curve of training from memory.
    a = launch(run_cfg(synthetic_list, tmp_path / "mem", amp="none", max_iter=10))
    b = launch(run_cfg(synthetic_list, tmp_path / "file", amp="none", max_iter=10, cache=False,
                       cache_file=str(tmp_path / "train.npy")))
    assert a["loss"] == b["loss"]


def test_a_compiled_run_writes_a_plain_model_and_resumes(synthetic_list, tmp_path):
    """torch.compile's wrapper prefixed every key with _orig_mod.: model.pt did not load."""
    from spherecli import load

    out = tmp_path / "compiled"
    launch(run_cfg(synthetic_list, out, batch_size=8, max_iter=2, snapshot=1, compile=True))
    saved = weights(out / "model.pt")
    assert not any(k.startswith("_orig_mod.") for k in saved), sorted(saved)[:3]
    model = load(out / "model.pt")
    assert model.embed(np.zeros((112, 96, 3), np.uint8)).shape == (1024,)  # flip: concat
    launch(run_cfg(synthetic_list, out, batch_size=8, max_iter=3, snapshot=1, compile=True), resume=True)
    assert Checkpoint.load(out / "checkpoint.pt").iteration == 3
    assert [r["iter"] for r in log_rows(out)] == [1, 2, 3]


def test_paired_fold_differences_by_hand():
    from spherecli.evaluation.report import paired

    # Differences 5, 0, 5 points: mean 10/3, sample variance 25/3, standard error sqrt(25/9) = 5/3.
    d = paired([0.85, 0.80, 0.90], [0.80, 0.80, 0.85], "run on lfw")
    assert d["diff"] == pytest.approx(10 / 3) and d["se"] == pytest.approx(5 / 3)
    assert (d["better"], d["folds"]) == (2, 3)
    with pytest.raises(UserError, match="run on lfw: 2 folds against the baseline's 3"):
        paired([0.8, 0.9], [0.8, 0.8, 0.85], "run on lfw")
