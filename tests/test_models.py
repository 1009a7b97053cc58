import math

import pytest
import torch

from spherecli.models import count_parameters, create_model
from spherecli.core.registry import NETWORKS
from spherecli.training.heads import create_head
from spherecli.training.train import Trainee


@pytest.mark.parametrize("arch", NETWORKS.names)
def test_feature_shape_and_rebuild_from_model_args(arch):
    model = create_model(arch)
    x = torch.zeros(2, 3, 112, 96)
    assert model(x).shape == (2, model.feature_dim)
    assert model.forward_features(x).shape[-2:] == (7, 6)
    again = create_model(arch, **model.model_args)
    assert again.state_dict().keys() == model.state_dict().keys()
    square = create_model(arch, input_size=(112, 112), feature_dim=64)
    assert square(torch.zeros(2, 3, 112, 112)).shape == (2, 64)


def test_sphereface_embedding_layer():
    assert create_model("sphere20").fc5.in_features == 512 * 7 * 6 == 21504


def test_mobilefacenet_size():
    # The paper: 0.99 M parameters, a 128-d feature from a 7x6 global depthwise filter.
    model = create_model("mobilefacenet")
    assert count_parameters(model) == pytest.approx(0.99e6, rel=0.01)
    assert model.linear7.conv.kernel_size == (7, 6) and model.feature_dim == 128


def test_parameter_counts():
    # SphereFace-20 is about 22.7 M parameters, fc5 (21,504 x 512) included.
    assert count_parameters(create_model("sphere20")) == pytest.approx(22.7e6, rel=0.005)
    fc5 = 21504 * 512 + 512
    # Residual units add 2 x (9 C^2 + C PReLU slopes) each.
    units = sum(n * 2 * (9 * c * c + c) for n, c in zip((1, 2, 4, 1), (64, 128, 256, 512)))
    stages = sum(9 * cin * c + c + c for cin, c in zip((3, 64, 128, 256), (64, 128, 256, 512)))
    assert count_parameters(create_model("sphere20")) == fc5 + units + stages
    assert create_model("sphere20", input_size=(112, 112)).fc5.in_features == 512 * 7 * 7


def test_original_initialisation():
    torch.manual_seed(0)
    model = create_model("sphere20")
    stage = model.features[0]
    bound = math.sqrt(3 / (3 * 9))  # Caffe xavier: U(+-sqrt(3 / fan_in))
    assert stage.weight.abs().max() <= bound and stage.weight.abs().max() > 0.95 * bound
    assert (stage.bias == 0).all() and (model.fc5.bias == 0).all()
    residual = model.features[2].conv1
    assert residual.weight.std().item() == pytest.approx(0.01, rel=0.05) and residual.bias is None
    assert all((m.weight == 0.25).all() for m in model.modules() if isinstance(m, torch.nn.PReLU))


def test_biases_get_double_lr_and_no_decay():
    model = Trainee(create_model("sphere4"), create_head("softmax", 512, 10))
    decay, bias = model.param_groups(5e-4, caffe_rules=True)
    assert (decay["lr_mult"], decay["weight_decay"]) == (1.0, 5e-4)
    assert (bias["lr_mult"], bias["weight_decay"]) == (2.0, 0.0)
    assert len(bias["params"]) == 6  # four stage convolutions, fc5 and the softmax layer
    plain = model.param_groups(5e-4, caffe_rules=False)
    assert len(plain) == 1 and len(plain[0]["params"]) == len(list(model.parameters()))
