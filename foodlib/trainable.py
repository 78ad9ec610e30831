"""How much of the network trains: ``trainable = "all" | "head" | "last:N"``.

The trunk (the backbone) is split into stages, input to output; the "head" is what follows it
(the linear neck, when there is one, and the loss's classifier / centers / means, which always
train). ``head`` freezes the whole trunk, ``last:N`` trains its last N stages, ``all`` trains
everything. Frozen stages get ``requires_grad=False`` and stay in eval mode (BatchNorm running
statistics frozen, no dropout / drop-path) whatever ``model.train()`` is asked.

>>> from foodlib.models import create_model
>>> model = apply_trainable(create_model("resnet18"), "last:1")
>>> [name for name, p in model.named_parameters() if p.requires_grad][:1]
['backbone.layer4.0.conv1.weight']
"""
from __future__ import annotations

import re

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
    """The backbone's stages, input to output, each a module (or a ModuleList of a stem's parts).

    * timm EfficientNet (``efficientnet_liteN``): stem (conv + BN), each of the 7 block stages, head conv + BN.
    * torchvision ResNet: stem (conv1 + bn1), layer1 .. layer4.
    * ``nn.Sequential`` (smallcnn): one stage per convolution with what follows it up to the next.
    * anything else: its top-level children that hold parameters.
    """
    if hasattr(backbone, "conv_stem") and hasattr(backbone, "blocks"):
        return [nn.ModuleList([backbone.conv_stem, backbone.bn1]), *backbone.blocks,
                nn.ModuleList([backbone.conv_head, backbone.bn2])]
    if hasattr(backbone, "layer4") and hasattr(backbone, "conv1"):
        return [nn.ModuleList([backbone.conv1, backbone.bn1]), backbone.layer1, backbone.layer2, backbone.layer3,
                backbone.layer4]
    if isinstance(backbone, nn.Sequential):
        stages: list[list[nn.Module]] = []
        for module in backbone:
            if isinstance(module, nn.Conv2d) or not stages:
                stages.append([])
            stages[-1].append(module)
        return [nn.ModuleList(s) for s in stages if any(True for _ in nn.ModuleList(s).parameters())]
    return [m for m in backbone.children() if any(True for _ in m.parameters())]


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


def trunk_is_frozen(model: nn.Module) -> bool:
    """True when nothing in the backbone trains (``trainable="head"``): its outputs can be cached."""
    return not any(p.requires_grad for p in model.backbone.parameters())
