"""CosFace / LMCL (Wang et al., CVPR 2018): soft-max over scaled cosines, the true class's cosine lowered by a margin."""
from __future__ import annotations

import torch

from .cosine import CosineMarginHead


class CosFaceLoss(CosineMarginHead):
    """CosFace (large margin cosine loss): true-class logit ``scale * (cos(theta_y) - margin)``.

    Reference: H. Wang, Y. Wang, Z. Zhou, X. Ji, D. Gong, J. Zhou, Z. Li, W. Liu, "CosFace: Large
    Margin Cosine Loss for Deep Face Recognition", CVPR 2018.

    Objective: the cross-entropy of the logits ``scale * cos(theta_k)`` for ``k != y`` and
    ``scale * (cos(theta_y) - margin)`` for the true class, with features and class weights
    normalised to unit length (:class:`~foodlib.losses.cosine.CosineMarginHead`). The margin is
    applied only in training; :meth:`predict` gives ``scale * cos(theta)``. ``terms``: ``ce``.

    Learnable state: the class weights ``loss.weight`` ``(C, D)`` (no bias), by back-propagation.

    Args:
        embedding_dim: D.
        num_classes: C.
        margin: the cosine margin ``m``, ``>= 0``. Default 0.35 (the paper's).
        scale: ``s``, ``> 0``. Default 64 (the paper's).

    >>> loss = CosFaceLoss(embedding_dim=2, num_classes=3)
    >>> (loss.margin, loss.scale), loss.predict(torch.randn(4, 2)).shape
    ((0.35, 64.0), torch.Size([4, 3]))
    """

    default_margin = 0.35
    default_scale = 64.0

    def target_logit(self, cos_true: torch.Tensor) -> torch.Tensor:
        return cos_true - self.margin
