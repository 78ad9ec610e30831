"""trainable = all | head | last:N: which parameters learn, and frozen BatchNorm statistics stay put."""
import pytest
import torch

from foodlib.config import Config, ConfigError
from foodlib.models import create_model, list_models
from foodlib.trainable import TrunkCut, apply_trainable, cut_for_cache, parse_trainable, trunk_stages


def test_parse_trainable():
    assert parse_trainable("all") is None and parse_trainable("head") == 0 and parse_trainable("last:3") == 3
    for bad in ("last:0", "last", "tail", "last:-1"):
        with pytest.raises(ValueError, match="all | head | last:N"):
            parse_trainable(bad)
    with pytest.raises(ConfigError, match="trainable='some'"):
        Config.from_flat(trainable="some")
    assert Config.from_flat(trainable="last:2").model.trainable == "last:2"


@pytest.mark.parametrize("name", [*(n for n in list_models() if n != "resnet50"), "timm/resnet18"])
def test_head_freezes_the_whole_trunk_and_last_n_its_last_stages(name):
    model = apply_trainable(create_model(name, embedding_dim=8), "head")
    assert not any(p.requires_grad for p in model.backbone.parameters())  # the whole trunk is frozen
    assert all(p.requires_grad for p in model.neck.parameters())
    stages = trunk_stages(model.backbone)
    assert len(stages) >= 4
    model = apply_trainable(model, "last:2")
    trains = [any(p.requires_grad for p in s.parameters()) for s in stages]
    assert trains == [False] * (len(stages) - 2) + [True, True]
    assert any(p.requires_grad for p in model.backbone.parameters())
    model = apply_trainable(model, "all")
    assert all(p.requires_grad for p in model.parameters()) and model.frozen == []
    with pytest.raises(ValueError, match="only"):
        apply_trainable(model, f"last:{len(stages) + 1}")


def test_frozen_stages_stay_in_eval_mode_and_do_not_move():
    torch.manual_seed(0)
    model = apply_trainable(create_model("smallcnn", embedding_dim=4), "last:1").train()
    frozen_bn = model.backbone[1]  # first BatchNorm, in a frozen stage
    last_bn = [m for m in model.backbone if isinstance(m, torch.nn.BatchNorm2d)][-1]
    assert not frozen_bn.training and last_bn.training and model.neck.training
    before = {k: v.clone() for k, v in model.backbone[:4].state_dict().items()}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model(torch.randn(8, 3, 16, 16)).square().mean().backward()
    optimizer.step()
    after = model.backbone[:4].state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # weights and running statistics
    assert model.backbone[0].weight.grad is None  # no gradient reaches a frozen stage


@pytest.mark.parametrize("name", [*list_models(), "timm/resnet18"])
@torch.no_grad()
def test_the_backbone_cut_at_any_stage_computes_the_same_features(name):
    """TrunkCut is what the trunk cache stores for last:N: first stages, then the rest and the
    pooling, must be the whole backbone (exactly: the same modules in the same order)."""
    torch.manual_seed(0)
    backbone = create_model(name).backbone.eval()
    x = torch.randn(2, 3, 64, 64)
    whole = backbone(x)
    stages = trunk_stages(backbone)
    for at in range(1, len(stages)):
        cut = TrunkCut(backbone, at)
        maps = cut.first(x)
        assert maps.ndim == 4, (name, at)
        torch.testing.assert_close(cut.rest(maps), whole, rtol=0, atol=0)
        # the backbone's own tensors, no copies, each on one side of the cut (the pooling's too)
        first = {id(t) for t in cut.first.state_dict(keep_vars=True).values()}
        rest = {id(t) for stage in stages[at:] for t in stage.state_dict(keep_vars=True).values()}
        assert not first & rest
        assert first | rest <= {id(t) for t in backbone.state_dict(keep_vars=True).values()}
        assert {id(p) for p in backbone.parameters()} <= first | rest


def test_what_the_trunk_cache_can_cut():
    """head caches the pooled output, last:N the maps after the frozen stages; nothing when every
    stage trains or the backbone is not one TrunkCut knows (fit() then trains on live images)."""
    smallcnn = create_model("smallcnn")
    assert cut_for_cache(apply_trainable(smallcnn, "head")) == (None, None)
    assert cut_for_cache(apply_trainable(smallcnn, "last:1")) == (3, None)
    assert cut_for_cache(apply_trainable(smallcnn, "last:4"))[1] == "every stage of the trunk trains"
    assert cut_for_cache(apply_trainable(smallcnn, "all"))[1] == "every stage of the trunk trains"
    assert cut_for_cache(apply_trainable(create_model("timm/resnet18"), "last:2")) == (3, None)
    assert "cannot be cut" in cut_for_cache(apply_trainable(create_model("timm/convnext_atto"), "last:1"))[1]


def test_an_unknown_backbone_cannot_be_cut_and_says_what_to_do():
    class Odd(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Conv2d(3, 4, 3), torch.nn.Conv2d(4, 4, 3)

        def forward(self, x):
            return self.b(self.a(x)).mean((2, 3))

    with pytest.raises(ValueError, match="trunk_cache: false"):
        TrunkCut(Odd(), 1)
    with pytest.raises(ValueError, match="stages 1..4"):
        TrunkCut(create_model("smallcnn").backbone, 5)
