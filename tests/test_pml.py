"""Tests for ``pml:<LossName>`` (pytorch-metric-learning behind foodlib's contract), class-balanced
batches (also under DDP), and fit() runs of a pair and a proxy loss on the embedded dishes."""
from __future__ import annotations

import doctest
import io

import numpy as np
import pytest
import torch
import torch.distributed as dist

pytest.importorskip("pytorch_metric_learning")

from conftest import tiny_config  # noqa: E402
from foodlib.config import Config, ConfigError  # noqa: E402
from foodlib.data.balanced import BalancedBatchLoader  # noqa: E402
from foodlib.losses import DiscriminativeLoss, LossOutput, create_loss  # noqa: E402
from foodlib.losses.pml import UNSEEN_CLASS_LOGIT, parse_pml_name  # noqa: E402

PAIR = "pml:MultiSimilarityLoss"
TRIPLET = "pml:TripletMarginLoss?margin=0.2&miner=TripletMarginMiner"
PROXY = "pml:ProxyAnchorLoss?margin=0.1&alpha=32"
NAMES = [PAIR, TRIPLET, PROXY, "pml:NormalizedSoftmaxLoss", "pml:ContrastiveLoss", "pml:SoftTripleLoss"]


# ----- the contract -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_contract_of_pml_losses(name):
    torch.manual_seed(0)
    dim, num_classes, n = 6, 4, 16
    loss = create_loss(name, embedding_dim=dim, num_classes=num_classes)
    assert isinstance(loss, DiscriminativeLoss)
    embedding = torch.randn(n, dim, requires_grad=True)
    labels = torch.arange(n) % num_classes  # 4 per class, as the balanced loader gives

    out = loss(embedding, labels)
    assert isinstance(out, LossOutput)
    assert out.loss.shape == () and out.loss.dtype == torch.float32 and torch.isfinite(out.loss)
    assert out.logits.shape == (n, num_classes) and tuple(out.terms) == loss.term_names == ("pml",)
    out.loss.backward()
    assert embedding.grad is not None and embedding.grad.abs().sum() > 0
    for pname, parameter in loss.named_parameters():
        assert parameter.grad is not None, f"no gradient reached {pname}"
    loss.set_progress(0, 3)
    loss.update_centers(embedding.detach(), labels)
    assert loss.predict(embedding.detach()).shape == (n, num_classes)
    # bf16 autocast: the loss math stays float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = loss(embedding.detach().bfloat16(), labels)
        assert out.loss.dtype == out.logits.dtype == loss.predict(embedding.bfloat16()).dtype == torch.float32


def test_kinds_and_class_balance_requests():
    assert create_loss(PROXY, 4, 3).kind == "proxy" and create_loss(PROXY, 4, 3).samples_per_class == 0
    pair = create_loss(PAIR, 4, 3)
    assert pair.kind == "pair" and pair.samples_per_class == 4
    assert create_loss("pml:ContrastiveLoss?samples_per_class=6", 4, 3).samples_per_class == 6
    assert type(create_loss(TRIPLET, 4, 3).miner).__name__ == "TripletMarginMiner"
    assert create_loss(PROXY, 4, 3).metric_loss.margin == 0.1


def test_proxy_loss_predicts_with_its_class_weights():
    torch.manual_seed(0)
    loss = create_loss(PROXY, 5, 3)
    x = torch.randn(7, 5)
    proxies = loss.metric_loss.proxies.detach()  # (C, D)
    expected = torch.nn.functional.normalize(x, dim=1) @ torch.nn.functional.normalize(proxies, dim=1).T
    assert torch.allclose(loss.predict(x), expected, atol=1e-6)  # cosine to each class's proxy


def test_pair_loss_class_means_follow_the_decayed_batches_and_predict_the_nearest():
    loss = create_loss("pml:ContrastiveLoss?mean_decay=0.5", 2, 3)  # LpDistance on unit vectors
    assert (loss.predict(torch.ones(1, 2)) == UNSEEN_CLASS_LOGIT).all()  # nothing seen yet
    loss.update_centers(torch.tensor([[2.0, 0.0], [4.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 0, 1]))
    # by hand: sums c0 = (6, 0), n0 = 2; c1 = (0, 1), n1 = 1; class 2 unseen
    assert torch.allclose(loss.class_means()[:2], torch.tensor([[3.0, 0.0], [0.0, 1.0]]))
    loss.update_centers(torch.tensor([[0.0, 3.0]]), torch.tensor([0]))
    # sums decay by 0.5 then add: c0 = (3, 0) + (0, 3) = (3, 3), n0 = 1 + 1 = 2 -> mean (1.5, 1.5)
    assert torch.allclose(loss.class_means()[0], torch.tensor([1.5, 1.5]))
    assert torch.allclose(loss.class_counts, torch.tensor([2.0, 0.5, 0.0]))
    logits = loss.predict(torch.tensor([[1.0, 1.2], [0.1, 2.0], [5.0, 0.0]]))
    # the distance normalises: class 0 mean points at 45 degrees, class 1 at 90
    assert logits.argmax(1).tolist() == [0, 1, 0]
    expected = -torch.cdist(torch.nn.functional.normalize(torch.tensor([[1.0, 1.2]]), dim=1),
                            torch.nn.functional.normalize(loss.class_means()[:2], dim=1))
    assert torch.allclose(logits[0, :2], expected[0], atol=1e-6)
    assert logits[0, 2] == UNSEEN_CLASS_LOGIT


def test_class_means_are_saved_and_load_with_weights_only():
    loss = create_loss(PAIR, 3, 4)
    x, labels = torch.randn(8, 3), torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    loss.update_centers(x, labels)
    buffer = io.BytesIO()
    torch.save({"loss": loss.state_dict()}, buffer)
    buffer.seek(0)
    restored = create_loss(PAIR, 3, 4)
    restored.load_state_dict(torch.load(buffer, weights_only=True)["loss"])
    assert torch.equal(restored.class_sums, loss.class_sums) and torch.equal(restored.predict(x), loss.predict(x))


def test_pair_class_means_all_reduce_sums_and_counts(monkeypatch):
    """With all_reduce faked as "the other rank had the same batch", the means get the global sums."""
    x, labels = torch.tensor([[1.0, 0.0], [3.0, 2.0]]), torch.tensor([0, 0])
    reduced = []

    def fake_all_reduce(tensor, op=None, **kwargs):
        assert op == dist.ReduceOp.SUM
        reduced.append(tuple(tensor.shape))
        tensor.mul_(2)

    monkeypatch.setattr(dist, "is_available", lambda: True)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "all_reduce", fake_all_reduce)
    loss = create_loss(PAIR, 2, 3)
    loss.update_centers(x, labels)
    assert reduced == [(3, 3)]  # one call: sums (C, D) and counts (C, 1) together
    assert torch.allclose(loss.class_sums[0], torch.tensor([8.0, 4.0])) and loss.class_counts[0] == 4


@pytest.mark.parametrize("name, message", [
    ("pml:NoSuchLoss", r"pytorch-metric-learning has no loss 'NoSuchLoss'; valid: .*MultiSimilarityLoss"),
    ("pml:TripletMarginLoss?miner=NoMiner", r"no miner 'NoMiner'; valid: .*TripletMarginMiner"),
    ("pml:TripletMarginLoss?bogus=1", r"TripletMarginLoss takes margin, swap, smooth_loss, triplets_per_anchor"),
    ("pml:ProxyAnchorLoss?num_classes=3", r"num_classes come from the model and the data"),
    ("pml:MultiSimilarityLoss?mean_decay=1", r"mean_decay must be below 1"),
])
def test_bad_pml_names_give_one_line_errors(name, message):
    with pytest.raises(ValueError, match=message):
        create_loss(name, 4, 3)
    with pytest.raises(ConfigError, match=message):
        Config.from_flat(loss=name)


def test_parse_and_doctests():
    assert parse_pml_name("pml:TripletMarginLoss?margin=0.2&swap=true") == ("TripletMarginLoss",
                                                                           {"margin": 0.2, "swap": True})
    import foodlib.losses.pml as pml_module
    assert doctest.testmod(pml_module, extraglobs={"torch": torch}).failed == 0


# ----- class-balanced batches ---------------------------------------------------------------------


def imbalanced_labels() -> np.ndarray:
    """6 classes with 3, 5, 9, 12, 20 and 40 images: a class smaller than m, and a large one."""
    return np.concatenate([np.full(n, c) for c, n in enumerate([3, 5, 9, 12, 20, 40])])


@pytest.mark.parametrize("batch_size, world_size", [(16, 1), (16, 2), (32, 2), (24, 3)])
def test_balanced_batches_have_m_per_class_on_every_rank_and_split_the_global_batch(batch_size, world_size):
    labels, m = imbalanced_labels(), 4
    loaders = [BalancedBatchLoader(None, labels, batch_size, m, seed=3, rank=r, world_size=world_size)
               for r in range(world_size)]
    single = BalancedBatchLoader(None, labels, batch_size, m, seed=3)
    for epoch in (0, 1):
        for loader in [*loaders, single]:
            loader.set_epoch(epoch)
        per_rank = [loader.batches() for loader in loaders]
        assert all(len(b) == len(labels) // batch_size == len(single) for b in per_rank)
        for step, whole in enumerate(single.batches()):
            parts = [batches[step] for batches in per_rank]
            assert sorted(np.concatenate(parts).tolist()) == sorted(whole.tolist())  # the shares make the global batch
            for part in parts:
                assert len(part) == batch_size // world_size
                counts = np.bincount(labels[part])
                assert set(counts[counts > 0].tolist()) <= {m, 2 * m}  # whole blocks of m per class
            if batch_size // m <= 6:  # no more blocks than classes: distinct classes in a batch
                assert np.bincount(labels[whole]).max() == m
    # reproducible in (seed, epoch), different across epochs
    again = BalancedBatchLoader(None, labels, batch_size, m, seed=3)
    again.set_epoch(1)
    assert all(np.array_equal(a, b) for a, b in zip(again.batches(), single.batches()))
    again.set_epoch(0)
    assert not all(np.array_equal(a, b) for a, b in zip(again.batches(), single.batches()))


def test_balanced_batches_sample_classes_uniformly_and_walk_each_class():
    labels, m = imbalanced_labels(), 2
    loader = BalancedBatchLoader(None, labels, 12, m, seed=0)  # 6 blocks = every class in every batch
    seen = np.concatenate(loader.batches())
    counts = np.bincount(labels[seen])
    assert (counts == counts[0]).all()  # class-balanced: the 3-image class as often as the 40-image one
    big = seen[labels[seen] == 5]
    assert len(set(big.tolist())) == len(big)  # 14 of 40 images of the big class, none repeated


def test_balanced_loader_errors_name_the_fix():
    with pytest.raises(ValueError, match=r"batch_size=18 must be a multiple of .* 4 \* 2 = 8.*use e.g. batch_size=16"):
        BalancedBatchLoader(None, imbalanced_labels(), 18, 4, world_size=2)
    with pytest.raises(ValueError, match="samples_per_class=1 must be an integer >= 2"):
        BalancedBatchLoader(None, imbalanced_labels(), 16, 1)
    with pytest.raises(ConfigError, match="samples_per_class=1 must be 0"):
        Config.from_flat(samples_per_class=1)


# ----- fit() on the embedded dishes ---------------------------------------------------------------


@pytest.mark.slow  # two short fits, ~30 s each on a busy 2-core machine
@pytest.mark.parametrize("name", ["pml:MultiSimilarityLoss", "pml:ProxyAnchorLoss"])
def test_fit_pml_pair_and_proxy_losses_on_dishes_with_class_balanced_batches(tmp_path, name, monkeypatch):
    import foodlib.data.balanced as balanced
    from foodlib.train import fit, load_checkpoint, load_run

    built = []
    original = balanced.BalancedBatchLoader.__init__

    def spy(self, *args, **kwargs):
        original(self, *args, **kwargs)
        built.append(self)

    monkeypatch.setattr(balanced.BalancedBatchLoader, "__init__", spy)
    cfg = tiny_config(tmp_path, loss=name, samples_per_class=4, epochs=2, lr=3e-3, features=False)
    result = fit(cfg)

    assert len(built) == 1 and built[0].samples_per_class == 4  # the training loader is class-balanced
    for batch in built[0].batches():
        labels = built[0].labels[batch]
        assert set(np.bincount(labels)[np.bincount(labels) > 0].tolist()) == {4}
    rows = [r for r in result.trace if r["split"] == "train"]
    assert all(np.isfinite(r["pml"]) for r in rows) and result.metrics["test"]["n"] > 0
    assert 0.0 <= result.metrics["test"]["top1"] <= 1.0
    # best.pt carries the loss state (class means or proxies) and loads without pickled code
    state = torch.load(tmp_path / "run" / "best.pt", map_location="cpu", weights_only=True)["loss"]
    key = "class_sums" if "MultiSimilarity" in name else "metric_loss.proxies"
    assert key in state and torch.isfinite(state[key]).all()
    if "MultiSimilarity" in name:
        assert (state["class_counts"] > 0).all()  # every class was seen
    model, loss, _, _ = load_run(tmp_path / "run")
    assert torch.equal(loss.state_dict()[key], load_checkpoint(tmp_path / "run" / "best.pt")["loss"][key])


@pytest.mark.parametrize("name", [PAIR, PROXY])
def test_exported_module_traces_pml_predictions(name):
    from foodlib.inference import InferenceModule, trace_module
    from foodlib.models import create_model

    torch.manual_seed(0)
    model = create_model("smallcnn", embedding_dim=8)
    loss = create_loss(name, 8, 3)
    loss.update_centers(torch.randn(6, 8), torch.tensor([0, 1, 2, 0, 1, 2]))  # a no-op for the proxy loss
    module = InferenceModule(model, loss).eval()
    traced = trace_module(module, 32, check=False)
    x = torch.randn(5, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(traced(x)[1], loss.predict(model(x)))


@pytest.mark.slow  # two torchrun processes on the CPU, ~1 min
def test_torchrun_two_processes_with_a_pair_loss_keep_the_class_means_in_sync(tmp_path):
    """``foodlib train`` under torchrun (2 CPU processes, gloo) with a pml pair loss and balanced
    batches: training finishes (fit's check_in_sync compares every rank's state at the end), both
    ranks hold bitwise identical class means, and every class was seen by the all-reduced means."""
    import foodlib.distributed as D
    from torchrun_launch import launch

    cfg = Config.from_flat(data="dishes", dishes_classes=4, dishes_per_class=30, image_size=32, backbone="smallcnn",
                           epochs=1, batch_size=16, workers=0, quiet=True, loss=PAIR, augment="none", features=False,
                           figures=False, out=str(tmp_path / "two"), cache_dir=str(tmp_path / "cache"))
    metrics = launch(cfg, nproc_per_node=2, timeout=300, env={D.RANK_STATE_DIR_ENV: str(tmp_path / "states")})
    rank0, rank1 = (torch.load(tmp_path / "states" / f"rank{r}.pt", weights_only=True) for r in range(2))
    for key in ("class_sums", "class_counts"):
        assert torch.equal(rank0["loss"][key], rank1["loss"][key]), key
    assert (rank0["loss"]["class_counts"] > 0).all()
    assert metrics["test"]["n"] > 0


def test_suites_plan_the_new_losses_with_their_options():
    from foodlib.suite import load_suite, plan_suite

    spec = load_suite("""
name: family
base: {data: dishes, dishes_classes: 3, dishes_per_class: 30, image_size: 32, backbone: smallcnn, epochs: 1, batch_size: 8}
losses: [softmax, cosface, arcface, contrastive_center, "pml:TripletMarginLoss?margin=0.2&miner=TripletMarginMiner"]
loss_params:
  softmax: {label_smoothing: 0.1}
  cosface: {scale: 30}
  arcface: {margin: 2.0}
""")
    runs = {run.name: run for run in plan_suite(spec)}
    assert runs["softmax-s0"].config.loss.label_smoothing == 0.1 and runs["cosface-s0"].config.loss.scale == 30
    assert runs["pml:TripletMarginLoss?margin=0.2&miner=TripletMarginMiner-s0"].error is None
    assert "ArcFaceLoss: margin must be a number in [0.0, 1.57" in runs["arcface-s0"].error  # the loss's own check
