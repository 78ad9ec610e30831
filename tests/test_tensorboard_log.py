"""foodlib.tensorboard_log: the event files a run writes, read back with TensorBoard's own reader."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402
from tensorboard.plugins.hparams import plugin_data_pb2  # noqa: E402

from foodlib.tensorboard_log import TENSORBOARD_DIR, RunBoard, hparam_values, spread_subset  # noqa: E402
from foodlib.train import fit  # noqa: E402
from conftest import tiny_config  # noqa: E402


def read_events(logdir) -> EventAccumulator:
    events = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    return events


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    cfg = tiny_config(tmp_path_factory.mktemp("tb"), epochs=2, lam=0.01, loss="center")
    return fit(cfg)


def test_scalars_match_the_trace_for_every_epoch_split_and_term(tiny_run):
    events = read_events(tiny_run.run_dir / TENSORBOARD_DIR)
    tags = set(events.Tags()["scalars"])
    with open(tiny_run.run_dir / "trace.csv") as f:
        rows = list(csv.DictReader(f))
    assert {r["split"] for r in rows} == {"train", "val"}
    for row in rows:
        for name in ("loss", "top1", "top5", "img_per_s", *tiny_run.loss.term_names):
            tag = f"{name}/{row['split']}"
            assert tag in tags, tag
            by_step = {e.step: e.value for e in events.Scalars(tag)}
            assert by_step[int(row["epoch"])] == pytest.approx(float(row[name]), rel=1e-5, abs=1e-6)
    assert [e.step for e in events.Scalars("lr")] == [1, 2]
    assert "center/train" in tags and "ce/val" in tags  # each loss term, both splits
    best = tiny_run.metrics
    assert events.Scalars("best/test_top1")[-1].value == pytest.approx(best["test"]["top1"], rel=1e-6)
    assert events.Scalars("best/test_top1")[-1].step == best["best_epoch"]


def test_hparams_session_holds_the_config_and_ends(tiny_run):
    events = read_events(tiny_run.run_dir / TENSORBOARD_DIR)
    content = events.PluginTagToContent("hparams")
    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"]).session_start_info
    assert start.hparams["loss"].string_value == "center"
    assert start.hparams["lam"].number_value == pytest.approx(0.01)
    assert start.hparams["epochs"].number_value == 2
    assert "out" not in start.hparams and "tensorboard" not in start.hparams  # runtime-only fields
    assert "_hparams_/experiment" not in content  # TensorBoard derives it from all of a suite's sessions
    end = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_end_info"]).session_end_info
    assert end.status == 1  # STATUS_SUCCESS


def test_projector_has_test_embeddings_labels_and_a_sprite(tiny_run):
    logdir = tiny_run.run_dir / TENSORBOARD_DIR
    config = (logdir / "projector_config.pbtxt").read_text()
    step = tiny_run.metrics["best_epoch"]
    folder = logdir / f"{step:05d}" / "test"
    assert f'tensor_name: "test:{step:05d}"' in config and "sprite" in config
    tensors = np.loadtxt(folder / "tensors.tsv", delimiter="\t", ndmin=2)
    features = np.load(tiny_run.run_dir / "features.npz")
    np.testing.assert_allclose(tensors, features["test_embeddings"], rtol=0, atol=1e-5)  # 5 decimals
    lines = (folder / "metadata.tsv").read_text().splitlines()
    assert lines[0].split("\t") == ["class", "predicted", "correct"]
    classes = list(features["classes"])
    assert [line.split("\t")[0] for line in lines[1:]] == [classes[i] for i in features["test_labels"]]
    n = len(tensors)
    sprite = Image.open(folder / "sprite.png")
    per_row = int(np.ceil(np.sqrt(n)))
    assert sprite.size == (per_row * 48, per_row * 48)
    assert np.asarray(sprite).std() > 0  # real thumbnails, not a blank sheet


def test_a_resumed_run_shows_each_epoch_once_and_one_projector(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    first = fit(tiny_config(tmp_path, epochs=1))
    # as if a process had logged epoch 2 and died before saving last.pt: the resumed run redoes epoch 2
    with SummaryWriter(str(first.run_dir / TENSORBOARD_DIR)) as killed:
        killed.add_scalar("loss/train", 1234.0, 2)
    result = fit(tiny_config(tmp_path, epochs=2, resume=True))  # epochs may grow on resume
    logdir = result.run_dir / TENSORBOARD_DIR
    events = read_events(logdir)
    assert [e.step for e in events.Scalars("loss/train")] == [1, 2]  # the orphaned step 2 was purged
    assert events.Scalars("loss/train")[-1].value == pytest.approx(result.trace[-2]["loss"], rel=1e-5)
    step = result.metrics["best_epoch"]
    assert [p.parent.name for p in logdir.glob("*/test")] == [f"{step:05d}"]
    assert (logdir / "projector_config.pbtxt").read_text().count("embeddings {") == 1


def test_tensorboard_off_writes_nothing(tmp_path):
    result = fit(tiny_config(tmp_path, epochs=1, tensorboard=False, features=False))
    assert not (result.run_dir / TENSORBOARD_DIR).exists()


def test_hparam_values_and_subsets(tmp_path):
    cfg = tiny_config(tmp_path, lam=None)
    values = hparam_values(cfg)
    assert "lam" not in values and values["backbone"] == "smallcnn" and "out" not in values
    assert list(spread_subset(5, 10)) == [0, 1, 2, 3, 4]
    subset = spread_subset(10_000, 2000)
    assert len(subset) == 2000 and subset[0] == 0 and subset[-1] == 9999 and np.all(np.diff(subset) > 0)


def test_disabled_board_is_a_no_op(tmp_path):
    board = RunBoard.open(tiny_config(tmp_path), tmp_path, main=False)
    board.log_epoch([{"epoch": 1, "split": "train", "loss": 1.0}], 1)
    board.finish({"best_epoch": 1}, None, tmp_path)
    board.close()
    assert not (tmp_path / TENSORBOARD_DIR).exists()
    json.dumps(hparam_values(tiny_config(tmp_path)))  # plain values only


def test_a_trunk_cache_run_gets_its_projector_with_thumbnails(tmp_path):
    """trainable=head trains on cached trunk features; the thumbnails come from the decoded images
    kept beside them (they once crashed the end-of-run summary there)."""
    import warnings

    cfg = tiny_config(tmp_path, trainable="head", embedding_dim=8, augment="none", cache_dir=str(tmp_path / "cache"))
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # a failed summary is a UserWarning
        result = fit(cfg)
    logdir = result.run_dir / TENSORBOARD_DIR
    config = (logdir / "projector_config.pbtxt").read_text()
    assert 'tensor_name: "test:' in config and "sprite" in config
    step = result.metrics["best_epoch"]
    sprite = Image.open(logdir / f"{step:05d}" / "test" / "sprite.png")
    assert np.asarray(sprite).std() > 0  # real thumbnails, not a blank sheet
