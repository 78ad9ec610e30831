"""Large-margin Gaussian Mixture loss (Wan et al., CVPR 2018): classify by Gaussian likelihood, with a margin."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from foodlib.distributed import all_reduce_sum

from .base import DiscriminativeLoss, LossOutput, autocast_off, check_choice, check_number, linear_ramp

COVARIANCES = ("identity", "diagonal")
#: what the first training batch sets (see :class:`LGMLoss`): nothing, the global scale, the means, both.
STARTS = ("none", "scale", "means", "scale_means")


class LGMLoss(DiscriminativeLoss):
    """L-GM loss: soft-max over Gaussian log-likelihoods with a margin, plus a likelihood regularizer.

    Reference: W. Wan, Y. Zhong, T. Li, J. Chen, "Rethinking Feature Distribution for Loss
    Functions in Image Classification", CVPR 2018.

    Objective: the embedding is modelled as a mixture of one Gaussian per class (uniform prior);
    the loss is the cross-entropy of the margin-enlarged class posteriors plus ``lam`` times the
    negative log-likelihood of each sample under its own class. With the global scale ``s`` (see
    below), ``z = x / s`` and ``d_k(x) = 1/2 * sum_d (z_d - mu_kd)^2 / var_kd`` (``var = 1`` for
    ``covariance="identity"``):

    * training logits ``-(d_k * (1 + alpha * [k == y]) + 1/2 * sum_d log var_kd)``: the true
      class's distance is enlarged by the margin ``alpha``;
    * :meth:`predict` logits: the same without the margin;
    * ``L_lkd = mean_i (d_{y_i}(x_i) + 1/2 * sum_d log var_{y_i d})`` (plus ``D * log s`` when the
      scale is learned, so that it stays a negative log-likelihood);
    * total ``CE(training logits) + lam * L_lkd``; ``terms`` holds ``ce`` and ``lkd`` (unscaled).

    Scale assumptions (the reason for ``start``): the authors' features are small (BN-ReLU after
    an 8x8 pool on CIFAR) and their means start near ``||mu||^2 = 2`` with unit variances. Raw
    pooled features of an ImageNet-style backbone are not: ResNet-18's 512-d pooled features have
    ``||x||^2`` of ~460 at 64 px, so ``(alpha + lam) * d_y`` starts at ~100 nats against
    ``ln C = 2.3``. Its gradient ``(alpha + lam) (x - mu_y) / N`` then pulls every feature to the
    origin faster than the means can move, and training falls into L-GM's trivial solution (all
    features and means at one point, CE = ln C). The model is the same in any unit of the feature
    space, so this class measures its distances in units of a global scale ``s``, fixed at the
    first training batch:

    * ``start="scale"`` (default): ``s`` is chosen so that the starting penalty
      ``(alpha + lam) * mean_i d_{y_i}`` of the first batch equals ``start_penalty`` (1 nat), with
      ``alpha`` and ``lam`` at their final values; the means keep the authors' "msra" fill, now
      in units of ``s``. This starts the authors' recipe where the authors' own features start,
      and it was the best start measured (benchmarks/bench_lgm_scale.py, RESULTS.md): it learns
      at alpha 0.1 -> 0.3 and lam 0.1 on raw 512-d features, without a neck.
    * ``"means"``: the means start at the first batch's class means (unit scale); ``"scale_means"``:
      both. ``"none"``: the authors' start as is (collapses on large raw features; kept for
      comparison and for runs saved before this option).

    The statistics of the first batch are summed over all ranks under torch.distributed, so every
    rank starts from the same scale and means. The start is part of the state (``log_scale``,
    ``started`` in ``state_dict()``): a resumed run or a loaded checkpoint never starts again, and
    a checkpoint saved before this option existed loads as started with ``s = 1``.

    Learnable state, trained by back-propagation in the network's optimizer group (same
    optimizer, peak learning rate and schedule as the network, no weight decay;
    :meth:`state_parameters` returns ``[]``):

    * ``loss.means`` ``(C, D)``, in units of ``s``: the mean of class k is ``s * means[k]``.
      Learning-rate rule: with AdamW each coordinate moves about ``lr`` per step, i.e. ``lr``
      standard deviations of the Gaussians whatever the backbone's feature scale. (The authors
      gave the means SGD at 2x the network's learning rate on features of about unit scale.)
    * ``loss.log_var`` ``(C, D)``, ``covariance="diagonal"`` only: log-variances in units of
      ``s^2``, initialised 0. With ``"identity"`` it is ``None`` and the variances stay 1, as in
      the authors' CIFAR-100 setting (``update_sigma: false``).
    * ``loss.log_scale`` ``()``: ``log s``, a buffer set by the start, or a parameter with
      ``learn_scale=True`` (measured, not the default: a learned scale barely moves at AdamW's
      step when it starts wrong).

    Margin warm-up: the authors grow ``alpha`` during training (CIFAR-100: 0.1, doubled every
    5000 iterations, capped at 0.3, i.e. full after two doublings). By default
    (``alpha_warmup_epochs=None``) :meth:`set_progress` ramps the margin linearly from
    ``alpha_start`` (default ``alpha / 3``, the authors' 0.1 for 0.3) to ``alpha`` over the first
    third of the run's epochs (at least one); ``alpha_warmup_epochs=0`` gives a fixed margin.

    Args:
        embedding_dim: D.
        num_classes: C.
        lam: weight of the likelihood regularizer, ``>= 0``. Default 0.1 (the authors' CIFAR-100
            ``center_coef``; 0.01 is their other setting).
        alpha: final margin, ``>= 0``. Default 0.3 (the authors' final CIFAR-100 value).
        covariance: ``"identity"`` (default) or ``"diagonal"`` (learned per-class variances).
        alpha_warmup_epochs: epochs over which the margin ramps up; ``None`` (default): the first
            third of the run; 0: fixed margin.
        alpha_start: margin at epoch 0 of the warm-up; ``None`` (default) means ``alpha / 3``.
        lam_warmup_epochs: ramp ``lam`` linearly from 0 over this many epochs (0: off).
        start: what the first training batch sets, one of :data:`STARTS`. Default ``"scale"``.
        start_penalty: the starting penalty ``(alpha + lam) * mean d_y`` in nats that
            ``"scale"`` / ``"scale_means"`` aim at, ``> 0``. Default 1.
        learn_scale: learn ``log s`` by back-propagation (default False: fixed after the start).

    >>> loss = LGMLoss(embedding_dim=2, num_classes=3, alpha=0.3)
    >>> x, y = torch.randn(6, 2), torch.tensor([0, 0, 1, 1, 2, 2])
    >>> out = loss(x, y)  # the first training batch sets the scale
    >>> sorted(out.terms), loss.predict(x).shape, bool(loss.started)
    (['ce', 'lkd'], torch.Size([6, 3]), True)
    """

    term_names = ("ce", "lkd")
    # Mahalanobis distance to the means is Euclidean for the identity covariance; a diagonal one is per
    # class, so no single metric fits a gallery and Euclidean stays the neutral choice.
    metric = "euclidean"

    def __init__(self, embedding_dim: int, num_classes: int, lam: float = 0.1, alpha: float = 0.3,
                 covariance: str = "identity", alpha_warmup_epochs: int | None = None,
                 alpha_start: float | None = None, lam_warmup_epochs: int = 0, start: str = "scale",
                 start_penalty: float = 1.0, learn_scale: bool = False):
        super().__init__(embedding_dim, num_classes)
        owner = type(self).__name__
        check_number(owner, "lam", lam, 0.0, hint="it weights the likelihood term; the authors used 0.1")
        check_number(owner, "alpha", alpha, 0.0, hint="it is the L-GM margin; the authors used 0.1 to 0.3")
        check_choice(owner, "covariance", covariance, COVARIANCES)
        if alpha_warmup_epochs is not None:
            check_number(owner, "alpha_warmup_epochs", alpha_warmup_epochs, 0)
        check_number(owner, "lam_warmup_epochs", lam_warmup_epochs, 0)
        if alpha_start is None:
            alpha_start = alpha / 3.0
        check_number(owner, "alpha_start", alpha_start, 0.0, hint="it is the margin at the start of the warm-up")
        check_choice(owner, "start", start, STARTS)
        check_number(owner, "start_penalty", start_penalty, 0.0, low_open=True,
                     hint="it is the starting penalty in nats; 1 is the default")
        self.lam = float(lam)
        self.alpha = float(alpha)
        self.covariance = covariance
        self.alpha_warmup_epochs = None if alpha_warmup_epochs is None else int(alpha_warmup_epochs)
        self.alpha_start = float(alpha_start)
        self.lam_warmup_epochs = int(lam_warmup_epochs)
        self.start = start
        self.start_penalty = float(start_penalty)
        self.learn_scale = bool(learn_scale)
        # The values in use this epoch; set_progress moves them along the warm-ups.
        self.current_alpha = self.alpha if self.alpha_warmup_epochs == 0 else self.alpha_start
        self.current_lam = 0.0 if self.lam_warmup_epochs > 0 else self.lam

        # "msra" fill of the authors' Caffe layer, in units of the scale s
        self.means = nn.Parameter(torch.randn(num_classes, embedding_dim) * math.sqrt(2.0 / embedding_dim))
        if covariance == "diagonal":
            self.log_var = nn.Parameter(torch.zeros(num_classes, embedding_dim))
        else:
            self.register_parameter("log_var", None)
        log_scale = torch.zeros(())
        if self.learn_scale:
            self.log_scale = nn.Parameter(log_scale)
        else:
            self.register_buffer("log_scale", log_scale)
        # uint8, not bool: every collective backend (gloo's broadcast in broadcast_state) takes it
        self.register_buffer("started", torch.tensor(int(start == "none"), dtype=torch.uint8))
        self._started = start == "none"  # host copy: checking the buffer every step would sync a GPU

    def extra_repr(self) -> str:
        return f"lam={self.lam}, alpha={self.alpha}, covariance={self.covariance!r}, start={self.start!r}"

    # ----- the scale-aware start ----------------------------------------------------------------

    @torch.no_grad()
    def start_from_batch(self, x: torch.Tensor, labels: torch.Tensor) -> None:
        """Set the scale and/or the means from a float32 batch ``(N, D)`` (all ranks summed); mark started.

        ``fit()`` never calls this: :meth:`forward` does, on the first training batch.
        """
        num_classes, dim = self.num_classes, self.embedding_dim
        x64 = x.detach().double()  # (N, D)
        means = self.means.detach().double()  # (C, D), in units of s (s = 1 before the start)
        # One all-reduce: class counts, class sums, sum ||x||^2, sum x.m_y, sum ||m_y||^2.
        stats = torch.cat([
            torch.bincount(labels, minlength=num_classes).double(),  # (C,)
            torch.zeros(num_classes, dim, dtype=torch.float64, device=x.device).index_add_(0, labels, x64).flatten(),
            torch.stack([x64.pow(2).sum(), (x64 * means[labels]).sum(), means[labels].pow(2).sum()]),
        ])
        stats = all_reduce_sum(stats)
        counts = stats[:num_classes]  # (C,)
        sums = stats[num_classes:num_classes * (dim + 1)].view(num_classes, dim)  # (C, D)
        square_sum, cross_sum, means_square_sum = stats[-3:]
        n = counts.sum().clamp_min(1.0)
        present = counts > 0  # (C,)
        class_means = sums[present] / counts[present, None]  # (C', D)
        weight = (self.alpha + self.lam) or 1.0
        target = 2.0 * self.start_penalty / weight  # wanted mean ||z - mu_y||^2 at the start

        log_scale = 0.0
        if self.start == "scale_means":
            # z = x / s and mu_y = class mean / s: mean ||z - mu_y||^2 = within-class scatter / s^2
            within = (square_sum - (class_means.pow(2).sum(1) * counts[present]).sum()) / n
            log_scale = 0.5 * math.log(max(float(within), 1e-12) / target)
        elif self.start == "scale":
            # mean ||x u - m_y||^2 = A u^2 - 2 B u + M with u = 1 / s: solve for the target
            a, b, m = float(square_sum / n), float(cross_sum / n), float(means_square_sum / n)
            disc = b * b - a * (m - target)
            u = (b + math.sqrt(disc)) / a if disc > 0 and a > 0 else max(b / max(a, 1e-12), 1e-6)
            log_scale = -math.log(max(u, 1e-12))
        self.log_scale.fill_(log_scale)
        if self.start in ("means", "scale_means"):
            self.means[present] = (class_means / math.exp(log_scale)).to(self.means.dtype)
        self.started.fill_(1)
        self._started = True

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # A checkpoint from before the start existed: its means are in raw units and already trained.
        if prefix + "means" in state_dict and prefix + "started" not in state_dict:
            state_dict[prefix + "started"] = torch.tensor(1, dtype=torch.uint8)
            state_dict.setdefault(prefix + "log_scale", torch.zeros(()))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        self._started = bool(self.started)  # once per load, not per step

    # ----- Gaussian pieces --------------------------------------------------------------------

    def half_mahalanobis(self, x: torch.Tensor) -> torch.Tensor:
        """``d_k(x_i)`` for a float32 embedding ``(N, D)`` -> ``(N, C)``, clamped at 0.

        The expansion ``sum_d w_kd (z_d^2 - 2 z_d mu_kd + mu_kd^2)`` with precisions ``w = 1/var``
        turns the N x C x D difference tensor into two matmuls.
        """
        z = x * torch.exp(-self.log_scale.float())  # (N, D), in units of s
        means = self.means.float()  # (C, D)
        if self.log_var is None:
            squared = (z.pow(2).sum(1, keepdim=True)  # (N, 1)
                       - 2.0 * z @ means.T  # (N, C)
                       + means.pow(2).sum(1))  # (C,)
        else:
            precision = torch.exp(-self.log_var.float())  # (C, D)
            squared = (z.pow(2) @ precision.T  # (N, C)
                       - 2.0 * z @ (means * precision).T  # (N, C)
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
            if self.training and not self._started:
                self.start_from_batch(x, labels)
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
            if self.learn_scale:  # the Gaussian's normaliser D log s, which a learned s must pay
                likelihood_term = likelihood_term + self.embedding_dim * self.log_scale.float()
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

    def margin_warmup_epochs(self, epochs: int) -> int:
        """Epochs of the margin ramp in a run of ``epochs``: the set value, or the first third (>= 1)."""
        if self.alpha_warmup_epochs is not None:
            return self.alpha_warmup_epochs
        return max(1, round(epochs / 3))

    def set_progress(self, epoch: int, epochs: int) -> None:
        """Set the margin and ``lam`` of this (0-based) epoch along their warm-ups."""
        self.current_alpha = linear_ramp(self.alpha_start, self.alpha, epoch, self.margin_warmup_epochs(epochs))
        self.current_lam = linear_ramp(0.0, self.lam, epoch, self.lam_warmup_epochs)
