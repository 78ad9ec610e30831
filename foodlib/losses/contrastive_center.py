"""Contrastive-center loss (Qi & Su, 2017): soft-max plus a pull toward the own center relative to the others."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .base import LossOutput, autocast_off, check_number, linear_ramp
from .softmax import SoftmaxLoss


def contrastive_center_ratios(embedding32: torch.Tensor, centers: torch.Tensor, labels: torch.Tensor,
                              delta: float) -> torch.Tensor:
    """``||x_i - c_{y_i}||^2 / (sum_{j != y_i} ||x_i - c_j||^2 + delta)`` per sample ``(N,)``.

    The denominator never builds the ``(N, C, D)`` difference tensor (nor the ``(N, C)`` distance
    matrix): summing over all classes expands to
    ``sum_j ||x_i - c_j||^2 = C ||x_i||^2 - 2 x_i . S + sum_j ||c_j||^2`` with ``S = sum_j c_j``,
    and the own class's distance is subtracted, so value and gradient cost O(N*D + C*D).

    Args:
        embedding32: float32 embedding ``(N, D)``.
        centers: float32 centers ``(C, D)``.
        labels: class indices ``(N,)``.
        delta: the constant that keeps the ratio finite when all centers coincide, ``> 0``.
    """
    num_classes = centers.shape[0]
    own = (embedding32 - centers[labels]).pow(2).sum(dim=1)  # (N,)
    all_classes = (num_classes * embedding32.pow(2).sum(dim=1)  # (N,)
                   - 2.0 * embedding32 @ centers.sum(dim=0)  # (N,)
                   + centers.pow(2).sum())  # scalar
    # The expansion cancels where x sits on the centers; the exact sum is never negative.
    others = (all_classes - own).clamp_min(0.0)  # (N,)
    return own / (others + delta)


class ContrastiveCenterLoss(SoftmaxLoss):
    """Contrastive-center loss: cross-entropy plus ``lam`` times the own-center / other-centers distance ratio.

    Reference: C. Qi, F. Su, "Contrastive-center loss for deep neural networks", ICIP 2017
    (arXiv:1707.07391).

    Objective: ``CE(W x + b, y) + lam * L_ct-c`` with
    ``L_ct-c = 1/2 * mean_i ||x_i - c_{y_i}||^2 / (sum_{j != y_i} ||x_i - c_j||^2 + delta)``. The
    paper writes a sum over the mini-batch; the mean keeps ``lam`` independent of the batch size,
    as in :class:`~foodlib.losses.CenterLoss`. The term pulls each sample toward its own center
    and, through the denominator, away from every other center, so it tightens classes and
    separates them with one term and no pair mining. ``terms`` holds ``ce`` and
    ``contrastive_center`` (``L_ct-c`` unscaled). The denominator is computed without an
    ``(N, C, D)`` tensor (:func:`contrastive_center_ratios`).

    Learnable state: the class centers ``loss.centers`` ``(C, D)``, an ``nn.Parameter`` returned
    by :meth:`state_parameters`, so ``fit()`` moves them with their own SGD optimizer and
    ``center_lr``. Qi & Su update the centers with the gradient of ``L_ct-c`` with respect to the
    centers; that gradient is what this loss uses. Center Loss's alpha rule is not used here: it
    only moves a center toward its own samples, while the gradient of the ratio also pushes each
    center away from the other classes' samples, which is the point of the denominator. As in
    :class:`~foodlib.losses.CenterLoss` (``update="sgd"``), ``lam`` scales only the gradient that
    reaches the network; the centers receive ``d L_ct-c / d c`` unscaled, so ``center_lr`` alone
    sets their step. The reported loss value is ``CE + lam * L_ct-c``. Centers start from
    ``N(0, 1/D)`` per coordinate, distinct and non-zero.

    Args:
        embedding_dim: D.
        num_classes: C.
        lam: weight of the contrastive-center term, ``>= 0``. Default 1.0: the term is a ratio
            (a few units at most; about ``1/(C-1)`` at the start), not a squared distance, so it
            needs a far larger weight than Center Loss's 0.003-0.01. Qi & Su report results over
            a range of weights; tune it for a new dataset.
        delta: the constant in the denominator, ``> 0``. Default 1.0 (the paper's).
        lam_warmup_epochs: ramp ``lam`` linearly from 0 over this many epochs (0, the default: off).

    >>> loss = ContrastiveCenterLoss(embedding_dim=2, num_classes=3)
    >>> x, y = torch.randn(6, 2), torch.tensor([0, 0, 1, 1, 2, 2])
    >>> out = loss(x, y)
    >>> sorted(out.terms), loss.centers.shape
    (['ce', 'contrastive_center'], torch.Size([3, 2]))
    """

    term_names = ("ce", "contrastive_center")

    def __init__(self, embedding_dim: int, num_classes: int, lam: float = 1.0, delta: float = 1.0,
                 lam_warmup_epochs: int = 0):
        super().__init__(embedding_dim, num_classes)
        owner = type(self).__name__
        check_number(owner, "lam", lam, 0.0, hint="it weights the contrastive-center term")
        check_number(owner, "delta", delta, 0.0, low_open=True,
                     hint="it keeps the ratio finite when the centers meet; the paper used 1")
        check_number(owner, "lam_warmup_epochs", lam_warmup_epochs, 0)
        self.lam = float(lam)
        self.delta = float(delta)
        self.lam_warmup_epochs = int(lam_warmup_epochs)
        self.current_lam = 0.0 if self.lam_warmup_epochs > 0 else self.lam  # lam in use this epoch
        self.centers = nn.Parameter(torch.randn(num_classes, embedding_dim) / math.sqrt(embedding_dim))  # (C, D)

    def extra_repr(self) -> str:
        return f"lam={self.lam}, delta={self.delta}"

    def forward(self, embedding: torch.Tensor, labels: torch.Tensor) -> LossOutput:
        self.check_batch(embedding, labels)
        labels = labels.long()
        with autocast_off(embedding):
            x = embedding.float()  # (N, D)
            logits = self.classifier_logits(x)  # (N, C)
            ce = F.cross_entropy(logits, labels)
            centers = self.centers.float()  # (C, D)
            # The same value twice, each copy letting the gradient through to one side only:
            # lam scales the network's share, the centers get theirs unscaled (see the docstring).
            toward_network = 0.5 * contrastive_center_ratios(x, centers.detach(), labels, self.delta).mean()
            toward_centers = 0.5 * contrastive_center_ratios(x.detach(), centers, labels, self.delta).mean()
            total = ce + self.current_lam * toward_network + (toward_centers - toward_centers.detach())
        return LossOutput(loss=total, logits=logits,
                          terms={"ce": ce.detach(), "contrastive_center": toward_network.detach()})

    def state_parameters(self) -> list[nn.Parameter]:
        return [self.centers]

    def set_progress(self, epoch: int, epochs: int) -> None:
        """Set the ``lam`` of this (0-based) epoch when ``lam_warmup_epochs > 0``."""
        self.current_lam = linear_ramp(0.0, self.lam, epoch, self.lam_warmup_epochs)
