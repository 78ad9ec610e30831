"""Exact resume: a run interrupted anywhere (SIGKILL included) and resumed ends where an uninterrupted run ends.

Every random draw of an epoch derives from (seed, epoch), the lr schedule from the global step, the
warm-ups from the epoch, and last.pt carries every piece of state (model with BatchNorm statistics,
loss with centers, both optimizers, grad scaler), so a resumed run must reproduce the uninterrupted
run's weights bit for bit on the CPU.
"""
import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import REPO, rewrite_training_forward, tiny_config
from foodlib.cli import main as cli_main
from foodlib.config import Config, ConfigError
from foodlib.train import check_resume_config, fit, load_checkpoint


class _Interrupted(Exception):
    """Stands in for a crash: raised from inside the training loop at a chosen step."""


def interrupt_at_training_step(monkeypatch, step: int) -> None:
    """Make the next fit() raise _Interrupted at its ``step``-th training forward (1-based, over all epochs)."""
    def crash(out, embedding, labels):
        raise _Interrupted(f"interrupted at training step {step}")

    rewrite_training_forward(monkeypatch, step, crash)


def assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def trace_numbers(rows):
    """The computed columns of trace rows (timings left out: they differ between runs)."""
    return [{k: v for k, v in row.items() if k not in ("seconds", "img_per_s")} for row in rows]


# Each case has state that an inexact resume would lose. Center: the lr warm-up and cosine
# schedule, SGD momentum, the centers' own optimizer (update="sgd") and the lam warm-up. L-GM:
# the margin warm-up, Adam moments and colour augmentation.
@pytest.mark.parametrize("overrides", [
    dict(loss="center", update="sgd", lam=0.05, lam_warmup_epochs=2, optimizer="sgd", lr=0.05, warmup_epochs=0.5),
    pytest.param(dict(loss="lgm", alpha_warmup_epochs=2, augment="strong"), marks=pytest.mark.slow),
    # contrastive-center: centers in their own SGD group; pml pair loss: class-balanced batches and
    # the class means (decayed sums and counts) in the loss's state dict
    pytest.param(dict(loss="contrastive_center", lam_warmup_epochs=2), marks=pytest.mark.slow),
    pytest.param(dict(loss="pml:MultiSimilarityLoss"), marks=pytest.mark.slow),
], ids=["center-sgd-warmups", "lgm-margin-warmup", "contrastive-center", "pml-pair-balanced"])
def test_run_interrupted_mid_epoch_resumes_to_identical_weights(tmp_path, monkeypatch, overrides):
    overrides = dict(epochs=2, dishes_per_class=20, features=False, **overrides)
    uninterrupted = fit(tiny_config(tmp_path / "a", **overrides))
    steps_per_epoch = len(uninterrupted.data.loader("train", 16, shuffle=True))
    assert steps_per_epoch >= 4  # so that "step 3 of epoch 2" is mid-epoch

    with monkeypatch.context() as patch:
        interrupt_at_training_step(patch, steps_per_epoch + 3)  # epoch 2, step 3
        with pytest.raises(_Interrupted):
            fit(tiny_config(tmp_path / "b", **overrides))
    run_b = tmp_path / "b" / "run"
    assert load_checkpoint(run_b / "last.pt")["epoch"] == 1
    stale = run_b / ".last.pt.k3j9x0q_.tmp"  # what a kill during a checkpoint write leaves behind
    stale.write_bytes(b"half a checkpoint")

    resumed = fit(tiny_config(tmp_path / "b", resume=True, **overrides))

    assert not stale.exists()
    assert_same_state(uninterrupted.model.state_dict(), resumed.model.state_dict())
    assert_same_state(uninterrupted.loss.state_dict(), resumed.loss.state_dict())
    assert trace_numbers(resumed.trace) == trace_numbers(uninterrupted.trace)
    for split in ("val", "test"):
        assert resumed.metrics[split] == uninterrupted.metrics[split]
    assert resumed.metrics["best_epoch"] == uninterrupted.metrics["best_epoch"]


@pytest.fixture(scope="module")
def one_epoch_run(tmp_path_factory):
    """A finished one-epoch softmax run; tests copy it before changing anything."""
    tmp = tmp_path_factory.mktemp("one-epoch")
    return fit(tiny_config(tmp, epochs=1, features=False)).run_dir


def copy_run(run_dir: Path, tmp_path: Path) -> Path:
    target = tmp_path / "run"
    shutil.copytree(run_dir, target)
    return target


def test_resume_refuses_a_config_that_changes_training_and_names_the_fields(one_epoch_run, tmp_path):
    run = copy_run(one_epoch_run, tmp_path)
    saved_yaml = (run / "config.yaml").read_text()
    cfg = tiny_config(tmp_path, epochs=2, resume=True, loss="center", lr=0.1)
    with pytest.raises(ConfigError) as error:
        fit(cfg)
    message = str(error.value)
    assert str(run / "last.pt") in message
    assert "loss='center' (the run used 'softmax')" in message
    assert "lr=0.1 (the run used 0.002)" in message
    assert "epochs" not in message  # more epochs are allowed
    assert (run / "config.yaml").read_text() == saved_yaml  # a refused resume rewrites nothing
    assert load_checkpoint(run / "last.pt")["epoch"] == 1


def test_resume_refusal_through_the_cli_is_one_line_with_exit_code_2(one_epoch_run, tmp_path, capsys):
    run = copy_run(one_epoch_run, tmp_path)
    saved = Config.from_yaml(run / "config.yaml")
    flags = ["train", "--config", str(run / "config.yaml"), "--out", str(run), "--resume", "--seed", "5"]
    assert saved.train.seed == 0
    assert cli_main(flags) == 2
    err = capsys.readouterr().err
    assert "seed=5 (the run used 0)" in err
    assert "Traceback" not in err


def test_resume_allows_more_epochs_and_runtime_settings(one_epoch_run, tmp_path):
    run = copy_run(one_epoch_run, tmp_path)
    first_epoch = load_checkpoint(run / "last.pt")["trace"]
    cfg = tiny_config(tmp_path, epochs=2, resume=True, device="cpu", quiet=False, features=False, eval_test=False)
    result = fit(cfg)
    assert load_checkpoint(run / "last.pt")["epoch"] == 2
    assert [r["epoch"] for r in result.trace if r["split"] == "train"] == [1, 2]
    assert trace_numbers(result.trace[: len(first_epoch)]) == trace_numbers(first_epoch)
    assert "test" not in result.metrics


@pytest.mark.parametrize("change, word", [
    (dict(epochs=2), "epochs=2 (the run used 3; epochs may only grow)"),
    (dict(batch_size=32), "batch_size=32 (the run used 64)"),
    (dict(embedding_dim=2), "embedding_dim=2 (the run used None)"),
])
def test_check_resume_config_names_each_difference(change, word):
    saved = Config.from_flat(epochs=3).to_dict()
    with pytest.raises(ConfigError) as error:
        check_resume_config(saved, Config.from_flat(**{"epochs": 3, **change}), Path("runs/x/last.pt"))
    assert word in str(error.value)
    assert "runs/x/last.pt" in str(error.value)


@pytest.mark.parametrize("change", [
    dict(epochs=5), dict(quiet=True), dict(workers=4), dict(device="cpu"), dict(resume=True), dict(out="elsewhere"),
    dict(features=False, figures=False, eval_test=False), dict(cache=False, cache_dir="/tmp/c"),
])
def test_check_resume_config_allows_settings_that_do_not_change_training(change):
    saved = Config.from_flat(epochs=3).to_dict()
    check_resume_config(saved, Config.from_flat(**{"epochs": 3, **change}), Path("last.pt"))


def test_check_resume_config_reads_a_field_missing_from_an_older_run_as_its_default():
    saved = Config.from_flat(epochs=3, loss="center").to_dict()
    del saved["loss"]["lam_warmup_epochs"]  # as if the run predates the field
    saved["train"]["retired_option"] = 1  # a field foodlib no longer has
    check_resume_config(saved, Config.from_flat(epochs=3, loss="center"), Path("last.pt"))
    with pytest.raises(ConfigError, match=r"lam_warmup_epochs=2 \(the run used 0\)"):
        check_resume_config(saved, Config.from_flat(epochs=3, loss="center", lam_warmup_epochs=2), Path("last.pt"))


# ----- SIGKILL of a real training process ------------------------------------------------------

TRAIN_FLAGS = ["--data", "dishes", "--dishes-classes", "4", "--dishes-per-class", "60", "--image-size", "32",
               "--backbone", "smallcnn", "--batch-size", "8", "--epochs", "2", "--lr", "0.003", "--seed", "3",
               "--workers", "0", "--quiet", "--no-features", "--no-figures"]


def start_training(out: Path, *extra: str) -> subprocess.Popen:
    # One thread in every process: the same arithmetic order in the killed, resumed and reference
    # runs, so their results can be compared exactly.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-m", "foodlib.cli", "train", *TRAIN_FLAGS, "--out", str(out), *extra],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(process: subprocess.Popen, timeout: float = 120) -> str:
    output, _ = process.communicate(timeout=timeout)
    assert process.returncode == 0, output
    return output


def read_trace(path: Path) -> list[dict]:
    with open(path) as handle:
        return list(csv.DictReader(handle))


@pytest.mark.slow
def test_training_killed_mid_epoch_resumes_to_the_uninterrupted_result(tmp_path):
    from foodlib.data import load_data

    # Generate and decode the data once, here, so the two processes do not both write it.
    load_data(Config.from_flat(data="dishes", dishes_classes=4, dishes_per_class=60, image_size=32), progress=False)
    reference_dir, killed_dir = tmp_path / "reference", tmp_path / "killed"
    reference = start_training(reference_dir)
    killed = start_training(killed_dir)
    try:
        last = killed_dir / "last.pt"
        deadline = time.time() + 90
        while not last.exists():  # appears atomically, complete, at the end of epoch 1
            assert killed.poll() is None, killed.communicate()[0]
            assert time.time() < deadline, "epoch 1 never finished"
            time.sleep(0.02)
        # Epoch 2 is under way now; kill it about a third of the way in, measured on epoch 1.
        epoch_seconds = sum(float(r["seconds"]) for r in read_trace(killed_dir / "trace.csv"))
        time.sleep(0.35 * epoch_seconds)
        os.kill(killed.pid, signal.SIGKILL)
        killed.wait(timeout=30)
    finally:
        if killed.poll() is None:
            killed.kill()
    assert killed.returncode == -signal.SIGKILL
    assert load_checkpoint(killed_dir / "last.pt")["epoch"] == 1, "the kill came after epoch 2 had finished"
    assert not (killed_dir / "metrics.json").exists()

    output = finish(start_training(killed_dir, "--resume"))
    assert "resuming" in output and "after epoch 1" in output
    finish(reference)

    metrics = {name: json.loads((folder / "metrics.json").read_text()) for name, folder in
               (("reference", reference_dir), ("resumed", killed_dir))}
    for split in ("val", "test"):
        for key in ("top1", "top5", "loss"):
            assert metrics["resumed"][split][key] == pytest.approx(metrics["reference"][split][key], abs=1e-6)
    for checkpoint in ("last.pt", "best.pt"):
        reference_ckpt, resumed_ckpt = (load_checkpoint(folder / checkpoint) for folder in (reference_dir, killed_dir))
        assert resumed_ckpt["epoch"] == reference_ckpt["epoch"]
        assert_same_state(reference_ckpt["model"], resumed_ckpt["model"])
        assert_same_state(reference_ckpt["loss"], resumed_ckpt["loss"])
    assert trace_numbers(read_trace(killed_dir / "trace.csv")) == trace_numbers(read_trace(reference_dir / "trace.csv"))
    assert not list(killed_dir.glob(".*.tmp"))
