"""Weight decay is decided by the loss (``weight_decay_parameters()``), not by a parameter's name.

The grouping must stay what the earlier name rule gave ("a loss parameter decays only if it is a
matrix under ``loss.classifier.``"), so that results and last.pt optimizer layouts are unchanged.
"""
import pytest

from foodlib.config import Config
from foodlib.losses import create_loss, list_losses
from foodlib.models import create_model
from foodlib.trainable import apply_trainable
from foodlib.train import build_optimizers

# Every registered loss with its defaults, plus the options that add or move parameters.
LOSS_CASES = [(name, {}) for name in list_losses()] + [
    ("center", {"update": "sgd"}),
    ("island", {"update": "sgd"}),
    ("lgm", {"covariance": "diagonal", "learn_scale": True}),
    ("pml:ProxyAnchorLoss", {}),  # proxy loss: class weights of its own
    ("pml:ArcFaceLoss", {}),  # PML's own ArcFace: a (D, C) weight matrix, not a foodlib classifier
    ("pml:MultiSimilarityLoss", {}),  # pair loss: buffers only
]


def name_rule_groups(model, loss):
    """The grouping of the earlier build_optimizers, by parameter name: (decay, no_decay)."""
    state_ids = {id(p) for p in loss.state_parameters()}
    decay, no_decay = [], []
    for name, p in list(model.named_parameters()) + [(f"loss.{n}", p) for n, p in loss.named_parameters()]:
        if not p.requires_grad or id(p) in state_ids:
            continue
        is_matrix = p.ndim > 1 and (not name.startswith("loss.") or name.startswith("loss.classifier."))
        (decay if is_matrix else no_decay).append(p)
    return decay, no_decay


@pytest.mark.parametrize("trainable", ["all", "head"])
@pytest.mark.parametrize("loss_name, options", LOSS_CASES, ids=lambda v: v if isinstance(v, str) else None)
def test_weight_decay_groups_match_the_earlier_name_rule(loss_name, options, trainable):
    if loss_name.startswith("pml:"):
        pytest.importorskip("pytorch_metric_learning")
    model = create_model("smallcnn", embedding_dim=8)
    apply_trainable(model, trainable)
    loss = create_loss(loss_name, embedding_dim=8, num_classes=5, **options)
    cfg = Config.from_flat(weight_decay=5e-4, optimizer="sgd", lr=0.1)
    optimizer, center_optimizer = build_optimizers(cfg, model, loss)
    decay, no_decay = name_rule_groups(model, loss)
    groups = optimizer.param_groups
    assert [g["weight_decay"] for g in groups] == [5e-4, 0.0]
    # same parameters, in the same order (the order is the optimizer state's layout in last.pt)
    assert [id(p) for p in groups[0]["params"]] == [id(p) for p in decay]
    assert [id(p) for p in groups[1]["params"]] == [id(p) for p in no_decay]
    state = loss.state_parameters()
    assert (center_optimizer is None) == (not state)
    if center_optimizer is not None:
        assert [id(p) for p in center_optimizer.param_groups[0]["params"]] == [id(p) for p in state]


def test_only_a_softmax_family_classifier_weight_decays():
    """The rule in words: the classifier's weight matrix decays, class state never does."""
    for name in ("softmax", "center", "island", "contrastive_center"):
        loss = create_loss(name, embedding_dim=4, num_classes=3)
        assert loss.weight_decay_parameters() == [loss.classifier.weight]
    for name in ("lgm", "cosface", "arcface"):
        assert create_loss(name, embedding_dim=4, num_classes=3).weight_decay_parameters() == []


def test_weight_decay_parameters_are_the_losss_own():
    """What a loss names must be among its trainable parameters, or build_optimizers would drop it."""
    for name in list_losses():
        loss = create_loss(name, embedding_dim=4, num_classes=3)
        own = {id(p) for p in loss.parameters()}
        assert all(id(p) in own and p.requires_grad for p in loss.weight_decay_parameters())
        assert isinstance(loss.weight_decay_parameters(), list)
