"""LFW protocol time: `sphereface evaluate` against extracting per pair as the original did,
and each network through PyTorch (fp32, bf16) and onnxruntime side by side.

    .venv/bin/python benchmarks/evaluate.py [--data out/demo/lfw-112X96] [--baseline-pairs 600]

Our path extracts each of the 7,701 distinct images once, in batches, with
DataLoader workers, then scores all 6,000 pairs. The original's
evaluation.m loops over the pairs and runs the network on each image of
each pair with its mirror (a batch of 2): 12,000 forward passes. The
baseline is timed on the first --baseline-pairs pairs and scaled to 6,000
(the loop does the same work for every pair). The same extraction is then
timed under bf16 autocast and through onnxruntime (the network exported to
ONNX, as `sphereface export` writes it), with the largest difference of
the onnxruntime features from PyTorch's fp32 ones. Timing needs no trained
weights, so freshly initialised networks are used.
"""

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from common import DATA, machine, need_data
from spherecli.preprocess.align import align_manifests
from spherecli.core.data import load_face, to_chw
from spherecli.preprocess.detect import detect_tree
from spherecli.evaluation.datasets import distinct_images, read_pairs
from spherecli.evaluation.evaluate import evaluate_features
from spherecli.models.export import export
from spherecli.models.features import embed, extract, load_network
from spherecli.core.formats import InputSpec, ModelFile
from spherecli.models import create_model


def per_pair(net, data: Path, pairs, n: int) -> float:
    """Seconds for n pairs the original way."""
    start = time.perf_counter()
    for a, b in zip(pairs.left[:n], pairs.right[:n]):
        for name in (a, b):
            embed(net, to_chw(load_face(str(data / name)))[None])
    return time.perf_counter() - start


def timed(fn, *args, **kw):
    start = time.perf_counter()
    out = fn(*args, **kw)
    return out, time.perf_counter() - start


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", type=Path, help="aligned LFW (made from the bundled LFW if absent)")
    ap.add_argument("--baseline-pairs", type=int, default=600)
    ap.add_argument("--archs", default="sphere4,sphere20,mobilefacenet")
    args = ap.parse_args()
    need_data()
    print(f"machine: {machine()}\n")
    data = args.data
    work = Path(tempfile.mkdtemp())
    if data is None:
        detect_tree(DATA / "lfw", work / "m.jsonl", progress=False)
        align_manifests([work / "m.jsonl"], work / "aligned", no_face="mean", progress=False)
        data = work / "aligned"
    pairs = read_pairs(DATA / "pairs.txt")
    names = distinct_images(pairs)
    paths = [str(data / n) for n in names]
    print("| network | extract 7,701 images, fp32 (s) | bf16 (s) | onnxruntime (s) | onnxruntime vs fp32, "
          "max abs diff | score 6,000 pairs (s) | original per-pair loop (s) | speed-up, fp32 |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for arch in args.archs.split(","):
        torch.manual_seed(0)
        model = create_model(arch).eval()
        ModelFile(arch, model.model_args, model.state_dict(), InputSpec()).save(work / f"{arch}.pt")
        export(work / f"{arch}.pt", work / f"{arch}.onnx")
        fp32 = load_network(work / f"{arch}.pt")
        feats, t_fp32 = timed(extract, fp32, paths, progress=False)
        _, t_bf16 = timed(extract, load_network(work / f"{arch}.pt", amp="bf16"), paths, progress=False)
        onnx, t_onnx = timed(extract, load_network(work / f"{arch}.onnx"), paths, progress=False)
        _, t_score = timed(evaluate_features, feats, {n: i for i, n in enumerate(names)}, pairs)
        base = per_pair(fp32, data, pairs, args.baseline_pairs) * len(pairs.same) / args.baseline_pairs
        total = t_fp32 + t_score
        print(f"| {arch} | {t_fp32:.1f} | {t_bf16:.1f} | {t_onnx:.1f} | {np.abs(onnx - feats).max():.1e} | "
              f"{t_score:.2f} | {base:.0f} (timed on {args.baseline_pairs}) | {base / total:.1f}x |",
              flush=True)


if __name__ == "__main__":
    main()
