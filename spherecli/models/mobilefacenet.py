"""MobileFaceNet (Chen et al., 2018): the field's CPU-sized face network, about 1 M parameters.

A MobileNetV2 body (inverted residual bottlenecks of depthwise 3x3
convolutions, batch normalisation, PReLU) followed by a global depthwise
convolution ("GDC", `linear7`, one 7x6 filter per channel) and a linear
1x1 convolution to the 128-d feature. Module names follow the widely
used PyTorch implementation (Xiaoccer/MobileFaceNet_Pytorch), so that its
published CASIA-WebFace checkpoint loads key for key.
"""

from __future__ import annotations

import math

from torch import nn

from spherecli.core.registry import NETWORKS

# (expansion t, channels c, repeats n, first stride s), the paper's Table 1.
BOTTLENECKS = ((2, 64, 5, 2), (4, 128, 1, 2), (2, 128, 6, 1), (4, 128, 1, 2), (2, 128, 2, 1))


class ConvBlock(nn.Module):
    def __init__(self, cin: int, cout: int, kernel, stride: int, padding: int, depthwise: bool = False,
                 linear: bool = False):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride, padding, groups=cin if depthwise else 1,
                              bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.prelu = None if linear else nn.PReLU(cout)

    def forward(self, x):
        x = self.bn(self.conv(x))
        return x if self.prelu is None else self.prelu(x)


class Bottleneck(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expansion: int):
        super().__init__()
        mid = cin * expansion
        self.shortcut = stride == 1 and cin == cout
        self.conv = nn.Sequential(
            nn.Conv2d(cin, mid, 1, 1, 0, bias=False), nn.BatchNorm2d(mid), nn.PReLU(mid),
            nn.Conv2d(mid, mid, 3, stride, 1, groups=mid, bias=False), nn.BatchNorm2d(mid), nn.PReLU(mid),
            nn.Conv2d(mid, cout, 1, 1, 0, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        return x + self.conv(x) if self.shortcut else self.conv(x)


class MobileFaceNet(nn.Module):
    # Its depthwise convolutions run 1.26x faster through onnxruntime than in eager
    # PyTorch on a CPU, with the same features (docs/benchmarks.md, 'evaluate').
    cpu_runtime = "onnxruntime"

    def __init__(self, input_size=(112, 96), feature_dim: int = 128):
        super().__init__()
        self.conv1 = ConvBlock(3, 64, 3, 2, 1)
        self.dw_conv1 = ConvBlock(64, 64, 3, 1, 1, depthwise=True)
        blocks, cin = [], 64
        for t, c, n, s in BOTTLENECKS:
            for i in range(n):
                blocks.append(Bottleneck(cin, c, s if i == 0 else 1, t))
                cin = c
        self.blocks = nn.Sequential(*blocks)
        self.conv2 = ConvBlock(cin, 512, 1, 1, 0)
        h, w = input_size
        for _ in range(4):  # four stride-2 layers: n -> ceil(n / 2)
            h, w = (h + 1) // 2, (w + 1) // 2
        self.linear7 = ConvBlock(512, 512, (h, w), 1, 0, depthwise=True, linear=True)
        self.linear1 = ConvBlock(512, feature_dim, 1, 1, 0, linear=True)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, std=math.sqrt(2.0 / fan_out))
        self.model_args = {"input_size": [int(v) for v in input_size], "feature_dim": feature_dim}
        self.feature_dim = feature_dim

    def forward_features(self, x):
        return self.conv2(self.blocks(self.dw_conv1(self.conv1(x))))

    def forward_head(self, x):
        return self.linear1(self.linear7(x)).flatten(1)

    def forward(self, x):
        return self.forward_head(self.forward_features(x))


@NETWORKS.register
def mobilefacenet(input_size=(112, 96), feature_dim: int = 128) -> MobileFaceNet:
    """MobileFaceNet: depthwise bottlenecks, global depthwise conv, 128-d (about 1 M parameters)."""
    return MobileFaceNet(input_size, feature_dim)
