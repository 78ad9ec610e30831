"""Island loss update scale before and after issue 18: the push on the centers vs Cai et al.'s update.

For C classes (D = 512, centers drawn as :class:`~foodlib.losses.IslandLoss` draws them), prints
the mean norm of the island part of one paper-mode center step (rate alpha = 0.5, lam_island =
10): as the paper writes it (a python loop over its formula, lambda_1 / (C - 1) * sum_{k != j}
...), as foodlib computed it before (``lam_island * dL_I/dc``, the exact gradient over ordered
pairs) and as it computes it now (``IslandLoss._center_update_direction`` with an empty batch
part). "acts like lambda_1" is the paper's lambda_1 that the old step equals.

    PYTHONPATH=$PWD python benchmarks/bench_island_scale.py
"""
from __future__ import annotations

import numpy as np
import torch

from foodlib.losses import IslandLoss
from foodlib.losses.island import island_term


def paper_step(centers: np.ndarray, lambda_1: float) -> np.ndarray:
    """Cai et al.'s island term of the center update, written as in the paper (a double loop)."""
    c = len(centers)
    norms = np.linalg.norm(centers, axis=1)
    step = np.zeros_like(centers)
    for j in range(c):
        for k in range(c):
            if j != k:
                step[j] += (centers[k] / (norms[k] * norms[j])
                            - (centers[k] @ centers[j]) * centers[j] / (norms[k] * norms[j] ** 3))
    return lambda_1 / (c - 1) * step


def main():
    alpha, lam_island, dim = 0.5, 10.0, 512
    print("| C | paper step (loop) | foodlib before | foodlib now | before / paper | before acts like lambda_1 |")
    print("|---|---|---|---|---|---|")
    for num_classes in (2, 7, 10, 101):
        torch.manual_seed(0)
        loss = IslandLoss(dim, num_classes, alpha=alpha, lam_island=lam_island)
        centers = loss.centers.detach().double()  # (C, D)
        paper = alpha * np.linalg.norm(paper_step(centers.numpy(), lam_island), axis=1).mean()
        exact = centers.clone().requires_grad_(True)
        (gradient,) = torch.autograd.grad(island_term(exact), exact)
        before = alpha * float((lam_island * gradient).norm(dim=1).mean())
        no_batch = torch.zeros(0, dim), torch.zeros(0, dtype=torch.long)  # only the island part moves
        now = alpha * float(loss._center_update_direction(*no_batch).double().norm(dim=1).mean())
        print(f"| {num_classes} | {paper:.4g} | {before:.4g} | {now:.4g} | {before / paper:.1f} "
              f"| {lam_island * before / paper:.0f} |")


if __name__ == "__main__":
    main()
