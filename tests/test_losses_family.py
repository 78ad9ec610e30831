"""Tests for the contrastive-center, CosFace and ArcFace losses and soft-max label smoothing:
values and gradients against the papers' formulas computed by hand on tiny tensors.

Expected values come from explicit Python loops (``math``), never from the code under test;
gradients are compared with central differences of those loops, in double precision.
"""
from __future__ import annotations

import doctest
import math

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from foodlib.losses import ArcFaceLoss, ContrastiveCenterLoss, CosFaceLoss, SoftmaxLoss, check_loss_options, create_loss
from foodlib.losses.contrastive_center import contrastive_center_ratios

X = [[1.0, 2.0], [0.5, -1.0], [-2.0, 0.0], [0.0, 1.5]]  # N=4, D=2
LABELS = [1, 0, 2, 1]  # C=3
CENTERS = [[1.0, 1.0], [0.0, 2.0], [-1.0, -1.0]]
WEIGHTS = [[1.0, 0.0], [0.6, 0.8], [-1.0, 0.5]]  # class weights (C, D), deliberately not unit length


def cross_entropy(rows: list[list[float]], labels: list[int], smoothing: float = 0.0) -> float:
    """mean_i sum_k q_ik * (-log p_ik), q = (1 - eps) onehot + eps / C; a stable log-sum-exp."""
    total = 0.0
    for row, y in zip(rows, labels):
        top = max(row)
        log_norm = top + math.log(sum(math.exp(z - top) for z in row))
        nll = [log_norm - z for z in row]
        total += (1 - smoothing) * nll[y] + smoothing * sum(nll) / len(row)
    return total / len(labels)


def numeric_gradient(function, values: list[list[float]], step: float = 1e-6) -> np.ndarray:
    """Central differences of a python function of a nested list, in double precision."""
    values = np.asarray(values, dtype=np.float64)
    gradient = np.zeros_like(values)
    for index in np.ndindex(values.shape):
        up, down = values.copy(), values.copy()
        up[index] += step
        down[index] -= step
        gradient[index] = (function(up.tolist()) - function(down.tolist())) / (2 * step)
    return gradient


def cosine(a: list[float], b: list[float]) -> float:
    return sum(p * q for p, q in zip(a, b)) / (math.hypot(*a) * math.hypot(*b))


# ----- contrastive-center ---------------------------------------------------------------------


def contrastive_center_by_hand(x, labels, centers, delta: float) -> float:
    """1/2 * mean_i ||x_i - c_y||^2 / (sum_{j != y} ||x_i - c_j||^2 + delta), with loops."""
    total = 0.0
    for xi, y in zip(x, labels):
        distances = [sum((a - c) ** 2 for a, c in zip(xi, cj)) for cj in centers]
        total += 0.5 * distances[y] / (sum(d for j, d in enumerate(distances) if j != y) + delta)
    return total / len(labels)


def test_contrastive_center_value_and_gradients_match_hand_computation():
    lam, delta = 0.7, 0.5
    loss = ContrastiveCenterLoss(2, 3, lam=lam, delta=delta)
    with torch.no_grad():
        loss.classifier.weight.zero_()  # CE = log 3 and dCE/dx = 0: the gradient is the term's alone
        loss.classifier.bias.zero_()
        loss.centers.copy_(torch.tensor(CENTERS))
    x = torch.tensor(X, requires_grad=True)

    out = loss(x, torch.tensor(LABELS))
    out.loss.backward()

    term = contrastive_center_by_hand(X, LABELS, CENTERS, delta)
    assert out.terms["contrastive_center"].item() == pytest.approx(term, abs=1e-6)
    assert out.terms["ce"].item() == pytest.approx(math.log(3), abs=1e-6)
    assert out.loss.item() == pytest.approx(math.log(3) + lam * term, abs=1e-6)
    # the network's gradient is lam * dL/dx; the centers' is dL/dc, not scaled by lam
    grad_x = lam * numeric_gradient(lambda v: contrastive_center_by_hand(v, LABELS, CENTERS, delta), X)
    grad_c = numeric_gradient(lambda v: contrastive_center_by_hand(X, LABELS, v, delta), CENTERS)
    np.testing.assert_allclose(x.grad.numpy(), grad_x, atol=1e-5)
    np.testing.assert_allclose(loss.centers.grad.numpy(), grad_c, atol=1e-5)
    assert loss.state_parameters() == [loss.centers]  # fit() moves them with center_lr


def test_contrastive_center_pushes_other_centers_away():
    """Through the denominator a sample pushes every other class's center away: for one sample of
    class 1, -dL/dc_0 points from x toward c_0 (dL/dc_j = A (x - c_j) / (N B^2), j != y)."""
    loss = ContrastiveCenterLoss(2, 3)
    with torch.no_grad():
        loss.centers.copy_(torch.tensor(CENTERS))
    x = torch.tensor([X[0]])
    loss(x, torch.tensor([1])).loss.backward()
    away = torch.tensor(CENTERS[0]) - x[0]  # from the sample toward c_0
    assert float(-loss.centers.grad[0] @ away) > 0
    toward = x[0] - torch.tensor(CENTERS[1])  # and its own center c_1 is pulled toward it
    assert float(-loss.centers.grad[1] @ toward) > 0


def test_contrastive_center_denominator_worked_example():
    # x = (0, 0), own center (1, 0): numerator 1; others (0, 2) and (-3, 0): 4 + 9 = 13; delta 1
    x = torch.zeros(1, 2)
    centers = torch.tensor([[1.0, 0.0], [0.0, 2.0], [-3.0, 0.0]])
    ratio = contrastive_center_ratios(x, centers, torch.tensor([0]), delta=1.0)
    assert ratio.item() == pytest.approx(1.0 / 14.0, abs=1e-7)


class _RecordShapes(TorchDispatchMode):
    """Records the shape of every tensor an operator produces (forward and backward)."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        for item in result if isinstance(result, (tuple, list)) else [result]:
            if isinstance(item, torch.Tensor):
                self.shapes.append(tuple(item.shape))
        return result


def test_contrastive_center_denominator_builds_no_n_by_c_tensor():
    n, c, d = 8, 50, 4  # N*C = 400 > C*D = 200 > N*D = 32
    x = torch.randn(n, d, requires_grad=True)
    centers = torch.randn(c, d, requires_grad=True)
    labels = torch.arange(n) % c
    with _RecordShapes() as recorder:
        value = contrastive_center_ratios(x, centers, labels, delta=1.0).mean()
        value.backward()
    largest = max(math.prod(shape) for shape in recorder.shapes)
    assert largest <= c * d, f"a tensor of {largest} elements appeared: {sorted(set(recorder.shapes))}"
    # and the values equal the direct (N, C, D) computation
    direct = (x[:, None, :] - centers[None]).pow(2).sum(2)  # (N, C)
    own = direct.gather(1, labels[:, None]).squeeze(1)
    expected = own / (direct.sum(1) - own + 1.0)
    assert torch.allclose(contrastive_center_ratios(x, centers, labels, 1.0), expected, rtol=1e-5, atol=1e-6)


def test_contrastive_center_on_own_center_is_zero_and_bad_values_are_named():
    loss = ContrastiveCenterLoss(2, 3)
    out = loss(loss.centers.detach().clone(), torch.arange(3))
    assert out.terms["contrastive_center"].item() == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match=r"ContrastiveCenterLoss: delta must be a number in \(0.0, inf\), got delta=0"):
        ContrastiveCenterLoss(2, 3, delta=0)
    assert (ContrastiveCenterLoss(2, 3).lam, ContrastiveCenterLoss(2, 3).delta) == (1.0, 1.0)


# ----- CosFace and ArcFace ---------------------------------------------------------------------


def cosface_logits_by_hand(x, weights, labels, scale, margin, with_margin=True):
    rows = []
    for xi, y in zip(x, labels):
        rows.append([scale * (cosine(xi, w) - (margin if (k == y and with_margin) else 0.0))
                     for k, w in enumerate(weights)])
    return rows


def arcface_target_by_hand(cos_true: float, margin: float) -> float:
    theta = math.acos(max(-1.0, min(1.0, cos_true)))
    if theta + margin > math.pi:  # past pi: the authors' fallback
        return cos_true - margin * math.sin(margin)
    return math.cos(theta + margin)


def arcface_logits_by_hand(x, weights, labels, scale, margin, with_margin=True):
    rows = []
    for xi, y in zip(x, labels):
        row = []
        for k, w in enumerate(weights):
            c = cosine(xi, w)
            row.append(scale * (arcface_target_by_hand(c, margin) if (k == y and with_margin) else c))
        rows.append(row)
    return rows


CASES = [(CosFaceLoss, cosface_logits_by_hand), (ArcFaceLoss, arcface_logits_by_hand)]


@pytest.mark.parametrize("loss_class, by_hand", CASES, ids=["cosface", "arcface"])
def test_cosine_margin_value_logits_and_gradients_match_hand_computation(loss_class, by_hand):
    scale, margin = 4.0, 0.3
    loss = loss_class(2, 3, margin=margin, scale=scale)
    with torch.no_grad():
        loss.weight.copy_(torch.tensor(WEIGHTS))
    x = torch.tensor(X, requires_grad=True)

    out = loss(x, torch.tensor(LABELS))
    out.loss.backward()

    rows = by_hand(X, WEIGHTS, LABELS, scale, margin)
    np.testing.assert_allclose(out.logits.detach().numpy(), rows, atol=1e-5)
    assert out.loss.item() == pytest.approx(cross_entropy(rows, LABELS), abs=1e-5)
    assert out.terms["ce"].item() == pytest.approx(out.loss.item())
    grad_x = numeric_gradient(lambda v: cross_entropy(by_hand(v, WEIGHTS, LABELS, scale, margin), LABELS), X)
    grad_w = numeric_gradient(lambda v: cross_entropy(by_hand(X, v, LABELS, scale, margin), LABELS), WEIGHTS)
    np.testing.assert_allclose(x.grad.numpy(), grad_x, atol=1e-4)
    np.testing.assert_allclose(loss.weight.grad.numpy(), grad_w, atol=1e-4)


@pytest.mark.parametrize("loss_class, by_hand", CASES, ids=["cosface", "arcface"])
def test_cosine_margin_is_off_in_predict(loss_class, by_hand):
    loss = loss_class(2, 3)  # the papers' defaults
    with torch.no_grad():
        loss.weight.copy_(torch.tensor(WEIGHTS))
    x = torch.tensor(X)
    plain = by_hand(X, WEIGHTS, LABELS, loss.scale, loss.margin, with_margin=False)  # s * cos(theta)
    np.testing.assert_allclose(loss.predict(x).detach().numpy(), plain, atol=1e-4)
    training = loss(x, torch.tensor(LABELS)).logits.detach().numpy()
    true = np.zeros((4, 3), dtype=bool)
    true[np.arange(4), LABELS] = True
    np.testing.assert_allclose(training[~true], np.asarray(plain)[~true], atol=1e-4)  # other classes untouched
    assert (training[true] < np.asarray(plain)[true] - 1.0).all()  # the true class loses at least s * 0.016


def test_papers_defaults():
    assert (CosFaceLoss(2, 3).scale, CosFaceLoss(2, 3).margin) == (64.0, 0.35)
    assert (ArcFaceLoss(2, 3).scale, ArcFaceLoss(2, 3).margin) == (64.0, 0.5)
    with pytest.raises(ValueError, match=r"ArcFaceLoss: margin must be a number in \[0.0, 1.57"):
        ArcFaceLoss(2, 3, margin=2.0)
    with pytest.raises(ValueError, match=r"CosFaceLoss: scale must be a number in \(0.0, inf\), got scale=0"):
        CosFaceLoss(2, 3, scale=0)


def test_arcface_angle_wrap_past_pi():
    margin, scale = 0.5, 1.0
    loss = ArcFaceLoss(2, 1 + 1, margin=margin, scale=scale)
    with torch.no_grad():
        loss.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    # angles to class 0's weight (1, 0): 0.3 (theta + m < pi) and 3.0 (theta + m > pi, as pi - m = 2.64)
    angles = [0.3, 3.0]
    x = torch.tensor([[math.cos(a), math.sin(a)] for a in angles])
    target = loss(x, torch.tensor([0, 0])).logits[:, 0]
    assert target[0].item() == pytest.approx(math.cos(0.3 + margin), abs=1e-6)
    # cos(3.0 + 0.5) = -0.936 would be *higher* than cos(3.0 + 0) ... the fallback keeps it lower:
    assert target[1].item() == pytest.approx(math.cos(3.0) - margin * math.sin(margin), abs=1e-6)
    assert target[1].item() < math.cos(3.0) < math.cos(3.0 + margin)
    # over all of [0, pi] the target never increases with the angle, and stays finite with a gradient
    sweep = torch.linspace(0.0, math.pi, 721)
    x = torch.stack([sweep.cos(), sweep.sin()], dim=1).requires_grad_(True)
    out = loss(x, torch.zeros(721, dtype=torch.long))
    target = out.logits[:, 0].detach()
    assert (target[1:] <= target[:-1] + 1e-6).all()
    out.loss.backward()
    assert torch.isfinite(x.grad).all()


# ----- label smoothing -------------------------------------------------------------------------


def test_softmax_label_smoothing_matches_hand_computation_and_is_off_by_default():
    weight, bias = [[1.0, 0.0], [0.0, 1.0], [-1.0, 0.5]], [0.1, -0.2, 0.3]
    eps = 0.2
    loss = SoftmaxLoss(2, 3, label_smoothing=eps)
    with torch.no_grad():
        loss.classifier.weight.copy_(torch.tensor(weight))
        loss.classifier.bias.copy_(torch.tensor(bias))
    x = torch.tensor(X, requires_grad=True)

    def logits_of(v):
        return [[sum(w * a for w, a in zip(weight[k], vi)) + bias[k] for k in range(3)] for vi in v]

    out = loss(x, torch.tensor(LABELS))
    out.loss.backward()
    assert out.loss.item() == pytest.approx(cross_entropy(logits_of(X), LABELS, eps), abs=1e-6)
    grad = numeric_gradient(lambda v: cross_entropy(logits_of(v), LABELS, eps), X)
    np.testing.assert_allclose(x.grad.numpy(), grad, atol=1e-5)
    np.testing.assert_allclose(loss.predict(x).detach().numpy(), logits_of(X), atol=1e-6)  # predict unchanged
    assert SoftmaxLoss(2, 3).label_smoothing == 0.0
    with pytest.raises(ValueError, match="label_smoothing must be below 1"):
        SoftmaxLoss(2, 3, label_smoothing=1.0)


# ----- options declared by the losses -----------------------------------------------------------


def test_config_forwards_new_options_and_the_loss_validates_them():
    from foodlib.config import Config, ConfigError
    from foodlib.train import loss_kwargs

    cfg = Config.from_flat(loss="arcface", margin=0.2, scale=30)
    built = create_loss(cfg.loss.loss, 4, 3, strict=False, **loss_kwargs(cfg))
    assert (built.margin, built.scale) == (0.2, 30.0)
    assert create_loss("softmax", 4, 3, strict=False, **loss_kwargs(Config.from_flat(label_smoothing=0.1))).label_smoothing == 0.1
    with pytest.raises(ConfigError, match=r"loss='arcface': ArcFaceLoss: margin must be a number in \[0.0, 1.57"):
        Config.from_flat(loss="arcface", margin=3.0)
    with pytest.raises(ConfigError, match=r"loss='center'.*unexpected option\(s\) margin=0.2"):
        Config.from_flat(loss="center", margin=0.2)
    with pytest.raises(ConfigError, match="label_smoothing must be a number in"):
        Config.from_flat(label_smoothing=-0.1)
    check_loss_options("contrastive_center", delta=2.0)
    assert Config.from_yaml(cfg.to_yaml()) == cfg


def test_cli_has_flags_for_the_new_options():
    from foodlib.cli import build_parser

    args = build_parser().parse_args(["train", "--loss", "cosface", "--margin", "0.2", "--scale", "30",
                                      "--label-smoothing", "0.1", "--delta", "2", "--samples-per-class", "4"])
    assert (args.margin, args.scale, args.label_smoothing, args.delta, args.samples_per_class) == \
        ("0.2", "30", "0.1", "2", "4")


def test_docstring_examples_run():
    import foodlib.losses.arcface as arcface_module
    import foodlib.losses.contrastive_center as contrastive_center_module
    import foodlib.losses.cosface as cosface_module
    import foodlib.losses.softmax as softmax_module
    for module in (arcface_module, contrastive_center_module, cosface_module, softmax_module):
        result = doctest.testmod(module, extraglobs={"torch": torch})
        assert result.failed == 0, module.__name__


def test_every_loss_names_the_metric_its_embedding_is_trained_for():
    from foodlib.losses import trained_metric
    from foodlib.losses import list_losses

    assert {trained_metric(name) for name in list_losses()} <= {"euclidean", "cosine"}
    assert trained_metric("cosface") == trained_metric("arcface") == "cosine"  # normalised features
    assert trained_metric("contrastive_center") == "euclidean"
    assert trained_metric("pml:MultiSimilarityLoss") == "cosine"
