import pytest
import torch

from foodlib.models import create_model, list_models


@pytest.mark.parametrize("name", list_models())
@pytest.mark.parametrize("embedding_dim", [None, 2])
def test_every_model_returns_embeddings(name, embedding_dim):
    model = create_model(name, embedding_dim=embedding_dim).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, model.embedding_dim)
    if embedding_dim:
        assert model.embedding_dim == embedding_dim


def test_resnet18_width_and_channels_last():
    model = create_model("resnet18").eval().to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    assert model(x).shape == (2, 512)


def test_pretrained_from_a_local_state_dict(tmp_path):
    import torchvision

    source = torchvision.models.resnet18(num_classes=1000)
    path = tmp_path / "resnet18.pth"
    torch.save(source.state_dict(), path)
    model = create_model("resnet18", pretrained=str(path))
    assert torch.equal(model.backbone.conv1.weight, source.conv1.weight)
    assert torch.equal(model.backbone.layer4[1].bn2.running_mean, source.layer4[1].bn2.running_mean)


def test_pretrained_file_of_another_architecture_is_refused(tmp_path):
    import torchvision

    path = tmp_path / "resnet34.pth"
    torch.save(torchvision.models.resnet34().state_dict(), path)
    with pytest.raises(ValueError, match="does not fit resnet18"):
        create_model("resnet18", pretrained=str(path))


def test_pretrained_download_offline_says_to_pass_a_path(monkeypatch):
    import torchvision

    weights = torchvision.models.ResNet18_Weights.DEFAULT

    def offline(self, *args, **kwargs):
        raise OSError("<urlopen error [Errno -3] Temporary failure in name resolution>")

    monkeypatch.setattr(type(weights), "get_state_dict", offline)
    with pytest.raises(RuntimeError, match="pass pretrained=/path/to/resnet18"):
        create_model("resnet18", pretrained=True)


def test_unknown_backbone_lists_the_valid_names():
    with pytest.raises(ValueError, match="resnet18.*smallcnn"):
        create_model("resnet81")


def test_timm_names_need_timm():
    try:
        import timm  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="foodlib\\[timm\\]"):
            create_model("timm/resnet18")
    else:
        assert create_model("timm/resnet18", embedding_dim=8)(torch.randn(1, 3, 64, 64)).shape == (1, 8)
