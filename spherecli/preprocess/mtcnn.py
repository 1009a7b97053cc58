"""MTCNN (Zhang et al., 2016), the face and landmark detector of the original pipeline.

The three networks and their weights are facenet-pytorch's. The weights are read
from its package without importing it: its import pulls in torchvision and
torch._dynamo, 1.2 s in every worker process. The cascade is written here to
batch what facenet-pytorch's `detect_face` does box by box, and otherwise does
the same arithmetic in the same order: tests/test_mtcnn.py holds every face to
facenet-pytorch's own call on real photos (they agree to 1e-4 px).

- The pyramid levels and the R-Net and O-Net crops are area-averaged from one
  integral image per batch, one gather for all the crops of a stage.
  facenet-pytorch calls `interpolate(mode="area")` once per candidate box (26% of
  its time). Both sum whole pixel values exactly and divide alike, so the inputs
  of the networks are equal to the bit.
- Max pooling is computed from strided views, without the indices PyTorch's
  kernel also computes; R-Net and O-Net see a few dozen crops per call.
- Non-maximum suppression runs on all images of a batch at once; a box only
  suppresses boxes of its own image.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch
from torch import nn

# The cascade's constants, as facenet-pytorch (and the original Matlab) set them.
CELL, STRIDE = 12, 2           # P-Net's receptive field and step on the pyramid
PYRAMID_NMS = 0.5              # within one pyramid level
STAGE_NMS = 0.7                # across levels, and after R-Net and O-Net


def _weights(name: str) -> dict:
    spec = importlib.util.find_spec("facenet_pytorch")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("facenet-pytorch is not installed; it provides the MTCNN weights "
                          "(pip install facenet-pytorch==2.5.3)")
    path = Path(spec.submodule_search_locations[0]) / "data" / f"{name}.pt"
    return torch.load(path, map_location="cpu", weights_only=True)


def _prelu_conv(cin: int, cout: int, k: int) -> tuple[nn.Conv2d, nn.PReLU]:
    return nn.Conv2d(cin, cout, k), nn.PReLU(cout)


def max_pool(x: torch.Tensor, k: int, s: int) -> torch.Tensor:
    """`max_pool2d(x, k, s, ceil_mode=True)`, as elementwise maxima of strided views.

    The same values (a maximum is exact), 2-4x faster on a CPU than PyTorch's
    channels-last kernel, which also computes the indices nobody asks for.
    """
    return _max_pool_along(_max_pool_along(x, k, s, 3), k, s, 2)


def _max_pool_along(x: torch.Tensor, k: int, s: int, dim: int) -> torch.Tensor:
    size = -(-(x.shape[dim] - k) // s) + 1
    window = [slice(None)] * x.dim()
    out = None
    for d in range(k):
        window[dim] = slice(d, None, s)
        part = x[tuple(window)]
        if out is None:
            out = part.narrow(dim, 0, size)
        elif part.shape[dim] >= size:
            out = torch.maximum(out, part.narrow(dim, 0, size))
        else:  # with ceil_mode the last window runs past the edge
            out = out.clone() if d == 1 else out
            head = out.narrow(dim, 0, part.shape[dim])
            torch.maximum(head, part, out=head)
    return out


class PNet(nn.Module):
    """Proposal network: fully convolutional over each pyramid level."""

    def __init__(self):
        super().__init__()
        self.conv1, self.prelu1 = _prelu_conv(3, 10, 3)
        self.conv2, self.prelu2 = _prelu_conv(10, 16, 3)
        self.conv3, self.prelu3 = _prelu_conv(16, 32, 3)
        self.conv4_1 = nn.Conv2d(32, 2, 1)
        self.conv4_2 = nn.Conv2d(32, 4, 1)

    def forward(self, x, sizes: list[tuple[int, int]] | None = None):
        """sizes: each image's height and width where the batch pads images to the largest."""
        x = self.prelu1(self.conv1(x))
        # With ceil_mode, pooling cuts its last window at the image's edge: padding must not
        # enter it. What lies further out is never read by a valid output.
        for image, (h, w) in zip(x, sizes or ()):
            image[:, h - 2:] = float("-inf")
            image[:, :, w - 2:] = float("-inf")
        x = self.prelu3(self.conv3(self.prelu2(self.conv2(max_pool(x, 2, 2)))))
        return self.conv4_2(x), self.conv4_1(x).softmax(1)

    @staticmethod
    def output_size(side: int) -> int:
        """Valid outputs along an input side: two 3 x 3 convolutions around a 2 x 2 pool."""
        return -(-(side - 4) // 2) + 1 - 4


class RNet(nn.Module):
    """Refinement network on 24 x 24 crops."""

    def __init__(self):
        super().__init__()
        self.conv1, self.prelu1 = _prelu_conv(3, 28, 3)
        self.conv2, self.prelu2 = _prelu_conv(28, 48, 3)
        self.conv3, self.prelu3 = _prelu_conv(48, 64, 2)
        self.dense4, self.prelu4 = nn.Linear(576, 128), nn.PReLU(128)
        self.dense5_1 = nn.Linear(128, 2)
        self.dense5_2 = nn.Linear(128, 4)

    def forward(self, x):
        x = max_pool(self.prelu1(self.conv1(x)), 3, 2)
        x = max_pool(self.prelu2(self.conv2(x)), 3, 2)
        x = self.prelu3(self.conv3(x))
        # The weights were converted from Caffe, which flattens width-major.
        x = self.prelu4(self.dense4(x.permute(0, 3, 2, 1).reshape(len(x), -1)))
        return self.dense5_2(x), self.dense5_1(x).softmax(1)


class ONet(nn.Module):
    """Output network on 48 x 48 crops: box, five landmarks and score."""

    def __init__(self):
        super().__init__()
        self.conv1, self.prelu1 = _prelu_conv(3, 32, 3)
        self.conv2, self.prelu2 = _prelu_conv(32, 64, 3)
        self.conv3, self.prelu3 = _prelu_conv(64, 64, 3)
        self.conv4, self.prelu4 = _prelu_conv(64, 128, 2)
        self.dense5, self.prelu5 = nn.Linear(1152, 256), nn.PReLU(256)
        self.dense6_1 = nn.Linear(256, 2)
        self.dense6_2 = nn.Linear(256, 4)
        self.dense6_3 = nn.Linear(256, 10)

    def forward(self, x):
        x = max_pool(self.prelu1(self.conv1(x)), 3, 2)
        x = max_pool(self.prelu2(self.conv2(x)), 3, 2)
        x = max_pool(self.prelu3(self.conv3(x)), 2, 2)
        x = self.prelu4(self.conv4(x))
        x = self.prelu5(self.dense5(x.permute(0, 3, 2, 1).reshape(len(x), -1)))
        return self.dense6_2(x), self.dense6_3(x), self.dense6_1(x).softmax(1)


class MTCNN:
    """The three-stage cascade over a batch of RGB images."""

    def __init__(self, min_face: int = 20, thresholds=(0.6, 0.7, 0.9), factor: float = 0.85,
                 device: str | torch.device = "cpu"):
        self.min_face, self.thresholds, self.factor = min_face, tuple(thresholds), factor
        self.device = torch.device(device)
        cpu = self.device.type == "cpu"
        # On a CPU, small calls keep each layer's output in cache: O-Net ran 2.2x faster on
        # 32 crops at a time than on 512, P-Net 1.5x on 4 large pyramid levels than on 16
        # (docs/benchmarks.md). A GPU wants whole batches.
        self.crops_per_call = 32 if cpu else 512
        self.pixels_per_call = 100_000 if cpu else 50_000_000
        self.pnet, self.rnet, self.onet = (self._load(net(), name) for net, name in
                                           ((PNet, "pnet"), (RNet, "rnet"), (ONet, "onet")))

    def _load(self, net: nn.Module, name: str) -> nn.Module:
        net.load_state_dict(_weights(name))
        net.eval().requires_grad_(False).to(self.device)
        if self.device.type == "cpu":
            # On a CPU the channels-last kernels are the fast ones; the layout changes no
            # value beyond float rounding.
            net.to(memory_format=torch.channels_last)
        return net

    def scales(self, height: int, width: int) -> list[float]:
        """The image pyramid: the smallest face maps to P-Net's 12 px cell, then shrinks by
        `factor` while the image's short side still holds a cell."""
        m = CELL / self.min_face
        side, scale, out = min(height, width) * m, m, []
        while side >= CELL:
            out.append(scale)
            scale, side = scale * self.factor, side * self.factor
        return out

    @torch.inference_mode()
    def __call__(self, images: list[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """RGB uint8 images, H x W x 3, of any sizes (each is padded to the largest, so
        similar sizes batch best). Per image: boxes (k x 4, x1 y1 x2 y2), scores (k) and
        landmarks (k x 5 x 2), best first."""
        shapes = [image.shape[:2] for image in images]
        batch = np.zeros((len(images), max(h for h, _ in shapes), max(w for _, w in shapes), 3), np.uint8)
        for padded, image in zip(batch, images):
            padded[:image.shape[0], :image.shape[1]] = image
        # cuDNN's TF32 convolutions, PyTorch's default on a GPU, move the scores enough to
        # change which candidate survives: on an H200 the landmarks of 1 LFW photo in 13
        # then moved by more than 0.1 px (up to 11 px); in full fp32 they agreed with the
        # CPU to 1e-4 px (docs/benchmarks.md). Scoped, so a caller's own setting stands.
        tf32 = torch.backends.cudnn.allow_tf32
        torch.backends.cudnn.allow_tf32 = False
        try:
            integral = _integral(torch.from_numpy(batch).to(self.device))
            image_sizes = torch.tensor(shapes, dtype=torch.int32, device=self.device)
            boxes, owner = self._propose(integral, shapes, image_sizes)
            if len(boxes):
                boxes, owner = self._refine(integral, image_sizes, boxes, owner)
            points = torch.zeros(0, 5, 2)
            if len(boxes):
                boxes, owner, points = self._output(integral, image_sizes, boxes, owner)
        finally:
            torch.backends.cudnn.allow_tf32 = tf32
        boxes, owner, points = boxes.cpu().numpy(), owner.cpu().numpy(), points.cpu().numpy()
        return [(boxes[owner == i, :4], boxes[owner == i, 4], points[owner == i]) for i in range(len(images))]

    def _propose(self, integral: torch.Tensor, shapes: list[tuple[int, int]], image_sizes: torch.Tensor):
        """Stage 1, P-Net over each image's pyramid: candidate boxes (x1 y1 x2 y2 score), squared.
        shapes and image_sizes: the images' heights and widths, as a list and a tensor."""
        depth = [len(self.scales(h, w)) for h, w in shapes]
        scales = self.scales(*max(shapes, key=min))
        found = [torch.zeros(0, 9, device=self.device)]
        groups = [torch.zeros(0, dtype=torch.long, device=self.device)]
        for level_index, scale in enumerate(scales):
            members = [i for i, d in enumerate(depth) if d > level_index]
            level_sizes = [(int(h * scale + 1), int(w * scale + 1)) for h, w in (shapes[i] for i in members)]
            member_index = torch.tensor(members, dtype=torch.int32, device=self.device)
            level = _level(integral, member_index, image_sizes[member_index], level_sizes)
            padded = None if len(set(level_sizes)) == 1 else level_sizes
            step = max(1, self.pixels_per_call // (level.shape[2] * level.shape[3]))
            reg, prob = _chunked(self.pnet, level, step, padded)
            face = prob[:, 1]
            for image, (h, w) in zip(face, padded or ()):
                image[PNet.output_size(h):] = 0
                image[:, PNet.output_size(w):] = 0
            where = (face >= self.thresholds[0]).nonzero()
            cell = where[:, 1:].float().flip(1)
            score = face[where[:, 0], where[:, 1], where[:, 2]]
            offsets = reg.permute(0, 2, 3, 1)[where[:, 0], where[:, 1], where[:, 2]]
            found.append(torch.cat([((STRIDE * cell + 1) / scale).floor(),
                                    ((STRIDE * cell + CELL) / scale).floor(), score[:, None], offsets], 1))
            groups.append(member_index[where[:, 0]].long() * len(scales) + level_index)
        # Suppression within each level of each image, in one call, then across levels.
        boxes, group = torch.cat(found), torch.cat(groups)
        keep = nms(boxes, group, PYRAMID_NMS)
        boxes, owner = boxes[keep], group[keep] // max(1, len(scales))
        keep = nms(boxes, owner, STAGE_NMS)
        boxes, owner = boxes[keep], owner[keep]
        # P-Net's offsets are fractions of the box's side without the +1 of the later stages.
        x1, y1, x2, y2, score = boxes[:, :5].unbind(1)
        bw, bh = x2 - x1, y2 - y1
        boxes = torch.stack([x1 + boxes[:, 5] * bw, y1 + boxes[:, 6] * bh,
                             x2 + boxes[:, 7] * bw, y2 + boxes[:, 8] * bh, score], 1)
        return _square(boxes), owner

    def _refine(self, integral, image_sizes, boxes, owner):
        """Stage 2, R-Net on 24 x 24 crops."""
        boxes, owner, crops = _crops(integral, image_sizes, boxes, owner, 24)
        reg, prob = _chunked(self.rnet, crops, self.crops_per_call)
        score = prob[:, 1]
        ok = score > self.thresholds[1]
        boxes = torch.cat([boxes[ok, :4], score[ok, None]], 1)
        owner, reg = owner[ok], reg[ok]
        keep = nms(boxes, owner, STAGE_NMS)
        return _square(_regress(boxes[keep], reg[keep])), owner[keep]

    def _output(self, integral, image_sizes, boxes, owner):
        """Stage 3, O-Net on 48 x 48 crops: final boxes and landmarks."""
        boxes, owner, crops = _crops(integral, image_sizes, boxes, owner, 48)
        reg, marks, prob = _chunked(self.onet, crops, self.crops_per_call)
        score = prob[:, 1]
        ok = score > self.thresholds[2]
        boxes = torch.cat([boxes[ok, :4], score[ok, None]], 1)
        owner, reg, marks = owner[ok], reg[ok], marks[ok]
        # Landmarks are fractions of the box, pixel-inclusive, in 1-based coordinates.
        bw = boxes[:, 2] - boxes[:, 0] + 1
        bh = boxes[:, 3] - boxes[:, 1] + 1
        points = torch.stack([bw[:, None] * marks[:, :5] + boxes[:, :1] - 1,
                              bh[:, None] * marks[:, 5:] + boxes[:, 1:2] - 1], 2)
        boxes = _regress(boxes, reg)
        keep = nms(boxes, owner, STAGE_NMS, overlap="min")
        return boxes[keep], owner[keep], points[keep]



def _chunked(net: nn.Module, x: torch.Tensor, step: int, sizes: list | None = None) -> tuple:
    """net's outputs over x, `step` items a call (with sizes: P-Net's padded images)."""
    calls = (net(x[i:i + step]) if sizes is None else net(x[i:i + step], sizes[i:i + step])
             for i in range(0, len(x), step))
    return tuple(torch.cat(parts) for parts in zip(*calls))


def _regress(boxes: torch.Tensor, reg: torch.Tensor) -> torch.Tensor:
    """Apply R-Net's or O-Net's box offsets, fractions of the pixel-inclusive side."""
    bw = boxes[:, 2] - boxes[:, 0] + 1
    bh = boxes[:, 3] - boxes[:, 1] + 1
    return torch.stack([boxes[:, 0] + reg[:, 0] * bw, boxes[:, 1] + reg[:, 1] * bh,
                        boxes[:, 2] + reg[:, 2] * bw, boxes[:, 3] + reg[:, 3] * bh, boxes[:, 4]], 1)


def _square(boxes: torch.Tensor) -> torch.Tensor:
    """Each box grown to a square on its long side, about the same centre."""
    x1, y1, x2, y2, score = boxes.unbind(1)
    w, h = x2 - x1, y2 - y1
    side = torch.max(w, h)
    x1 = x1 + w * 0.5 - side * 0.5
    y1 = y1 + h * 0.5 - side * 0.5
    return torch.stack([x1, y1, x1 + side, y1 + side, score], 1)


def _integral(pixels: torch.Tensor) -> torch.Tensor:
    """N x (H+1) x (W+1) x 3 sums of every top-left rectangle, in integers."""
    n, h, w, c = pixels.shape
    dtype = torch.int32 if h * w * 255 < 2 ** 31 else torch.int64
    out = torch.zeros(n, h + 1, w + 1, c, dtype=dtype, device=pixels.device)
    out[:, 1:, 1:] = pixels.to(dtype).cumsum(1).cumsum(2)
    return out


# Area resampling, as `interpolate(mode="area")`, i.e. adaptive average pooling: bin i of
# a side L out of `size` covers [floor(i L / size), ceil((i + 1) L / size)). Its kernel sums
# each bin in floats, which is exact for pixel values; here the sums come from the integral
# image, exact too, and the division is the same (by the bin's height, then its width), so
# the results are equal to the bit.

def _bins(lo: torch.Tensor, hi: torch.Tensor, size: torch.Tensor, count: int):
    """Start and end of bins 0..count-1 of [lo, hi) cut into `size` (all broadcast);
    steps past `size` repeat its last bin, so that padding stays finite."""
    steps = torch.arange(count, dtype=lo.dtype, device=lo.device)
    size = size[..., None]
    steps = torch.minimum(steps, size - 1)
    length = (hi - lo)[..., None]
    return lo[..., None] + steps * length // size, lo[..., None] - (-(steps + 1) * length // size)


def _normalised(sums: torch.Tensor, height: torch.Tensor, width: torch.Tensor) -> torch.Tensor:
    """N x h x w x 3 bin sums -> the networks' input, N x 3 x h x w (channels-last)."""
    return sums.float().div_(height).div_(width).sub_(127.5).mul_(0.0078125).permute(0, 3, 1, 2)


def _gather(integral: torch.Tensor, owner: torch.Tensor, ys, ye, xs, xe) -> torch.Tensor:
    """Sums of the bins (ys..ye) x (xs..xe) of each owner's image: B x h x w x 3."""
    n, hp, wp, c = integral.shape
    rows = owner[:, None] * hp
    top, bottom = ((rows + ys) * wp)[:, :, None], ((rows + ye) * wp)[:, :, None]
    left, right = xs[:, None, :], xe[:, None, :]
    flat = integral.view(-1, c)

    def at(index):
        return flat.index_select(0, index.reshape(-1))

    sums = at(bottom + right) - at(top + right) - at(bottom + left) + at(top + left)
    return sums.view(len(owner), ys.shape[1], xs.shape[1], c)


def _level(integral: torch.Tensor, members: torch.Tensor, shapes: torch.Tensor,
           sizes: list[tuple[int, int]]) -> torch.Tensor:
    """Images `members` (their heights and widths in `shapes`), each area-resampled as a
    whole to its height and width in `sizes`, padded to the largest: one pyramid level.

    Whole rows of the integral image first, then columns: twice the speed of gathering
    the four corners of every bin (`_gather`) on middle-sized levels.
    """
    n, hp, wp, c = integral.shape
    out = torch.tensor(sizes, dtype=torch.int32, device=integral.device)
    zero = torch.zeros_like(shapes[:, 0])
    ys, ye = _bins(zero, shapes[:, 0], out[:, 0], max(h for h, _ in sizes))
    xs, xe = _bins(zero, shapes[:, 1], out[:, 1], max(w for _, w in sizes))
    first = members[:, None] * hp
    rows = integral.view(n * hp, wp * c)
    band = rows.index_select(0, (first + ye).flatten()) - rows.index_select(0, (first + ys).flatten())
    band = band.view(-1, c)
    m, h = ys.shape
    start = (torch.arange(m * h, dtype=torch.int32, device=integral.device) * wp).view(m, h, 1)

    def at(column):
        return band.index_select(0, (start + column[:, None]).flatten())

    sums = (at(xe) - at(xs)).view(m, h, xs.shape[1], c)
    return _normalised(sums, (ye - ys)[:, :, None, None], (xe - xs)[:, None, :, None])


def _crops(integral: torch.Tensor, image_sizes: torch.Tensor, boxes: torch.Tensor, owner: torch.Tensor,
           size: int):
    """Each box's part inside its image, area-resampled to size x size.

    facenet-pytorch resamples one box at a time; here one gather does them all.
    Boxes wholly outside their image are dropped.
    """
    # Truncated, then clipped to the image in 1-based pixels, as facenet-pytorch's `pad`.
    # Indices are int32: index_select takes them 3x faster than int64 on a CPU.
    x1, y1, x2, y2 = boxes[:, :4].trunc().int().unbind(1)
    height, width = image_sizes[owner].unbind(1)
    x1, y1 = x1.clamp(min=1) - 1, y1.clamp(min=1) - 1
    x2, y2 = torch.minimum(x2, width), torch.minimum(y2, height)
    inside = (x2 > x1) & (y2 > y1)
    if not bool(inside.all()):
        boxes, owner, x1, y1, x2, y2 = (t[inside] for t in (boxes, owner, x1, y1, x2, y2))
    cut = torch.tensor(size, dtype=torch.int32, device=boxes.device)
    ys, ye = _bins(y1, y2, cut, size)
    xs, xe = _bins(x1, x2, cut, size)
    sums = _gather(integral, owner.int(), ys, ye, xs, xe)
    return boxes, owner, _normalised(sums, (ye - ys)[:, :, None, None], (xe - xs)[:, None, :, None])


def nms(boxes: torch.Tensor, owner: torch.Tensor, threshold: float, overlap: str = "union") -> torch.Tensor:
    """Greedy non-maximum suppression within each group (image): indices kept, by group, best first.

    "union": intersection over union with areas (x2 - x1)(y2 - y1), as torchvision's nms
    that facenet-pytorch uses in its first two stages. "min": intersection over the
    smaller box, pixel-inclusive (+1), the original MTCNN's last stage. Every round keeps
    the best box left in each image at once, so a batch takes as many rounds as its
    busiest image has boxes to keep, not as all its images together.
    """
    b = boxes[:, :5].cpu().numpy()
    img = owner.cpu().numpy()
    if overlap == "min":
        # Between equal scores (O-Net's saturate at 1 - 1e-7) the box kept is the one
        # facenet-pytorch keeps: its last stage walks numpy's default (unstable) argsort of
        # one image's scores from the end.
        order = np.concatenate([np.zeros(0, np.int64)] + [
            i[np.argsort(b[i, 4])[::-1]] for i in (np.flatnonzero(img == k) for k in np.unique(img))])
    else:
        order = np.lexsort((-b[:, 4], img))  # torchvision's stable sort, image by image
    x1, y1, x2, y2 = b[order, :4].T
    img = img[order]
    one = np.float32(overlap == "min")
    area = (x2 - x1 + one) * (y2 - y1 + one)
    left, kept = np.arange(len(order)), []
    with np.errstate(invalid="ignore", divide="ignore"):
        while len(left):
            first = np.ones(len(left), bool)
            first[1:] = img[left[1:]] != img[left[:-1]]
            best = left[first]
            kept.append(best)
            top = best[np.cumsum(first) - 1]  # each box's best in its image
            w = np.maximum(np.minimum(x2[top], x2[left]) - np.maximum(x1[top], x1[left]) + one, 0)
            h = np.maximum(np.minimum(y2[top], y2[left]) - np.maximum(y1[top], y1[left]) + one, 0)
            inter = w * h
            if overlap == "min":
                iou = inter / np.minimum(area[top], area[left])
            else:
                iou = inter / (area[top] + area[left] - inter)
            left = left[~first & ~(iou > threshold)]
    keep = order[np.sort(np.concatenate(kept))] if kept else np.zeros(0, np.int64)
    return torch.as_tensor(keep, device=boxes.device)
