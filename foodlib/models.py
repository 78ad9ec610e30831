"""Backbones that map images to embeddings ``(N, D)``; all class-specific layers live in the loss.

>>> model = create_model("resnet18", embedding_dim=2)
>>> model(torch.zeros(4, 3, 64, 64)).shape
torch.Size([4, 2])
>>> "resnet18" in list_models()
True
"""
from __future__ import annotations

import difflib
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from foodlib.errors import PretrainedWeightsError


class EmbeddingNet(nn.Module):
    """``backbone`` (images -> pooled features ``(N, F)``) followed by an optional linear ``neck`` to D dims.

    The neck is a single linear layer, as in the papers' 2-D experiments (Wen et al. 2016, Fig. 2;
    Wan et al. 2018), so D=2 features can be plotted as they are.
    """

    def __init__(self, backbone: nn.Module, feature_dim: int, embedding_dim: int | None = None, name: str = ""):
        super().__init__()
        self.name = name
        self.backbone = backbone
        self.feature_dim = feature_dim
        self.neck = nn.Linear(feature_dim, embedding_dim) if embedding_dim else nn.Identity()
        self.embedding_dim = embedding_dim or feature_dim

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.neck(self.backbone(images))  # (N, D)


# ----- torchvision ResNets ----------------------------------------------------------------------

def _resnet(arch: str) -> Callable[..., tuple[nn.Module, int]]:
    def build(pretrained: bool | str = False) -> tuple[nn.Module, int]:
        import torchvision

        weights = None
        if pretrained is True:
            weights = torchvision.models.get_model_weights(arch).DEFAULT
        net = torchvision.models.get_model(arch, weights=None)
        if weights is not None:
            net.load_state_dict(_download_state_dict(weights, arch))
        elif isinstance(pretrained, (str, Path)) and pretrained:
            _load_local_weights(net, pretrained, arch, ignore_prefixes=("fc.",))
        feature_dim = net.fc.in_features
        net.fc = nn.Identity()  # (N, F) pooled features; the classifier belongs to the loss
        return net, feature_dim

    return build


def _download_state_dict(weights, arch: str) -> dict:
    try:
        return weights.get_state_dict(progress=False, check_hash=True)
    except Exception as error:  # URLError, HTTPError, socket errors: all mean "no download here"
        raise PretrainedWeightsError(
            f"could not download pretrained weights for {arch} ({type(error).__name__}: {error}). "
            f"On an offline machine, copy the weights file ({weights.url}) here and pass "
            f"pretrained=/path/to/{weights.url.rsplit('/', 1)[-1]} (--pretrained PATH)."
        ) from error


def _load_local_weights(net: nn.Module, path: str | Path, arch: str, ignore_prefixes=()) -> None:
    """Load a state dict saved with ``torch.save(model.state_dict())`` (torchvision / timm key names).

    Keys of the original classifier (``fc.*``) are ignored: foodlib's classifier lives in the loss.
    A foodlib checkpoint (with a ``model`` entry) is accepted too.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"pretrained={str(path)!r}: no such weights file for {arch}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a text file, a truncated download, a pickle with code in it
        message = next((line for line in str(error).splitlines() if line.strip()), "")
        raise ValueError(
            f"pretrained={str(path)!r} is not a weights file torch can read ({type(error).__name__}: {message[:120]}); "
            f"pass a state dict of {arch} saved with torch.save(model.state_dict(), PATH)"
        ) from None
    if not isinstance(state, dict):
        raise ValueError(f"pretrained={str(path)!r} holds a {type(state).__name__}, not a state dict; "
                         f"pass a state dict of {arch} saved with torch.save(model.state_dict(), PATH)")
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = {k.removeprefix("backbone."): v for k, v in state["model"].items() if k.startswith("backbone.")}
    state = {k: v for k, v in state.items() if not k.startswith(tuple(ignore_prefixes))}
    own = net.state_dict()
    missing = [k for k in own if k not in state and not k.startswith(tuple(ignore_prefixes))]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        raise ValueError(
            f"weights file {path} does not fit {arch}: {len(missing)} missing keys (e.g. {missing[:3]}), "
            f"{len(unexpected)} unexpected keys (e.g. {unexpected[:3]}). Pass weights saved from {arch}."
        )
    for key, value in state.items():
        if own[key].shape != value.shape:
            raise ValueError(f"weights file {path}: {key} has shape {tuple(value.shape)}, {arch} needs {tuple(own[key].shape)}")
    net.load_state_dict(state, strict=False)


# ----- a small CNN for tiny images (digits, 32-64 px dishes) --------------------------------------

def _small_cnn(pretrained: bool | str = False) -> tuple[nn.Module, int]:
    """Four conv blocks (32-64-128-256 channels, BN, ReLU), stride-2 pooling, global average pool."""
    def block(c_in: int, c_out: int, pool: bool) -> list[nn.Module]:
        layers = [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
        return layers + ([nn.MaxPool2d(2)] if pool else [])

    net = nn.Sequential(
        *block(3, 32, True), *block(32, 64, True), *block(64, 128, True), *block(128, 256, False),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(),
    )
    if pretrained is True:
        raise ValueError("smallcnn has no published pretrained weights; pass a local weights file or False")
    if pretrained:
        _load_local_weights(net, pretrained, "smallcnn")
    return net, 256


# ----- timm (optional) ------------------------------------------------------------------------

def _timm(name: str, pretrained: bool | str) -> tuple[nn.Module, int]:
    try:
        import timm
    except ImportError as error:
        raise ImportError(f"backbone 'timm/{name}' needs timm: pip install 'foodlib[timm]'") from error
    kwargs = {}
    if isinstance(pretrained, (str, Path)) and pretrained:
        kwargs["pretrained_cfg_overlay"] = dict(file=str(Path(pretrained).expanduser()))
    try:
        net = timm.create_model(name, pretrained=bool(pretrained), num_classes=0, **kwargs)
    except Exception as error:
        if pretrained is True:
            raise PretrainedWeightsError(
                f"could not load pretrained timm weights for {name} ({type(error).__name__}: {error}). "
                "Offline, pass pretrained=/path/to/weights (.safetensors or .pth)."
            ) from error
        raise
    return net, net.num_features


_REGISTRY: dict[str, Callable[..., tuple[nn.Module, int]]] = {
    "resnet18": _resnet("resnet18"),
    "resnet34": _resnet("resnet34"),
    "resnet50": _resnet("resnet50"),
    "smallcnn": _small_cnn,
}


def list_models(include_timm: bool = False) -> list[str]:
    """Registered backbone names; any timm model also works as ``timm/<name>`` when timm is installed."""
    names = sorted(_REGISTRY)
    if include_timm:
        try:
            import timm

            names += [f"timm/{n}" for n in timm.list_models()]
        except ImportError:
            pass
    return names


def create_model(name: str, embedding_dim: int | None = None, pretrained: bool | str = False) -> EmbeddingNet:
    """Build a backbone by name, optionally with a linear neck to ``embedding_dim``.

    Args:
        name: one of :func:`list_models` or ``timm/<model name>``.
        embedding_dim: output width D; None keeps the backbone's width (512 for resnet18).
        pretrained: False, True (download the published weights), or a local weights file.
    """
    if name.startswith("timm/"):
        backbone, feature_dim = _timm(name.split("/", 1)[1], pretrained)
    elif name in _REGISTRY:
        backbone, feature_dim = _REGISTRY[name](pretrained=pretrained)
    else:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=3)
        raise ValueError(
            f"unknown backbone {name!r}; valid: {', '.join(sorted(_REGISTRY))} or timm/<name>"
            + (f" (did you mean {', '.join(close)}?)" if close else "")
        )
    if embedding_dim is not None and embedding_dim < 1:
        raise ValueError(f"embedding_dim={embedding_dim!r} must be >= 1")
    return EmbeddingNet(backbone, feature_dim, embedding_dim, name=name)
