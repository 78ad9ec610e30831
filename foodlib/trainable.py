"""How much of the network trains: ``trainable = "all" | "head" | "last:N"``.

The trunk (the backbone) is split into stages, input to output; the "head" is what follows it
(the linear neck, when there is one, and the loss's classifier / centers / means, which always
train). ``head`` freezes the whole trunk, ``last:N`` trains its last N stages, ``all`` trains
everything. Frozen stages get ``requires_grad=False`` and stay in eval mode (BatchNorm running
statistics frozen, no dropout / drop-path) whatever ``model.train()`` is asked.

A frozen prefix is a fixed function of the pixels, so the frozen-trunk cache (:mod:`foodlib.trunk_cache`)
can store its outputs: :class:`TrunkCut` splits the backbone after its first k stages, with
``cut.rest(cut.first(x)) == backbone(x)``.

>>> from foodlib.models import create_model
>>> model = apply_trainable(create_model("resnet18"), "last:1")
>>> [name for name, p in model.named_parameters() if p.requires_grad][:1]
['backbone.layer4.0.conv1.weight']
"""
from __future__ import annotations

import re
from typing import Callable

import torch
from torch import nn

_LAST = re.compile(r"last:(\d+)$")


def parse_trainable(value: str) -> int | None:
    """Number of trainable trunk stages: None for "all", 0 for "head", N for "last:N".

    Raises:
        ValueError: any other value (the message names the valid forms).
    """
    if value == "all":
        return None
    if value == "head":
        return 0
    match = _LAST.match(str(value))
    if match and int(match.group(1)) >= 1:
        return int(match.group(1))
    raise ValueError(f"trainable={value!r} is not valid; use all | head | last:N with N >= 1 (e.g. last:2)")


def trunk_stages(backbone: nn.Module) -> list[nn.Module]:
    """The backbone's stages, input to output, each a module that runs on the previous one's output.

    * timm EfficientNet (``efficientnet_liteN``): stem (conv + BN + act), each of the 7 block stages,
      head conv + BN + act; the global pool follows (:func:`trunk_pooling`).
    * ResNet (torchvision, or timm's ``timm/resnet*``): stem (conv1 + bn1 + activation + maxpool),
      layer1 .. layer4; then the average pool.
    * ``nn.Sequential`` (smallcnn): one stage per convolution with what follows it up to the next
      (the last stage ends with the pooling).
    * anything else: its top-level children that hold parameters (enough to freeze them; such a
      backbone cannot be cut for the trunk cache).
    """
    if _is_efficientnet(backbone):
        return [nn.Sequential(backbone.conv_stem, backbone.bn1), *backbone.blocks,
                nn.Sequential(backbone.conv_head, backbone.bn2)]
    if _is_resnet(backbone):
        activation = getattr(backbone, "relu", None) or getattr(backbone, "act1", None) or nn.Identity()
        return [nn.Sequential(backbone.conv1, backbone.bn1, activation, backbone.maxpool), backbone.layer1,
                backbone.layer2, backbone.layer3, backbone.layer4]
    if isinstance(backbone, nn.Sequential):
        stages: list[list[nn.Module]] = []
        for module in backbone:
            if isinstance(module, nn.Conv2d) or not stages:
                stages.append([])
            stages[-1].append(module)
        return [nn.Sequential(*s) for s in stages if any(_has_parameters(m) for m in s)]
    return [m for m in backbone.children() if _has_parameters(m)]


def _is_efficientnet(backbone: nn.Module) -> bool:
    return hasattr(backbone, "conv_stem") and hasattr(backbone, "blocks")


def _is_resnet(backbone: nn.Module) -> bool:
    return hasattr(backbone, "layer4") and hasattr(backbone, "conv1") and hasattr(backbone, "maxpool")


def _has_parameters(module: nn.Module) -> bool:
    return next(module.parameters(), None) is not None


def trunk_pooling(backbone: nn.Module) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """What turns the last stage's maps into the backbone's pooled ``(N, F)`` output, or None when
    :func:`trunk_stages` does not cover the whole backbone (it cannot be cut)."""
    if (_is_efficientnet(backbone) or _is_resnet(backbone)) and hasattr(backbone, "forward_head"):
        return backbone.forward_head  # timm: global pool, dropout, classifier
    if _is_resnet(backbone) and hasattr(backbone, "avgpool") and hasattr(backbone, "fc"):  # torchvision
        return lambda x: backbone.fc(torch.flatten(backbone.avgpool(x), 1))
    if isinstance(backbone, nn.Sequential):
        covered = sum(len(stage) for stage in trunk_stages(backbone))
        return (lambda x: x) if covered == len(backbone) else None
    return None


class TrunkCut:
    """The backbone cut after its first ``at`` stages: ``cut.rest(cut.first(x)) == backbone(x)``.

    ``first`` is what the trunk cache computes once (the frozen stages); ``rest`` runs the trainable
    stages and the pooling on its stored outputs. Both use the backbone's own modules (no copies).

    >>> from foodlib.models import create_model
    >>> backbone = create_model("smallcnn").backbone.eval()
    >>> cut = TrunkCut(backbone, 3)
    >>> x = torch.randn(2, 3, 32, 32)
    >>> tuple(cut.first(x).shape), bool(torch.allclose(cut.rest(cut.first(x)), backbone(x)))
    ((2, 128, 4, 4), True)
    """

    def __init__(self, backbone: nn.Module, at: int):
        stages, pooling = trunk_stages(backbone), trunk_pooling(backbone)
        if pooling is None:
            raise ValueError(f"{type(backbone).__name__} cannot be cut into stages for the trunk cache; "
                             "set trunk_cache: false")
        if not 1 <= at <= len(stages):
            raise ValueError(f"cut after stage {at}: the backbone has stages 1..{len(stages)}")
        self.at, self._rest, self._pooling = at, stages[at:], pooling
        self.first = nn.Sequential(*stages[:at])  # images -> the first ``at`` stages' maps (N, C, H, W)

    def rest(self, maps: torch.Tensor) -> torch.Tensor:
        """The remaining stages and the pooling: pooled features ``(N, F)``."""
        for stage in self._rest:
            maps = stage(maps)
        return self._pooling(maps)


def cut_for_cache(model: nn.Module) -> tuple[int | None, str | None]:
    """Where the trunk cache can cut ``model`` (after :func:`apply_trainable`), or why it cannot.

    Returns:
        ``(None, None)`` for ``head`` (the cache stores the pooled output), ``(k, None)`` for
        ``last:N`` with k = the number of frozen stages, ``(None, reason)`` when nothing can be
        cached: everything trains (``all``, or ``last:N`` with N = every stage), or the backbone
        is not one :class:`TrunkCut` knows.
    """
    n = parse_trainable(getattr(model, "trainable", "all"))
    if n == 0:
        return None, None
    stages = trunk_stages(model.backbone)
    if n is None or n >= len(stages):
        return None, "every stage of the trunk trains"
    if trunk_pooling(model.backbone) is None:
        return None, f"{type(model.backbone).__name__} cannot be cut into stages"
    return len(stages) - n, None


def apply_trainable(model: nn.Module, trainable: str = "all") -> nn.Module:
    """Freeze all but the last N trunk stages of an :class:`~foodlib.models.EmbeddingNet` (in place).

    Args:
        model: an EmbeddingNet (``backbone``, ``neck``, ``frozen``).
        trainable: "all", "head" or "last:N".

    Returns:
        The model, with ``model.frozen`` listing the frozen modules and ``model.trainable`` the setting.
    """
    n = parse_trainable(trainable)
    for p in model.parameters():
        p.requires_grad_(True)
    model.frozen = []
    model.trainable = trainable
    if n is None:
        return model.train(model.training)
    stages = trunk_stages(model.backbone)
    if n > len(stages):
        raise ValueError(f"trainable={trainable!r}: {model.name or 'the backbone'} has only {len(stages)} stages; "
                         f"use last:{len(stages)} or all")
    frozen = [model.backbone] if n == 0 else stages[: len(stages) - n]
    for module in frozen:
        for p in module.parameters():
            p.requires_grad_(False)
    model.frozen = frozen
    return model.train(model.training)

