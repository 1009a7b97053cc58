"""Ordinary mistakes through the real command line: one `error:` line that names what to
fix, exit status 2, and no file that was there changed. Needs no outside data."""

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import cv2
import pytest
import torch

from spherecli.core.formats import InputSpec, ModelFile
from spherecli.models import create_model

from conftest import sphereface_here, write_synthetic_faces

SPHEREFACE = [sys.executable, "-m", "spherecli"]
NO_GPU = not torch.cuda.is_available()


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """A model, aligned crops, raw photos of another size, a pair list over both, bad files."""
    w = tmp_path_factory.mktemp("mistakes")
    torch.manual_seed(0)
    net = create_model("sphere4")
    ModelFile("sphere4", net.model_args, net.state_dict(), InputSpec()).save(w / "m.pt")
    aligned = write_synthetic_faces(w / "aligned", people=4, per_person=3)
    raw = w / "raw"
    pairs = []
    for person in sorted(os.listdir(aligned)):
        for i, name in enumerate(sorted(os.listdir(aligned / person)), 1):
            crop = cv2.imread(str(aligned / person / name))
            for root, img in ((aligned, crop), (raw, cv2.resize(crop, (150, 150)))):
                (root / person).mkdir(parents=True, exist_ok=True)
                cv2.imwrite(str(root / person / f"{person}_{i:04d}.jpg"), img)
            (aligned / person / name).unlink()
    people = sorted(os.listdir(aligned))
    # Two folds of one same and one different pair: the fewest the protocol can score.
    pairs = [f"{people[0]} 1 2", f"{people[2]} 1 {people[3]} 1", f"{people[1]} 1 2",
             f"{people[0]} 3 {people[1]} 3"]
    (w / "pairs.txt").write_text("2\t1\n" + "\n".join(pairs) + "\n")
    (w / "empty.pt").write_bytes(b"")
    (w / "photo.pt").write_bytes((raw / people[0] / f"{people[0]}_0001.jpg").read_bytes())
    (w / "text.pt").write_text("not a model\n")
    (w / "notimg.jpg").write_text("hello\n")
    (w / "existing.onnx").write_bytes(b"keep me")
    (w / "batch.toml").write_text("batch_size = 16.5\n")
    (w / "typo.toml").write_text("batch-size = 16\n")
    (w / "nobody").mkdir()
    (w / "latin1.toml").write_bytes("# r\xe9glages\nbatch_size = 16\n".encode("latin-1"))
    (w / "onefold.txt").write_text("1\t2\n" + "\n".join(pairs) + "\n")
    crops = sorted(str(p) for p in aligned.rglob("*.jpg"))
    photos = sorted(raw.rglob("*.jpg"))
    (w / "rawlist.txt").write_text(f"{crops[0]} 0\n" + "".join(f"{p} 1\n" for p in photos))
    (w / "list.txt").write_text("".join(f"{aligned / p / f'{p}_0001.jpg'} {i}\n"
                                        for i, p in enumerate(people)))
    (w / "far.txt").write_text("".join(f"{aligned / p / f'{p}_0001.jpg'} {i * 1000}\n"
                                       for i, p in enumerate(people)))
    manifest = {"type": "header", "format": "spherecli.manifest", "version": 1, "root": str(w / "gone"),
                "settings": {}}
    image = {"type": "image", "path": "p/a.jpg", "status": "ok", "width": 100, "height": 100,
             "landmarks": [[30, 40], [70, 40], [50, 60], [35, 80], [65, 80]]}
    (w / "gone.jsonl").write_text(json.dumps(manifest) + "\n" + json.dumps(image) + "\n")
    (w / "raw.jsonl").write_text(json.dumps({**manifest, "root": str(raw)}) + "\n" + json.dumps(
        {**image, "path": f"{people[0]}/{people[0]}_0001.jpg"}) + "\n")
    (w / "run" / "x").mkdir(parents=True)
    (w / "run" / "x" / "log.jsonl").write_text(json.dumps({"iter": 5, "loss": 2.0, "acc": 0.1, "lr": 0.1,
                                                           "feature_norm": 1.0, "images_per_s": 9.0,
                                                           "elapsed_s": 1.0, "eta_s": 0}) + "\n")
    return w


def snapshot(root: Path) -> dict:
    return {p: hashlib.sha1(p.read_bytes()).hexdigest() for p in root.rglob("*") if p.is_file()}


MISTAKES = [
    # where aligned crops are expected, raw photos
    ("evaluate --pairs {w}/pairs.txt --model {w}/m.pt --data {w}/raw --workers 0 -q",
     "150x150 image where 112x96 aligned face crops are expected"),
    ("embed {w}/raw --aligned --model {w}/m.pt -o {w}/out/f.npz -q", "not the 112x96 aligned face crops"),
    ("afs {w}/raw --model {w}/m.pt -q", "not the 112x96 aligned face crops"),
    # outputs that cannot be written, found before the work
    ("embed {w}/aligned --aligned --model {w}/m.pt -o /proc/nowhere/f.npz -q",
     "cannot write /proc/nowhere/f.npz"),
    ("evaluate --pairs {w}/pairs.txt --model {w}/m.pt --data {w}/aligned -o /proc/x/r.json -q",
     "cannot write /proc/x/r.json"),
    ("evaluate --pairs {w}/pairs.txt --model {w}/m.pt --data {w}/aligned --roc /proc/x/roc.png -q",
     "cannot write /proc/x/roc.png"),
    ("export {w}/m.pt -o /proc/x/m.onnx", "cannot write /proc/x/m.onnx"),
    ("report {w}/run/x --plot /proc/x/p.png", "cannot write /proc/x/p.png"),
    ("train --list {w}/list.txt --out /proc/x/run --device cpu -q", "cannot write /proc/x/run"),
    # devices
    ("detect {w}/raw --device gpu -o {w}/out/m.jsonl -q",
     "--device 'gpu': expected cpu, cuda, cuda:N or auto"),
    ("train --list {w}/list.txt --out {w}/out/r --device gpu -q", "expected cpu, cuda, cuda:N or auto"),
    # bad model files
    ("evaluate --pairs {w}/pairs.txt --model {w}/empty.pt --data {w}/aligned -q", "empty.pt: empty file"),
    ("evaluate --pairs {w}/pairs.txt --model {w}/photo.pt --data {w}/aligned -q",
     "photo.pt: not a PyTorch model or checkpoint file"),
    ("evaluate --pairs {w}/pairs.txt --model {w}/text.pt --data {w}/aligned -q",
     "text.pt: not a PyTorch model or checkpoint file"),
    ("verify {w}/notimg.jpg {w}/notimg.jpg --model {w}/m.pt", "notimg.jpg: not a recognisable image"),
    # reports and recipes
    ("report {w}/run/x --key foo", "its log has no 'foo'"),
    ("train --list {w}/list.txt --out {w}/out/r --batch-size 0 -q",
     "'--batch-size': expected a whole number at least 1"),
    ("train --list {w}/list.txt --out {w}/out/r --lr-steps 10,abc -q",
     "'--lr-steps': expected a number at least 0"),
    ("train --list {w}/list.txt --out {w}/out/r --config {w}/batch.toml -q",
     "batch.toml: batch_size: expected a whole number, got 16.5"),
    ("train --list {w}/list.txt --out {w}/out/r --config {w}/typo.toml -q", "did you mean batch_size?"),
    ("train --list {w}/list.txt --out {w}/out/r --head cosface --lambda-hold 400 -q",
     "the cosface head does not take lambda_hold"),
    ("train --list {w}/far.txt --out {w}/out/r -q", "label 3000 is far above the other labels"),
    # outputs that would replace something
    ("export {w}/m.pt -o {w}/m.pt --overwrite", "an exported network is written to a file named .onnx"),
    ("import {w}/m.pt -o {w}/m.pt --overwrite", "is an input of this command"),
    ("export {w}/m.pt -o {w}/existing.onnx", "existing.onnx exists; it is left as it is (add --overwrite"),
    ("import {w}/m.pt -o {w}/existing.onnx", "existing.onnx exists; it is left as it is (add --overwrite"),
    # outputs of the wrong kind, onto inputs, or where they cannot be read back
    ("evaluate --pairs {w}/pairs.txt --model {w}/m.pt --data {w}/aligned --roc {w}/m.pt -q",
     "a PNG picture is written to a file named .png"),
    ("evaluate --pairs {w}/pairs.txt --model {w}/m.pt --data {w}/aligned -o {w}/m.pt -q",
     "m.pt is an input of this command"),
    ("evaluate --pairs {w}/pairs.txt --model {w}/m.pt --data {w}/aligned --scores {w}/pairs.txt -q",
     "pairs.txt is an input of this command"),
    ("report {w}/run/x --plot {w}/m.pt", "a PNG picture is written to a file named .png"),
    ("export {w}/m.pt -o {w}/out/x.pt",
     "an exported network is written to a file named .onnx or .pt2 or .ts"),
    ("list {w}/aligned -o {w}/m.pt", "m.pt exists and is not a training list"),
    ("list {w}/aligned -o {w}/gone.jsonl", "gone.jsonl exists and is not a training list"),
    ("embed {w}/aligned --aligned --model {w}/m.pt -o {w}/m.pt -q", "m.pt is an input of this command"),
    ("train --list {w}/list.txt --out {w}/out/c --cache-file {w}/list.txt -q", "list.txt is an input"),
    ("train --list {w}/list.txt --out {w}/out/c --cache-file {w}/m.pt -q",
     "m.pt exists and is not a decoded-image cache"),
    ("align {w}/raw.jsonl -o {w}/raw -q", "raw is the input folder"),
    # values out of range, or that contradict each other
    ("train --list {w}/list.txt --out {w}/out/r --feature-dim -4 -q",
     "'--feature-dim': expected a whole number at least 1"),
    ("detect {w}/raw --factor 1.0 -o {w}/out/m.jsonl -q",
     "'--factor': expected a number above 0 and below 1"),
    ("detect {w}/raw --thresholds 2,2,2 -o {w}/out/m.jsonl -q", "'--thresholds': expected a number at least"),
    ("verify {w}/notimg.jpg {w}/notimg.jpg --model {w}/m.pt --far 2", "'--far': expected a number above 0"),
    ("verify {w}/notimg.jpg {w}/notimg.jpg --model {w}/m.pt --threshold nan", "'--threshold': expected"),
    ("verify {w}/notimg.jpg {w}/notimg.jpg --model {w}/m.pt --far 1e-3 --threshold 0.3",
     "give --far (a threshold chosen by false-accept rate) or --threshold, not both"),
    ("align {w}/gone.jsonl -o {w}/out/a --size 20000x20000 -q",
     "crop size 20000x20000: expected a whole number"),
    ("evaluate --pairs {w}/onefold.txt --model {w}/m.pt --data {w}/aligned --workers 0 -q",
     "the protocol chooses each fold's threshold on the other folds, so it needs at least 2"),
    ("evaluate --benchmarks {w}/batch.toml --model {w}/m.pt --data {w}/aligned -q",
     "--data cannot go with it"),
    # inputs that are not what they should be
    ("train --list {w}/rawlist.txt --out {w}/out/r --device cpu --workers 0 --batch-size 2 -q",
     "a 150x150 image where 112x96 aligned face crops are expected"),
    ("train --list {w}/list.txt --out {w}/out/r --config {w}/latin1.toml -q", "latin1.toml: not a text file"),
    ("embed {w}/nobody --model {w}/m.pt -o {w}/out/none/f.npz -q", "nobody: no images"),
    # stages given the wrong thing
    ("align {w}/raw/{first} -o {w}/out/a -q", "is a photo; align reads the landmarks"),
    ("align {w}/gone.jsonl -o {w}/out/a -q", "none of the 1 images could be aligned"),
    ("detect {w}/nobody -o {w}/out/n.jsonl -q", "no images"),
]
if NO_GPU:
    MISTAKES += [
        ("detect {w}/raw --device cuda -o {w}/out/m.jsonl -q", "PyTorch sees no GPU"),
        ("verify {w}/notimg.jpg {w}/notimg.jpg --model {w}/m.pt --device cuda", "PyTorch sees no GPU"),
        ("evaluate --pairs {w}/pairs.txt --model {w}/m.pt --data {w}/aligned --device cuda -q",
         "PyTorch sees no GPU"),
        ("train --list {w}/list.txt --out {w}/out/r --device CUDA -q", "PyTorch sees no GPU"),
        ("train --list {w}/list.txt --out {w}/out/r --gpus 0 -q", "--gpus 0: PyTorch sees no GPU"),
        ("train --list {w}/list.txt --out {w}/out/r --gpus 0,1 -q", "--gpus 0,1: PyTorch sees no GPU"),
    ]


@pytest.mark.parametrize("command, message", MISTAKES,
                         ids=[f"{m[0].split()[0]}:{m[1][:40]}" for m in MISTAKES])
def test_mistake_is_one_clear_line(work, command, message, capsys):
    first = sorted(os.listdir(work / "raw"))[0]
    before = snapshot(work)
    args = command.format(w=work, first=f"{first}/{first}_0001.jpg").split()
    status, err = sphereface_here(args), capsys.readouterr().err
    assert status == 2, (status, err[-2000:])
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err[-2000:]
    assert message in lines[0], lines[0]
    after = snapshot(work)
    assert {p: h for p, h in after.items() if p in before} == before, "an existing file changed"
    assert not (work / "out" / "none").exists(), "a failed call left the folder it made for its output"


def test_evaluate_on_another_pair_list_keeps_the_calibration(work):
    """A result on a pair list other than LFW's own is named after it: the model's
    calibration (MODEL.lfw.json) is not replaced."""
    (work / "m.lfw.json").write_text(json.dumps({"calibration": {"mean": None, "threshold": 0.3,
                                                                 "flip": "concat"}}))
    kept = (work / "m.lfw.json").read_text()
    r = subprocess.run(SPHEREFACE + ["evaluate", "--pairs", str(work / "pairs.txt"), "--model",
                                     str(work / "m.pt"), "--data", str(work / "aligned"), "--workers", "0",
                                     "-q"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert (work / "m.pairs.json").is_file() and (work / "m.lfw.json").read_text() == kept
    (work / "m.pairs.json").unlink()
    (work / "m.lfw.json").unlink()


def test_an_output_in_use_is_refused_and_a_stale_lock_taken_over(work, tmp_path):
    manifest = tmp_path / "m.jsonl"
    lock = Path(str(manifest) + ".lock")
    lock.write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": "now",
                                "command": "sphereface detect elsewhere"}))
    r = subprocess.run(SPHEREFACE + ["detect", str(work / "raw"), "-o", str(manifest), "-q"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and f"being written by another detect (pid {os.getpid()}" in r.stderr
    assert not manifest.exists()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True)
    lock.write_text(json.dumps({"pid": int(dead.stdout), "host": socket.gethostname()}))
    r = subprocess.run(SPHEREFACE + ["detect", str(work / "raw"), "-o", str(manifest), "-q"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert manifest.exists() and not lock.exists(), "the stale lock was taken over and released"
    run = tmp_path / "run"
    run.mkdir()
    (run / "train.lock").write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))
    r = subprocess.run(SPHEREFACE + ["train", "--list", str(work / "list.txt"), "--out", str(run),
                                     "--device", "cpu", "--max-iter", "1", "--batch-size", "2"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "being written by another training run" in r.stderr
    assert not (run / "log.jsonl").exists()


def test_two_processes_fail_like_one(work, tmp_path):
    """A missing image under --nproc 2: one error line from the launcher, no tracebacks."""
    broken = tmp_path / "list.txt"
    broken.write_text((work / "list.txt").read_text() + f"{work}/aligned/nobody.jpg 1\n")
    r = subprocess.run(SPHEREFACE + ["train", "--list", str(broken), "--out", str(tmp_path / "r"),
                                     "--nproc", "2", "--device", "cpu", "--batch-size", "1", "--max-iter",
                                     "2", "-q"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr[-3000:]
    assert "Traceback" not in r.stderr and "ChildFailedError" not in r.stderr, r.stderr[-3000:]
    errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "list.txt:5: image not found" in errors[0]


def sphereface(*args, cwd=None):
    return subprocess.run(SPHEREFACE + [str(a) for a in args], capture_output=True, text=True, cwd=cwd,
                          timeout=300)


def test_a_resumed_run_keeps_its_network_and_resumes_from_any_folder(work, tmp_path):
    """config.toml names the list by its absolute path, so --resume works from another
    folder; options that would not fit the checkpoint are one error line, the run untouched."""
    (tmp_path / "here").mkdir()
    (tmp_path / "there").mkdir()
    os.symlink(work / "list.txt", tmp_path / "here" / "list.txt")
    common = ["--arch", "sphere4", "--device", "cpu", "--workers", "0", "--batch-size", "4", "--snapshot",
              "2", "-q"]
    r = sphereface("train", "--list", "list.txt", "--out", tmp_path / "run", "--max-iter", "2", *common,
                   cwd=tmp_path / "here")
    assert r.returncode == 0, r.stderr
    before = snapshot(tmp_path / "run")
    for change in (["--arch", "sphere10"], ["--list", work / "rawlist.txt"]):
        r = sphereface("train", "--out", tmp_path / "run", "--resume", *change, "-q", cwd=tmp_path / "there")
        lines = [x for x in r.stderr.splitlines() if x.strip()]
        assert r.returncode == 2 and len(lines) == 1 and "holds a run trained with other settings" in lines[0]
        assert snapshot(tmp_path / "run") == before
    r = sphereface("train", "--out", tmp_path / "run", "--resume", "--max-iter", "4", "-q",
                   cwd=tmp_path / "there")
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "run" / "log.jsonl").read_text().splitlines()[-1])["iter"] == 4


def test_a_grey_pgm_face_is_aligned(tmp_path):
    """A .pgm photo's crop keeps its name: it is written grey, which is what it was."""
    face = cv2.resize(cv2.imread(str(write_synthetic_faces(tmp_path / "s", 1, 1) / "person00" / "000.jpg")),
                      (200, 200))
    (tmp_path / "p" / "x").mkdir(parents=True)
    cv2.imwrite(str(tmp_path / "p" / "x" / "a.pgm"), cv2.cvtColor(face, cv2.COLOR_BGR2GRAY))
    (tmp_path / "marks.txt").write_text("x/a.pgm 70 90 130 90 100 120 75 150 125 150\n")
    r = sphereface("align", tmp_path / "marks.txt", "--root", tmp_path / "p", "-o", tmp_path / "crops", "-q")
    assert r.returncode == 0 and "could not encode" not in r.stderr, r.stderr
    crop = cv2.imread(str(tmp_path / "crops" / "x" / "a.pgm"), cv2.IMREAD_UNCHANGED)
    assert crop.shape == (112, 96)


def test_a_list_names_links_as_they_are_and_leaves_out_dangling_ones(work, tmp_path):
    from spherecli.preprocess.lists import build_list

    root = tmp_path / "aligned"
    shutil.copytree(work / "aligned", root)
    person = sorted(os.listdir(root))[0]
    target = sorted((root / person).iterdir())[0]
    os.symlink(target, root / person / "link.jpg")
    os.symlink(tmp_path / "nowhere.jpg", root / person / "dangling.jpg")
    summary = build_list([root], tmp_path / "list.txt")
    paths = [line.rsplit(" ", 1)[0] for line in (tmp_path / "list.txt").read_text().splitlines()]
    assert str(root / person / "link.jpg") in paths and not any("dangling" in p for p in paths)
    assert summary["not_files"] == 1
    assert json.loads((tmp_path / "list.txt.json").read_text())["images"] == len(paths)


def test_a_false_accept_rate_the_calibration_set_cannot_resolve_is_said(tmp_path):
    from spherecli.recognition.calibration import Calibration

    (tmp_path / "m.lfw.json").write_text(json.dumps({"calibration": {
        "mean": None, "threshold": 0.3, "flip": "concat", "impostors": sorted(range(100))}}))
    (tmp_path / "m.pt").write_bytes(b"")
    cal = Calibration.load(tmp_path / "m.pt", far=1e-3)
    assert cal.far_of(cal.threshold) == 0
    assert any("100 impostor pairs, too few to resolve" in n and "1,000" in n for n in cal.notes), cal.notes
    assert not Calibration.load(tmp_path / "m.pt", far=0.1).notes


def test_the_pixel_limit_is_ours_above_pillows(tmp_path):
    """A header of 20000 x 10000 (200 megapixels, above Pillow's own 179): refused by the
    limit given, quoting it, not Pillow's number."""
    import struct
    import zlib

    from spherecli.core.images import decode

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = chunk(b"IHDR", struct.pack(">IIBBBBB", 20000, 10000, 8, 2, 0, 0, 0))
    body = chunk(b"IDAT", zlib.compress(b"\0" * 100)) + chunk(b"IEND", b"")
    (tmp_path / "big.png").write_bytes(b"\x89PNG\r\n\x1a\n" + header + body)
    with pytest.raises(OSError, match="over the limit of 150"):
        decode(tmp_path / "big.png", max_pixels=150_000_000)
    with pytest.raises(OSError) as raised:
        decode(tmp_path / "big.png", max_pixels=300_000_000)
    assert "178956970" not in str(raised.value)


def test_embed_writes_the_file_it_names(work, tmp_path):
    r = sphereface("embed", work / "aligned", "--aligned", "--model", work / "m.pt", "-o",
                   tmp_path / "features.bin", "-q")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "features.bin").is_file() and not (tmp_path / "features.bin.npz").exists()
    assert str(tmp_path / "features.bin") in r.stderr


def test_the_library_names_settings_and_the_command_line_names_flags(work, capsys):
    """A Python caller is told of `far` and `threshold`, a shell user of --far and --threshold."""
    from spherecli import UserError, load
    from spherecli.cli import as_flags

    with pytest.raises(UserError, match=r"give `far` \(.*\) or `threshold`, not both"):
        load(work / "m.pt", far=1e-3, threshold=0.3)
    args = ["verify", work / "notimg.jpg", work / "notimg.jpg", "--model", work / "m.pt", "--far", "1e-3",
            "--threshold", "0.3"]
    assert sphereface_here(args) == 2
    err = capsys.readouterr().err
    assert "give --far (a threshold chosen by false-accept rate) or --threshold, not both" in err
    # Only names some command declares become flags.
    said = "`init_from` x, `sphereface list`, `nothing`"
    assert as_flags(said) == "--init-from x, `sphereface list`, `nothing`"
