"""Discriminative losses behind one contract, and a registry to build them by name.

>>> list_losses()
['center', 'island', 'lgm', 'softmax']
>>> loss = create_loss("center", embedding_dim=2, num_classes=10, lam=0.01)
>>> type(loss).__name__, loss.term_names
('CenterLoss', ('ce', 'center'))
>>> # a shared config passes every option; strict=False drops the ones a loss does not take
>>> create_loss("softmax", embedding_dim=2, num_classes=10, strict=False, lam=0.01, covariance="identity")
SoftmaxLoss(
  (classifier): Linear(in_features=2, out_features=10, bias=True)
)
"""
from __future__ import annotations

import inspect
from typing import Any

from .base import DiscriminativeLoss, LossOutput
from .center import CenterLoss
from .island import IslandLoss
from .lgm import LGMLoss
from .softmax import SoftmaxLoss

__all__ = [
    "CenterLoss", "DiscriminativeLoss", "IslandLoss", "LGMLoss", "LossOutput", "SoftmaxLoss",
    "create_loss", "list_losses", "loss_options",
]

_LOSSES: dict[str, type[DiscriminativeLoss]] = {
    "softmax": SoftmaxLoss,
    "center": CenterLoss,
    "lgm": LGMLoss,
    "island": IslandLoss,
}


def list_losses() -> list[str]:
    """Names accepted by :func:`create_loss`, sorted."""
    return sorted(_LOSSES)


def _loss_class(name: str) -> type[DiscriminativeLoss]:
    try:
        return _LOSSES[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown loss {name!r}; valid names: {', '.join(list_losses())}") from None


def loss_options(name: str) -> tuple[str, ...]:
    """The keyword options loss ``name`` takes besides ``embedding_dim`` and ``num_classes``.

    >>> loss_options("lgm")[:3]
    ('lam', 'alpha', 'covariance')
    """
    signature = inspect.signature(_loss_class(name).__init__)
    return tuple(p for p in signature.parameters if p not in ("self", "embedding_dim", "num_classes"))


def create_loss(name: str, embedding_dim: int, num_classes: int, *, strict: bool = True,
                **options: Any) -> DiscriminativeLoss:
    """Build the loss registered as ``name`` (see :func:`list_losses`).

    Args:
        name: registry name, e.g. ``"center"``.
        embedding_dim: D, the width of the model's embedding.
        num_classes: C.
        strict: with ``True`` (default) an option the loss does not take is an error; with
            ``False`` such options are dropped, so a config can pass one shared set (``lam``,
            ``alpha``, ``update``, ``covariance``, ``lam_island``, ...) to every loss.
        **options: the loss's keyword arguments. An option given as ``None`` means "use the loss's
            default" and is dropped (the config writes ``None`` for unset values).

    Returns:
        The loss module, on the CPU in float32; move it with ``.to(device)`` like the model.

    Raises:
        ValueError: unknown name (the message lists the valid ones), an option the loss does not
            take (with ``strict=True``), or an invalid value (the message names it).

    >>> create_loss("lgm", embedding_dim=2, num_classes=5, covariance="diagonal").log_var.shape
    torch.Size([5, 2])
    """
    loss_class = _loss_class(name)
    accepted = loss_options(name)
    given = {key: value for key, value in options.items() if value is not None}
    unknown = sorted(set(given) - set(accepted))
    if unknown and strict:
        shown = ", ".join(f"{key}={given[key]!r}" for key in unknown)
        raise ValueError(
            f"create_loss({name!r}): unexpected option(s) {shown}; {name!r} takes "
            f"{', '.join(accepted) or 'no options'}. Pass strict=False to drop options a loss does "
            f"not use (e.g. a config shared by all losses)."
        )
    kept = {key: value for key, value in given.items() if key in accepted}
    return loss_class(embedding_dim, num_classes, **kept)
