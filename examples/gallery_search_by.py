"""Search by template or by photo? The first k photos of each person enrolled (k = 1, 3, 5),
the others searched, through the API. Closed set: rank-1 over everyone. Open set: only
the first half of the people (sorted) enrolled; at the calibration's FAR 1e-3 threshold,
the share of known people's photos named correctly and of strangers' photos rejected.

On the bundled `wild` photos (25 people x 8, detected and aligned here), or on a folder
of aligned crops PERSON/... (CFP's 500 people x 10 frontal photos with --glob):

    .venv/bin/python examples/gallery_search_by.py --model out/demo/published/068.pt
    .venv/bin/python examples/gallery_search_by.py --model out/demo/published/068.pt \\
        --aligned out/demo/cfp-112X96 --glob '*/frontal/*'
"""
import argparse
import fnmatch
import json
from pathlib import Path

import cv2
import numpy as np

import spherecli
from spherecli.core.images import walk_images
from spherecli.core.registry import SEARCH_BY

ap = argparse.ArgumentParser()
ap.add_argument("--model", required=True)
ap.add_argument("--wild", type=Path, default=Path(__file__).resolve().parents[2] / "shared/data/wild")
ap.add_argument("--aligned", type=Path, help="aligned crops PERSON/... instead of the wild photos")
ap.add_argument("--glob", default="*", help="with --aligned: the crops whose path matches")
args = ap.parse_args()
model = spherecli.load(args.model)
photos: dict = {}
if args.aligned:
    for rel in walk_images(args.aligned):
        if fnmatch.fnmatchcase(rel, args.glob):  # RGB arrays of the model's input size: crops as they are
            photos.setdefault(rel.split("/")[0], []).append(cv2.imread(str(args.aligned / rel))[:, :, ::-1])
else:
    photos = {p.name: sorted(p.iterdir()) for p in sorted(args.wild.iterdir()) if p.is_dir()}
units = {}
for person, images in photos.items():
    for i, image in enumerate(images):
        try:
            units[person, i] = model.calibration.unit(model.embed(image))
        except spherecli.UserError:
            pass  # no face: neither enrolled nor searched
threshold = model.calibration.threshold_at_far(1e-3)
known = sorted(photos)[: (len(photos) + 1) // 2]


def gallery(people, k: int, by: str):
    g = spherecli.Gallery.memory(model, by=by)
    for person in people:
        g.enrol(model, [im for i, im in enumerate(photos[person][:k]) if (person, i) in units], person)
    return g


rows = []
for k in (1, 3, 5):
    for by in SEARCH_BY:
        everyone, half = gallery(photos, k, by), gallery(known, k, by)
        probes = [(person, i) for person in photos for i in range(k, len(photos[person]))
                  if (person, i) in units]
        q = np.stack([units[p] for p in probes])
        closed = [a[0].name == person for (person, _), a in zip(probes, everyone.search(q))]
        named, rejected = [], []
        for (person, _), a in zip(probes, half.search(q)):
            if person in known:
                named.append(a[0].name == person and a[0].score >= threshold)
            else:
                rejected.append(a[0].score < threshold)
        rows.append({"enrolled_per_person": k, "by": by, "people": len(photos), "searches": len(probes),
                     "rank1": round(float(np.mean(closed)), 4),
                     "known_named_at_far_1e-3": round(float(np.mean(named)), 4),
                     "unknown_rejected_at_far_1e-3": round(float(np.mean(rejected)), 4)})
        print(json.dumps(rows[-1]), flush=True)
print(json.dumps({"model": args.model, "threshold_far_1e-3": round(threshold, 4)}))
