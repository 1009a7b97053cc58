"""Training throughput: `sphereface train` against a plain eager fp32 loop.

    .venv/bin/python benchmarks/train.py [--iters 30] [--batch-size 64]

Same network, head (A-Softmax m=4), batch and aligned CelebA faces for
both. The baseline is the obvious PyTorch loop: DataLoader decoding JPEGs,
fp32, NCHW. The trainer runs with its defaults (bf16 autocast where the
hardware is fast at it, channels-last) plus --cache. Throughput is taken
after a warm-up of a third of the iterations. On a GPU the same comparison
runs with the GPU's batch size.
"""

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from common import machine, sample_tree
from spherecli.preprocess.align import align_manifests
from spherecli.core.config import TrainConfig
from spherecli.core.data import FaceList
from spherecli.preprocess.detect import detect_tree
from spherecli.models.features import prepare
from spherecli.core.formats import InputSpec, read_list
from spherecli.preprocess.lists import build_list
from spherecli.training.heads import create_head
from spherecli.models import autocast_dtype, create_model
from spherecli.training.train import train


def aligned_list(n: int) -> Path:
    work = Path(tempfile.mkdtemp())
    detect_tree(sample_tree("celeba", n), work / "m.jsonl", progress=False)
    align_manifests([work / "m.jsonl"], work / "aligned", progress=False)
    build_list([work / "aligned"], work / "train.txt")
    return work / "train.txt"


def plain_loop(items, arch, batch, iters, device) -> float:
    classes = max(label for _, label in items) + 1
    model = create_model(arch).to(device)
    head = create_head("asoftmax", model.feature_dim, classes).to(device)
    opt = torch.optim.SGD(list(model.parameters()) + list(head.parameters()), lr=0.01, momentum=0.9)
    keys = [(i % len(items), False) for i in range(batch * iters)]
    loader = DataLoader(FaceList(items), batch_size=batch, sampler=keys, num_workers=2)
    warm = iters // 3
    for i, (x, y) in enumerate(loader):
        if i == warm:
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
        x, y = prepare(x, InputSpec(), device), y.to(device)
        loss = F.cross_entropy(head(model(x), y), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return batch * (iters - warm) / (time.perf_counter() - start)


def trainer(list_path, arch, batch, iters, device) -> tuple[float, str]:
    out = Path(tempfile.mkdtemp()) / "run"
    warm = iters // 3
    cfg = TrainConfig(list=str(list_path), out=str(out), arch=arch, batch_size=batch,
                      max_iter=iters, display=warm, snapshot=10 ** 9, cache=True, workers=2,
                      device=device.type, lr=0.01)
    train(cfg, progress=False)
    rows = [json.loads(line) for line in open(out / "log.jsonl") if '"iter"' in line]
    elapsed = rows[-1]["elapsed_s"] - rows[0]["elapsed_s"]
    dtype = autocast_dtype(cfg.amp, device)
    return batch * (rows[-1]["iter"] - rows[0]["iter"]) / elapsed, "fp32" if dtype is None else str(dtype)[6:]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--archs", default="sphere4,sphere20,mobilefacenet")
    args = ap.parse_args()
    print(f"machine: {machine()}\n")
    list_path = aligned_list(600)
    items = read_list(list_path)
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    print("| device | network | batch | plain fp32 loop (img/s) | sphereface train (img/s) "
          "| precision | speed-up |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for device in devices:
        batch = args.batch_size if device.type == "cpu" else 256
        for arch in args.archs.split(","):
            iters = args.iters if arch != "sphere20" or device.type == "cuda" else max(9, args.iters // 3)
            base = plain_loop(items, arch, batch, iters, device)
            ours, precision = trainer(list_path, arch, batch, iters, device)
            print(f"| {device.type} | {arch} | {batch} | {base:.1f} | {ours:.1f} | {precision} | "
                  f"{ours / base:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
