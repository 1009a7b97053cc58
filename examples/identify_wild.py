"""Open-set identification on the bundled `wild` photos (25 people x 8) through the API: each
person's first photo is the gallery, the others probes (their face nearest the centre). Rank-1
over 25 people; with 13 known, known named and strangers rejected at the LFW and FAR 1e-3 thresholds.

    .venv/bin/python examples/identify_wild.py --model out/demo/celeba-sphere4-asoftmax/model.pt
"""
import argparse
import json
from pathlib import Path
from statistics import mean

import spherecli

ap = argparse.ArgumentParser()
ap.add_argument("--model", required=True)
ap.add_argument("--wild", type=Path, default=Path(__file__).resolve().parents[2] / "shared/data/wild")
args = ap.parse_args()
model = spherecli.load(args.model)
photos = {p.name: sorted(p.iterdir()) for p in sorted(args.wild.iterdir()) if p.is_dir()}
known = sorted(photos)[: (len(photos) + 1) // 2]
everyone, half = (model.gallery({n: photos[n][:1] for n in names}) for names in (photos, known))
found = [(n, model.identify(p, everyone), model.identify(p, half)) for n in photos for p in photos[n][1:]]
answers = [(n, a[0], h[0]) for n, a, h in found if a]


def open_set(t):
    named = [h.best_match == n and h.score >= t for n, _, h in answers if n in known]
    rejected = [h.score < t for n, _, h in answers if n not in known]
    return {"threshold": round(t, 4), "known_identified": round(mean(named), 4),
            "unknown_rejected": round(mean(rejected), 4)}


print(json.dumps({"model": args.model, "calibration": model.calibration.source,
                  "probe_photos_with_a_face": len(answers),
                  "rank1": round(mean(a.best_match == n for n, a, _ in answers), 4),
                  "open_set": open_set(model.calibration.threshold),
                  "open_set_at_far_0.001": open_set(model.calibration.threshold_at_far(1e-3))}, indent=1))
