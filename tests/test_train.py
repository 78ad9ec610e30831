"""fit() end to end on small real runs: the run folder, learning, and the CLI."""
import csv
import json

import pytest
import torch

from conftest import tiny_config
from foodlib.cli import main as cli_main
from foodlib.train import fit, load_checkpoint, load_run


@pytest.fixture(scope="module")
def softmax_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("softmax")
    # digits: easy enough that 3 short epochs must learn; dishes are deliberately harder
    return fit(tiny_config(tmp, data="digits", limit_per_class=30, val_fraction=0.1, epochs=3, lr=3e-3,
                           features=True, figures=True))


def test_run_folder_has_everything(softmax_run):
    run = softmax_run.run_dir
    for name in ("config.yaml", "run.json", "trace.csv", "metrics.json", "best.pt", "last.pt", "features.npz",
                 "classes.json", "splits/train.txt", "splits/val.txt", "splits/test.txt"):
        assert (run / name).is_file(), name
    assert (run / "figures" / "umap.png").is_file()
    info = json.loads((run / "run.json").read_text())
    assert info["seed"] == 0 and info["torch"] == torch.__version__


def test_metrics_json_holds_fractions(softmax_run):
    metrics = json.loads((softmax_run.run_dir / "metrics.json").read_text())
    for split in ("val", "test"):
        assert 0.0 <= metrics[split]["top1"] <= metrics[split]["top5"] <= 1.0
    for key in ("intra_class_variance", "inter_class_distance", "fisher_ratio", "silhouette", "knn_top1", "nmi"):
        assert key in metrics["test"], key
    low, high = metrics["test"]["top1_ci"]
    assert low <= metrics["test"]["top1"] <= high


def test_training_learns(softmax_run):
    rows = list(csv.DictReader(open(softmax_run.run_dir / "trace.csv")))
    train = [r for r in rows if r["split"] == "train"]
    assert {"epoch", "split", "lr", "loss", "ce", "top1", "top5", "seconds", "img_per_s"} <= set(rows[0])
    assert float(train[-1]["loss"]) < float(train[0]["loss"])
    assert float(train[-1]["top1"]) > float(train[0]["top1"])
    assert softmax_run.metrics["test"]["top1"] > 0.5  # 10 classes: chance is 0.1


def test_checkpoints_carry_config_and_classes(softmax_run):
    best = load_checkpoint(softmax_run.run_dir / "best.pt")
    assert best["classes"] == softmax_run.data.classes
    assert best["config"]["loss"]["loss"] == "softmax"
    last = load_checkpoint(softmax_run.run_dir / "last.pt")
    assert last["epoch"] == 3 and "optimizer" in last


def test_load_run_reproduces_the_test_evaluation(softmax_run):
    from foodlib.train import evaluate

    model, loss, cfg, classes = load_run(softmax_run.run_dir)
    loader = softmax_run.data.loader("test", 64, shuffle=False)
    again = evaluate(model, loss, loader, cfg.data.image_size, torch.device("cpu"))
    assert again["top1"] == pytest.approx(softmax_run.metrics["test"]["top1"])


def test_existing_run_needs_resume(softmax_run):
    cfg = tiny_config(softmax_run.run_dir.parent, data="digits")  # same out folder
    assert cfg.train.out == str(softmax_run.run_dir)
    with pytest.raises(FileExistsError, match="resume"):
        fit(cfg)


@pytest.mark.parametrize("optimizer", ["sgd", "adagrad"])
def test_other_optimizers_and_schedules_run(tmp_path, optimizer):
    result = fit(tiny_config(tmp_path, optimizer=optimizer, lr=0.01, schedule="step", warmup_epochs=0.5,
                             epochs=2, features=False))
    assert result.metrics["val"]["n"] > 0


def test_cli_train(tmp_path, capsys):
    code = cli_main(["train", "--data", "dishes", "--dishes-classes", "3", "--dishes-per-class", "12",
                     "--image-size", "32", "--backbone", "smallcnn", "--epochs", "1", "--batch-size", "8",
                     "--workers", "0", "--quiet", "--no-features", "--loss", "center", "--lam", "0.01",
                     "--out", str(tmp_path / "cli")])
    assert code == 0
    assert "run folder" in capsys.readouterr().out
    assert json.loads((tmp_path / "cli" / "metrics.json").read_text())["test"]["n"] == 12


@pytest.mark.slow
def test_real_food_photos_learn_above_chance(tmp_path, food101_10):
    """Real Food-101 photos (10 classes): a small subset, small images, a few epochs, well above chance."""
    cfg = tiny_config(tmp_path, data=str(food101_10), limit_per_class=80, val_fraction=0.2, image_size=48,
                      epochs=6, batch_size=32, lr=3e-3, eval_test=False, features=False)
    result = fit(cfg)
    val = result.metrics["val"]
    assert val["n"] == 160
    # chance is 0.10; with 160 val images its standard error is 0.024, so 0.2 is 4 of them above
    assert val["top1"] > 0.20, val


def test_non_finite_watch_names_the_first_bad_step_when_read_late():
    """The GPU mode reads its flags every 10 steps; the message must still name the first bad step."""
    from foodlib.losses import LossOutput
    from foodlib.train import NonFiniteLossError, NonFiniteWatch

    watch = NonFiniteWatch(("ce", "center"), torch.device("cpu"), steps_per_epoch=30, every=10)
    nan, one = torch.tensor(float("nan")), torch.tensor(1.0)
    for step in range(11):
        bad = step >= 3
        out = LossOutput(nan if bad else one, torch.zeros(1, 2), {"ce": one, "center": nan if bad else one})
        watch.observe(step, out)
        if step < 10:
            watch.check(0, step, "last.pt was kept")  # flags are read at steps 0, 10, 20 and the last
    with pytest.raises(NonFiniteLossError, match=r"loss is nan at epoch 1, step 4 of 30 \(non-finite term\(s\): center\)"):
        watch.check(0, 10, "last.pt was kept")


@pytest.mark.parametrize("fails", [False, True])
def test_distributed_cleanup_runs_whether_or_not_the_run_fails(tmp_path, monkeypatch, fails):
    """fit() destroys the process group it set up also when training raises (try/finally)."""
    import foodlib.train as T
    from foodlib.distributed import DistInfo

    calls = []
    monkeypatch.setattr(T, "setup_distributed", lambda device: DistInfo(rank=0, world_size=2))
    monkeypatch.setattr(T, "cleanup_distributed", lambda: calls.append("cleanup"))

    def body(*args, **kwargs):
        if fails:
            raise RuntimeError("rank 0 failed in epoch 1")
        return "result"

    monkeypatch.setattr(T, "_fit", body)
    cfg = tiny_config(tmp_path)
    if fails:
        with pytest.raises(RuntimeError, match="rank 0 failed"):
            fit(cfg)
        assert not (tmp_path / "run").exists()  # the folder it created is removed, as before
    else:
        assert fit(cfg) == "result"
    assert calls == ["cleanup"]


def test_train_and_val_trace_rows_have_the_same_columns():
    """One helper builds both rows: the same columns in the same order, times and speeds from its arguments."""
    from foodlib.train import _trace_row

    stats = {"n": 40, "loss": 1.5, "ce": 1.2, "center": 0.3, "top1": 0.5, "top5": 0.9}
    train = _trace_row(0, "train", 0.01, stats, 2.0)
    val = _trace_row(0, "val", 0.01, {**stats, "n": 10}, 0.5)
    assert list(train) == list(val) == ["epoch", "split", "lr", "loss", "ce", "center", "top1", "top5", "seconds",
                                        "img_per_s"]
    assert (train["epoch"], train["img_per_s"], val["img_per_s"]) == (1, 20.0, 20.0)


@pytest.mark.slow
def test_discriminative_losses_make_classes_more_compact_than_softmax(tmp_path):
    """Same data, seed and budget through fit(): the loss falls for every loss, and center, island
    and L-GM leave a smaller intra-class variance in the training embeddings than softmax."""
    variance = {}
    for name in ("softmax", "center", "island", "lgm"):
        result = fit(tiny_config(tmp_path / name, loss=name, epochs=4, dishes_per_class=40, lr=3e-3,
                                 eval_test=False))
        train_rows = [r for r in result.trace if r["split"] == "train"]
        assert train_rows[-1]["loss"] < train_rows[0]["loss"], name
        variance[name] = result.metrics["train"]["intra_class_variance"]
        assert "test" not in result.metrics  # eval_test=False: test images untouched, features included
    for name in ("center", "island", "lgm"):
        assert variance[name] < variance["softmax"], variance
