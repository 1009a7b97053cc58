import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from spherecli import UserError
from spherecli.training.heads import (ASoftmax, ArcFace, CosFace, Softmax, SphereFace2, SphereFaceR,
                                     create_head, hyperspherical_energy, psi)
from spherecli.core.registry import HEADS


@pytest.mark.parametrize("m", [1, 2, 3, 4])
def test_target_logit_is_the_piecewise_psi_on_every_branch(m):
    """(lambda |x| cos + |x| psi) / (1 + lambda), psi = (-1)^k cos(m theta) - 2k on [k pi/m, (k+1) pi/m]."""
    torch.manual_seed(m)
    # lambda = 3 throughout
    head = ASoftmax(2, 3, margin=m, lambda_base=3.0, lambda_gamma=0.0, lambda_min=0.0).double().eval()
    w0 = F.normalize(head.weight[0].detach(), dim=0)
    # Angles across all m branches (avoiding the exact boundaries), radius 2.5.
    theta = torch.tensor([(k + f) * math.pi / m for k in range(m) for f in (0.1, 0.5, 0.9)],
                         dtype=torch.double)
    base_angle = torch.atan2(w0[1], w0[0])
    x = 2.5 * torch.stack([torch.cos(base_angle + theta), torch.sin(base_angle + theta)], 1)
    logits = head(x, torch.zeros(len(x), dtype=torch.long))
    k = torch.floor(theta * m / math.pi)
    expected_psi = (-1) ** k * torch.cos(m * theta) - 2 * k
    expected = (3 * 2.5 * torch.cos(theta) + 2.5 * expected_psi) / 4
    torch.testing.assert_close(logits[:, 0], expected, rtol=1e-9, atol=1e-9)
    # The other classes get the plain inner product with the normalised weight.
    w = F.normalize(head.weight.detach(), dim=1)
    torch.testing.assert_close(logits[:, 1:], x @ w[1:].t())


def test_psi_is_continuous_and_decreasing():
    c = torch.linspace(1, -1, 20001, dtype=torch.double)
    for m in (1, 2, 3, 4):
        p, _ = psi(c, m)
        assert (p[1:] <= p[:-1] + 1e-9).all(), f"psi not monotonic for m={m}"
        assert p[-1].item() == pytest.approx(-2 * m + 1)


def test_lambda_schedule_at_known_iterations():
    head = ASoftmax(4, 3)  # base 1000, gamma 0.12, power 1, lambda_min 5
    assert head.lambda_at(1) == pytest.approx(1000 / 1.12)
    assert head.lambda_at(100) == pytest.approx(1000 / 13)
    assert head.lambda_at(1658) == pytest.approx(1000 / (1 + 0.12 * 1658))
    assert head.lambda_at(1659) == 5.0 and head.lambda_at(28000) == 5.0
    held = ASoftmax(4, 3, lambda_hold=400)
    assert held.lambda_at(400) == 1000 and held.lambda_at(401) == pytest.approx(1000 / 1.12)
    # Training forwards count iterations from 1, as the original increments before use.
    x, y = torch.randn(2, 4), torch.tensor([0, 1])
    head.train()
    head(x, y)
    assert head.last_lambda == pytest.approx(1000 / 1.12)
    head(x, y)
    assert int(head.iteration) == 2 and head.last_lambda == pytest.approx(1000 / 1.24)
    head.eval()
    head(x, y)
    assert int(head.iteration) == 2


def caffe_quadruple_grad(x, w, label, lam, top_diff):
    """The Caffe layer's m=4 backward, written out by hand in numpy."""
    wn = w / np.linalg.norm(w, axis=1, keepdims=True)
    grad_x = top_diff @ wn
    norm = np.linalg.norm(x)
    c = wn[label] @ x / norm
    sign_0 = np.sign(c)
    sign_3 = sign_0 * np.sign(2 * c * c - 1)
    sign_4 = 2 * sign_0 + sign_3 - 3
    coeff_w = sign_3 * (32 * c ** 3 - 16 * c)
    coeff_x = -1 / norm * (sign_3 * (24 * c ** 4 - 8 * c ** 2 - 1) - sign_4)
    coeff_norm = math.sqrt(coeff_w ** 2 + coeff_x ** 2)
    g = top_diff[label]
    grad_x += -g * wn[label] + lam / (1 + lam) * g * wn[label]
    grad_x += g / (1 + lam) * (coeff_w / coeff_norm * wn[label] + coeff_x / coeff_norm * x)
    grad_w = np.outer(top_diff, x)
    return grad_x, grad_w


@pytest.mark.parametrize("angle", [0.3, 1.0, 2.0, 2.8])
def test_original_backward_matches_the_hand_derived_caffe_gradient(angle):
    w = np.array([[1.0, 0.0, 0.0], [0.2, 1.5, -0.3], [-0.7, 0.1, 0.9]])
    x = 2.0 * np.array([math.cos(angle), math.sin(angle), 0.4])
    top_diff = np.array([0.3, -0.8, 0.5])
    head = ASoftmax(3, 3, margin=4, lambda_base=7.0, lambda_gamma=0.0, lambda_min=0.0,
                    backward="original").double().eval()
    with torch.no_grad():
        head.weight.copy_(torch.from_numpy(w))
    xt = torch.tensor(x[None], requires_grad=True)
    logits = head(xt, torch.tensor([0]))
    logits.backward(torch.tensor(top_diff[None]))
    gx, gw = caffe_quadruple_grad(x, w, 0, 7.0, top_diff)
    np.testing.assert_allclose(xt.grad[0].numpy(), gx, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(head.weight.grad.numpy(), gw, rtol=1e-10, atol=1e-12)
    # The forward pass renormalised the stored weights in place, as Caffe does.
    np.testing.assert_allclose(head.weight.detach().norm(dim=1).numpy(), 1.0)


@pytest.mark.parametrize("m", [1, 2, 3, 4])
def test_exact_backward_is_the_true_gradient(m):
    torch.manual_seed(0)
    head = ASoftmax(6, 4, margin=m, lambda_base=2.0, lambda_gamma=0.0, lambda_min=0.0,
                    backward="exact").double().eval()
    x = torch.randn(5, 6, dtype=torch.double, requires_grad=True)
    y = torch.randint(0, 4, (5,))
    assert torch.autograd.gradcheck(lambda x: head(x, y), (x,))
    # Both modes give the same forward values.
    original = ASoftmax(6, 4, margin=m, lambda_base=2.0, lambda_gamma=0.0, lambda_min=0.0,
                        backward="original").double().eval()
    original.load_state_dict(head.state_dict())
    torch.testing.assert_close(original(x, y), head(x, y))


@pytest.mark.parametrize("name, settings", [(name, {}) for name in HEADS.names if name != "asoftmax"]
                         + [("asoftmax", {"backward": b}) for b in ("original", "exact")])
def test_no_nan_for_zero_features_or_cos_at_plus_minus_one(name, settings):
    torch.manual_seed(0)
    head = create_head(name, 4, 3, **settings)
    # Class weights along the axes: the features below sit at cos = 1 and cos = -1 to them.
    weight = head.fc.weight if isinstance(head, Softmax) else head.weight
    with torch.no_grad():
        weight.copy_(torch.eye(3, 4))
    x = torch.tensor([[0.0, 0, 0, 0], [2.0, 0, 0, 0], [-3.0, 0, 0, 0], [0, 1e-30, 0, 0]],
                     requires_grad=True)
    y = torch.tensor([0, 0, 0, 1])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = head(x, y)
    assert logits.dtype == torch.float32
    loss = head.loss(logits, y)
    loss.backward()
    assert torch.isfinite(logits).all() and torch.isfinite(x.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in head.parameters())


def test_cosface_and_arcface_margins():
    torch.manual_seed(0)
    x, y = torch.randn(4, 8), torch.tensor([0, 1, 2, 0])
    cos_head = CosFace(8, 3, scale=30.0, margin=0.35)
    arc_head = ArcFace(8, 3, scale=30.0, margin=0.5)
    arc_head.weight = cos_head.weight
    cos = F.normalize(x) @ F.normalize(cos_head.weight).t()
    target = cos.gather(1, y[:, None])[:, 0]
    torch.testing.assert_close(cos_head(x, y).gather(1, y[:, None])[:, 0], 30 * (target - 0.35))
    theta = torch.acos(target)
    expected = torch.where(theta + 0.5 < math.pi, torch.cos(theta + 0.5),
                           target - math.sin(math.pi - 0.5) * 0.5)
    torch.testing.assert_close(arc_head(x, y).gather(1, y[:, None])[:, 0], 30 * expected)
    other = torch.ones_like(cos, dtype=torch.bool).scatter(1, y[:, None], False)
    torch.testing.assert_close(arc_head(x, y)[other], 30 * cos[other])


def test_bad_head_options():
    with pytest.raises(UserError, match="1, 2, 3 or 4"):
        create_head("asoftmax", 4, 3, margin=1.5)
    with pytest.raises(UserError, match="unknown head"):
        create_head("sphereloss", 4, 3)
    with pytest.raises(UserError, match=r"cosface head does not take lambda_hold \(it takes: scale, "):
        create_head("cosface", 4, 3, lambda_hold=400)
    with pytest.raises(UserError, match="at least 1"):
        create_head("spherefacer", 4, 3, margin=0.5)
    with pytest.raises(UserError, match="between 0 and 1"):
        create_head("sphereface2", 4, 3, positive_weight=1.0)
    with pytest.raises(UserError, match="mhe_distance must be one of euclidean, angular"):
        create_head("asoftmax", 4, 3, mhe=1.0, mhe_distance="geodesic")


def test_every_head_setting_is_a_training_option():
    """The flags and [head] keys of config.HEAD_SETTINGS are exactly what the heads take."""
    from spherecli.core.config import HEAD_SETTINGS
    from spherecli.training.heads import head_settings

    taken = {option for name in HEADS.names for option in head_settings(name)}
    assert taken == set(HEAD_SETTINGS)


def _at_angles(weight, theta, radius=2.5):
    """Features at the given angles from the first class weight, in the plane of the first two axes."""
    w0 = F.normalize(weight[0].detach(), dim=0)
    base = torch.atan2(w0[1], w0[0])
    return radius * torch.stack([torch.cos(base + theta), torch.sin(base + theta)], 1)


@pytest.mark.parametrize("version", ["v0", "v1"])
@pytest.mark.parametrize("m", [1.0, 1.5, 1.7, 4.0])
def test_sphereface_r_target_logit_is_the_papers_margin(version, m):
    """SphereFace-R (HFN): s psi(theta_y) with psi = (-1)^k cos(m theta) - 2k, k = floor(m theta / pi)
    (v0), or cos(min(m theta, pi)) (v1); the other classes s cos theta."""
    torch.manual_seed(0)
    head = SphereFaceR(2, 3, scale=30.0, margin=m, version=version).double().eval()
    theta = torch.linspace(0.05, math.pi - 0.05, 23, dtype=torch.double)
    x = _at_angles(head.weight, theta.double())
    logits = head(x, torch.zeros(len(x), dtype=torch.long))
    if version == "v0":
        k = torch.floor(m * theta / math.pi)
        expected = (-1) ** k * torch.cos(m * theta) - 2 * k
    else:
        expected = torch.cos(torch.clamp(m * theta, max=math.pi))
    torch.testing.assert_close(logits[:, 0], 30 * expected, rtol=1e-9, atol=1e-9)
    w = F.normalize(head.weight.detach(), dim=1)
    torch.testing.assert_close(logits[:, 1:], 30 * F.normalize(x, dim=1) @ w[1:].t())


def test_sphereface_r_gradient_is_the_detached_one():
    """Characteristic gradient detachment: the gradient of SphereFace-R's logits is that of s cos theta
    (autograd of the literal formula), not that of s psi(theta)."""
    torch.manual_seed(1)
    head = SphereFaceR(6, 4, scale=30.0, margin=1.5).double().train()
    x = torch.randn(5, 6, dtype=torch.double, requires_grad=True)
    y = torch.randint(0, 4, (5,))
    upstream = torch.randn(5, 4, dtype=torch.double)
    (head(x, y) * upstream).sum().backward()
    x2 = x.detach().clone().requires_grad_(True)
    w2 = head.weight.detach().clone().requires_grad_(True)
    cos = (x2 / x2.norm(dim=1, keepdim=True)) @ (w2 / w2.norm(dim=1, keepdim=True)).t()
    (30 * cos * upstream).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad)
    torch.testing.assert_close(head.weight.grad, w2.grad)
    # ... while autograd of psi itself would differ: the detachment is what is tested.
    x3 = x.detach().clone().requires_grad_(True)
    c = ((x3 / x3.norm(dim=1, keepdim=True)) @ (w2.detach() / w2.detach().norm(dim=1, keepdim=True)).t())
    theta = torch.acos(c.gather(1, y[:, None]).clamp(-1 + 1e-9, 1 - 1e-9))
    k = torch.floor(1.5 * theta / math.pi).detach()
    psi_y = (-1) ** k * torch.cos(1.5 * theta) - 2 * k
    (30 * c.scatter(1, y[:, None], psi_y) * upstream).sum().backward()
    assert not torch.allclose(x3.grad, x.grad)


def _sphereface2_literal(cos, y, r=40.0, m=0.4, lam=0.7, t=3.0, lw=50.0, b=0.0):
    """The paper's loss, face by face and class by class."""
    total = 0.0
    for i in range(len(cos)):
        for j in range(len(cos[i])):
            g = 2 * ((cos[i][j] + 1) / 2) ** t - 1
            if j == y[i]:
                total += lam / r * math.log(1 + math.exp(-(r * (g - m) + b)))
            else:
                total += (1 - lam) / r * math.log(1 + math.exp(r * (g + m) + b))
    return lw * total / len(cos)


def test_sphereface2_loss_is_the_papers_formula():
    torch.manual_seed(2)
    head = SphereFace2(6, 5).double()
    with torch.no_grad():
        head.bias.fill_(-3.0)
    x = torch.randn(4, 6, dtype=torch.double, requires_grad=True)
    y = torch.tensor([0, 3, 3, 4])
    loss = head.loss(head(x, y), y)
    cos = (F.normalize(x, dim=1) @ F.normalize(head.weight, dim=1).t()).detach()
    assert loss.item() == pytest.approx(_sphereface2_literal(cos.tolist(), y.tolist(), b=-3.0), rel=1e-9)
    # The gradient is that of r cos in the logits (detached adjustment and margin): dL/dcos_yj is
    # lw lambda sigma(-z) for the target, lw (1 - lambda) sigma(z) for the others, through cos.
    loss.backward()
    z = head(x, y).detach()
    target = F.one_hot(y, 5).bool()
    dcos = torch.where(target, -50 * 0.7 * torch.sigmoid(-z), 50 * 0.3 * torch.sigmoid(z)) / len(y)
    x2 = x.detach().clone().requires_grad_(True)
    (((F.normalize(x2, dim=1) @ F.normalize(head.weight.detach(), dim=1).t()) * dcos).sum()).backward()
    torch.testing.assert_close(x.grad, x2.grad)
    assert head.bias.grad.item() == pytest.approx(dcos.sum().item() / 40, rel=1e-9)


def test_sphereface2_bias_starts_where_its_gradient_is_zero():
    """With every cosine 0, the target's pull on b equals the 999 others' push."""
    head = SphereFace2(1_001, 1_000).double()
    with torch.no_grad():
        head.weight.copy_(torch.eye(1_000, 1_001, dtype=torch.double))
    x = torch.zeros(3, 1_001, dtype=torch.double)
    x[:, -1] = 1.0  # orthogonal to every class weight
    y = torch.tensor([0, 5, 999])
    logits = head(x, y)
    head.loss(logits, y).backward()
    # Each side alone pulls with lw lambda sigma(-z_y) / r, about 0.87; b is held in fp32.
    pull = 50 * 0.7 * torch.sigmoid(-logits[0, 0]).item() / 40
    assert pull > 0.5 and abs(head.bias.grad.item()) < 1e-6 * pull
    assert head.loss(logits, y).item() == pytest.approx(head.chance_loss(1_000), rel=1e-6)


def _energy_literal(w, rows, power, distance, half_space):
    w = [v / np.linalg.norm(v) for v in w]
    terms = []
    for i in rows:
        for j in range(len(w)):
            if j == i:
                continue
            for sign in ((1, -1) if half_space else (1,)):
                if distance == "angular":
                    d = math.acos(max(-1.0, min(1.0, float(np.dot(w[i], sign * w[j])))))
                else:
                    d = float(np.linalg.norm(w[i] - sign * w[j]))
                terms.append(math.log(1 / d) if power == 0 else d ** -power)
    return sum(terms) / len(terms)


@pytest.mark.parametrize("power", [0.0, 1.0, 2.0])
@pytest.mark.parametrize("distance", ["euclidean", "angular"])
@pytest.mark.parametrize("half_space", [False, True])
def test_hyperspherical_energy_is_the_papers_sum(power, distance, half_space):
    """MHE: the mean of d^-s (log 1/d for s = 0) over pairs of distinct unit class weights, by
    Euclidean distance or angle, over all pairs or the batch's classes against all."""
    rng = np.random.default_rng(3)
    w = rng.normal(size=(5, 3))
    weight = torch.tensor(w)
    everything = hyperspherical_energy(weight, None, power, distance, half_space)
    literal = _energy_literal(w, range(5), power, distance, half_space)
    assert everything.item() == pytest.approx(literal, rel=1e-9)
    labels = torch.tensor([4, 1, 1])
    batch = hyperspherical_energy(weight, labels, power, distance, half_space)
    assert batch.item() == pytest.approx(_energy_literal(w, [4, 1, 1], power, distance, half_space), rel=1e-9)


def test_mhe_adds_its_weighted_energy_and_pushes_the_weights_apart():
    torch.manual_seed(4)
    x, y = torch.randn(6, 8), torch.tensor([0, 1, 2, 0, 1, 2])
    plain = create_head("asoftmax", 8, 3)
    plus = create_head("asoftmax", 8, 3, mhe=0.5)
    plus.load_state_dict(plain.state_dict())
    assert plain.regulariser is None
    energy = hyperspherical_energy(plus.weight, y)
    torch.testing.assert_close(plus.loss(plus(x, y), y), plain.loss(plain(x, y), y) + 0.5 * energy)
    assert plus.metrics()["mhe"] == pytest.approx(energy.item(), abs=1e-5)
    # A step down the energy alone spreads the class weights: the energy falls.
    weight = plus.weight.detach().clone().requires_grad_(True)
    hyperspherical_energy(weight, None).backward()
    moved = weight.detach() - 0.1 * weight.grad
    assert hyperspherical_energy(moved, None) < hyperspherical_energy(weight, None)


@pytest.mark.parametrize("name", HEADS.names)
def test_chance_loss_is_the_loss_when_every_cosine_is_zero(name):
    """What the stall watch compares the loss with: a network that tells no face from another
    (A-Softmax's ln C holds while lambda is large, as when the watch starts)."""
    head = create_head(name, 9, 8, **({"lambda_base": 1e12} if name == "asoftmax" else {})).double()
    weight = head.class_weights()
    with torch.no_grad():
        weight.copy_(torch.eye(8, 9, dtype=torch.double))
        if isinstance(head, Softmax):
            head.fc.bias.zero_()
    x = torch.zeros(4, 9, dtype=torch.double)
    x[:, -1] = 3.0  # orthogonal to every class weight
    y = torch.tensor([0, 2, 5, 7])
    assert head.loss(head(x, y), y).item() == pytest.approx(head.chance_loss(8), rel=1e-6)
