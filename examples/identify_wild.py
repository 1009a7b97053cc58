"""Open-set identification on the bundled `wild` photos (25 people x 8 photos).

    .venv/bin/python examples/identify_wild.py --model out/demo/celeba-sphere4-asoftmax/model.pt

Closed set: the first photo of each person is the gallery, the other seven
are probes; rank-1 is how often the probe's face (the one nearest the
photo's centre, as detect chooses) is nearest its own person's template.
Open set: only the first half of the people (13) are in the gallery; the
others' probes should come out "unknown" (--annotate draws these answers,
a coloured box and name per face, grey for unknown). Reports the rate of correct
rejections and, for the known people, correct identifications that also
clear the threshold. The threshold is the model's calibration
(MODEL.lfw.json from `sphereface evaluate`) unless --threshold.
"""

import argparse
import json
import os
import shutil
import tempfile
from pathlib import Path

from spherecli.detect import select_face
from spherecli.images import decode
from spherecli.calibration import Calibration
from spherecli.gallery import gallery, templates
from spherecli.identify import identify
from spherecli.recognize import FaceEmbedder

DATA = Path(os.environ.get("SPHERECLI_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


def probe_answers(emb, names, tmpl, probes: Path, cal, annotate=None) -> dict[str, dict]:
    """For each probe photo, the row of its central face."""
    rows: dict[str, list] = {}
    for row in identify(emb, names, tmpl, probes, cal, annotate=annotate):
        if row.get("box"):
            rows.setdefault(row["source"], []).append(row)
    answers = {}
    for source, faces in rows.items():
        rgb, _ = decode(probes / source)
        answers[source] = faces[select_face(faces, rgb.shape[1], rgb.shape[0], "center")]
    return answers


def open_set(answers: dict, known: set, threshold: float) -> dict:
    """Known people named correctly, and unknown people rejected, at a threshold."""
    def named(row):
        return row["best_match"] if row["score"] >= threshold else "unknown"
    familiar = [(s, r) for s, r in answers.items() if s.split("/")[0] in known]
    strangers = [r for s, r in answers.items() if s.split("/")[0] not in known]
    identified = sum(named(r) == s.split("/")[0] for s, r in familiar)
    return {"threshold": round(threshold, 4),
            "known_identified": round(identified / len(familiar), 4),
            "unknown_rejected": round(sum(named(r) == "unknown" for r in strangers) / len(strangers), 4)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--input-spec", help="for an ONNX model (see sphereface evaluate --help)")
    ap.add_argument("--threshold", type=float)
    ap.add_argument("--far", type=float, default=1e-3,
                    help="also report the open set at the threshold of this false-accept rate on LFW")
    ap.add_argument("--wild", type=Path, default=DATA / "wild")
    ap.add_argument("--annotate", type=Path, help="draw the open-set answers into this folder")
    args = ap.parse_args()
    cal = Calibration.load(args.model, threshold=args.threshold)
    emb = FaceEmbedder(args.model, flip=cal.flip, input_spec=args.input_spec)
    people = sorted(p.name for p in args.wild.iterdir() if p.is_dir())
    work = Path(tempfile.mkdtemp())
    for person in people:
        photos = sorted(p.name for p in (args.wild / person).iterdir())
        (work / "gallery" / person).mkdir(parents=True)
        shutil.copy(args.wild / person / photos[0], work / "gallery" / person)
        (work / "probe" / person).mkdir(parents=True)
        for photo in photos[1:]:
            shutil.copy(args.wild / person / photo, work / "probe" / person)
    owners, feats, _ = gallery(emb, work / "gallery", args.model)
    all_names, all_tmpl = templates(owners, feats, cal)
    known = set(people[: (len(people) + 1) // 2])
    keep = [i for i, p in enumerate(owners) if p in known]
    half_names, half_tmpl = templates([owners[i] for i in keep], feats[keep], cal)

    closed = probe_answers(emb, all_names, all_tmpl, work / "probe", cal)
    rank1 = sum(r["best_match"] == s.split("/")[0] for s, r in closed.items()) / len(closed)
    opened = probe_answers(emb, half_names, half_tmpl, work / "probe", cal, args.annotate)
    report = {"model": args.model, "calibration": cal.source, "probe_photos_with_a_face": len(closed),
              "rank1": round(rank1, 4), "open_set": open_set(opened, known, cal.threshold)}
    if cal.impostors is not None and args.threshold is None:
        report[f"open_set_at_far_{args.far:g}"] = open_set(opened, known, cal.threshold_at_far(args.far))
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
