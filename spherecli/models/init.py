"""Weight initialisation shared by networks and heads."""

import math

import torch


def caffe_xavier_(tensor: torch.Tensor) -> torch.Tensor:
    """Caffe's "xavier" filler: uniform on +-sqrt(3 / fan_in).

    Not torch's xavier_uniform_, which averages fan_in and fan_out.
    """
    fan_in = tensor[0].numel()
    bound = math.sqrt(3.0 / fan_in)
    with torch.no_grad():
        return tensor.uniform_(-bound, bound)
