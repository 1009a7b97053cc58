import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from spherecli.images import decode
from spherecli.mtcnn import MTCNN, _crops, _integral, _level, max_pool, nms

# Photos where two overlapping final boxes share O-Net's saturated score, so the face
# returned depends on which of them the last suppression keeps.
TIES = ["lfw/Anthony_Ervin/Anthony_Ervin_0001.jpg", "celeba/10059/190526.jpg",
        "celeba/10112/191841.jpg", "wild/7234/032591.jpg"]


def photos(data, dataset, n):
    return [f"{dataset}/{p.parent.name}/{p.name}" for p in sorted((data / dataset).glob("*/*.jpg"))[:n]]


def test_cascade_equals_facenet_pytorch_on_real_photos(data):
    """Batched by image size here, one photo at a time there: the same faces and landmarks."""
    from facenet_pytorch import MTCNN as FacenetMTCNN

    theirs = FacenetMTCNN(min_face_size=20, thresholds=[0.6, 0.7, 0.9], factor=0.85, keep_all=True,
                          select_largest=False)
    ours = MTCNN()
    names = photos(data, "lfw", 24) + photos(data, "celeba", 24) + photos(data, "wild", 8) + TIES
    images = {n: decode(data / n)[0] for n in names}
    by_size: dict = {}
    for n, image in images.items():
        by_size.setdefault(image.shape, []).append(n)
    found = {}
    for group in by_size.values():
        found.update(zip(group, ours(np.stack([images[n] for n in group]))))
    assert any(len(group) > 1 for group in by_size.values())
    faces = 0
    for n in names:
        boxes, scores, points = theirs.detect(images[n], landmarks=True)
        our_boxes, our_scores, our_points = found[n]
        if boxes is None:
            assert len(our_boxes) == 0, n
            continue
        assert len(our_boxes) == len(boxes), n
        np.testing.assert_allclose(our_points, points.astype(np.float64), atol=2e-3, err_msg=n)
        np.testing.assert_allclose(our_boxes, boxes.astype(np.float64), atol=2e-3, err_msg=n)
        np.testing.assert_allclose(our_scores, scores.astype(np.float64), atol=1e-5, err_msg=n)
        faces += len(boxes)
    assert faces >= len(names) - 2


def test_area_resampling_equals_interpolate_to_the_bit(data):
    image = decode(data / "wild" / TIES[-1].split("/", 1)[1])[0]
    pixels = torch.from_numpy(np.stack([image, image[::-1].copy()]))
    nchw = pixels.permute(0, 3, 1, 2).float()
    h, w = image.shape[:2]
    integral = _integral(pixels)
    for size in ((h * 3 // 5, w * 3 // 5), (37, 51), (12, 12)):
        expected = (F.interpolate(nchw, size=size, mode="area") - 127.5) * 0.0078125
        assert torch.equal(_level(integral, *size), expected)
    rng = np.random.default_rng(0)
    x1, y1 = rng.integers(-20, w - 12, 60), rng.integers(-20, h - 12, 60)
    side = rng.integers(12, 200, 60)
    # Boxes partly outside are clipped; the last one lies wholly outside and is dropped.
    boxes = torch.tensor(np.stack([x1, y1, x1 + side, y1 + side * 1.3, np.ones(60)], 1), dtype=torch.float32)
    boxes = torch.cat([boxes, torch.tensor([[w + 5.0, 10, w + 50, 60, 1]])])
    owner = torch.tensor(rng.integers(0, 2, 61))
    kept, kept_owner, crops = _crops(integral, boxes, owner, 24)
    assert len(kept) == 60 and torch.equal(kept_owner, owner[:60])
    for crop, (bx1, by1, bx2, by2), n in zip(crops, kept[:, :4].trunc().int().tolist(), kept_owner):
        part = nchw[n:n + 1, :, max(by1, 1) - 1:min(by2, h), max(bx1, 1) - 1:min(bx2, w)]
        assert torch.equal(crop[None], (F.interpolate(part, size=(24, 24), mode="area") - 127.5) * 0.0078125)


@pytest.mark.parametrize("shape,k,s", [((3, 28, 22, 22), 3, 2), ((2, 32, 46, 46), 3, 2), ((1, 3, 7, 5), 3, 2),
                                       ((2, 10, 149, 148), 2, 2), ((2, 64, 9, 8), 2, 2)])
def test_max_pool_equals_torch_ceil_mode(shape, k, s):
    x = torch.randn(shape).contiguous(memory_format=torch.channels_last)
    assert torch.equal(max_pool(x, k, s), F.max_pool2d(x, k, s, ceil_mode=True))


def test_nms_keeps_what_torchvision_keeps_image_by_image():
    from torchvision.ops import nms as torchvision_nms

    rng = np.random.default_rng(1)
    corner = rng.uniform(0, 80, (300, 2))
    size = rng.uniform(5, 40, (300, 1))
    score = rng.uniform(0.6, 1, (300, 1)).round(2)  # rounded: equal scores among them
    boxes = torch.tensor(np.hstack([corner, corner + size, score]), dtype=torch.float32)
    owner = torch.tensor(rng.integers(0, 3, 300))
    kept = nms(boxes, owner, 0.5)
    for image in range(3):
        mine = torch.nonzero(owner == image)[:, 0]
        expected = mine[torchvision_nms(boxes[mine, :4], boxes[mine, 4], 0.5)]
        assert torch.equal(kept[owner[kept] == image], expected)


def test_detecting_imports_neither_torchvision_nor_facenet_pytorch():
    # Each worker process imports what detect needs; torchvision alone (through
    # torch._dynamo) took 1.2 s of every detect command's start-up.
    code = ("import sys; import spherecli.detect; from spherecli.mtcnn import MTCNN; MTCNN(); "
            "heavy = ('torchvision', 'facenet_pytorch', 'torch._dynamo'); "
            "print(sorted(m for m in heavy if m in sys.modules))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "[]"
