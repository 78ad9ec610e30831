"""The contract every foodlib loss follows.

A loss module owns everything class-specific (linear classifier, centers, Gaussian means and
variances), as face-recognition heads do; the model only maps images to embeddings ``(N, D)``.

>>> out = loss(embedding, labels)      # training: out.loss, out.logits (C columns), out.terms
>>> logits = loss.predict(embedding)   # evaluation logits (no margin), (N, C)
"""
from __future__ import annotations

import math

from dataclasses import dataclass, field
from numbers import Real

import torch
from torch import nn


@dataclass
class LossOutput:
    """What a loss returns for one batch.

    Attributes:
        loss: scalar tensor to back-propagate.
        logits: ``(N, C)`` training logits (with any margin applied).
        terms: each term of the objective as a detached scalar tensor, for logging
            (e.g. ``{"ce": ..., "center": ...}``); keys are stable across batches.
    """

    loss: torch.Tensor
    logits: torch.Tensor
    terms: dict[str, torch.Tensor] = field(default_factory=dict)


class DiscriminativeLoss(nn.Module):
    """Base class: a head over embeddings that returns a :class:`LossOutput`.

    Subclasses implement :meth:`forward` and :meth:`predict`. Optional hooks:

    * :meth:`state_parameters`: learnable class state (centers) that takes its own learning rate
      in ``fit()`` (a second parameter group); all other parameters join the network's group.
    * :meth:`weight_decay_parameters`: which of those other parameters take the network's weight
      decay (default: none, since pulling class state towards the origin would fight the loss).
    * :meth:`update_centers`: called by ``fit()`` after each optimizer step with the detached
      batch embedding, for state updated outside autograd (Center Loss Algorithm 1).
    * :meth:`set_progress`: called by ``fit()`` at the start of each epoch, for schedules
      (margin or lambda warm-up).
    """

    #: names of the terms in ``LossOutput.terms`` (besides the total), in logging order.
    term_names: tuple[str, ...] = ("ce",)
    #: the distance that ranks this loss's embeddings in nearest-neighbour search (retrieval,
    #: open-set, ``foodlib neighbours``): "euclidean" for losses that pull by (squared) Euclidean
    #: distance, or that train no metric (softmax, where Euclidean is the common default);
    #: "cosine" for losses that normalise the features and train angles.
    metric: str = "euclidean"

    def __init__(self, embedding_dim: int, num_classes: int):
        super().__init__()
        if embedding_dim < 1 or num_classes < 2:
            raise ValueError(
                f"need embedding_dim >= 1 and num_classes >= 2, got {embedding_dim=}, {num_classes=}"
            )
        self.embedding_dim = embedding_dim
        self.num_classes = num_classes

    def check_batch(self, embedding: torch.Tensor, labels: torch.Tensor | None = None) -> None:
        """Raise a ValueError naming the shapes when a batch does not fit this head.

        Only shapes are checked: a label range check would need a device sync on every step.
        """
        name = type(self).__name__
        if embedding.ndim != 2 or embedding.shape[1] != self.embedding_dim:
            raise ValueError(
                f"{name}: embedding must have shape (N, {self.embedding_dim}), got "
                f"{tuple(embedding.shape)}; build the loss with embedding_dim equal to the model's"
            )
        if labels is not None and (labels.ndim != 1 or labels.shape[0] != embedding.shape[0]):
            raise ValueError(
                f"{name}: labels must have shape (N,) = ({embedding.shape[0]},) to match the "
                f"embedding, got {tuple(labels.shape)}; pass class indices, not one-hot rows"
            )

    def forward(self, embedding: torch.Tensor, labels: torch.Tensor) -> LossOutput:  # pragma: no cover
        raise NotImplementedError

    def predict(self, embedding: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def state_parameters(self) -> list[nn.Parameter]:
        return []

    def weight_decay_parameters(self) -> list[nn.Parameter]:
        """The parameters of this loss that ``fit()`` decays like the network's weight matrices.

        The default is none: class state (centers, Gaussian means, log-variances, proxies) is what
        the loss pulls embeddings towards, and decaying it towards the origin would fight the loss.
        A loss with a plain linear classifier returns its weight matrix (never its bias), as the
        network's own last layer would be decayed. Parameters in :meth:`state_parameters` have
        their own optimizer and are never decayed, whatever this returns.
        """
        return []

    @torch.no_grad()
    def update_centers(self, embedding: torch.Tensor, labels: torch.Tensor) -> None:
        return None

    def set_progress(self, epoch: int, epochs: int) -> None:
        return None


# ----- helpers shared by the losses ----------------------------------------------------------


def autocast_off(tensor: torch.Tensor) -> torch.autocast:
    """A context with autocast disabled on ``tensor``'s device, so loss math stays float32.

    Under AMP the embedding arrives as bf16/fp16; distances, soft-max and center updates lose too
    much precision there, so every loss casts the embedding up and computes inside this context.
    """
    return torch.autocast(device_type=tensor.device.type, enabled=False)


def linear_ramp(start: float, end: float, epoch: int, warmup_epochs: int) -> float:
    """``start`` at epoch 0, moving linearly to ``end`` at ``epoch == warmup_epochs`` and after.

    >>> [linear_ramp(0.0, 1.0, e, 4) for e in range(6)]
    [0.0, 0.25, 0.5, 0.75, 1.0, 1.0]
    """
    if warmup_epochs <= 0:
        return end
    fraction = min(1.0, max(0, epoch) / warmup_epochs)
    return start + (end - start) * fraction


def check_number(owner: str, name: str, value, low: float, high: float = float("inf"), *,
                 low_open: bool = False, hint: str = "") -> None:
    """Raise a ValueError naming ``owner``, ``name`` and ``value`` unless low <= value <= high.

    ``low_open`` makes the lower bound strict. NaN, infinities and non-numbers are rejected too.
    """
    is_number = isinstance(value, Real) and not isinstance(value, bool)
    if is_number and not math.isfinite(value):
        raise ValueError(f"{owner}: {name}={value!r} must be a finite number" + (f"; {hint}" if hint else ""))
    above = is_number and (value > low if low_open else value >= low)
    if not (above and value <= high):
        interval = f"{'(' if low_open else '['}{low}, {high}{']' if high != float('inf') else ')'}"
        raise ValueError(f"{owner}: {name} must be a number in {interval}, got {name}={value!r}"
                         + (f"; {hint}" if hint else ""))


def check_choice(owner: str, name: str, value, choices: tuple[str, ...]) -> None:
    """Raise a ValueError naming ``owner``, ``name``, ``value`` and the valid choices."""
    if value not in choices:
        raise ValueError(f"{owner}: {name} must be one of {', '.join(map(repr, choices))}, "
                         f"got {name}={value!r}")
