"""A dry run at CASIA-WebFace's size on this machine: what the stages cost in time and
memory when the tree has 10,575 identities and 494,414 images.

    .venv/bin/python benchmarks/casia.py --faces out/demo/celeba-112X96 [--work out/casia-dry]

The tree is made of hard links to a few real aligned faces (almost no disk). Each
step runs in a fresh process, so its peak memory is its own:
- list: walking the tree and writing the training list;
- dataset: reading the list, checking every image exists, the epoch sampler;
- train: building SphereFace-20 with a 10,575-class A-Softmax head and running a
  few iterations (batch 64 here: the time per image is what scales);
- resume: the same run continued from its checkpoint;
- manifest: a detect manifest of every image (written here, with landmarks), then
  what `detect` does before it detects (reading it, the resume scan) and what
  `align` does before it warps (reading it, skipping crops that exist).
"""

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
IDENTITIES, IMAGES = 10575, 494414


def build_tree(faces: Path, tree: Path) -> None:
    """CASIA's shape: 10,575 folders, 494,414 images, the first folders one image larger."""
    if (tree / ".complete").exists():
        return
    sources = sorted(faces.rglob("*.jpg"))[:64]
    per, extra = divmod(IMAGES, IDENTITIES)
    n = 0
    for i in range(IDENTITIES):
        folder = tree / f"{i:07d}"
        folder.mkdir(parents=True, exist_ok=True)
        for j in range(per + (i < extra)):
            target = folder / f"{j + 1:03d}.jpg"
            if not target.exists():
                os.link(sources[n % len(sources)], target)
            n += 1
    (tree / ".complete").write_text(str(n))


def step(name: str, work: Path) -> dict:
    """One step, in this process; returns what it made."""
    tree, lst = work / "CASIA-WebFace-112X96", work / "casia.txt"
    if name == "list":
        from spherecli.preprocess.lists import build_list
        s = build_list([tree], lst, exclude={"0166921", "1056413", "1193098"})
        return {"identities": s["identities"], "images": s["images"]}
    if name == "dataset":
        from spherecli.core.data import EpochBatches, check_images
        from spherecli.core.formats import read_list
        items, _ = check_images(read_list(lst), str(lst), False)
        sampler = EpochBatches(len(items), 256, seed=0, stop=2)
        first = next(iter(sampler))
        return {"items": len(items), "batch": len(first)}
    if name in ("train", "resume"):
        from spherecli.core.config import load_config, resolve
        from spherecli.training.train import launch
        run = work / "run"
        overrides = {"list": str(lst), "out": str(run), "arch": "sphere20", "batch_size": 64, "workers": 2,
                     "max_iter": 3 if name == "train" else 5, "snapshot": 3, "display": 1, "device": "cpu"}
        if name == "train":
            shutil.rmtree(run, ignore_errors=True)
            cfg, resuming = load_config(None, overrides), False
        else:
            cfg, resuming = resolve(None, overrides, True)
        start = time.perf_counter()
        last = launch(cfg, resuming, progress=False)
        rows = [json.loads(x) for x in open(run / "log.jsonl") if '"iter"' in x]
        return {"iterations": last["iter"], "loop_s": round(time.perf_counter() - start, 1),
                "images_per_s": rows[-1]["images_per_s"], "resumed": resuming}
    if name == "manifest":
        from spherecli.preprocess.align import align_manifests
        from spherecli.preprocess.detect import DetectSettings, _resume_state
        from spherecli.core.formats import JsonlAppender, manifest_header
        manifest = work / "casia.landmarks.jsonl"
        header = manifest_header(work / "photos", DetectSettings().as_json())
        if not manifest.exists():
            out = JsonlAppender(manifest)
            out.write([header])
            marks = [[30.3, 51.7], [65.5, 51.5], [48.0, 71.7], [33.5, 92.4], [62.7, 92.2]]
            rels = [f"{p.parent.name}/{p.name}" for p in sorted(tree.glob("*/*.jpg"))]
            for i in range(0, len(rels), 10000):
                out.write({"type": "image", "path": r, "identity": r[:7], "width": 96, "height": 112,
                           "orientation": 1, "faces": 1, "status": "ok", "box": [1, 1, 95, 111],
                           "score": 0.99, "landmarks": marks} for r in rels[i:i + 10000])
            out.close()
        start = time.perf_counter()
        done = _resume_state(manifest, header, False)
        resume_s = time.perf_counter() - start
        start = time.perf_counter()
        counts = align_manifests([manifest], tree, root=str(tree), progress=False)
        return {"records": len(done), "detect_resume_scan_s": round(resume_s, 1),
                "align_bookkeeping_s": round(time.perf_counter() - start, 1), "existing": counts["existing"]}
    raise SystemExit(f"unknown step {name}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--faces", type=Path, help="aligned faces to link to")
    ap.add_argument("--work", type=Path, default=ROOT / "out" / "casia-dry")
    ap.add_argument("--step", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.step:
        start = time.perf_counter()
        made = step(args.step, args.work)
        made["seconds"] = round(time.perf_counter() - start, 1)
        made["peak_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
        print(json.dumps(made))
        return
    start = time.perf_counter()
    build_tree(args.faces, args.work / "CASIA-WebFace-112X96")
    print(f"tree: {time.perf_counter() - start:.0f} s\n")
    print("| step | seconds | peak memory (MB) | what |")
    print("| --- | --- | --- | --- |")
    for name in ("list", "dataset", "train", "resume", "manifest"):
        r = subprocess.run([sys.executable, __file__, "--step", name, "--work", str(args.work)],
                           capture_output=True, text=True)
        if r.returncode:
            print(f"| {name} | failed | | {r.stderr.strip().splitlines()[-1]} |")
            continue
        made = json.loads(r.stdout.strip().splitlines()[-1])
        seconds, peak = made.pop("seconds"), made.pop("peak_mb")
        what = ", ".join(f"{k} {v}" for k, v in made.items())
        print(f"| {name} | {seconds} | {peak} | {what} |", flush=True)


if __name__ == "__main__":
    main()
