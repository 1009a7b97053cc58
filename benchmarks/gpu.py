"""The GPU check: every GPU question of docs/benchmarks.md answered by one command.

    # on the development machine: pack what the check reads (about 60 MB; the device tool carries 64 MiB)
    .venv/bin/python benchmarks/gpu.py --pack out/gpu-bundle --lfw-aligned out/demo/lfw-112X96 \
        --celeba-list out/demo/celeba-112X96.txt
    # on the GPU machine (make gpu-check does both steps here when a GPU is local)
    PYTHONPATH=.:out/gpu-bundle/site python3 benchmarks/gpu.py --bundle out/gpu-bundle --out results/
    # back here: the table into docs/benchmarks.md (a rerun's --steps after a fix listed last)
    .venv/bin/python benchmarks/gpu.py --record results/gpu.json [rerun/gpu.json]

What it measures, each step on its own (a failing step is recorded and the next runs):
- the machine: device, driver, torch and CUDA versions;
- SphereFace-20 training images/s at batch 256 on synthetic inputs (10,575 classes,
  as CASIA-WebFace): fp32, bf16, fp16 (with loss scaling), each with and without
  channels-last, then torch.compile of the best; peak memory; the trainer's step
  against a plain fp32 loop in the same run;
- the real trainer through torchrun (one process per GPU: NCCL, DDP, the checkpoint
  on rank 0) for a few hundred iterations on aligned CelebA faces read from the
  decoded-image cache file; the loss must fall;
- MTCNN detect on the GPU over LFW photos, images/s, and its landmarks against the
  CPU's on the same photos;
- evaluate's feature extraction on the GPU, images/s, and LFW accuracy against the
  CPU's with the same network;
- JPEG decoding of aligned crops on the GPU (torchvision.io.decode_jpeg in batches)
  against the CPU;
- SphereFace+'s MHE term at 10,575 classes, forward and backward: the paper's mini-batch
  form (the batch's classes against all) and all C^2 pairs, against the network's
  training step in the same run.
`--device cpu --tiny` runs every step small on the CPU: the test suite does, so the
check cannot rot before a GPU comes.
"""

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from spherecli.core.config import TrainConfig  # noqa: E402
from spherecli.core.formats import ImageList, InputSpec, read_list  # noqa: E402
from spherecli.training.heads import create_head, hyperspherical_energy  # noqa: E402
from spherecli.models import create_model  # noqa: E402
from spherecli.training.train import Trainee, Trainer  # noqa: E402

CASIA_CLASSES = 10575


# --------------------------------------------------------------------------- the bundle

def pack(bundle: Path, lfw_aligned: Path, pairs: Path, celeba_list: Path, lfw_raw: Path | None,
         raw_images: int = 1000, celeba_people: int = 150, quality: int = 85) -> dict:
    """What the check reads, small enough to travel: LFW's aligned crops and pairs, a
    slice of the CelebA training list, LFW photos for the detector, and facenet-pytorch
    (the GPU machine has torch but not it)."""
    import cv2

    def copy_jpeg(src: Path, dst: Path):
        dst.parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(dst), cv2.imread(str(src)), [cv2.IMWRITE_JPEG_QUALITY, quality])

    shutil.rmtree(bundle, ignore_errors=True)
    for src in sorted(lfw_aligned.rglob("*.jpg")):
        copy_jpeg(src, bundle / "lfw-aligned" / src.relative_to(lfw_aligned))
    shutil.copy(pairs, bundle / "pairs.txt")
    items = read_list(celeba_list)
    keep = sorted({label for _, label in items})[:celeba_people]
    lines = []
    for path, label in items:
        if label in keep:
            rel = Path(path).relative_to(Path(path).parents[1])
            copy_jpeg(Path(path), bundle / "celeba" / rel)
            lines.append(f"celeba/{rel.as_posix()} {keep.index(label)}")
    (bundle / "celeba.txt").write_text("\n".join(lines) + "\n")
    if lfw_raw is not None:
        for src in sorted(lfw_raw.rglob("*.jpg"))[:raw_images]:
            dst = bundle / "lfw-raw" / src.relative_to(lfw_raw)
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(src, dst)
    import facenet_pytorch
    shutil.copytree(Path(facenet_pytorch.__file__).parent, bundle / "site" / "facenet_pytorch",
                    ignore=shutil.ignore_patterns("__pycache__"))
    size = sum(f.stat().st_size for f in bundle.rglob("*") if f.is_file())
    return {"bundle": str(bundle), "megabytes": round(size / 2 ** 20, 1), "celeba_images": len(lines)}


# --------------------------------------------------------------------------- the steps

def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def machine_info(device) -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version(), "cpu_cores": os.cpu_count(), "device": str(device)}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["gpus"] = torch.cuda.device_count()
        info["gpu_memory_gb"] = round(torch.cuda.get_device_properties(device).total_memory / 2 ** 30, 1)
        try:
            query = ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]
            info["driver"] = subprocess.run(query, capture_output=True, text=True, timeout=30).stdout.strip()
        except OSError:
            info["driver"] = None
    return info


def training_speed(device, arch: str, batch: int, iters: int, classes: int) -> list[dict]:
    """Images/s of the trainer's step in each precision and layout, and of a plain loop."""
    rows = []
    x_all = torch.randint(0, 256, (4, batch, 3, 112, 96), dtype=torch.uint8, device=device)
    y_all = torch.randint(0, classes, (4, batch), device=device)
    warm = max(2, iters // 4)

    def timed(step) -> tuple[float, float]:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        for i in range(warm):
            step(x_all[i % 4], y_all[i % 4])
        sync(device)
        start = time.perf_counter()
        for i in range(iters):
            step(x_all[i % 4], y_all[i % 4])
        sync(device)
        speed = batch * iters / (time.perf_counter() - start)
        peak = torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else None
        return speed, peak

    speed, peak = timed(plain_loop(device, arch, classes))
    rows.append({"what": "plain loop", "precision": "fp32", "channels_last": False, "compile": False,
                 "images_per_s": round(speed, 1), "peak_gb": peak and round(peak, 2)})

    def trainer(amp, channels_last, compiled=False):
        torch.manual_seed(0)
        cfg = TrainConfig(arch=arch, amp=amp, channels_last=channels_last, batch_size=batch, lr=0.01,
                          warmup=0, max_iter=10 ** 6, device=device.type, compile=compiled)
        trainee = Trainee(create_model(arch), create_head("asoftmax", 512, classes)).to(device)
        if channels_last:
            trainee.to(memory_format=torch.channels_last)
        return Trainer(cfg, trainee, InputSpec(), ImageList([""] * classes, range(classes)), device=device)

    for amp in ("none", "bf16", "fp16"):
        for channels_last in (False, True):
            t = trainer(amp, channels_last)
            speed, peak = timed(lambda x, y, t=t: t.step(x, y))
            rows.append({"what": "trainer", "precision": "fp32" if amp == "none" else amp,
                         "channels_last": channels_last, "compile": False, "images_per_s": round(speed, 1),
                         "peak_gb": peak and round(peak, 2)})
            del t
    best = max((r for r in rows if r["what"] == "trainer"), key=lambda r: r["images_per_s"])
    start = time.perf_counter()
    t = trainer("none" if best["precision"] == "fp32" else best["precision"], best["channels_last"], True)
    speed, peak = timed(lambda x, y: t.step(x, y))
    rows.append({**best, "compile": True, "images_per_s": round(speed, 1), "peak_gb": peak and round(peak, 2),
                 "compile_and_warm_up_s": round(time.perf_counter() - start, 1)})
    return rows


def plain_loop(device, arch: str, classes: int):
    """The obvious PyTorch training step: fp32, NCHW, the input scaled inline."""
    torch.manual_seed(0)
    model, head = create_model(arch).to(device), create_head("asoftmax", 512, classes).to(device)
    opt = torch.optim.SGD(list(model.parameters()) + list(head.parameters()), lr=0.01, momentum=0.9)

    def step(x, y):
        loss = torch.nn.functional.cross_entropy(head(model((x.float() - 127.5) / 128), y), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return step


def mhe_cost(device, arch: str, batch: int, iters: int, classes: int) -> list[dict]:
    """Milliseconds per iteration of SphereFace+'s energy term, forward and backward, beside the
    fp32 training step of the network and A-Softmax head it regularises."""
    def timed(step) -> tuple[float, float | None]:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        step()
        sync(device)
        start = time.perf_counter()
        for _ in range(iters):
            step()
        sync(device)
        peak = torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else None
        return (time.perf_counter() - start) / iters * 1000, peak

    x = torch.randint(0, 256, (batch, 3, 112, 96), dtype=torch.uint8, device=device)
    y = torch.randint(0, classes, (batch,), device=device)
    network_step = plain_loop(device, arch, classes)
    ms_network, peak = timed(lambda: network_step(x, y))
    rows = [{"what": f"{arch} + A-Softmax training step (fp32)", "ms": round(ms_network, 2),
             "peak_gb": peak and round(peak, 2)}]
    weight = torch.randn(classes, 512, device=device, requires_grad=True)
    for pairs, labels in (("batch", y), ("all", None)):
        def energy(labels=labels):
            weight.grad = None
            hyperspherical_energy(weight, labels).backward()
        ms, peak = timed(energy)
        rows.append({"what": f"MHE, {pairs} pairs", "ms": round(ms, 2), "peak_gb": peak and round(peak, 2),
                     "share_of_step": round(ms / ms_network, 4)})
    return rows


def ddp_training(bundle: Path, work: Path, device, arch: str, batch: int, iters: int) -> dict:
    """The real trainer under torchrun, one process per GPU, from the cache file."""
    nproc = torch.cuda.device_count() if device.type == "cuda" else 1
    run = work / "ddp-run"
    shutil.rmtree(run, ignore_errors=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "spherecli", "train", "--list", str(bundle / "celeba.txt"), "--out", str(run),
           "--cache-file", str(work / "celeba-cache.npy"), "--arch", arch, "--batch-size", str(batch),
           "--max-iter", str(iters), "--lr", "0.1", "--warmup", str(max(1, iters // 10)), "--lr-steps",
           "0.7", "--clip-grad", "5", "--lambda-hold", str(iters), "--display", str(max(1, iters // 20)),
           "--snapshot", str(max(1, iters // 2)), "--device", device.type, "--workers", "4", "-q"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(bundle / "site"),
                                                        os.environ.get("PYTHONPATH", "")])}
    start = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    seconds = time.perf_counter() - start
    log = run / "log.jsonl"
    rows = [json.loads(line) for line in open(log) if '"iter"' in line] if log.exists() else []
    result = {"processes": nproc, "returncode": r.returncode, "seconds": round(seconds, 1),
              "iterations": rows[-1]["iter"] if rows else 0, "first_loss": rows[0]["loss"] if rows else None,
              "last_loss": rows[-1]["loss"] if rows else None,
              "images_per_s": round(float(np.median([x["images_per_s"] for x in rows[2:]] or [0])), 1),
              "checkpoint": (run / "checkpoint.pt").exists(), "model": (run / "model.pt").exists()}
    result["loss_fell"] = bool(rows) and rows[-1]["loss"] < 0.7 * rows[0]["loss"]
    if r.returncode:
        result["stderr"] = r.stderr[-6000:]
    return result


def detection(bundle: Path, work: Path, device) -> dict:
    """MTCNN on the device over the LFW photos, and its landmarks against the CPU's."""
    from spherecli.preprocess.detect import detect_tree
    from spherecli.core.formats import read_manifest

    photos = bundle / "lfw-raw"
    gpu = detect_tree(photos, work / "lfw-gpu.landmarks.jsonl", device=device.type, progress=False)
    cpu = detect_tree(photos, work / "lfw-cpu.landmarks.jsonl", device="cpu", progress=False)

    def marks(path):
        return {r["path"]: np.array(r["landmarks"]) for r in read_manifest(path)[1] if r["status"] == "ok"}
    a, b = marks(work / "lfw-gpu.landmarks.jsonl"), marks(work / "lfw-cpu.landmarks.jsonl")
    common = sorted(set(a) & set(b))
    diff = np.array([np.abs(a[p] - b[p]).max() for p in common]) if common else np.zeros(1)
    return {"images": gpu["images"], "images_per_s": gpu["images_per_s"],
            "cpu_images_per_s": cpu["images_per_s"],
            "faces_device": len(a), "faces_cpu": len(b), "compared": len(common),
            "landmarks_max_diff_px": round(float(diff.max()), 4),
            "landmarks_over_0.1_px": int((diff > 0.1).sum())}


def extraction(bundle: Path, device, arch: str, workers: int, limit: int | None) -> dict:
    """evaluate's features on the device (fp32, bf16) and on the CPU, with one network."""
    from spherecli.evaluation.datasets import distinct_images, read_pairs
    from spherecli.evaluation.evaluate import evaluate_features
    from spherecli.models.features import TorchNetwork, extract

    pairs = read_pairs(bundle / "pairs.txt")
    if limit:  # the tiny run: the pairs among the first images only, in two folds
        keep = set(distinct_images(pairs)[:limit])
        chosen = [i for i, (a, b) in enumerate(zip(pairs.left, pairs.right)) if a in keep and b in keep]
        pairs.left, pairs.right = [pairs.left[i] for i in chosen], [pairs.right[i] for i in chosen]
        pairs.same, pairs.folds = pairs.same[chosen], 2
    names = distinct_images(pairs)
    paths = [str(bundle / "lfw-aligned" / n) for n in names]
    torch.manual_seed(0)
    module = create_model(arch).eval()
    result = {"network": f"{arch}, seeded random weights", "images": len(paths)}
    runs = (("device_fp32", device, "none"), ("device_bf16", device, "bf16"), ("cpu_fp32", "cpu", "none"))
    for name, dev, amp in runs:
        net = TorchNetwork(module, InputSpec(), arch, device=str(dev), amp=amp)
        extract(net, paths[:64], workers=0, progress=False)  # warm up
        sync(torch.device(dev))
        start = time.perf_counter()
        feats = extract(net, paths, workers=workers, progress=False)
        sync(torch.device(dev))
        accuracy = evaluate_features(feats, {n: i for i, n in enumerate(names)}, pairs)["mean"]
        result[name] = {"images_per_s": round(len(paths) / (time.perf_counter() - start), 1),
                        "accuracy": round(100 * accuracy, 3)}
    diff = abs(result["device_fp32"]["accuracy"] - result["cpu_fp32"]["accuracy"])
    result["accuracy_diff_points"] = round(diff, 3)
    return result


def jpeg_decoding(bundle: Path, device, n: int) -> dict:
    """Aligned crops decoded on the device in batches, against OpenCV on one CPU core."""
    import cv2
    from torchvision.io import decode_jpeg

    files = sorted((bundle / "lfw-aligned").rglob("*.jpg"))[:n]
    data = [np.fromfile(f, np.uint8) for f in files]
    cv2.setNumThreads(1)
    start = time.perf_counter()
    for d in data:
        cv2.imdecode(d, cv2.IMREAD_COLOR)
    cpu = len(data) / (time.perf_counter() - start)
    result = {"images": len(data), "cpu_one_core_images_per_s": round(cpu, 1)}
    if device.type == "cuda":
        tensors = [torch.from_numpy(d) for d in data]
        decode_jpeg(tensors[:256], device=device)
        sync(device)
        start = time.perf_counter()
        for i in range(0, len(tensors), 256):
            decode_jpeg(tensors[i:i + 256], device=device)
        sync(device)
        result["device_images_per_s"] = round(len(data) / (time.perf_counter() - start), 1)
    return result


# --------------------------------------------------------------------------- the report

def markdown(report: dict) -> str:
    m = report.get("machine", {})
    lines = [f"GPU check of {report['date']}: {m.get('gpu', m.get('device'))} (driver {m.get('driver')}, "
             f"{m.get('gpu_memory_gb')} GB), torch {m.get('torch')}, CUDA {m.get('cuda')}, "
             f"cuDNN {m.get('cudnn')}, "
             f"Python {m.get('python')}, {m.get('cpu_cores')} CPU cores. `{report['command']}`", ""]
    if "training_speed" in report and isinstance(report["training_speed"], list):
        lines += ["SphereFace-20 training step, batch 256, A-Softmax over 10,575 classes, synthetic "
                  "inputs:", "",
                  "| loop | precision | channels-last | torch.compile | images/s | peak memory (GB) |",
                  "| --- | --- | --- | --- | --- | --- |"]
        for r in report["training_speed"]:
            extra = f" ({r['compile_and_warm_up_s']} s to compile)" if "compile_and_warm_up_s" in r else ""
            lines.append(f"| {r['what']} | {r['precision']} | {'yes' if r['channels_last'] else 'no'} | "
                         f"{'yes' + extra if r['compile'] else 'no'} | {r['images_per_s']} | "
                         f"{r['peak_gb']} |")
        lines.append("")
    if isinstance(report.get("mhe_cost"), list):
        lines += ["SphereFace+'s energy term over 10,575 classes, 512-d, forward and backward, "
                  "batch 256:", "",
                  "| what | ms per iteration | share of the training step | peak memory (GB) |",
                  "| --- | --- | --- | --- |"]
        lines += [f"| {r['what']} | {r['ms']} | {r.get('share_of_step', '')} | {r['peak_gb']} |"
                  for r in report["mhe_cost"]]
        lines.append("")
    for key, title in (("ddp_training", "The real trainer under torchrun"), ("detection", "MTCNN detect"),
                       ("extraction", "evaluate's feature extraction"), ("jpeg_decoding", "JPEG decoding")):
        if key in report:
            numbers = ", ".join(f"{k} {v}" for k, v in report[key].items()
                                if k not in ("stderr", "traceback"))
            lines.append(f"- {title}: {numbers}")
    return "\n".join(lines) + "\n"


def record(results: list[Path], docs: Path = ROOT / "docs" / "benchmarks.md") -> None:
    """Put a GPU check's table into docs/benchmarks.md, between its markers."""
    text = docs.read_text()
    begin, end = "<!-- gpu-check -->", "<!-- /gpu-check -->"
    report: dict = {}
    for path in results:
        later = json.loads(path.read_text())
        if report:
            later["command"] = f"{report['command']}`, then `{later['command']}"
        report.update(later)
    table = markdown(report)
    if begin in text:
        text = text[:text.index(begin) + len(begin)] + "\n" + table + text[text.index(end):]
    else:
        text += f"\n## GPU check\n\n{begin}\n{table}{end}\n"
    docs.write_text(text)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pack", type=Path, help="write the bundle here and stop")
    ap.add_argument("--lfw-aligned", type=Path)
    ap.add_argument("--celeba-list", type=Path)
    ap.add_argument("--lfw-raw", type=Path, default=ROOT.parent / "shared" / "data" / "lfw")
    ap.add_argument("--pairs", type=Path, default=ROOT.parent / "shared" / "data" / "pairs.txt")
    ap.add_argument("--bundle", type=Path)
    ap.add_argument("--out", type=Path, default=Path("gpu-check"))
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="every step small (the test suite's run)")
    ap.add_argument("--steps", help="comma-separated: run only these steps (a rerun after a fix)")
    ap.add_argument("--record", type=Path, nargs="+",
                    help="put these gpu.json files' table into --docs and stop (a later file's steps win)")
    ap.add_argument("--docs", type=Path, default=ROOT / "docs" / "benchmarks.md")
    args = ap.parse_args()
    if args.record:
        record(args.record, args.docs)
        return
    if args.pack:
        print(json.dumps(pack(args.pack, args.lfw_aligned, args.pairs, args.celeba_list,
                              args.lfw_raw if args.lfw_raw.is_dir() else None)))
        return
    device = torch.device(args.device)
    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="gpu-check-"))  # caches and checkpoints: not results
    tiny = args.tiny
    report = {"date": time.strftime("%Y-%m-%d"), "command": " ".join(sys.argv)}
    steps = {
        "machine": lambda: machine_info(device),
        # tiny: batches of 2, since fp16 on a CPU runs at about one image a second
        "training_speed": lambda: training_speed(device, "sphere4" if tiny else "sphere20",
                                                 2 if tiny else 256, 2 if tiny else 30,
                                                 50 if tiny else CASIA_CLASSES),
        "ddp_training": lambda: ddp_training(args.bundle, work, device, "sphere4" if tiny else "sphere20",
                                             8 if tiny else 256, 12 if tiny else 300),
        "detection": lambda: detection(args.bundle, work, device),
        "extraction": lambda: extraction(args.bundle, device, "sphere4", 0 if tiny else 8,
                                         40 if tiny else None),
        "jpeg_decoding": lambda: jpeg_decoding(args.bundle, device, 64 if tiny else 7701),
        "mhe_cost": lambda: mhe_cost(device, "sphere4" if tiny else "sphere20", 2 if tiny else 256,
                                     1 if tiny else 10, 50 if tiny else CASIA_CLASSES),
    }
    wanted = args.steps.split(",") if args.steps else list(steps)
    for name in wanted:
        step = steps[name]
        start = time.perf_counter()
        try:
            report[name] = step()
        except Exception as e:  # noqa: BLE001 - one broken step must not cost the others' numbers
            report[name] = {"failed": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-3000:]}
        print(f"{name}: {time.perf_counter() - start:.1f} s", flush=True)
        (args.out / "gpu.json").write_text(json.dumps(report, indent=1) + "\n")
    (args.out / "gpu.md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
