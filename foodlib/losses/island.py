"""Island loss (Cai et al., 2018): Center Loss plus a term that pushes the class centers apart in angle."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import check_number
from .center import CenterLoss

#: smallest center norm used in the cosine; keeps a zero center finite (cosine 0) instead of NaN.
COSINE_EPS = 1e-6


def island_term(centers: torch.Tensor) -> torch.Tensor:
    """``L_I = sum_{j != k} (cos(c_j, c_k) + 1)`` over ordered pairs for centers ``(C, D)``.

    Each unordered pair counts twice (C=59 classes give 59 * 58 = 3422 terms). ``L_I`` is 0 only
    when every pair is antipodal, which is possible for C=2; for more classes it is smallest when
    the centers spread out evenly in angle.

    The sum over pairs never builds the C x C cosine matrix: with unit vectors u_j and their sum
    S, ``sum_{j != k} u_j . u_k = ||S||^2 - sum_j ||u_j||^2`` exactly, so value and gradient cost
    O(C * D) (at C=1000 this made the island loss as cheap as Center Loss; benchmarks/RESULTS.md).
    """
    unit = F.normalize(centers, dim=1, eps=COSINE_EPS)  # (C, D); a zero row stays zero
    total = unit.sum(dim=0)  # (D,)
    num_classes = centers.shape[0]
    # ||S||^2 holds every ordered pair once plus the diagonal ||u_j||^2 (1, or 0 for a zero center).
    return total.dot(total) - unit.pow(2).sum() + num_classes * (num_classes - 1)


class IslandLoss(CenterLoss):
    """Island loss: Center Loss plus ``lam_island`` times the paper's pairwise-cosine push on the centers.

    Reference: J. Cai, Z. Meng, A. S. Khan, Z. Li, J. O'Reilly, Y. Tong, "Island Loss for Learning
    Discriminative Features in Facial Expression Recognition", IEEE FG 2018.

    Objective: ``CE + lam * (L_C + lam_island * L_I / (2 (C - 1)))`` with ``L_C`` the Center Loss
    term and ``L_I = sum_{j != k} (cos(c_j, c_k) + 1)`` over ordered pairs of classes (the paper's
    island term, see :func:`island_term`); the centers are pulled toward their samples and pushed
    apart in angle. ``terms`` holds ``ce``, ``center`` (``L_C``) and ``island`` (``L_I``), unscaled.
    ``L_I`` does not depend on the embedding, so the network's gradient is that of Center Loss;
    ``L_I`` moves only the centers.

    Scale of ``lam_island`` (the paper's lambda_1): the paper's center update (its Eq. 5 and
    Algorithm 1) adds ``lambda_1 / (C - 1) * sum_{k != j} (u_k - cos(c_j, c_k) u_j) / ||c_j||``
    with ``u = c / ||c||``, which is ``1 / (2 (C - 1))`` times the exact gradient of the ``L_I``
    it writes (``dL_I/dc_j = 2 * sum_{k != j} (u_k - cos(c_j, c_k) u_j) / ||c_j||``). This class
    follows the update, so ``lam_island`` means what the paper's lambda_1 means for any C: the
    push on a center is lambda_1 times the mean over the other classes of the gradient of their
    cosine, and the reported total uses the same ``L_I / (2 (C - 1))`` so that the total's gradient
    is the update. (Before, the exact gradient of ``L_I`` was used, which at C = 10 made the
    default 10 act like the paper's 180; benchmarks/RESULTS.md.)

    Learnable state: the centers ``loss.centers`` ``(C, D)``, initialised as in
    :class:`CenterLoss` (random, norm about 1: the cosine needs non-zero centers).

    * ``update="paper"``: after each optimizer step :meth:`update_centers` applies
      ``c <- c - alpha * (delta_c + lam_island / (2 (C - 1)) * dL_I/dc)``: the Algorithm 1 step of
      Center Loss (classes present in the batch only; sums and counts all-reduced under
      torch.distributed) plus the paper's island step for every center, evaluated at the current
      centers and computed with autograd. The rate ``alpha`` is constant, as in the paper's
      Algorithm 1: the island push does not follow the network's learning-rate schedule. The
      centers are identical on every rank, so the island part needs no communication.
    * ``update="sgd"``: the centers are an ``nn.Parameter`` (own constant learning rate
      ``center_lr`` in ``fit()``, not scheduled either) and receive
      ``dL_C/dc + lam_island / (2 (C - 1)) * dL_I/dc``, neither scaled by ``lam``; the network
      receives ``lam * dL_C/dx``.

    Scale assumptions: ``L_I`` depends only on the centers' directions, so the push is in units
    of ``1 / ||c_j||``: a center near the origin is pushed hard; an exactly zero center gives
    cosine 0 and a large but finite push (norms are clamped at ``COSINE_EPS``), never NaN. Large
    raw features (pooled ResNet features have ``||x||^2`` in the hundreds) make the centers long,
    which weakens the push relative to the Center Loss pull; the paper's features were smaller.

    Args:
        embedding_dim: D.
        num_classes: C.
        lam: weight of ``L_C + lam_island * L_I / (2 (C - 1))``, ``>= 0``. Default 0.01 (Cai et al.).
        lam_island: the paper's lambda_1, weight of the center-separation step, ``>= 0``. Default 10
            (Cai et al.).
        alpha: center update rate of the paper rule, in ``(0, 1]``. Default 0.5.
        update: ``"paper"`` (default) or ``"sgd"``.
        lam_warmup_epochs: ramp ``lam`` linearly from 0 over this many epochs (0: off).

    >>> loss = IslandLoss(embedding_dim=2, num_classes=3)
    >>> x, y = torch.randn(6, 2), torch.tensor([0, 0, 1, 1, 2, 2])
    >>> sorted(loss(x, y).terms)
    ['ce', 'center', 'island']
    >>> loss.island_weight  # lam_island / (2 (C - 1)): the paper's per-pair weight
    2.5
    >>> loss.update_centers(x, y)  # after optimizer.step(), with update="paper"
    """

    term_names = ("ce", "center", "island")

    def __init__(self, embedding_dim: int, num_classes: int, lam: float = 0.01, lam_island: float = 10.0,
                 alpha: float = 0.5, update: str = "paper", lam_warmup_epochs: int = 0):
        super().__init__(embedding_dim, num_classes, lam=lam, alpha=alpha, update=update,
                         lam_warmup_epochs=lam_warmup_epochs)
        check_number(type(self).__name__, "lam_island", lam_island, 0.0,
                     hint="it weights the center-separation term; Cai et al. used 10")
        self.lam_island = float(lam_island)
        # the paper's update: lambda_1 / (C - 1) per pair gradient, i.e. 1 / (2 (C - 1)) of dL_I/dc
        self.island_weight = self.lam_island / (2.0 * (num_classes - 1))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, lam_island={self.lam_island}"

    def _add_center_state_terms(self, total: torch.Tensor, centers: torch.Tensor,
                                terms: dict[str, torch.Tensor]) -> torch.Tensor:
        separation = island_term(centers)
        terms["island"] = separation.detach()
        # Value: lam * island_weight * L_I. Gradient (sgd mode only, since paper-mode centers are a
        # buffer): island_weight * dL_I/dc, unscaled by lam like the center term's.
        total = total + self.current_lam * self.island_weight * separation.detach()
        if separation.requires_grad:
            total = total + self.island_weight * (separation - separation.detach())
        return total

    def _center_update_direction(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Algorithm 1's ``delta_c`` plus the paper's island step ``island_weight * dL_I/dc``, ``(C, D)``."""
        direction = super()._center_update_direction(x, labels)
        with torch.enable_grad():  # update_centers runs under no_grad
            centers = self.centers.detach().float().requires_grad_(True)
            (island_gradient,) = torch.autograd.grad(island_term(centers), centers)
        return direction + self.island_weight * island_gradient
