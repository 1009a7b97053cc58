"""Classification heads ("margin heads") that turn face features into logits.

Every head has the same interface: `head(features, labels) -> logits`, and
`head.loss(logits, labels)`: softmax cross-entropy for all but SphereFace2
(one binary classifier per class), plus SphereFace+'s hyperspherical energy
of the class weights when `mhe` is set. The margin, if any, is applied to
the target class's logit. Heads compute in fp32 whatever the autocast
state, because cos(m theta) polynomials and margins lose their meaning in
half precision.

A head's settings are its constructor's keyword arguments, named as the
training options are (`margin`, `scale`, `lambda_hold`, ...), and the MHE
settings, which every head takes; the config's head table is passed to it
as it is and a setting it does not take is an error. To add a head, write a
class here, decorate it with `@HEADS.register` and declare its name in
spherecli/core/registry.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from spherecli.core.errors import UserError
from spherecli.core.registry import A_SOFTMAX_BACKWARD, HEADS, MHE_DISTANCES, MHE_PAIRS, SPHEREFACE_R_VERSIONS
from spherecli.models.init import caffe_xavier_

EPS = 1e-12


def at_least_fp32(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _fp32(fn):
    """Run a head's forward in fp32 even inside an autocast region."""
    def forward(self, features, labels):
        with torch.autocast(features.device.type, enabled=False):
            return fn(self, at_least_fp32(features), labels)
    forward.__doc__ = fn.__doc__
    return forward


def hyperspherical_energy(weight: torch.Tensor, labels: torch.Tensor | None = None, power: float = 2.0,
                          distance: str = "euclidean", half_space: bool = False) -> torch.Tensor:
    """Minimum hyperspherical energy's term (Liu et al. 2018): the mean of f_s(d(w_i, w_j)) over
    pairs of distinct unit class weights, f_s(d) = d^-s for s > 0 and log(1/d) for s = 0.

    d is the Euclidean distance |w_i - w_j| or the angle between them ("angular", A-MHE).
    With labels, i runs over the batch's labels and j over every other class (SphereFace+'s
    mini-batch form, B x C pairs); without, over all C (C - 1) pairs. Half-space MHE also
    counts each w_j's reflection -w_j, so that collinear weights pointing apart are not
    mistaken for far apart.
    """
    w = F.normalize(weight, dim=1, eps=EPS)
    rows = torch.arange(len(w), device=w.device) if labels is None else labels
    cos = w[rows] @ w.t()
    others = torch.ones_like(cos, dtype=torch.bool).scatter(1, rows[:, None], False)

    def energy(c):
        c = c[others]
        if distance == "angular":
            d = torch.acos(c.clamp(-1 + 1e-7, 1 - 1e-7))
        else:
            d = torch.sqrt((2 - 2 * c).clamp_min(1e-12))
        return -torch.log(d) if power == 0 else d ** -power

    e = energy(cos)
    if half_space:
        e = torch.cat([e, energy(-cos)])
    return e.mean()


@dataclass
class MHE:
    """SphereFace+'s regulariser: weight x hyperspherical energy of the head's class weights."""
    mhe: float = 0.0
    mhe_power: float = 2.0
    mhe_distance: str = "euclidean"
    mhe_half_space: bool = False
    mhe_pairs: str = "batch"

    def __post_init__(self):
        if self.mhe_distance not in MHE_DISTANCES:
            raise UserError(f"mhe_distance must be one of {', '.join(MHE_DISTANCES)}, "
                            f"got {self.mhe_distance!r}")
        if self.mhe_pairs not in MHE_PAIRS:
            raise UserError(f"mhe_pairs must be one of {', '.join(MHE_PAIRS)}, got {self.mhe_pairs!r}")

    def __call__(self, weight, labels):
        return hyperspherical_energy(weight, labels if self.mhe_pairs == "batch" else None, self.mhe_power,
                                     self.mhe_distance, self.mhe_half_space)


MHE_SETTINGS = tuple(f.name for f in fields(MHE))


class Head(nn.Module):
    """What the trainer asks of every head besides its forward pass."""

    regulariser: MHE | None = None

    def class_weights(self) -> torch.Tensor:
        return self.weight

    def criterion(self, logits, labels):
        return F.cross_entropy(logits, labels)

    def loss(self, logits, labels):
        """The head's loss on its logits, with SphereFace+'s energy term when it is set."""
        loss = self.criterion(at_least_fp32(logits), labels)
        if self.regulariser is not None:
            energy = self.regulariser(at_least_fp32(self.class_weights()), labels)
            self.last_energy = energy.detach()
            loss = loss + self.regulariser.mhe * energy
        return loss

    def chance_loss(self, num_classes: int) -> float:
        """The loss of a network that tells no face from another: ln C for a softmax."""
        return math.log(num_classes)

    def metrics(self) -> dict:
        """Numbers of the last forward pass worth logging (A-Softmax: lambda; MHE: the energy)."""
        return {"mhe": round(float(self.last_energy), 5)} if hasattr(self, "last_energy") else {}


@HEADS.register
class Softmax(Head):
    """Plain softmax: an inner product with bias (the paper's baseline)."""

    def __init__(self, feature_dim: int, num_classes: int):
        super().__init__()
        self.fc = nn.Linear(feature_dim, num_classes)
        caffe_xavier_(self.fc.weight)
        nn.init.zeros_(self.fc.bias)

    def class_weights(self):
        return self.fc.weight

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
        own = {"lambda": round(self.last_lambda, 4)} if hasattr(self, "last_lambda") else {}
        return own | super().metrics()

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

    def chance_loss(self, num_classes: int) -> float:
        # Every cosine 0: the margin has already lowered the target's logit below the others'.
        target = self.s * float(self.margin(torch.zeros(1, dtype=torch.double)))
        return math.log(math.exp(target) + num_classes - 1) - target


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


@HEADS.register
class SphereFaceR(_NormalisedHead):
    """SphereFace-R (Liu et al., TPAMI 2022), hard feature normalisation: s psi(theta_y), where
    the multiplicative margin m may be any real >= 1.

    version v0 is the original's psi, (-1)^k cos(m theta) - 2k with k = floor(m theta / pi);
    v1 is cos(min(m theta, pi)). Characteristic gradient detachment: the target logit is
    s (cos + [psi - cos]), the bracket detached, so the margin sets the forward value (and
    with it the softmax's probabilities) while the gradient is that of s cos, which is
    what lets it train without A-Softmax's annealed lambda.
    """

    def __init__(self, feature_dim: int, num_classes: int, scale: float = 30.0, margin: float = 1.5,
                 version: str = "v0"):
        super().__init__(feature_dim, num_classes, scale, margin)
        if margin < 1:
            raise UserError(f"SphereFace-R margin m must be at least 1 (it multiplies the angle), "
                            f"got {margin}")
        if version not in SPHEREFACE_R_VERSIONS:
            raise UserError(f"version must be one of {', '.join(SPHEREFACE_R_VERSIONS)}, got {version!r}")
        self.version = version

    def margin(self, c):
        with torch.no_grad():
            m_theta = self.m * torch.acos(c)
            if self.version == "v0":
                k = torch.floor(m_theta / math.pi)
                value = (1 - 2 * torch.remainder(k, 2)) * torch.cos(m_theta) - 2 * k
            else:
                value = torch.cos(m_theta.clamp_max(math.pi))
            detached = value - c
        return c + detached


@HEADS.register
class SphereFace2(Head):
    """SphereFace2 (Wen et al., ICLR 2022): one binary classifier per class, no softmax.

    Logits z_j = r g(cos theta_j) -+ r m + b (minus for the target, plus for the others),
    with g(c) = 2 ((c + 1) / 2)^t - 1 and one learnt bias b. The loss per face is
    lw / r (lambda log(1 + e^-z_y) + (1 - lambda) sum_{j != y} log(1 + e^z_j)). As the
    authors' code trains it, the adjustment g and the margin set the forward value and the
    gradient is that of r cos (the detachment of SphereFace-R); lw (`loss_weight`, theirs:
    50) gives the r-scaled loss a softmax loss's gradient. b starts where its gradient is
    zero for cosines of 0, i.e. where the positive and the negative terms pull it equally.
    """

    def __init__(self, feature_dim: int, num_classes: int, scale: float = 40.0, margin: float = 0.4,
                 positive_weight: float = 0.7, similarity_power: float = 3.0, loss_weight: float = 50.0):
        super().__init__()
        if not 0 < positive_weight < 1:
            raise UserError(f"positive_weight (lambda) must be between 0 and 1, got {positive_weight}")
        self.weight = nn.Parameter(caffe_xavier_(torch.empty(num_classes, feature_dim)))
        self.r, self.m, self.lam, self.t = scale, margin, positive_weight, similarity_power
        self.lw, self.num_classes = loss_weight, num_classes
        self.bias = nn.Parameter(torch.tensor(self.start_bias()))

    def _start_logits(self) -> tuple[float, float]:
        """Target's and others' logits before the bias, at cos = 0."""
        g0 = 2 * 0.5 ** self.t - 1
        return self.r * (g0 - self.m), self.r * (g0 + self.m)

    def start_bias(self) -> float:
        # lambda sigma(-(a_y + b)) = (1 - lambda)(C - 1) sigma(a_j + b), solved for v = e^(a_j + b):
        # e v^2 + (1 - z) v - z = 0, z = lambda / ((1 - lambda)(C - 1)), e = e^(a_y - a_j); the root
        # is written without the difference of near-equal numbers that e ~ 1e-14 would cause.
        a_y, a_j = self._start_logits()
        z = self.lam / ((1 - self.lam) * max(self.num_classes - 1, 1))
        e = math.exp(a_y - a_j)
        v = 2 * z / ((1 - z) + math.sqrt((1 - z) ** 2 + 4 * e * z))
        return math.log(v) - a_j

    @_fp32
    def forward(self, features, labels):
        cos = F.normalize(features, dim=1, eps=EPS) @ F.normalize(self.weight, dim=1, eps=EPS).t()
        cos = cos.clamp(-1, 1)
        with torch.no_grad():
            sign = torch.ones_like(cos).scatter(1, labels[:, None], -1.0)
            detached = 2 * ((cos + 1) / 2) ** self.t - 1 + sign * self.m - cos
        return self.r * (cos + detached) + self.bias

    def criterion(self, logits, labels):
        target = torch.zeros_like(logits, dtype=torch.bool).scatter(1, labels[:, None], True)
        terms = torch.where(target, self.lam * F.softplus(-logits), (1 - self.lam) * F.softplus(logits))
        return self.lw / self.r * terms.sum(1).mean()

    def chance_loss(self, num_classes: int) -> float:
        a_y, a_j = self._start_logits()
        b = self.start_bias()
        softplus = lambda v: math.log1p(math.exp(-abs(v))) + max(v, 0.0)  # noqa: E731
        return self.lw / self.r * (self.lam * softplus(-(a_y + b))
                                   + (1 - self.lam) * (num_classes - 1) * softplus(a_j + b))


def head_settings(name: str) -> tuple[str, ...]:
    """The settings a head takes: its constructor's keyword arguments, and MHE's."""
    import inspect

    return tuple(p for p in inspect.signature(HEADS.get(name)).parameters
                 if p not in ("self", "feature_dim", "num_classes")) + MHE_SETTINGS


def check_head(name: str, settings: dict) -> None:
    """A setting that the head does not take is an error."""
    extra = sorted(set(settings) - set(head_settings(name)))
    if extra:
        takes = ", ".join(head_settings(name)) or "no settings"
        raise UserError(f"the {name} head does not take {', '.join(extra)} (it takes: {takes})")


def create_head(name: str, feature_dim: int, num_classes: int, **settings) -> Head:
    check_head(name, settings)
    mhe = MHE(**{k: settings.pop(k) for k in MHE_SETTINGS if k in settings})
    head = HEADS.get(name)(feature_dim, num_classes, **settings)
    if mhe.mhe:
        head.regulariser = mhe
    return head
