"""Large-margin Gaussian Mixture loss (Wan et al., CVPR 2018): classify by Gaussian likelihood, with a margin."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .base import DiscriminativeLoss, LossOutput, autocast_off, check_choice, check_number, linear_ramp

COVARIANCES = ("identity", "diagonal")


class LGMLoss(DiscriminativeLoss):
    """L-GM loss: soft-max over Gaussian log-likelihoods with a margin, plus a likelihood regularizer.

    Reference: W. Wan, Y. Zhong, T. Li, J. Chen, "Rethinking Feature Distribution for Loss
    Functions in Image Classification", CVPR 2018.

    Objective: the embedding is modelled as a mixture of one Gaussian per class (uniform prior);
    the loss is the cross-entropy of the margin-enlarged class posteriors plus ``lam`` times the
    negative log-likelihood of each sample under its own class. With
    ``d_k(x) = 1/2 * sum_d (x_d - mu_kd)^2 / var_kd`` (``var = 1`` for ``covariance="identity"``):

    * training logits ``-(d_k * (1 + alpha * [k == y]) + 1/2 * sum_d log var_kd)``: the true
      class's distance is enlarged by the margin ``alpha``;
    * :meth:`predict` logits: the same without the margin;
    * ``L_lkd = mean_i (d_{y_i}(x_i) + 1/2 * sum_d log var_{y_i d})``;
    * total ``CE(training logits) + lam * L_lkd``; ``terms`` holds ``ce`` and ``lkd`` (unscaled).

    All C distances are needed for the logits, so an ``(N, C)`` matrix is inherent here; it is
    computed as ``||x||^2 - 2 x.mu + ||mu||^2`` with matmuls (weighted by the precisions for the
    diagonal case), clamped at 0, in float32 with autocast off.

    Learnable state, trained by back-propagation with the network's learning rate
    (:meth:`state_parameters` returns ``[]``: ``fit()``'s separate group and ``center_lr`` are
    tuned for center updates, and the authors' CIFAR-100 setup gave the means only a 2x
    learning-rate multiplier):

    * ``loss.means`` ``(C, D)``: initialised ``N(0, 2/D)`` per coordinate, the "msra" filler of
      the authors' Caffe layer;
    * ``loss.log_var`` ``(C, D)``, ``covariance="diagonal"`` only: log-variances, initialised 0
      (unit variances). With ``"identity"`` it is ``None`` and the variances stay 1, as in the
      authors' CIFAR-100 setting (``update_sigma: false``).

    Margin warm-up: the authors grow ``alpha`` during training (CIFAR-100: 0.1, doubled every
    5000 iterations, capped at 0.3). Here, with ``alpha_warmup_epochs > 0``, :meth:`set_progress`
    ramps the margin linearly from ``alpha_start`` at epoch 0 to ``alpha`` at that epoch.

    Args:
        embedding_dim: D.
        num_classes: C.
        lam: weight of the likelihood regularizer, ``>= 0``. Default 0.1 (the authors' CIFAR-100
            ``center_coef``).
        alpha: margin, ``>= 0``. Default 0.3 (the authors' final CIFAR-100 value).
        covariance: ``"identity"`` (default) or ``"diagonal"`` (learned per-class variances).
        alpha_warmup_epochs: epochs over which the margin ramps up (0, the default: fixed margin).
        alpha_start: margin at epoch 0 of the warm-up; ``None`` (default) means ``0.1 * alpha``.
        lam_warmup_epochs: ramp ``lam`` linearly from 0 over this many epochs (0: off).

    >>> loss = LGMLoss(embedding_dim=2, num_classes=3, alpha=0.3)
    >>> x, y = torch.randn(6, 2), torch.tensor([0, 0, 1, 1, 2, 2])
    >>> out = loss(x, y)
    >>> sorted(out.terms), loss.predict(x).shape
    (['ce', 'lkd'], torch.Size([6, 3]))
    """

    term_names = ("ce", "lkd")

    def __init__(self, embedding_dim: int, num_classes: int, lam: float = 0.1, alpha: float = 0.3,
                 covariance: str = "identity", alpha_warmup_epochs: int = 0,
                 alpha_start: float | None = None, lam_warmup_epochs: int = 0):
        super().__init__(embedding_dim, num_classes)
        owner = type(self).__name__
        check_number(owner, "lam", lam, 0.0, hint="it weights the likelihood term; the authors used 0.1")
        check_number(owner, "alpha", alpha, 0.0, hint="it is the L-GM margin; the authors used 0.1 to 0.3")
        check_choice(owner, "covariance", covariance, COVARIANCES)
        check_number(owner, "alpha_warmup_epochs", alpha_warmup_epochs, 0)
        check_number(owner, "lam_warmup_epochs", lam_warmup_epochs, 0)
        if alpha_start is None:
            alpha_start = 0.1 * alpha
        check_number(owner, "alpha_start", alpha_start, 0.0, hint="it is the margin at the start of the warm-up")
        self.lam = float(lam)
        self.alpha = float(alpha)
        self.covariance = covariance
        self.alpha_warmup_epochs = int(alpha_warmup_epochs)
        self.alpha_start = float(alpha_start)
        self.lam_warmup_epochs = int(lam_warmup_epochs)
        # The values in use this epoch; set_progress moves them along the warm-ups.
        self.current_alpha = self.alpha_start if self.alpha_warmup_epochs > 0 else self.alpha
        self.current_lam = 0.0 if self.lam_warmup_epochs > 0 else self.lam

        self.means = nn.Parameter(torch.randn(num_classes, embedding_dim) * math.sqrt(2.0 / embedding_dim))
        if covariance == "diagonal":
            self.log_var = nn.Parameter(torch.zeros(num_classes, embedding_dim))
        else:
            self.register_parameter("log_var", None)

    def extra_repr(self) -> str:
        return f"lam={self.lam}, alpha={self.alpha}, covariance={self.covariance!r}"

    # ----- Gaussian pieces --------------------------------------------------------------------

    def half_mahalanobis(self, x: torch.Tensor) -> torch.Tensor:
        """``d_k(x_i)`` for a float32 embedding ``(N, D)`` -> ``(N, C)``, clamped at 0.

        The expansion ``sum_d w_kd (x_d^2 - 2 x_d mu_kd + mu_kd^2)`` with precisions ``w = 1/var``
        turns the N x C x D difference tensor into two matmuls.
        """
        means = self.means.float()  # (C, D)
        if self.log_var is None:
            squared = (x.pow(2).sum(1, keepdim=True)  # (N, 1)
                       - 2.0 * x @ means.T  # (N, C)
                       + means.pow(2).sum(1))  # (C,)
        else:
            precision = torch.exp(-self.log_var.float())  # (C, D)
            squared = (x.pow(2) @ precision.T  # (N, C)
                       - 2.0 * x @ (means * precision).T  # (N, C)
                       + (means.pow(2) * precision).sum(1))  # (C,)
        # Cancellation in the expansion can leave tiny negatives where x sits on a mean.
        return 0.5 * squared.clamp_min(0.0)

    def half_log_det(self) -> torch.Tensor | None:
        """``1/2 * sum_d log var_kd`` per class ``(C,)``; ``None`` for identity covariance (all zero)."""
        if self.log_var is None:
            return None
        return 0.5 * self.log_var.float().sum(1)

    # ----- objective ----------------------------------------------------------------------------

    def forward(self, embedding: torch.Tensor, labels: torch.Tensor) -> LossOutput:
        self.check_batch(embedding, labels)
        labels = labels.long()
        with autocast_off(embedding):
            x = embedding.float()  # (N, D)
            distances = self.half_mahalanobis(x)  # (N, C)
            true_class = F.one_hot(labels, self.num_classes).to(distances.dtype)  # (N, C)
            margin_distances = distances * (1.0 + self.current_alpha * true_class)  # (N, C)
            own_distance = distances.gather(1, labels[:, None]).squeeze(1)  # (N,)
            log_det = self.half_log_det()
            if log_det is None:
                logits = -margin_distances
                likelihood_term = own_distance.mean()
            else:
                logits = -(margin_distances + log_det)
                likelihood_term = (own_distance + log_det[labels]).mean()
            ce = F.cross_entropy(logits, labels)
            total = ce + self.current_lam * likelihood_term
        return LossOutput(loss=total, logits=logits,
                          terms={"ce": ce.detach(), "lkd": likelihood_term.detach()})

    def predict(self, embedding: torch.Tensor) -> torch.Tensor:
        """Class log-likelihoods without the margin (uniform prior), ``(N, C)``."""
        self.check_batch(embedding)
        with autocast_off(embedding):
            distances = self.half_mahalanobis(embedding.float())  # (N, C)
            log_det = self.half_log_det()
            return -distances if log_det is None else -(distances + log_det)

    def set_progress(self, epoch: int, epochs: int) -> None:
        """Set the margin and ``lam`` of this (0-based) epoch along their warm-ups."""
        self.current_alpha = linear_ramp(self.alpha_start, self.alpha, epoch, self.alpha_warmup_epochs)
        self.current_lam = linear_ramp(0.0, self.lam, epoch, self.lam_warmup_epochs)
