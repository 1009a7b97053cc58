"""SphereFace networks (Liu et al., CVPR 2017): 4, 10, 20, 36 and 64 layers.

Four stages of 64, 128, 256, 512 channels. Each stage opens with a 3x3
stride-2 convolution (with bias) and continues with residual units of two
3x3 convolutions (no bias) around an identity skip. Every convolution is
followed by a per-channel PReLU; there is no batch normalisation. A fully
connected layer fc5 maps the last feature map to the 512-d face feature.
"""

from __future__ import annotations


import torch
from torch import nn

from spherecli.core.registry import NETWORKS
from spherecli.models.init import caffe_xavier_

CHANNELS = (64, 128, 256, 512)
UNITS = {4: (0, 0, 0, 0), 10: (0, 1, 2, 0), 20: (1, 2, 4, 1), 36: (2, 4, 8, 2), 64: (3, 8, 16, 3)}


class Residual(nn.Module):
    def __init__(self, channels: int, bias: bool = False):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, 1, 1, bias=bias)
        self.prelu1 = nn.PReLU(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=bias)
        self.prelu2 = nn.PReLU(channels)
        for conv in (self.conv1, self.conv2):
            nn.init.normal_(conv.weight, std=0.01)
            if bias:
                nn.init.zeros_(conv.bias)

    def forward(self, x):
        return x + self.prelu2(self.conv2(self.prelu1(self.conv1(x))))


class SphereNet(nn.Module):
    """residual_bias gives the residual convolutions a bias: the original fixes
    theirs at zero, but PyTorch ports (clcarwin's sphere20a) trained them."""

    def __init__(self, units=(1, 2, 4, 1), input_size=(112, 96), feature_dim: int = 512,
                 residual_bias: bool = False):
        super().__init__()
        layers, cin = [], 3
        for cout, n in zip(CHANNELS, units):
            conv = nn.Conv2d(cin, cout, 3, 2, 1, bias=True)
            caffe_xavier_(conv.weight)
            nn.init.zeros_(conv.bias)
            layers += [conv, nn.PReLU(cout)] + [Residual(cout, residual_bias) for _ in range(n)]
            cin = cout
        self.features = nn.Sequential(*layers)
        h, w = input_size
        for _ in CHANNELS:  # each stride-2 stage: n -> ceil(n / 2)
            h, w = (h + 1) // 2, (w + 1) // 2
        self.fc5 = nn.Linear(cin * h * w, feature_dim)
        caffe_xavier_(self.fc5.weight)
        nn.init.zeros_(self.fc5.bias)
        self.model_args = {"input_size": [int(v) for v in input_size], "feature_dim": feature_dim}
        if residual_bias:
            self.model_args["residual_bias"] = True
        self.feature_dim = feature_dim

    def forward_features(self, x):
        return self.features(x)

    def forward_head(self, x):
        return self.fc5(torch.flatten(x, 1))

    def forward(self, x):
        return self.forward_head(self.forward_features(x))


@NETWORKS.register
def sphere4(**kw) -> SphereNet:
    """SphereFace-4: four stride-2 convolutions, no residual units."""
    return SphereNet(UNITS[4], **kw)


@NETWORKS.register
def sphere10(**kw) -> SphereNet:
    """SphereFace-10."""
    return SphereNet(UNITS[10], **kw)


@NETWORKS.register
def sphere20(**kw) -> SphereNet:
    """SphereFace-20, the released model's network."""
    return SphereNet(UNITS[20], **kw)


@NETWORKS.register
def sphere36(**kw) -> SphereNet:
    """SphereFace-36."""
    return SphereNet(UNITS[36], **kw)


@NETWORKS.register
def sphere64(**kw) -> SphereNet:
    """SphereFace-64, the network of the paper's margin table."""
    return SphereNet(UNITS[64], **kw)
