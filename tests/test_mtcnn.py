import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from spherecli.core.images import decode
from spherecli.preprocess.mtcnn import MTCNN, _crops, _integral, _level, max_pool, nms

# Photos where two overlapping final boxes share O-Net's saturated score, so the face
# returned depends on which of them the last suppression keeps.
TIES = ["lfw/Anthony_Ervin/Anthony_Ervin_0001.jpg", "celeba/10059/190526.jpg",
        "celeba/10112/191841.jpg", "wild/7234/032591.jpg"]


def photos(data, dataset, n):
    return [f"{dataset}/{p.parent.name}/{p.name}" for p in sorted((data / dataset).glob("*/*.jpg"))[:n]]


def test_cascade_equals_facenet_pytorch_on_real_photos(data):
    """Batched across sizes here (padded to the largest), one photo at a time there:
    the same faces and landmarks."""
    from facenet_pytorch import MTCNN as FacenetMTCNN

    theirs = FacenetMTCNN(min_face_size=20, thresholds=[0.6, 0.7, 0.9], factor=0.85, keep_all=True,
                          select_largest=False)
    ours = MTCNN()
    names = photos(data, "lfw", 24) + photos(data, "celeba", 24) + photos(data, "wild", 8) + TIES
    images = {n: decode(data / n)[0] for n in names}
    batches = [names[i:i + 8] for i in range(0, len(names), 8)]
    assert any(len({images[n].shape for n in batch}) > 2 for batch in batches)
    found = {}
    for batch in batches:
        found.update(zip(batch, ours([images[n] for n in batch])))
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
    image = decode(data / TIES[-1])[0].copy()
    h, w = image.shape[:2]
    small = image[:h - 37, :w - 50].copy()  # a second, smaller image, padded in the batch
    pixels = torch.zeros(2, h, w, 3, dtype=torch.uint8)
    pixels[0], pixels[1, :h - 37, :w - 50] = torch.from_numpy(image), torch.from_numpy(small)
    integral = _integral(pixels)
    shapes = [(h, w), (h - 37, w - 50)]
    for scale in (0.6, 0.27, 0.05):
        sizes = [(int(a * scale + 1), int(b * scale + 1)) for a, b in shapes]
        level = _level(integral, torch.tensor([0, 1], dtype=torch.int32),
                       torch.tensor(shapes, dtype=torch.int32), sizes)
        for i, (one, size) in enumerate(zip((image, small), sizes)):
            nchw = torch.from_numpy(one).permute(2, 0, 1)[None].float()
            expected = (F.interpolate(nchw, size=size, mode="area") - 127.5) * 0.0078125
            assert torch.equal(level[i:i + 1, :, :size[0], :size[1]], expected)
    rng = np.random.default_rng(0)
    x1, y1 = rng.integers(-20, w - 62, 60), rng.integers(-20, h - 49, 60)
    side = rng.integers(12, 200, 60)
    # Boxes partly outside are clipped to their own image; the last lies wholly outside
    # the smaller image, inside the padding, and is dropped.
    boxes = torch.tensor(np.stack([x1, y1, x1 + side, y1 + side * 1.3, np.ones(60)], 1), dtype=torch.float32)
    boxes = torch.cat([boxes, torch.tensor([[w - 45.0, 10, w - 5, 60, 1]])])
    owner = torch.tensor(np.r_[rng.integers(0, 2, 60), 1])
    kept, kept_owner, crops = _crops(integral, torch.tensor(shapes, dtype=torch.int32), boxes, owner, 24)
    assert len(kept) == 60 and torch.equal(kept_owner, owner[:60])
    for crop, (bx1, by1, bx2, by2), n in zip(crops, kept[:, :4].trunc().int().tolist(), kept_owner):
        one = torch.from_numpy((image, small)[n]).permute(2, 0, 1)[None].float()
        part = one[:, :, max(by1, 1) - 1:min(by2, shapes[n][0]), max(bx1, 1) - 1:min(bx2, shapes[n][1])]
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
    code = ("import sys; import spherecli.preprocess.detect; from spherecli.preprocess.mtcnn import MTCNN; "
            "MTCNN(); "
            "heavy = ('torchvision', 'facenet_pytorch', 'torch._dynamo'); "
            "print(sorted(m for m in heavy if m in sys.modules))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "[]"
