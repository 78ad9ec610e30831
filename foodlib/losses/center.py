"""Center Loss (Wen et al., ECCV 2016): soft-max plus a pull of each embedding toward its class center."""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .base import LossOutput, autocast_off, check_choice, check_number, linear_ramp
from .softmax import SoftmaxLoss

CENTER_UPDATES = ("paper", "sgd")


def half_squared_distance_to_centers(embedding32: torch.Tensor, own_centers: torch.Tensor) -> torch.Tensor:
    """``1/2 * mean_i ||x_i - c_{y_i}||^2`` for rows already paired with their centers (both ``(N, D)``)."""
    return 0.5 * (embedding32 - own_centers).pow(2).sum(dim=1).mean()


class CenterLoss(SoftmaxLoss):
    """Center Loss: cross-entropy plus ``lam`` times the mean squared distance to the class center.

    Reference: Y. Wen, K. Zhang, Z. Li, Y. Qiao, "A Discriminative Feature Learning Approach for
    Deep Face Recognition", ECCV 2016.

    Objective: ``CE(W x + b, y) + lam * L_C`` with ``L_C = 1/2 * mean_i ||x_i - c_{y_i}||^2``
    (the paper writes a sum over the mini-batch; the mean keeps ``lam`` independent of the batch
    size). ``terms`` holds ``ce`` and ``center`` (``L_C`` unscaled). The classifier is the one of
    :class:`SoftmaxLoss` (``loss.classifier``). Each sample's center is gathered with
    ``centers[labels]``, so the cost is O(N*D) and no (N, C) distance matrix is formed.

    Learnable state: the class centers ``loss.centers`` ``(C, D)``, float32.

    * ``update="paper"`` (Algorithm 1): the centers are a buffer and get no gradient; the
      network gets ``d total / d x_i = lam * (x_i - c_{y_i}) / N`` from the center term. After each
      optimizer step ``fit()`` calls :meth:`update_centers`, which moves every class ``j`` present
      in the batch by ``c_j <- c_j - alpha * sum_{i: y_i = j} (c_j - x_i) / (1 + n_j)``; classes
      absent from the batch do not move. Under ``torch.distributed`` the per-class sums and counts
      are all-reduced first, so every rank applies the update of the global batch.
    * ``update="sgd"``: the centers are an ``nn.Parameter`` returned by :meth:`state_parameters`
      (``fit()`` puts them in their own group with ``center_lr``). The gradient is split so that
      ``lam`` scales only what reaches the network, as in the paper:
      ``d total / d x_i = lam * (x_i - c_{y_i}) / N`` and
      ``d total / d c_j = -sum_{i: y_i = j} (x_i - c_j) / N`` (no ``lam``). The reported loss value is
      still ``CE + lam * L_C``. Note the ``1/N`` here versus the paper rule's per-class
      ``1/(1 + n_j)``: a class with ``n_j`` samples moves by about ``center_lr * n_j / N`` of its
      distance per step.

    Initialisation: centers are drawn from ``N(0, 1/D)`` per coordinate (norm close to 1 for any D)
    rather than zeros. With the paper rule the start is forgotten within a few appearances of a
    class (each one moves the center ``alpha * n_j / (1 + n_j)`` of the way to the batch mean), so
    the choice hardly matters for Center Loss; distinct non-zero directions matter for the island
    loss built on this class, whose cosine between centers is undefined at zero and whose gradient
    grows like ``1 / ||c_j||``.

    Args:
        embedding_dim: D.
        num_classes: C.
        lam: weight of the center term, ``>= 0``. Default 0.01. Wen et al. used 0.003 for face
            recognition (and vary it in their MNIST figures); fine-grained food sits near 0.01.
        alpha: center update rate of the paper rule, in ``(0, 1]``. Default 0.5 (the paper's).
            Unused when ``update="sgd"``.
        update: ``"paper"`` (Algorithm 1, default) or ``"sgd"``.
        lam_warmup_epochs: ramp ``lam`` linearly from 0 over this many epochs through
            :meth:`set_progress` (0, the default: full ``lam`` from the start).

    >>> loss = CenterLoss(embedding_dim=2, num_classes=3, lam=0.01)
    >>> x, y = torch.randn(6, 2), torch.tensor([0, 0, 1, 1, 2, 2])
    >>> out = loss(x, y)
    >>> sorted(out.terms), loss.centers.shape
    (['ce', 'center'], torch.Size([3, 2]))
    >>> loss.update_centers(x, y)  # after optimizer.step(), with update="paper"
    """

    term_names = ("ce", "center")

    def __init__(self, embedding_dim: int, num_classes: int, lam: float = 0.01, alpha: float = 0.5,
                 update: str = "paper", lam_warmup_epochs: int = 0):
        super().__init__(embedding_dim, num_classes)
        owner = type(self).__name__
        check_number(owner, "lam", lam, 0.0, hint="it weights the center term; the paper used 0.003")
        check_number(owner, "alpha", alpha, 0.0, 1.0, low_open=True,
                     hint="it is the fraction a center moves toward its batch mean per step; the paper used 0.5")
        check_choice(owner, "update", update, CENTER_UPDATES)
        check_number(owner, "lam_warmup_epochs", lam_warmup_epochs, 0)
        self.lam = float(lam)
        self.alpha = float(alpha)
        self.update = update
        self.lam_warmup_epochs = int(lam_warmup_epochs)
        self.current_lam = 0.0 if self.lam_warmup_epochs > 0 else self.lam  # lam in use this epoch

        initial = torch.randn(num_classes, embedding_dim) / math.sqrt(embedding_dim)  # (C, D)
        if update == "paper":
            self.register_buffer("centers", initial)  # persistent: saved in the state dict
        else:
            self.centers = nn.Parameter(initial)

    def extra_repr(self) -> str:
        return f"lam={self.lam}, alpha={self.alpha}, update={self.update!r}"

    # ----- objective ------------------------------------------------------------------------

    def forward(self, embedding: torch.Tensor, labels: torch.Tensor) -> LossOutput:
        self.check_batch(embedding, labels)
        labels = labels.long()
        with autocast_off(embedding):
            x = embedding.float()  # (N, D)
            logits = self.classifier_logits(x)  # (N, C)
            ce = F.cross_entropy(logits, labels)
            centers = self.centers.float()  # (C, D)
            total, center_term = self._add_center_term(ce, x, centers, labels)
            terms = {"ce": ce.detach(), "center": center_term.detach()}
            total = self._add_center_state_terms(total, centers, terms)
        return LossOutput(loss=total, logits=logits, terms=terms)

    def _add_center_state_terms(self, total: torch.Tensor, centers: torch.Tensor,
                                terms: dict[str, torch.Tensor]) -> torch.Tensor:
        """Hook for terms on the centers alone (the island loss); adds their logged values to ``terms``."""
        return total

    def _add_center_term(self, ce: torch.Tensor, x: torch.Tensor, centers: torch.Tensor,
                         labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``ce + lam * L_C`` with the gradient routing of the update mode; returns (total, L_C)."""
        if self.update == "paper":
            # centers is a buffer: the only gradient is lam * (x - c) / N, to the network.
            center_term = half_squared_distance_to_centers(x, centers[labels])
            return ce + self.current_lam * center_term, center_term
        # sgd: the same value computed twice, each copy letting the gradient through to one side.
        toward_network = half_squared_distance_to_centers(x, centers.detach()[labels])
        toward_centers = half_squared_distance_to_centers(x.detach(), centers[labels])
        # (t - t.detach()) is exactly 0 in value but carries dL_C/dc unscaled by lam.
        total = ce + self.current_lam * toward_network + (toward_centers - toward_centers.detach())
        return total, toward_network

    # ----- learnable state ------------------------------------------------------------------

    def state_parameters(self) -> list[nn.Parameter]:
        return [self.centers] if self.update == "sgd" else []

    @torch.no_grad()
    def update_centers(self, embedding: torch.Tensor, labels: torch.Tensor) -> None:
        """Apply the paper's rule ``c_j <- c_j - alpha * delta_c_j`` (``update="paper"`` only).

        Call after the optimizer step with the batch's detached embedding ``(N, D)`` and labels
        ``(N,)``. A no-op in ``"sgd"`` mode, where the optimizer moves the centers.
        """
        if self.update != "paper":
            return
        self.check_batch(embedding, labels)
        with autocast_off(embedding):
            step = self._center_update_direction(embedding.detach().float(), labels.long())  # (C, D)
            self.centers.sub_(self.alpha * step)

    def _center_update_direction(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """``delta_c_j = sum_{i: y_i = j} (c_j - x_i) / (1 + n_j)`` for every class ``(C, D)``.

        Rows of classes absent from the (global) batch are zero. Subclasses add terms here.
        """
        centers = self.centers  # (C, D)
        num_classes, dim = centers.shape
        # One buffer for the per-class sums of (c_j - x_i) and the counts n_j: one all-reduce.
        sums_and_counts = torch.zeros(num_classes, dim + 1, device=centers.device, dtype=centers.dtype)
        offsets = centers[labels] - x  # (N, D)
        ones = torch.ones(len(labels), 1, device=centers.device, dtype=centers.dtype)
        sums_and_counts.index_add_(0, labels, torch.cat([offsets, ones], dim=1))
        if dist.is_available() and dist.is_initialized():
            # Centers are identical on every rank, so summing per-rank sums and counts gives the
            # global batch's update and keeps the ranks' centers equal.
            dist.all_reduce(sums_and_counts, op=dist.ReduceOp.SUM)
        sums, counts = sums_and_counts[:, :dim], sums_and_counts[:, dim:]  # (C, D), (C, 1)
        return sums / (1.0 + counts)

    def set_progress(self, epoch: int, epochs: int) -> None:
        """Set the ``lam`` of this (0-based) epoch when ``lam_warmup_epochs > 0``."""
        self.current_lam = linear_ramp(0.0, self.lam, epoch, self.lam_warmup_epochs)
