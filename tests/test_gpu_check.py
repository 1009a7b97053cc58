"""benchmarks/gpu.py, the one command that answers the GPU questions, run small on the CPU
so that it cannot rot before a GPU comes."""

import json
import os
import shutil
import subprocess
import sys

import cv2

from conftest import DATA, ROOT, write_synthetic_faces

GPU_CHECK = [sys.executable, str(ROOT / "benchmarks" / "gpu.py")]


def test_gpu_check_runs_every_step_on_the_cpu(synthetic_list, tmp_path):
    aligned = write_synthetic_faces(tmp_path / "faces", people=6, per_person=8, seed=3)
    people = sorted(os.listdir(aligned))
    lfw = tmp_path / "lfw-aligned"
    for p in people:
        (lfw / p).mkdir(parents=True)
        for i, f in enumerate(sorted(os.listdir(aligned / p)), 1):
            shutil.copy(aligned / p / f, lfw / p / f"{p}_{i:04d}.jpg")
    lines = []
    for k in range(2):
        lines += [f"{people[k]} {2 * i + 1} {2 * i + 2}" for i in range(3)]
        lines += [f"{people[k + 2]} {i + 1} {people[k + 4]} {i + 1}" for i in range(3)]
    (tmp_path / "pairs.txt").write_text("2\t3\n" + "\n".join(lines) + "\n")
    raw = tmp_path / "raw"
    if (DATA / "lfw").is_dir():
        for src in sorted((DATA / "lfw").glob("A*/*.jpg"))[:6]:
            (raw / src.parent.name).mkdir(parents=True, exist_ok=True)
            shutil.copy(src, raw / src.parent.name / src.name)
    else:
        for p in people:
            (raw / p).mkdir(parents=True)
            photo = cv2.resize(cv2.imread(str(lfw / p / f"{p}_0001.jpg")), (150, 150))
            cv2.imwrite(str(raw / p / "1.jpg"), photo)
    bundle, out = tmp_path / "bundle", tmp_path / "out"
    subprocess.run(GPU_CHECK + ["--pack", str(bundle), "--lfw-aligned", str(lfw), "--celeba-list",
                                str(synthetic_list), "--pairs", str(tmp_path / "pairs.txt"), "--lfw-raw",
                                str(raw)], check=True, capture_output=True)
    assert (bundle / "site" / "facenet_pytorch" / "data" / "onet.pt").is_file()
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{bundle / 'site'}"}
    r = subprocess.run(GPU_CHECK + ["--bundle", str(bundle), "--out", str(out), "--device", "cpu",
                                    "--tiny"], capture_output=True, text=True, env=env, timeout=600)
    print(r.stdout)
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads((out / "gpu.json").read_text())
    failed = {k: v["failed"] for k, v in report.items() if isinstance(v, dict) and "failed" in v}
    assert not failed, failed
    speeds = report["training_speed"]
    assert {(r["precision"], r["channels_last"]) for r in speeds if r["what"] == "trainer"} == \
        {(p, c) for p in ("fp32", "bf16", "fp16") for c in (False, True)}
    assert speeds[-1]["compile"] and all(r["images_per_s"] > 0 for r in speeds)
    ddp = report["ddp_training"]
    assert ddp["returncode"] == 0 and ddp["iterations"] == 12 and ddp["checkpoint"] and ddp["model"]
    assert report["detection"]["landmarks_over_0.1_px"] == 0
    assert report["extraction"]["accuracy_diff_points"] == 0.0
    assert [r["what"] for r in report["mhe_cost"]][1:] == ["MHE, batch pairs", "MHE, all pairs"]
    assert all(r["ms"] > 0 for r in report["mhe_cost"])
    # A rerun of one step after a fix, recorded over the first run's.
    r = subprocess.run(GPU_CHECK + ["--bundle", str(bundle), "--out", str(out / "rerun"), "--device", "cpu",
                                    "--tiny", "--steps", "ddp_training"], capture_output=True, text=True,
                       env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert set(json.loads((out / "rerun" / "gpu.json").read_text())) == {"date", "command", "ddp_training"}
    docs = tmp_path / "benchmarks.md"
    docs.write_text("# Benchmarks\n")
    record = GPU_CHECK + ["--record", str(out / "gpu.json"), str(out / "rerun" / "gpu.json"),
                          "--docs", str(docs)]
    subprocess.run(record, check=True)
    subprocess.run(record, check=True)
    text = docs.read_text()
    assert text.count("<!-- gpu-check -->") == 1 and "| trainer | bf16 |" in text
    assert "--steps ddp_training" in text and "MTCNN detect" in text and "| MHE, all pairs |" in text
