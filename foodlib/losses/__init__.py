"""Discriminative losses behind one contract, and a registry to build them by name.

>>> list_losses()
['arcface', 'center', 'contrastive_center', 'cosface', 'island', 'lgm', 'softmax']
>>> loss = create_loss("center", embedding_dim=2, num_classes=10, lam=0.01)
>>> type(loss).__name__, loss.term_names
('CenterLoss', ('ce', 'center'))
>>> # a shared config passes every option; strict=False drops the ones a loss does not take
>>> create_loss("softmax", embedding_dim=2, num_classes=10, strict=False, lam=0.01, covariance="identity")
SoftmaxLoss(
  (classifier): Linear(in_features=2, out_features=10, bias=True)
)
>>> # any pytorch-metric-learning loss, by name (optional extra: pip install 'foodlib[pml]')
>>> type(create_loss("pml:MultiSimilarityLoss?alpha=2", embedding_dim=8, num_classes=10)).__name__
'PMLLoss'
"""
from __future__ import annotations

import inspect
from typing import Any

from .arcface import ArcFaceLoss
from .base import DiscriminativeLoss, LossOutput
from .center import CenterLoss
from .contrastive_center import ContrastiveCenterLoss
from .cosface import CosFaceLoss
from .island import IslandLoss
from .lgm import LGMLoss
from .pml import PML_PREFIX, PMLLoss, create_pml_loss, is_pml_name
from .softmax import SoftmaxLoss

__all__ = [
    "CenterLoss", "DiscriminativeLoss", "IslandLoss", "LGMLoss", "LossOutput", "SoftmaxLoss",
    "create_loss", "list_losses", "loss_options", "trained_metric",
    "ArcFaceLoss", "ContrastiveCenterLoss", "CosFaceLoss", "PMLLoss", "check_loss_options",
]

_LOSSES: dict[str, type[DiscriminativeLoss]] = {
    "softmax": SoftmaxLoss,
    "center": CenterLoss,
    "lgm": LGMLoss,
    "island": IslandLoss,
    "contrastive_center": ContrastiveCenterLoss,
    "cosface": CosFaceLoss,
    "arcface": ArcFaceLoss,
}


def list_losses() -> list[str]:
    """Names accepted by :func:`create_loss`, sorted; ``pml:<LossName>`` names come on top of these."""
    return sorted(_LOSSES)


def _loss_class(name: str) -> type[DiscriminativeLoss]:
    try:
        return _LOSSES[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown loss {name!r}; valid names: {', '.join(list_losses())}, "
                         f"or {PML_PREFIX}<LossName> for a pytorch-metric-learning loss") from None


def trained_metric(name: str) -> str:
    """The nearest-neighbour distance for embeddings trained with loss ``name`` (its class's ``metric``).

    >>> trained_metric("center"), trained_metric("arcface"), trained_metric("pml:MultiSimilarityLoss")
    ('euclidean', 'cosine', 'cosine')
    """
    return PMLLoss.metric if is_pml_name(name) else _loss_class(name).metric


def loss_options(name: str) -> tuple[str, ...]:
    """The keyword options loss ``name`` takes besides ``embedding_dim`` and ``num_classes``.

    >>> loss_options("lgm")[:3]
    ('lam', 'alpha', 'covariance')

    A ``pml:`` name takes its options inside the name, so it has none here.
    """
    if is_pml_name(name):
        return ()
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
    if is_pml_name(name):
        loss_class = lambda d, c, **_: create_pml_loss(name, d, c)  # noqa: E731 - options live in the name
    else:
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


def check_loss_options(name: str, **options: Any) -> None:
    """Validate ``options`` against loss ``name``'s own declaration; raise a one-line ValueError.

    The loss is the source of truth for its options: this builds it on a tiny head (D=2, C=2) so
    its constructor's checks run, e.g. for a config before any data loads. An option the loss
    does not take is an error (options given as ``None`` mean "the loss's default" and are skipped).

    >>> check_loss_options("cosface", margin=0.2, scale=30)
    >>> check_loss_options("softmax", margin=0.2)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ValueError: create_loss('softmax'): unexpected option(s) margin=0.2; 'softmax' takes label_smoothing. ...
    """
    create_loss(name, embedding_dim=2, num_classes=2, strict=True, **options)
