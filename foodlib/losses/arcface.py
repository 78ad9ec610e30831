"""ArcFace (Deng et al., CVPR 2019): soft-max over scaled cosines, the true class's angle enlarged by a margin."""
from __future__ import annotations

import math

import torch

from .cosine import CosineMarginHead

#: floor of sin^2(theta) under the square root: sqrt has an infinite slope at 0 (theta = 0 or pi).
SIN_SQUARED_EPS = 1e-12


class ArcFaceLoss(CosineMarginHead):
    """ArcFace (additive angular margin loss): true-class logit ``scale * cos(theta_y + margin)``.

    Reference: J. Deng, J. Guo, N. Xue, S. Zafeiriou, "ArcFace: Additive Angular Margin Loss for
    Deep Face Recognition", CVPR 2019.

    Objective: the cross-entropy of ``scale * cos(theta_k)`` for ``k != y`` and
    ``scale * cos(theta_y + margin)`` for the true class, features and class weights normalised
    (:class:`~foodlib.losses.cosine.CosineMarginHead`). ``cos(theta + m)`` is computed as
    ``cos(theta) cos(m) - sin(theta) sin(m)``.

    Angle wrap: ``cos(theta + m)`` stops decreasing once ``theta + m`` passes pi, so a sample far
    on the wrong side would be rewarded for moving further away. As in the authors'
    implementation, where ``theta > pi - m`` (``cos(theta) < cos(pi - m)``) the target becomes
    ``cos(theta) - m * sin(m)``, a CosFace-style penalty that keeps decreasing in ``theta``. The
    target is then non-increasing over all of ``[0, pi]``, with a small downward step at
    ``theta = pi - m``: from ``-1`` to ``-cos(m) - m sin(m)`` (-1.117 for ``m = 0.5``).

    The margin is applied only in training; :meth:`predict` gives ``scale * cos(theta)``.
    ``terms``: ``ce``.

    Learnable state: the class weights ``loss.weight`` ``(C, D)`` (no bias), by back-propagation.

    Args:
        embedding_dim: D.
        num_classes: C.
        margin: the additive angular margin ``m`` in radians, in ``[0, pi/2]``. Default 0.5 (the paper's).
        scale: ``s``, ``> 0``. Default 64 (the paper's).

    >>> loss = ArcFaceLoss(embedding_dim=2, num_classes=3)
    >>> (loss.margin, loss.scale), loss.predict(torch.randn(4, 2)).shape
    ((0.5, 64.0), torch.Size([4, 3]))
    """

    default_margin = 0.5
    default_scale = 64.0
    max_margin = math.pi / 2  # beyond it cos(theta + m) is decreasing nowhere near theta = 0

    def target_logit(self, cos_true: torch.Tensor) -> torch.Tensor:
        m = self.margin
        sin_true = (1.0 - cos_true.pow(2)).clamp_min(SIN_SQUARED_EPS).sqrt()  # (N,), theta in [0, pi]
        cos_shifted = cos_true * math.cos(m) - sin_true * math.sin(m)  # cos(theta + m)
        past_pi = cos_true < math.cos(math.pi - m)  # theta + m > pi
        return torch.where(past_pi, cos_true - m * math.sin(m), cos_shifted)
