"""Classification heads ("margin heads") that turn face features into logits.

Every head has the same interface: `head(features, labels) -> logits`, to be
fed to ordinary softmax cross-entropy; the margin, if any, is applied to
the target class's logit. Heads compute in fp32 whatever the autocast
state, because cos(m theta) polynomials and margins lose their meaning in
half precision.

A head's settings are its constructor's keyword arguments, named as the
training options are (`margin`, `scale`, `lambda_hold`, ...), so the
config's head table is passed to it as it is and a setting it does not
take is an error. To add a head, write a class here, decorate it with
`@HEADS.register` and declare its name in spherecli/core/registry.py.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from spherecli.core.errors import UserError
from spherecli.core.registry import A_SOFTMAX_BACKWARD, HEADS
from spherecli.models.init import caffe_xavier_

EPS = 1e-12


def _fp32(fn):
    """Run a head's forward in fp32 even inside an autocast region."""
    def forward(self, features, labels):
        with torch.autocast(features.device.type, enabled=False):
            return fn(self, features.to(torch.promote_types(features.dtype, torch.float32)), labels)
    forward.__doc__ = fn.__doc__
    return forward


class Head(nn.Module):
    """What the trainer asks of every head besides its forward pass."""

    def metrics(self) -> dict:
        """Numbers of the last forward pass worth logging (A-Softmax: lambda)."""
        return {}


@HEADS.register
class Softmax(Head):
    """Plain softmax: an inner product with bias (the paper's baseline)."""

    def __init__(self, feature_dim: int, num_classes: int):
        super().__init__()
        self.fc = nn.Linear(feature_dim, num_classes)
        caffe_xavier_(self.fc.weight)
        nn.init.zeros_(self.fc.bias)

    @_fp32
    def forward(self, features, labels):
        return self.fc(features)


def chebyshev(c: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """T_m(c) = cos(m theta) and its derivative m U_{m-1}(c), for c = cos(theta)."""
    t_prev, t = torch.ones_like(c), c
    u_prev, u = torch.zeros_like(c), torch.ones_like(c)  # U_{-1}, U_0
    for _ in range(m - 1):
        t_prev, t = t, 2 * c * t - t_prev
        u_prev, u = u, 2 * c * u - u_prev
    return t, m * u


def psi(c: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """psi(theta) = (-1)^k cos(m theta) - 2k on [k pi/m, (k+1) pi/m], and d psi / d cos.

    k comes from sign tests against cos(j pi / m), not from arccos, as in
    the original layer; at the interval ends psi is continuous so the test
    direction does not matter.
    """
    k = torch.zeros_like(c)
    for j in range(1, m):
        k = k + (c < math.cos(j * math.pi / m)).to(c.dtype)
    sign = 1 - 2 * torch.remainder(k, 2)
    t, dt = chebyshev(c, m)
    return sign * t - 2 * k, sign * dt


def margin_logits(x, weight, labels, lam: float, m: int):
    """A-Softmax logits: x.w_j for every class, (lambda |x| cos + |x| psi) / (1 + lambda)
    for the target; and (|x|, cos, psi, d psi / d cos) of the target, for the Caffe backward."""
    logits = x @ weight.t()
    norm = x.norm(dim=1).clamp_min(EPS)
    c = (logits.gather(1, labels[:, None])[:, 0] / norm).clamp(-1, 1)
    p, dp = psi(c, m)
    target = (lam * norm * c + norm * p) / (1 + lam)
    return logits.scatter(1, labels[:, None], target[:, None]), (norm, c, p, dp)


class _CaffeMarginProduct(torch.autograd.Function):
    """A-Softmax logits with the original Caffe layer's backward pass.

    Forward: margin_logits. Backward, as MarginInnerProductLayer computes it: the
    target's psi term contributes coeff_w w + coeff_x x with the two
    coefficients divided by their joint norm (the "Backward gradient" note
    of the original README), and the weights get the plain inner-product
    gradient, treating the (already normalised) weights as free.
    """

    @staticmethod
    def forward(ctx, x, weight, labels, lam, m):
        logits, (norm, c, p, dp) = margin_logits(x, weight, labels, lam, m)
        ctx.save_for_backward(x, weight, labels, norm, c, p, dp)
        ctx.lam = lam
        return logits

    @staticmethod
    def backward(ctx, grad):
        x, weight, labels, norm, c, p, dp = ctx.saved_tensors
        lam = ctx.lam
        grad_w = grad.t() @ x
        w_y = weight[labels]
        g_y = grad.gather(1, labels[:, None])
        coeff_w = dp
        coeff_x = (p - c * dp) / norm
        scale = torch.sqrt(coeff_w ** 2 + coeff_x ** 2).clamp_min(EPS)
        coeff_w, coeff_x = (coeff_w / scale)[:, None], (coeff_x / scale)[:, None]
        # grad @ W gives every class g_j w_j; swap the target's share for the layer's.
        grad_x = grad @ weight + g_y * ((lam / (1 + lam) - 1) * w_y
                                        + (coeff_w * w_y + coeff_x * x) / (1 + lam))
        return grad_x, grad_w, None, None, None


@HEADS.register
class ASoftmax(Head):
    """A-Softmax (SphereFace): angular margin m with the annealed lambda.

    lambda = max(lambda_min, lambda_base * (1 + lambda_gamma * t)^(-lambda_power)),
    t the training iteration (counted from 1, as the original increments
    before use). `lambda_hold` keeps lambda at its base for that many
    iterations and starts the decay after them (0 = the original schedule).
    `scale` replaces |x| by a fixed scale (the feature-normalised variant;
    None = the original). `backward` is "exact" (autograd through every
    operation) or "original" (the Caffe layer's normalised gradient, weights
    renormalised in place).
    """

    def __init__(self, feature_dim: int, num_classes: int, margin: int = 4, lambda_base: float = 1000.0,
                 lambda_gamma: float = 0.12, lambda_power: float = 1.0, lambda_min: float = 5.0,
                 lambda_hold: int = 0, scale: float | None = None, backward: str = "exact"):
        super().__init__()
        if margin not in (1, 2, 3, 4):
            raise UserError(f"A-Softmax margin m must be 1, 2, 3 or 4, got {margin}")
        if backward not in A_SOFTMAX_BACKWARD:
            raise UserError(f"backward must be one of {', '.join(A_SOFTMAX_BACKWARD)}, got {backward!r}")
        self.weight = nn.Parameter(caffe_xavier_(torch.empty(num_classes, feature_dim)))
        self.m, self.base, self.gamma, self.power = int(margin), lambda_base, lambda_gamma, lambda_power
        self.lambda_min, self.hold, self.s, self.backward = lambda_min, lambda_hold, scale, backward
        self.register_buffer("iteration", torch.zeros((), dtype=torch.long))

    def metrics(self) -> dict:
        return {"lambda": round(self.last_lambda, 4)} if hasattr(self, "last_lambda") else {}

    def lambda_at(self, t: int) -> float:
        t = max(0, t - self.hold)
        return max(self.lambda_min, self.base * (1 + self.gamma * t) ** (-self.power))

    @_fp32
    def forward(self, features, labels):
        if self.training:
            self.iteration += 1
        lam = self.lambda_at(int(self.iteration))
        self.last_lambda = lam
        x = features if self.s is None else self.s * F.normalize(features, dim=1, eps=EPS)
        if self.backward == "original":
            with torch.no_grad():
                self.weight.div_(self.weight.norm(dim=1, keepdim=True).clamp_min(EPS))
            return _CaffeMarginProduct.apply(x, self.weight, labels, lam, self.m)
        return margin_logits(x, F.normalize(self.weight, dim=1, eps=EPS), labels, lam, self.m)[0]


class _NormalisedHead(Head):
    """Shared by the heads that score cos(theta) between unit features and unit weights."""

    def __init__(self, feature_dim: int, num_classes: int, s: float, m: float):
        super().__init__()
        self.weight = nn.Parameter(caffe_xavier_(torch.empty(num_classes, feature_dim)))
        self.s, self.m = s, m

    def cosines(self, features):
        return F.normalize(features, dim=1, eps=EPS) @ F.normalize(self.weight, dim=1, eps=EPS).t()

    @_fp32
    def forward(self, features, labels):
        cos = self.cosines(features).clamp(-1, 1)
        c = cos.gather(1, labels[:, None])
        return self.s * cos.scatter(1, labels[:, None], self.margin(c))


@HEADS.register
class CosFace(_NormalisedHead):
    """CosFace / AM-Softmax: s (cos(theta_y) - m)."""

    def __init__(self, feature_dim: int, num_classes: int, scale: float = 64.0, margin: float = 0.35):
        super().__init__(feature_dim, num_classes, scale, margin)

    def margin(self, c):
        return c - self.m


@HEADS.register
class ArcFace(_NormalisedHead):
    """ArcFace: s cos(theta_y + m), linearised past theta = pi - m so it stays monotonic."""

    def __init__(self, feature_dim: int, num_classes: int, scale: float = 64.0, margin: float = 0.5):
        super().__init__(feature_dim, num_classes, scale, margin)

    def margin(self, c):
        # sin from cos, clamped away from 0 so the gradient stays finite at cos = +-1.
        sin = torch.sqrt((1 - c * c).clamp_min(1e-7))
        shifted = c * math.cos(self.m) - sin * math.sin(self.m)
        return torch.where(c > math.cos(math.pi - self.m), shifted,
                           c - math.sin(math.pi - self.m) * self.m)


def head_settings(name: str) -> tuple[str, ...]:
    """The settings a head takes: its constructor's keyword arguments."""
    import inspect

    return tuple(p for p in inspect.signature(HEADS.get(name)).parameters
                 if p not in ("self", "feature_dim", "num_classes"))


def check_head(name: str, settings: dict) -> None:
    """A setting that the head does not take is an error."""
    extra = sorted(set(settings) - set(head_settings(name)))
    if extra:
        takes = ", ".join(head_settings(name)) or "no settings"
        raise UserError(f"the {name} head does not take {', '.join(extra)} (it takes: {takes})")


def create_head(name: str, feature_dim: int, num_classes: int, **settings) -> nn.Module:
    check_head(name, settings)
    return HEADS.get(name)(feature_dim, num_classes, **settings)
