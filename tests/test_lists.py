import json
import os

import pytest

from spherecli import UserError
from spherecli.core.formats import read_list
from spherecli.preprocess.lists import build_list, read_exclusions


def tree(tmp_path, counts):
    root = tmp_path / "aligned"
    for name, n in counts.items():
        (root / name).mkdir(parents=True)
        for i in range(n):
            (root / name / f"{i:03d}.jpg").write_bytes(b"x")
    return root


def test_labels_follow_sorted_identities_with_exclusions_and_minimum(tmp_path):
    root = tree(tmp_path, {"carol": 3, "alice": 2, "bob": 1, "0166921": 4, "dave": 5})
    names = tmp_path / "drop.txt"
    names.write_text("# overlap with the test set\ndave\n")
    # A file of names and the casia-lfw token inside a comma-separated list.
    exclude = read_exclusions([str(names), "erin,casia-lfw"])
    assert exclude == {"dave", "erin", "0166921", "1056413", "1193098"}
    summary = build_list([root], tmp_path / "l.txt", exclude=exclude, min_images=2)
    items = read_list(tmp_path / "l.txt")
    labels = {p.split("/")[-2]: label for p, label in items}
    assert labels == {"alice": 0, "carol": 1}
    assert len(items) == 5
    assert summary["identities"] == 2 and summary["images"] == 5
    assert summary["excluded"] == ["0166921", "dave"] and summary["dropped_identities"] == 1
    assert summary["exclusions_not_found"] == ["1056413", "1193098", "erin"]
    assert (summary["per_identity_min"], summary["per_identity_max"]) == (2, 3)
    side = json.loads((tmp_path / "l.txt.json").read_text())
    assert side["names"] == ["alice", "carol"]


def test_relative_paths_resolve_against_the_list_folder(tmp_path):
    root = tree(tmp_path, {"a b": 2, "c": 1})
    (tmp_path / "lists").mkdir()
    build_list([root], tmp_path / "lists" / "l.txt", relative=True)
    text = (tmp_path / "lists" / "l.txt").read_text()
    assert text.startswith("../aligned/a b/000.jpg 0\n")
    items = read_list(tmp_path / "lists" / "l.txt")
    assert all((tmp_path / "lists" / p).exists() for p, _ in items)


def test_several_folders_merge_by_identity(tmp_path):
    a = tree(tmp_path / "1", {"x": 1, "y": 1})
    b = tree(tmp_path / "2", {"y": 2, "z": 1})
    summary = build_list([a, b], tmp_path / "l.txt")
    assert summary["identities"] == 3 and summary["images"] == 5
    assert sorted(label for _, label in read_list(tmp_path / "l.txt")) == [0, 1, 1, 1, 2]


def test_bad_list_lines_name_file_and_line(tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_text("a.jpg 0\nb.jpg zero\n")
    with pytest.raises(UserError, match=r"bad\.txt:2: expected"):
        read_list(bad)
    with pytest.raises(UserError, match="no identity folder"):
        build_list([tree(tmp_path, {"a": 1})], tmp_path / "l.txt", min_images=5)


def test_names_with_spaces_tabs_and_hashes_survive_the_list(tmp_path):
    root = tree(tmp_path, {"a b": 1, "#c\td": 1, " e": 1})
    build_list([root], tmp_path / "l.txt", relative=True)
    items = read_list(tmp_path / "l.txt")
    assert sorted(p.split("/")[-2] for p, _ in items) == sorted(["a b", "#c\td", " e"])
    assert all(os.path.exists(p) for p, _ in items)


def test_a_file_name_with_a_line_break_is_refused(tmp_path):
    root = tree(tmp_path, {"alice": 2})
    (root / "alice" / "evil\n9.jpg").write_bytes(b"x")
    with pytest.raises(UserError, match="line break"):
        build_list([root], tmp_path / "l.txt")
    assert not (tmp_path / "l.txt").exists()
