"""LFW protocol time: `sphereface evaluate` against extracting per pair as the original did.

    .venv/bin/python benchmarks/evaluate.py [--data out/demo/lfw-112X96] [--baseline-pairs 600]

Our path extracts each of the 7,701 distinct images once, in batches, with
DataLoader workers, then scores all 6,000 pairs. The original's
evaluation.m loops over the pairs and runs the network on each image of
each pair with its mirror (a batch of 2): 12,000 forward passes. The
baseline is timed on the first --baseline-pairs pairs and scaled to 6,000
(the loop does the same work for every pair). `--amp bf16` extraction is
timed too (off by default: fp32 is what published numbers are measured
with). Timing needs no trained weights, so freshly initialised networks
are used.
"""

import argparse
import tempfile
import time
from pathlib import Path

import torch

from common import DATA, machine, need_data
from spherecli.align import align_manifests
from spherecli.data import load_face, normalize, to_chw
from spherecli.detect import detect_tree
from spherecli.evaluate import distinct_images, evaluate_features, extract, read_pairs
from spherecli.models import create_model


def per_pair(model, data: Path, pairs, n: int) -> float:
    """Seconds for n pairs the original way."""
    start = time.perf_counter()
    with torch.no_grad():
        for a, b in zip(pairs.left[:n], pairs.right[:n]):
            for name in (a, b):
                x = to_chw(load_face(str(data / name)))[None]
                model(normalize(torch.cat([x, x.flip(-1)])))
    return time.perf_counter() - start


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", type=Path, help="aligned LFW (made from the bundled LFW if absent)")
    ap.add_argument("--baseline-pairs", type=int, default=600)
    ap.add_argument("--archs", default="sphere4,sphere20")
    args = ap.parse_args()
    need_data()
    print(f"machine: {machine()}\n")
    data = args.data
    if data is None:
        work = Path(tempfile.mkdtemp())
        detect_tree(DATA / "lfw", work / "m.jsonl", progress=False)
        align_manifests([work / "m.jsonl"], work / "aligned", no_face="mean", progress=False)
        data = work / "aligned"
    pairs = read_pairs(DATA / "pairs.txt")
    names = distinct_images(pairs)
    paths = [str(data / n) for n in names]
    print("| network | extract 7,701 images (s) | score 6,000 pairs (s) | total (s) | "
          "original per-pair loop, 6,000 pairs (s) | speed-up | extract with --amp bf16 (s) |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for arch in args.archs.split(","):
        torch.manual_seed(0)
        model = create_model(arch).eval()
        start = time.perf_counter()
        feats = extract(model, paths, progress=False)
        t_extract = time.perf_counter() - start
        start = time.perf_counter()
        extract(model, paths, amp="bf16", progress=False)
        t_bf16 = time.perf_counter() - start
        start = time.perf_counter()
        evaluate_features(feats, {n: i for i, n in enumerate(names)}, pairs)
        t_score = time.perf_counter() - start
        model = create_model(arch).eval()
        base = per_pair(model, data, pairs, args.baseline_pairs) * len(pairs.same) / args.baseline_pairs
        total = t_extract + t_score
        print(f"| {arch} | {t_extract:.1f} | {t_score:.2f} | {total:.1f} | {base:.0f} "
              f"(timed on {args.baseline_pairs}) | {base / total:.1f}x | {t_bf16:.1f} |", flush=True)


if __name__ == "__main__":
    main()
