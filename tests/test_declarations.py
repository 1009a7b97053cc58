"""Tests generated from the command line's own declarations: every command, every output
option and every numeric option, read from click's objects, so a new command or option
is covered without a test of its own.

- Each output option pointed at each input of the same call, and at a file of another
  kind, exits 2 with one `error:` line and leaves every file as it was (sha256), and
  makes no file or folder.
- Each numeric option just past the ends of its range, NaN and infinite exits 2 with
  one line; at the ends themselves the command runs or exits 2, never a traceback.

Each command needs one working call here (BASE); a command without one fails the first
test. The calls run in this process, through `spherecli.cli.main`, so that one import of
torch serves them all."""

import hashlib
import math
import os
import shutil

import cv2
import pytest
import torch

from spherecli.cli import Number, OutputPath, leaf_commands
from spherecli.core.formats import InputSpec, ModelFile
from spherecli.core.images import walk_images
from spherecli.models import create_model

from conftest import DATA, sphereface_here as call, write_synthetic_faces

COMMANDS = leaf_commands()
# One working call per command, on the files of `work`; {o} is a fresh folder per call.
BASE = {
    "detect": "detect {w}/photos -o {o}/m.jsonl -q",
    "align": "align {w}/photos.jsonl -o {o}/crops -q",
    "list": "list {w}/aligned -o {o}/list.txt",
    "train": "train --list {w}/list.txt --arch sphere4 --out {o}/run --max-iter 2 --batch-size 4 "
             "--workers 0 --display 1 --device cpu --amp none -q",
    "evaluate": "evaluate --pairs {w}/pairs.txt --model {w}/m.pt --data {w}/aligned --workers 0 "
                "-o {o}/r.json -q",
    "verify": "verify {w}/photos/a/1.jpg {w}/photos/b/1.jpg --model {w}/m.pt",
    "identify": "identify --gallery {w}/gallery --probe {w}/probe.jpg --model {w}/m.pt "
                "--cache {o}/cache -q",
    "gallery create": "gallery create {o}/g --model {w}/m.pt",
    "gallery enrol": "gallery enrol {w}/enrolled {w}/photos -q",
    "gallery remove": "gallery remove {w}/enrolled-once --person b",  # called once: b is gone after it
    "gallery list": "gallery list {w}/enrolled",
    "gallery info": "gallery info {w}/enrolled",
    "megaface": "megaface --probes {w}/aligned --distractors {w}/distractors --model {w}/m.pt "
                "-o {o}/megaface.json -q",
    "embed": "embed {w}/aligned --aligned --model {w}/m.pt -o {o}/f.npz -q",
    "export": "export {w}/m.pt -o {o}/m.onnx",
    "import": "import {w}/068.ckpt -o {o}/imported.pt",
    "afs": "afs {w}/aligned --model {w}/m.pt -q",
    "report": "report {w}/run",
}


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """Real face photos where ../shared/data is (so detection finds faces), synthetic ones
    otherwise; aligned crops, a pair list, a list, a model, a published-format checkpoint,
    a run folder, a landmark manifest and a file of another kind."""
    w = tmp_path_factory.mktemp("declared")
    aligned = write_synthetic_faces(w / "aligned", people=4, per_person=3)
    wild = DATA / "wild"
    for person, name in (("a", 0), ("b", 1)):
        for i in (1, 2):
            target = w / "photos" / person / f"{i}.jpg"
            target.parent.mkdir(parents=True, exist_ok=True)
            if wild.is_dir():
                folder = wild / sorted(os.listdir(wild))[name]
                shutil.copy(folder / sorted(os.listdir(folder))[i], target)
            else:
                crop = cv2.imread(str(aligned / f"person0{name}" / "000.jpg"))
                cv2.imwrite(str(target), cv2.resize(crop, (150, 150)))
    shutil.copytree(w / "photos", w / "gallery")
    shutil.copy(w / "photos" / "a" / "2.jpg", w / "probe.jpg")
    people = sorted(os.listdir(aligned))
    for person in people:  # LFW's naming, so that the pair list finds the crops
        for i, name in enumerate(sorted(os.listdir(aligned / person)), 1):
            os.rename(aligned / person / name, aligned / person / f"{person}_{i:04d}.jpg")
    (w / "pairs.txt").write_text(f"2\t1\n{people[0]} 1 2\n{people[2]} 1 {people[3]} 1\n{people[1]} 1 2\n"
                                 f"{people[0]} 3 {people[1]} 3\n")
    (w / "list.txt").write_text("".join(f"{aligned / p / f'{p}_{i:04d}.jpg'} {k}\n"
                                        for k, p in enumerate(people) for i in (1, 2, 3)))
    torch.manual_seed(0)
    net = create_model("sphere4")
    ModelFile("sphere4", net.model_args, net.state_dict(), InputSpec()).save(w / "m.pt")
    torch.save({"iters": 1, "net_state_dict": create_model("mobilefacenet").state_dict()}, w / "068.ckpt")
    (w / "notes.txt").write_text("a file of the user's, of no kind spherecli writes\n")
    assert call(f"detect {w}/photos -o {w}/photos.jsonl -q".split()) == 0
    write_synthetic_faces(w / "distractors", people=3, per_person=2, seed=1)
    for gallery in ("enrolled", "enrolled-once"):
        assert call(f"gallery create {w}/{gallery} --model {w}/m.pt".split()) == 0
        assert call(f"gallery enrol {w}/{gallery} {w}/photos -q".split()) == 0
    assert call(f"train --list {w}/list.txt --arch sphere4 --out {w}/run --max-iter 1 --batch-size 4 "
                f"--workers 0 --device cpu -q".split()) == 0
    return w


def snapshot(root):
    files = {p: hashlib.sha256(open(p, "rb").read()).hexdigest()
             for p in sorted(root.rglob("*")) if p.is_file()}
    return files, {p for p in root.rglob("*") if p.is_dir()}


def base_args(command: str, w, tmp_path) -> list[str]:
    fresh = tmp_path / f"o{len(os.listdir(tmp_path))}"
    return BASE[command].format(w=w, o=fresh).split()


def with_value(args: list[str], param, value: str) -> list[str]:
    """args with the option given this value (replacing the value it has there)."""
    args = list(args)
    for i, a in enumerate(args):
        if a in param.opts:
            args[i + 1] = value
            return args
    return args + [param.opts[0], value]


def declared(kind):
    """(command, option) of every option whose type is `kind`."""
    return [(name, p) for name, command in sorted(COMMANDS.items()) for p in command.params
            if isinstance(p.type, kind)]


def inputs_of(args: list[str]) -> list[str]:
    """What a call reads: its existing paths, and for a folder one image in it too."""
    found = []
    for a in args:
        if os.path.isfile(a):
            found.append(a)
        elif os.path.isdir(a):
            found.append(a)
            first = next(walk_images(a), None)
            if first:
                found.append(os.path.join(a, first))
    return found


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err[-2000:]
    return lines[0]


def test_every_command_has_a_working_call(work, tmp_path, capsys):
    assert set(BASE) == set(COMMANDS), "add a working call of the new command to BASE"
    for command in BASE:
        status = call(base_args(command, work, tmp_path))
        err = capsys.readouterr().err
        # Photos without a face (no ../shared/data) are an error for verify and identify.
        assert status == 0 or (not DATA.is_dir() and command in ("verify", "identify")), (command, err)


@pytest.mark.parametrize("command, param", declared(OutputPath), ids=lambda v: getattr(v, "name", v))
def test_an_output_never_lands_on_an_input_or_a_foreign_file(work, tmp_path, capsys, command, param):
    args = base_args(command, work, tmp_path)
    targets = inputs_of(args) + [str(work / "notes.txt")]
    flags = [[], ["--overwrite"]] if any(p.name == "overwrite" for p in COMMANDS[command].params) \
        else [[]]
    for target in targets:
        for extra in flags:
            if extra and target == str(work / "notes.txt"):
                continue  # --overwrite may replace a file of another kind, never an input
            before = snapshot(work)
            status = call(with_value(args, param, target) + extra)
            line = one_error_line(capsys)
            assert status == 2, (command, param.name, target, line)
            assert snapshot(work) == before, (command, param.name, target, "changed a file")


@pytest.mark.parametrize("command, param", declared(Number), ids=lambda v: getattr(v, "name", v))
def test_a_number_is_checked_where_it_is_declared(work, tmp_path, capsys, command, param):
    inside, outside = param.type.range.samples()
    count = param.type.count

    def text(v):
        return ",".join([str(v)] * (count or 1)) if count is not None else str(v)
    for value in outside:
        status = call(with_value(base_args(command, work, tmp_path), param, text(value)))
        assert status == 2, (param.name, value)
        assert param.opts[-1] in one_error_line(capsys)
    for value in inside:
        status = call(with_value(base_args(command, work, tmp_path), param, text(value)))
        err = capsys.readouterr().err
        assert status in (0, 2) and "Traceback" not in err, (param.name, value, err[-2000:])


def test_the_samples_cover_both_sides_of_each_end():
    from spherecli.core.validate import Range

    inside, outside = Range(0, 1, lo_open=True).samples()
    assert inside == [1] and 0 in outside and 1.001 in outside and any(math.isnan(v) for v in outside)
    inside, outside = Range(1, integer=True).samples()
    assert inside == [1] and 0 in outside
