import os
import subprocess
import sys

import pytest

from spherecli import UserError
from spherecli.core.parallel import map_batches

# The parent keeps OpenCV's thread pool busy, then aligns with two workers.
# Workers forked from such a process inherit the pool's locks without its
# threads: this is how the whole test suite once hung in CI until killed.
ALIGN_AFTER_OPENCV_THREADS = """
import sys, cv2, numpy as np
from spherecli.preprocess.align import align_manifests
cv2.warpAffine(np.zeros((2000, 2000, 3), np.uint8), np.eye(2, 3), (2000, 2000))
summary = align_manifests([sys.argv[1]], sys.argv[2], root=sys.argv[3], workers=2, progress=False)
print(summary["aligned"])
"""


def test_workers_start_after_the_parent_used_opencv_threads(data, tmp_path):
    lfw = data / "lfw"
    paths = sorted(f"{p.parent.name}/{p.name}" for p in lfw.glob("A*/*.jpg"))[:130]
    # Rough landmarks of the 150x150 LFW crops are enough to exercise the warp.
    points = "55 65 95 65 75 85 60 105 90 105"
    (tmp_path / "l.txt").write_text("".join(f"{p} {points}\n" for p in paths))
    run = subprocess.run([sys.executable, "-c", ALIGN_AFTER_OPENCV_THREADS, str(tmp_path / "l.txt"),
                          str(tmp_path / "out"), str(lfw)],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert int(run.stdout) == len(paths) == len(list((tmp_path / "out").glob("*/*.jpg")))


def test_a_worker_killed_mid_run_is_an_error_not_a_hang():
    # multiprocessing.Pool waits forever for a job whose worker the kernel
    # killed. More jobs than are kept in flight: submitting to the broken
    # pool must fail just as clearly as collecting from it.
    with pytest.raises(UserError, match="worker process stopped unexpectedly"):
        with map_batches(os._exit, [9] * 20, 2, int) as results:
            list(results)


def test_results_of_every_job_come_back_from_the_workers():
    with map_batches(abs, range(-50, 0), 2, int) as results:
        assert sorted(results) == list(range(1, 51))


def test_this_process_works_too_while_the_workers_start():
    limit = sys.getrecursionlimit()
    try:
        # The initializer's mark shows this process was set up as a worker and took jobs.
        with map_batches(abs, range(-50, 0), 2, sys.setrecursionlimit, (limit + 123,),
                         start_here=True) as results:
            assert sorted(results) == list(range(1, 51))
        assert sys.getrecursionlimit() == limit + 123
    finally:
        sys.setrecursionlimit(limit)
