"""The shared head of the cosine-margin losses (CosFace, ArcFace): unit weights, unit features, a scale."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import DiscriminativeLoss, LossOutput, autocast_off, check_number

#: smallest norm in the normalisations: a zero embedding gives cosines 0 instead of NaN.
NORM_EPS = 1e-12


class CosineMarginHead(DiscriminativeLoss):
    """Soft-max over ``scale * cos(theta_k)`` with a margin on the true class; not registered itself.

    ``cos(theta_k) = (x / ||x||) . (w_k / ||w_k||)`` for the class weights ``loss.weight``
    ``(C, D)`` (no bias). Subclasses define :meth:`target_logit`, the margin-modified
    ``cos(theta_y)`` of the true class; :meth:`predict` gives ``scale * cos(theta)`` with no
    margin. Everything runs in float32 with autocast off.

    Learnable state: ``loss.weight`` ``(C, D)``, Xavier-uniform initialised, trained by
    back-propagation with the network's learning rate. Only its direction matters, so ``fit()``'s
    weight decay does not touch it (the default :meth:`weight_decay_parameters`: none).
    """

    term_names = ("ce",)
    metric = "cosine"  # features and class weights are normalised: angles are what training shapes
    default_margin = 0.0  # overridden by each paper's value
    default_scale = 64.0
    max_margin = float("inf")  # largest valid margin

    def __init__(self, embedding_dim: int, num_classes: int, margin: float | None = None,
                 scale: float | None = None):
        super().__init__(embedding_dim, num_classes)
        owner = type(self).__name__
        margin = self.default_margin if margin is None else margin
        scale = self.default_scale if scale is None else scale
        check_number(owner, "margin", margin, 0.0, self.max_margin,
                     hint=f"the paper used {self.default_margin}")
        check_number(owner, "scale", scale, 0.0, low_open=True,
                     hint=f"it multiplies the cosines; the paper used {self.default_scale:g}")
        self.margin = float(margin)
        self.scale = float(scale)
        self.weight = nn.Parameter(nn.init.xavier_uniform_(torch.empty(num_classes, embedding_dim)))  # (C, D)

    def extra_repr(self) -> str:
        return f"margin={self.margin}, scale={self.scale}"

    def cosines(self, embedding32: torch.Tensor) -> torch.Tensor:
        """``cos(theta)`` between each embedding and each class weight, ``(N, C)``, in [-1, 1]."""
        unit_x = F.normalize(embedding32, dim=1, eps=NORM_EPS)  # (N, D)
        unit_w = F.normalize(self.weight.float(), dim=1, eps=NORM_EPS)  # (C, D)
        return (unit_x @ unit_w.T).clamp(-1.0, 1.0)  # (N, C); rounding can step past +-1

    def target_logit(self, cos_true: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        """The margin-modified cosine of the true class, ``(N,)`` -> ``(N,)``."""
        raise NotImplementedError

    def forward(self, embedding: torch.Tensor, labels: torch.Tensor) -> LossOutput:
        self.check_batch(embedding, labels)
        labels = labels.long()
        with autocast_off(embedding):
            cos = self.cosines(embedding.float())  # (N, C)
            cos_true = cos.gather(1, labels[:, None]).squeeze(1)  # (N,)
            true_class = F.one_hot(labels, self.num_classes).bool()  # (N, C)
            margined = torch.where(true_class, self.target_logit(cos_true)[:, None], cos)  # (N, C)
            logits = self.scale * margined
            ce = F.cross_entropy(logits, labels)
        return LossOutput(loss=ce, logits=logits, terms={"ce": ce.detach()})

    def predict(self, embedding: torch.Tensor) -> torch.Tensor:
        """``scale * cos(theta)``, no margin, ``(N, C)``."""
        self.check_batch(embedding)
        with autocast_off(embedding):
            return self.scale * self.cosines(embedding.float())
