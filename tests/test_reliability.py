"""Bad inputs and crashes: damaged image files, invalid configs, damaged checkpoints, NaN losses, killed writes.

Every bad input is made by the test itself: a truncated JPEG, a zero-byte file, a text file named
.jpg, a checkpoint cut in half, a writer that dies mid-write.
"""
import json
import math
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import foodlib.train as train_module
from conftest import rewrite_training_forward, tiny_config
from foodlib.cli import main as cli_main
from foodlib.config import Config, ConfigError
from foodlib.data import BadFilesError
from foodlib.files import (LOCK_NAME, FolderBusyError, atomic_torch_save, atomic_write, atomic_write_json, atomic_write_text,
                        folder_lock, remove_stale_temp_files)
from foodlib.losses import LossOutput, create_loss
from foodlib.models import create_model
from foodlib.train import CheckpointError, NonFiniteLossError, fit, load_checkpoint, load_run

CLASSES = ("apple", "bread")
TRAIN_PER_CLASS, TEST_PER_CLASS = 12, 4


def make_image_folder(root: Path, bad_files: bool = True) -> dict[str, str]:
    """An ImageFolder with 2 classes of 48 px JPEGs; with ``bad_files``, three unusable files.

    Returns {absolute path of each bad file: a word its reason must contain}.
    """
    rng = np.random.default_rng(0)
    for split, count in (("train", TRAIN_PER_CLASS), ("test", TEST_PER_CLASS)):
        for label, name in enumerate(CLASSES):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                pixels = (rng.random((48, 48, 3)) * 60 + label * 150).astype(np.uint8)  # dark vs bright class
                Image.fromarray(pixels).save(folder / f"{i}.jpg", quality=90)
    if not bad_files:
        return {}
    root = root.resolve()
    whole = (root / "train/apple/0.jpg").read_bytes()
    (root / "train/apple/truncated.jpg").write_bytes(whole[: len(whole) // 2])
    (root / "train/apple/empty.jpg").write_bytes(b"")
    (root / "train/bread/notes.jpg").write_text("shopping list: flour, yeast\n")
    return {str(root / "train/apple/truncated.jpg"): "truncated", str(root / "train/apple/empty.jpg"): "empty",
            str(root / "train/bread/notes.jpg"): "not an image"}


def folder_config(tmp_path: Path, data: Path, **overrides) -> Config:
    base = dict(data=str(data), image_size=32, backbone="smallcnn", epochs=1, batch_size=8, workers=0, quiet=True,
                features=False, figures=False, out=str(tmp_path / "run"), cache_dir=str(tmp_path / "cache"))
    base.update(overrides)
    return Config.from_flat(**base)


def read_bad_files(run_dir: Path) -> dict[str, str]:
    lines = (run_dir / "bad_files.txt").read_text().splitlines()
    return dict(line.split("\t", 1) for line in lines)


# ----- atomic writes ---------------------------------------------------------------------------

class _WriterDied(Exception):
    pass


def half_then_die(handle):
    handle.write(b'{"new": tr')
    raise _WriterDied


def test_atomic_write_keeps_the_old_file_when_the_writer_dies_mid_write(tmp_path):
    target = tmp_path / "metrics.json"
    target.write_text('{"old": true}\n')
    with pytest.raises(_WriterDied):
        atomic_write(target, half_then_die)
    assert target.read_text() == '{"old": true}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]  # no temporary file left


def test_atomic_write_of_a_new_file_leaves_nothing_when_the_writer_dies(tmp_path):
    with pytest.raises(_WriterDied):
        atomic_write(tmp_path / "sub" / "new.bin", half_then_die)
    assert list((tmp_path / "sub").iterdir()) == []


def test_atomic_torch_save_keeps_the_old_checkpoint_when_pickling_fails(tmp_path):
    target = tmp_path / "last.pt"
    atomic_torch_save(target, {"epoch": 1, "weights": torch.arange(3.0)})

    class Unpicklable:
        def __reduce__(self):
            raise _WriterDied("cannot pickle")

    with pytest.raises(_WriterDied):
        atomic_torch_save(target, {"epoch": 2, "weights": torch.zeros(1000), "bad": Unpicklable()})
    saved = torch.load(target, weights_only=False)
    assert saved["epoch"] == 1 and torch.equal(saved["weights"], torch.arange(3.0))
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_atomic_writes_round_trip_and_get_ordinary_permissions(tmp_path):
    atomic_write_text(tmp_path / "a.txt", "héllo\n")
    atomic_write_json(tmp_path / "b.json", {"top1": 0.5})
    assert (tmp_path / "a.txt").read_text() == "héllo\n"
    assert json.loads((tmp_path / "b.json").read_text()) == {"top1": 0.5}
    umask = os.umask(0o022)
    os.umask(umask)
    # mkstemp makes 0600 files; a finished file must be readable like any other (0644 with umask 022)
    assert stat.S_IMODE((tmp_path / "a.txt").stat().st_mode) == 0o666 & ~umask


def test_remove_stale_temp_files_removes_only_what_atomic_write_leaves(tmp_path):
    stale = tmp_path / ".last.pt.a1b2c3d4.tmp"
    stale.write_bytes(b"half")
    keep = [tmp_path / "last.pt", tmp_path / ".notes.tmp", tmp_path / "x.a1b2c3d4.tmp"]
    for path in keep:
        path.write_bytes(b"x")
    assert remove_stale_temp_files(tmp_path) == [stale]
    assert not stale.exists() and all(path.exists() for path in keep)


# ----- one writer per folder -------------------------------------------------------------------------

HOLD_LOCK = """
import sys, time
from foodlib.files import folder_lock
with folder_lock(sys.argv[1], "a test holder"):
    print("locked", flush=True)
    time.sleep(60)
"""


def test_folder_lock_names_its_holder_and_is_released_when_the_holder_is_killed(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(tmp_path)], stdout=subprocess.PIPE, text=True,
                              cwd=Path(__file__).resolve().parents[1])
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(FolderBusyError, match=rf"{tmp_path} is in use by a test holder \(pid {holder.pid} "):
            with folder_lock(tmp_path, "a second writer"):
                pass
    finally:
        holder.kill()  # SIGKILL: no cleanup code runs, the OS drops the lock
        holder.wait()
    with folder_lock(tmp_path, "a second writer"):
        assert "a second writer" in (tmp_path / LOCK_NAME).read_text()
    assert not (tmp_path / LOCK_NAME).exists()  # removed on release
    with folder_lock(tmp_path, "a third writer"):
        with pytest.raises(FolderBusyError, match="a third writer"):  # also within one process
            with folder_lock(tmp_path, "a nested writer"):
                pass


def test_atomic_writes_and_configs_work_where_there_is_no_fcntl(tmp_path):
    """Windows has no fcntl: only the locks need it, so configs and metrics files still load and save there."""
    code = ("import sys; sys.modules['fcntl'] = None\n"
            "from foodlib.config import Config\n"
            f"Config().to_yaml({str(tmp_path / 'c.yaml')!r}); print(Config.from_yaml({str(tmp_path / 'c.yaml')!r}).train.epochs)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(Config().train.epochs)


IMPORT_ALL = """
import importlib, pkgutil, sys
sys.modules["fcntl"] = None  # as on Windows: `import fcntl` raises ImportError
import foodlib
names = [m.name for m in pkgutil.walk_packages(foodlib.__path__, "foodlib.")]
failed = []
for name in names:
    try:
        importlib.import_module(name)
    except Exception as error:
        failed.append(f"{name}: {error!r}")
print(len(names), *failed, sep="\\n")
"""


def test_every_foodlib_module_imports_where_there_is_no_fcntl():
    """Windows and macOS need no POSIX-only module at import time: locks go through filelock."""
    done = subprocess.run([sys.executable, "-c", IMPORT_ALL], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr
    count, *failed = done.stdout.strip().splitlines()
    assert int(count) > 30 and failed == []


def test_no_foodlib_module_imports_fcntl():
    """Locking is filelock's job (it picks flock, msvcrt or a soft lock per platform); none is hand-written."""
    import ast

    root = Path(__file__).resolve().parents[1] / "foodlib"
    users = []
    for file in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(file.read_text(), str(file))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            users += [f"{file.relative_to(root.parent)}:{node.lineno}" for n in names if n.split(".")[0] == "fcntl"]
    assert users == []


def test_fit_refuses_a_run_folder_another_process_is_writing(tmp_path, capsys):
    cfg = tiny_config(tmp_path, epochs=1)
    with folder_lock(cfg.train.out, "another training run"):
        with pytest.raises(FolderBusyError, match="in use by another training run"):
            fit(cfg)
        assert cli_main(["train", "--data", "dishes", "--out", cfg.train.out, "--quiet"]) == 2
        assert "in use by another training run" in capsys.readouterr().err
        assert sorted(p.name for p in Path(cfg.train.out).iterdir()) == [LOCK_NAME]  # nothing written
    result = fit(cfg)  # once the holder is gone
    assert (result.run_dir / "metrics.json").is_file() and not (result.run_dir / LOCK_NAME).exists()


# ----- damaged checkpoints ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """A finished one-epoch run on the embedded dishes; tests copy it before damaging anything."""
    return fit(tiny_config(tmp_path_factory.mktemp("finished"), epochs=1, features=False)).run_dir


def copy_run(run_dir: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(run_dir, tmp_path / "run"))


def truncate_to_half(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_truncated_best_pt_gives_a_checkpoint_error_naming_the_file(finished_run, tmp_path):
    run = copy_run(finished_run, tmp_path)
    truncate_to_half(run / "best.pt")
    with pytest.raises(CheckpointError) as error:
        load_run(run)
    assert str(run / "best.pt") in str(error.value)
    assert "corrupt or truncated" in str(error.value)


def test_truncated_last_pt_stops_resume_with_the_path_and_the_cli_exits_2(finished_run, tmp_path, capsys):
    run = copy_run(finished_run, tmp_path)
    truncate_to_half(run / "last.pt")
    with pytest.raises(CheckpointError, match="corrupt or truncated") as error:
        fit(tiny_config(tmp_path, epochs=2, resume=True, features=False))
    assert str(run / "last.pt") in str(error.value)

    code = cli_main(["train", "--config", str(run / "config.yaml"), "--out", str(run), "--epochs", "2", "--resume"])
    err = capsys.readouterr().err
    assert code == 2
    assert str(run / "last.pt") in err and "Traceback" not in err


@pytest.mark.parametrize("content, words", [
    (b"", "corrupt or truncated"),
    (b"this is not a zip archive", "corrupt or truncated"),
    ("list", "not a foodlib checkpoint"),
    ("dict-without-weights", "lacks ['model', 'loss']"),
])
def test_foreign_or_garbage_checkpoints_are_named(tmp_path, content, words):
    path = tmp_path / "best.pt"
    if content == "list":
        torch.save([1, 2, 3], path)
    elif content == "dict-without-weights":
        torch.save({"format": train_module.CHECKPOINT_FORMAT, "config": {}, "classes": ["a", "b"], "epoch": 1}, path)
    else:
        path.write_bytes(content)
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(path)
    assert str(path) in str(error.value) and words in str(error.value)


def test_missing_checkpoint_is_named(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "best.pt")


# ----- damaged image files ---------------------------------------------------------------------

@pytest.mark.parametrize("cache", [True, False], ids=["decoded-cache", "uncached-scan"])
def test_training_skips_and_lists_bad_files(tmp_path, cache):
    expected = make_image_folder(tmp_path / "data")
    result = fit(folder_config(tmp_path, tmp_path / "data", cache=cache))

    listed = read_bad_files(result.run_dir)
    assert set(listed) == set(expected)
    for path, word in expected.items():
        assert word in listed[path], listed[path]
    assert result.metrics["bad_files"] == 3
    usable = 2 * TRAIN_PER_CLASS  # every good train image, in train or val
    assert len(result.data.labels("train")) + len(result.data.labels("val")) == usable
    assert result.metrics["test"]["n"] == 2 * TEST_PER_CLASS
    split_files = "".join((result.run_dir / "splits" / f"{s}.txt").read_text() for s in ("train", "val"))
    assert not any(path in split_files for path in expected)
    assert (result.run_dir / "metrics.json").is_file() and (result.run_dir / "last.pt").is_file()


@pytest.mark.parametrize("cache", [True, False], ids=["decoded-cache", "uncached-scan"])
def test_bad_files_fail_policy_raises_listing_every_file(tmp_path, cache):
    expected = make_image_folder(tmp_path / "data")
    with pytest.raises(BadFilesError) as error:
        fit(folder_config(tmp_path, tmp_path / "data", cache=cache, bad_files="fail"))
    message = str(error.value)
    assert message.startswith("3 unreadable image file(s)")
    for path in expected:
        assert path in message
    assert "bad_files='skip'" in message
    assert not (tmp_path / "run" / "last.pt").exists()


def test_bad_files_fail_policy_through_the_cli_exits_2_with_the_list(tmp_path, capsys):
    expected = make_image_folder(tmp_path / "data")
    code = cli_main(["train", "--data", str(tmp_path / "data"), "--bad-files", "fail", "--image-size", "32",
                     "--backbone", "smallcnn", "--quiet", "--out", str(tmp_path / "run"),
                     "--cache-dir", str(tmp_path / "cache")])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("foodlib train: error: 3 unreadable image file(s)")
    assert all(path in err for path in expected) and "Traceback" not in err


def test_data_check_cli_exit_codes_and_report(tmp_path, capsys):
    expected = make_image_folder(tmp_path / "bad")
    make_image_folder(tmp_path / "clean", bad_files=False)

    assert cli_main(["data-check", str(tmp_path / "bad")]) == 0  # a report, not a verdict
    out = capsys.readouterr().out
    for path in expected:
        assert Path(path).name in out
    assert cli_main(["data-check", str(tmp_path / "bad"), "--fail-on-error"]) == 1
    assert cli_main(["data-check", str(tmp_path / "clean"), "--fail-on-error"]) == 0
    capsys.readouterr()
    assert cli_main(["data-check", str(tmp_path / "nowhere")]) == 2
    assert "nowhere" in capsys.readouterr().err

    assert cli_main(["data-check", str(tmp_path / "bad"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert {str(Path(p).resolve()) for p in report["bad_files"]} == set(expected)
    assert report["summary"] == {"not_image": 1, "truncated": 1, "zero_byte": 1}


def test_data_check_reports_odd_but_usable_files_and_structure(tmp_path, capsys):
    root = tmp_path / "odd"
    make_image_folder(root, bad_files=False)
    Image.new("RGB", (48, 48), (200, 10, 10)).save(root / "train/apple/really_a_png.jpg", format="PNG")
    Image.new("L", (48, 48), 128).save(root / "train/bread/grey.jpg")
    Image.new("RGB", (8, 8), (1, 2, 3)).save(root / "train/bread/tiny.jpg")
    shutil.copy(root / "train/apple/3.jpg", root / "test/apple/leaked.jpg")
    (root / "train/cake").mkdir()  # empty class folder in train, missing from test
    assert cli_main(["data-check", str(root), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)["summary"]
    for kind in ("wrong_extension", "unusual_mode", "tiny", "duplicate_across_splits", "empty_class", "missing_class"):
        assert summary.get(kind, 0) >= 1, (kind, summary)


# ----- invalid configs: one clear message naming the field, the value and the choices ------------

CONFIG_ERRORS = [
    (dict(loss="arcfase"), ["loss='arcfase'", "arcface", "center", "island", "lgm", "softmax"]),
    (dict(backbone="resnet99"), ["backbone='resnet99'", "resnet18", "resnet50", "smallcnn", "timm/<name>"]),
    (dict(optimizer="adam"), ["optimizer='adam'", "adagrad", "adamw", "sgd"]),
    (dict(loss="center", lam=-0.1), ["lam=-0.1", "[0.0, inf)"]),
    (dict(loss="center", alpha=1.5), ["alpha=1.5", "(0.0, 1.0]"]),
    (dict(loss="island", alpha=0.0), ["alpha=0.0", "(0.0, 1.0]"]),
    (dict(embedding_dim=1), ["embedding_dim=1", ">= 2"]),
    (dict(loss="center", lam=float("nan")), ["lam=nan"]),
    (dict(lam=0.1), ["lam=0.1", "'softmax' takes label_smoothing"]),  # an option softmax does not take
]


@pytest.mark.parametrize("overrides, words", CONFIG_ERRORS)
def test_config_errors_name_field_value_and_choices(overrides, words):
    with pytest.raises(ConfigError) as error:
        Config.from_flat(**overrides)
    for word in words:
        assert word in str(error.value)


@pytest.mark.parametrize("overrides, words", CONFIG_ERRORS)
def test_cli_train_config_errors_exit_2_with_one_line(tmp_path, capsys, overrides, words):
    flags = [f"--{name.replace('_', '-')}={value}" for name, value in overrides.items()]
    code = cli_main(["train", *flags, "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("foodlib train: error: ") and err.count("\n") == 1
    for word in words:
        assert word in err
    assert not (tmp_path / "run").exists()  # nothing is written for an invalid config


def test_valid_timm_name_passes_validation_without_timm():
    # timm/<name> is checked when the model is built (timm may not be installed where configs are written)
    assert Config.from_flat(backbone="timm/convnext_tiny").model.backbone == "timm/convnext_tiny"
    with pytest.raises(ConfigError, match="backbone='timm/'"):
        Config.from_flat(backbone="timm/")


def test_missing_data_folder_names_the_value_and_the_choices(tmp_path, capsys):
    missing = tmp_path / "no-such-photos"
    with pytest.raises(FileNotFoundError) as error:
        fit(folder_config(tmp_path, missing))
    for word in (f"data={str(missing)!r}", "dishes", "digits", "food101:ROOT"):
        assert word in str(error.value)
    assert cli_main(["train", "--data", str(missing), "--out", str(tmp_path / "run2")]) == 2
    assert "no-such-photos" in capsys.readouterr().err


def test_factories_list_the_valid_names():
    with pytest.raises(ValueError) as error:
        create_loss("arcfase", embedding_dim=2, num_classes=3)
    assert "'arcfase'" in str(error.value) and "arcface, center, contrastive_center" in str(error.value)
    with pytest.raises(ValueError) as error:
        create_model("resnet99")
    assert "'resnet99'" in str(error.value) and "smallcnn" in str(error.value)


def test_resume_on_data_with_other_classes_names_the_classes(tmp_path, capsys):
    data = tmp_path / "data"
    make_image_folder(data, bad_files=False)
    fit(folder_config(tmp_path, data))
    for split in ("train", "test"):
        (data / split / "bread").rename(data / split / "cake")
    with pytest.raises(train_module.CheckpointError) as error:
        fit(folder_config(tmp_path, data, epochs=2, resume=True))
    message = str(error.value)
    assert str(tmp_path / "run" / "last.pt") in message
    assert "only in the checkpoint ['bread']" in message and "only in the data ['cake']" in message

    code = cli_main(["train", "--config", str(tmp_path / "run" / "config.yaml"), "--epochs", "2", "--resume"])
    assert code == 2 and "only in the data ['cake']" in capsys.readouterr().err


@pytest.mark.parametrize("error", [
    BadFilesError("2 unreadable image file(s): a.jpg, b.jpg"),
    CheckpointError("checkpoint runs/x/last.pt is corrupt or truncated"),
    ValueError("CenterLoss: lam must be a number in [0.0, inf), got lam=-1"),
    NonFiniteLossError("loss is nan at epoch 2, step 3 of 6 (non-finite term(s): ce)"),
    FileExistsError("runs/x already holds a run (last.pt)"),
], ids=lambda e: type(e).__name__)
def test_cli_turns_input_errors_into_one_line_and_exit_code_2(tmp_path, monkeypatch, capsys, error):
    def failing_fit(cfg, data=None):
        raise error

    monkeypatch.setattr(train_module, "fit", failing_fit)
    assert cli_main(["train", "--out", str(tmp_path / "run")]) == 2
    assert capsys.readouterr().err == f"foodlib train: error: {error}\n"


def test_cli_lets_programming_errors_raise_with_their_traceback(tmp_path, monkeypatch):
    def failing_fit(cfg, data=None):
        raise KeyError("a bug, not a bad input")

    monkeypatch.setattr(train_module, "fit", failing_fit)
    with pytest.raises(KeyError):
        cli_main(["train", "--out", str(tmp_path / "run")])


# ----- NaN / infinite loss ----------------------------------------------------------------------

def make_loss_non_finite_at(monkeypatch, step: int, term: str, value: float = math.nan) -> None:
    """The ``step``-th training forward (1-based, over all epochs) returns ``value`` in ``term`` and the total."""
    def poison(out, embedding, labels):
        bad = out.terms[term] * value
        return LossOutput(out.loss + bad, out.logits, {**out.terms, term: bad})

    rewrite_training_forward(monkeypatch, step, poison)


def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    from foodlib.data import load_data

    cfg = tiny_config(tmp_path, loss="center", epochs=3, features=False)
    steps_per_epoch = len(load_data(cfg, progress=False).loader("train", cfg.train.batch_size, shuffle=True))
    make_loss_non_finite_at(monkeypatch, steps_per_epoch + 2, term="center")  # epoch 2, step 2
    with pytest.raises(NonFiniteLossError) as error:
        fit(cfg)
    message = str(error.value)
    run = tmp_path / "run"
    assert f"epoch 2, step 2 of {steps_per_epoch}" in message
    assert "non-finite term(s): center)" in message and "loss is nan" in message
    assert f"{run / 'last.pt'} holds the last good epoch (1)" in message

    last = load_checkpoint(run / "last.pt")
    assert last["epoch"] == 1 and load_checkpoint(run / "best.pt")["epoch"] == 1
    assert all(torch.isfinite(t).all() for t in last["model"].values() if t.is_floating_point())
    assert all(torch.isfinite(t).all() for t in last["loss"].values())
    assert not (run / "metrics.json").exists()
    model, loss, _, _ = load_run(run, "last.pt")  # the kept checkpoint is usable
    assert torch.isfinite(loss.predict(model(torch.zeros(2, 3, 32, 32)))).all()


def test_infinite_loss_in_the_first_epoch_says_there_is_no_checkpoint(tmp_path, monkeypatch):
    make_loss_non_finite_at(monkeypatch, 1, term="ce", value=math.inf)
    with pytest.raises(NonFiniteLossError) as error:
        fit(tiny_config(tmp_path, epochs=1, features=False))
    message = str(error.value)
    assert "loss is inf at epoch 1, step 1" in message and "(non-finite term(s): ce)" in message
    assert "no epoch finished, so there is no checkpoint" in message
    assert not (tmp_path / "run" / "last.pt").exists()


def test_nan_gradient_on_an_epochs_last_step_never_becomes_last_pt(tmp_path, monkeypatch):
    """The loss stays finite but its gradient is NaN: the weights break after the step, not the loss."""
    from foodlib.data import load_data

    cfg = tiny_config(tmp_path, epochs=3, features=False)
    steps_per_epoch = len(load_data(cfg, progress=False).loader("train", cfg.train.batch_size, shuffle=True))
    def nan_gradient(out, embedding, labels):  # at the last step of epoch 2
        # sqrt(u) at u = 0: the value is 0, the gradient 0 * inf = NaN
        zero_with_nan_gradient = torch.sqrt(((embedding - embedding.detach()) ** 2).sum())
        return LossOutput(out.loss + zero_with_nan_gradient, out.logits, out.terms)

    rewrite_training_forward(monkeypatch, 2 * steps_per_epoch, nan_gradient)
    with pytest.raises(NonFiniteLossError) as error:
        fit(cfg)
    message = str(error.value)
    assert f"after epoch 2 (step {steps_per_epoch} of {steps_per_epoch})" in message
    assert "weights are NaN or infinite: " in message and "holds the last good epoch (1)" in message
    last = load_checkpoint(tmp_path / "run" / "last.pt")
    assert last["epoch"] == 1
    assert all(torch.isfinite(t).all() for t in last["model"].values() if t.is_floating_point())


def test_a_diverging_lr_is_caught_as_a_non_finite_loss(tmp_path):
    with pytest.raises(NonFiniteLossError, match=r"loss is (nan|inf) at epoch 1, step \d+"):
        fit(tiny_config(tmp_path, optimizer="sgd", lr=1e12, momentum=0.0, schedule="constant", epochs=1,
                        features=False))


# ----- untrusted run folders: loading never runs code from them ------------------------------------

class _WritesAMarker:
    """Unpickling this calls ``os.system("touch MARKER")``: what a hostile checkpoint would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch '{self.marker}'",)


def plant_payload(run: Path, marker: Path) -> None:
    """Add the payload object to best.pt and last.pt, keeping every real key (a checkpoint that works)."""
    for name in ("best.pt", "last.pt"):
        ckpt = torch.load(run / name, weights_only=True)
        ckpt["note"] = _WritesAMarker(marker)
        torch.save(ckpt, run / name)


def test_checkpoint_with_code_in_it_never_runs_it(finished_run, tmp_path, capsys):
    run = copy_run(finished_run, tmp_path)
    marker = tmp_path / "payload-ran"
    plant_payload(run, marker)
    image = tmp_path / "query.jpg"
    Image.fromarray(np.full((40, 40, 3), 128, np.uint8)).save(image)

    for load in (lambda: load_run(run), lambda: load_checkpoint(run / "last.pt"),
                 lambda: fit(tiny_config(tmp_path, epochs=2, resume=True, features=False))):
        with pytest.raises(CheckpointError, match="refuses to load it") as error:
            load()
        assert "posix.system" in str(error.value) or "os.system" in str(error.value)
        assert "\n" not in str(error.value)
    for argv in (["predict", str(run), str(image)], ["embed", str(run), str(image), "--out", str(tmp_path / "e.npz")],
                 ["export", str(run), "--out", str(tmp_path / "m.pt")],
                 ["train", "--config", str(run / "config.yaml"), "--out", str(run), "--epochs", "2", "--resume"]):
        code = cli_main(argv)
        err = capsys.readouterr().err
        assert code == 2, argv
        assert len(err.strip().splitlines()) == 1 and "refuses to load it" in err, (argv, err)
    assert not marker.exists(), "the checkpoint's payload ran"


def test_every_checkpoint_foodlib_writes_loads_as_weights_only(finished_run):
    """best.pt and last.pt hold only tensors and plain values (the resume test covers every optimizer)."""
    for name in ("best.pt", "last.pt"):
        ckpt = torch.load(finished_run / name, weights_only=True)
        assert {"model", "loss", "config", "classes"} <= set(ckpt)


# ----- a finished run is never overwritten without --overwrite ------------------------------------

def fingerprint(run: Path) -> dict[str, bytes]:
    return {name: (run / name).read_bytes() for name in ("best.pt", "metrics.json", "trace.csv")}


def test_finished_run_without_last_pt_is_not_overwritten(finished_run, tmp_path, capsys):
    run = copy_run(finished_run, tmp_path)
    (run / "last.pt").unlink()  # to save disk, or as the corrupt-checkpoint message suggests
    before = fingerprint(run)
    with pytest.raises(FileExistsError, match="--overwrite") as error:
        fit(tiny_config(tmp_path, epochs=1, features=False))
    assert "best.pt" in str(error.value) and "metrics.json" in str(error.value)
    code = cli_main(["train", "--config", str(run / "config.yaml"), "--out", str(run)])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "--overwrite" in err
    assert fingerprint(run) == before


def test_resume_without_last_pt_does_not_silently_start_over(finished_run, tmp_path):
    run = copy_run(finished_run, tmp_path)
    (run / "last.pt").unlink()
    before = fingerprint(run)
    with pytest.raises(ConfigError, match="lr=0.1"):  # a different config: named, whatever is in the folder
        fit(tiny_config(tmp_path, epochs=1, features=False, resume=True, lr=0.1))
    with pytest.raises(FileExistsError, match="no last.pt"):  # same config, but results there: not resumable
        fit(tiny_config(tmp_path, epochs=1, features=False, resume=True))
    assert fingerprint(run) == before


def test_resume_of_a_run_killed_before_its_first_epoch_checks_the_config(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    tiny_config(tmp_path, epochs=1).to_yaml(run / "config.yaml")  # what fit() writes before epoch 1
    with pytest.raises(ConfigError, match="lr=0.1"):
        fit(tiny_config(tmp_path, epochs=1, features=False, resume=True, lr=0.1))
    fit(tiny_config(tmp_path, epochs=1, features=False, resume=True))
    assert "starting from epoch 1" in capsys.readouterr().out
    assert (run / "metrics.json").is_file()


def test_overwrite_flag_replaces_a_finished_run_and_is_not_recorded(finished_run, tmp_path):
    run = copy_run(finished_run, tmp_path)
    (run / "figures").mkdir(exist_ok=True)
    (run / "figures" / "old.png").write_bytes(b"old figure")
    fit(tiny_config(tmp_path, epochs=1, features=False, seed=3, overwrite=True))
    assert not (run / "figures" / "old.png").exists()
    assert Config.from_yaml(run / "config.yaml").train.seed == 3
    assert Config.from_yaml(run / "config.yaml").train.overwrite is False  # a rerun from config.yaml asks again


# ----- a suite never deletes a run folder ------------------------------------------------------------

def test_suite_moves_an_outdated_run_aside_instead_of_deleting_it(tmp_path, monkeypatch):
    import foodlib.suite as S
    from foodlib.report import collect_runs
    from test_suite import TINY_BASE, FakePapermill, suite_text

    monkeypatch.setattr(S, "execute_notebook", FakePapermill())
    S.run_suite(S.load_suite(suite_text(), tmp_path), log=lambda line: None)
    (tmp_path / "tiny" / "softmax-s0" / "best.pt").write_bytes(b"the finished run's weights")
    lines = []
    S.run_suite(S.load_suite(suite_text(base={**TINY_BASE, "epochs": 2}), tmp_path), log=lines.append)
    retired = sorted((tmp_path / "tiny").glob("softmax-s0.old-*"))
    assert len(retired) == 1 and (retired[0] / "best.pt").read_bytes() == b"the finished run's weights"
    assert any(str(retired[0]) in line and "moved" in line for line in lines), lines
    assert not (retired[0] / LOCK_NAME).exists()
    assert sorted(row["run"] for row in collect_runs(tmp_path / "tiny")) == ["center-s0", "softmax-s0"]


@pytest.mark.parametrize("field, value", [("figures", True), ("quiet", False), ("workers", 2), ("threads", 1),
                                          ("device", "cpu"), ("overwrite", True), ("cache_dir", "/elsewhere")])
def test_suite_fields_that_change_no_result_do_not_make_a_run_outdated(tmp_path, field, value):
    import foodlib.suite as S
    from test_suite import suite_text

    run = S.plan_suite(S.load_suite(suite_text(), tmp_path))[0]
    run.run_dir.mkdir(parents=True)
    run.config.to_yaml(run.run_dir / "config.yaml")
    (run.run_dir / "metrics.json").write_text("{}")
    assert S.run_state(run) == "complete"
    run.config = run.config.with_overrides(**{field: value})
    assert S.run_state(run) == "complete"


# ----- a damaged decoded cache is found, reported and rebuilt --------------------------------------

def small_photos(folder: Path, n: int = 6) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        Image.fromarray(np.full((20, 24, 3), 40 * i, np.uint8)).save(folder / f"{i}.png")
        paths.append(str(folder / f"{i}.png"))
    return paths


def damage_keeping_size_and_mtime(path: Path) -> None:
    st = path.stat()
    path.write_bytes(np.random.default_rng(1).integers(0, 256, st.st_size, dtype=np.uint8).tobytes())
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_same_size_corruption_of_the_decoded_cache_is_detected_and_rebuilt(tmp_path, monkeypatch, capsys):
    import foodlib.data.cache as cache_module
    from foodlib.data.cache import build_cache

    paths = small_photos(tmp_path / "photos")
    first = build_cache(paths, side=16, cache_dir=tmp_path / "cache", progress=False)
    expected = np.array(first.array)
    damage_keeping_size_and_mtime(Path(first.file))
    monkeypatch.setattr(cache_module, "_VERIFIED", set())  # a new process: first use since the damage

    assert cli_main(["cache", "--cache-dir", str(tmp_path / "cache")]) == 0
    listing = capsys.readouterr().out
    assert "corrupt" in listing and "current" not in listing.split("state", 1)[1]

    with pytest.warns(UserWarning, match=r"is corrupt: block 1 of 1 .*rebuilding it") as warned:
        again = build_cache(paths, side=16, cache_dir=tmp_path / "cache", progress=False)
    assert first.file in str(warned[0].message)
    assert np.array_equal(np.asarray(again.array), expected)
    assert cli_main(["cache", "--cache-dir", str(tmp_path / "cache")]) == 0
    assert "current" in capsys.readouterr().out


def test_corrupt_cache_metadata_is_named_and_rebuilt(tmp_path, capsys):
    from foodlib.data.cache import build_cache

    paths = small_photos(tmp_path / "photos")
    first = build_cache(paths, side=16, cache_dir=tmp_path / "cache", progress=False)
    meta = Path(first.file).with_suffix(".json")
    meta.write_text('{"side": 16, "n": ')  # cut short
    assert cli_main(["cache", "--cache-dir", str(tmp_path / "cache")]) == 0
    assert "corrupt" in capsys.readouterr().out
    with pytest.warns(UserWarning, match=f"{meta}.*rebuilding it"):
        build_cache(paths, side=16, cache_dir=tmp_path / "cache", progress=False)
    assert json.loads(meta.read_text())["n"] == len(paths)


def test_cache_checksums_are_verified_once_per_process(tmp_path, monkeypatch):
    import foodlib.data.cache as cache_module
    from foodlib.data.cache import build_cache

    paths = small_photos(tmp_path / "photos")
    build_cache(paths, side=16, cache_dir=tmp_path / "cache", progress=False)
    calls = []
    real = cache_module.first_bad_block
    monkeypatch.setattr(cache_module, "first_bad_block", lambda *a: calls.append(a) or real(*a))
    monkeypatch.setattr(cache_module, "_VERIFIED", set())
    for _ in range(3):
        build_cache(paths, side=16, cache_dir=tmp_path / "cache", progress=False)
    assert len(calls) == 1


# ----- small data ------------------------------------------------------------------------------------

def test_val_with_one_image_per_class_finishes_the_run_with_metrics(tmp_path):
    data = tmp_path / "data"
    make_image_folder(data, bad_files=False)  # 12 train images per class: val_fraction 0.1 leaves one each
    result = fit(folder_config(tmp_path, data, features=True, val_fraction=0.1))
    metrics = json.loads((result.run_dir / "metrics.json").read_text())
    assert metrics["val"]["n"] == len(CLASSES)
    assert metrics["val"]["silhouette"] is None  # undefined with one sample per class, and said so
    assert isinstance(metrics["test"]["silhouette"], float)


# ----- folder layouts: sub-folders and symlink loops ------------------------------------------------

def test_images_in_class_sub_folders_are_trained_on_as_data_check_counts_them(tmp_path, capsys):
    from foodlib.data import load_data
    from foodlib.data.scan import scan_dataset

    data = tmp_path / "data"
    make_image_folder(data, bad_files=False)
    for name in CLASSES:  # ImageFolder's meaning: any depth below the class folder
        nested = data / "train" / name / "batch2" / "more"
        nested.mkdir(parents=True)
        for i in range(3):
            shutil.copy(data / "train" / name / f"{i}.jpg", nested / f"n{i}.jpg")
    report = scan_dataset(data, progress=False, hash_duplicates=False)
    loaded = load_data(folder_config(tmp_path, data, val_fraction=0.0), progress=False)
    assert sum(report.counts["train"].values()) == 2 * (TRAIN_PER_CLASS + 3)
    assert len(loaded.index.splits["train"]) == 2 * (TRAIN_PER_CLASS + 3)


def test_symlink_loop_is_walked_once_and_reported(tmp_path, capsys):
    from foodlib.data import load_data
    from foodlib.data.scan import scan_dataset

    data = tmp_path / "data"
    make_image_folder(data, bad_files=False)
    (data / "train" / "apple" / "loop").symlink_to("..")  # ln -s .. "train/apple/loop"
    report = scan_dataset(data, progress=False)
    assert report.files_scanned == 2 * (TRAIN_PER_CLASS + TEST_PER_CLASS)
    loops = report.by_kind("symlink_loop")
    assert [p.path for p in loops] == ["train/apple/loop"] and "not followed" in loops[0].detail
    assert not report.by_kind("duplicate")
    with pytest.warns(UserWarning, match="loop.*not followed"):
        loaded = load_data(folder_config(tmp_path, data, val_fraction=0.0), progress=False)
    assert len(loaded.index.splits["train"]) == 2 * TRAIN_PER_CLASS


def test_empty_train_class_stops_training_with_the_class_named(tmp_path, capsys):
    from foodlib.data import EmptyClassError

    data = tmp_path / "data"
    make_image_folder(data, bad_files=False)
    (data / "train" / "cake").mkdir()
    (data / "test" / "cake").mkdir()
    with pytest.raises(EmptyClassError, match=r"\['cake'\].*no usable training image"):
        fit(folder_config(tmp_path, data))
    code = cli_main(["train", "--data", str(data), "--backbone", "smallcnn", "--image-size", "32", "--epochs", "1",
                     "--out", str(tmp_path / "cli-run"), "--cache-dir", str(tmp_path / "cache"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "cake" in err


def test_file_deleted_mid_run_without_cache_is_skipped_and_listed(tmp_path):
    data = tmp_path / "data"
    make_image_folder(data, bad_files=False)
    victim = (data / "train" / "bread" / "5.jpg").resolve()
    real_transform = train_module.train_transform
    calls = {"n": 0}

    def delete_after_first_batch(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 1:
            victim.unlink()  # someone cleans the dataset folder while the run is on
        return real_transform(*args, **kwargs)

    train_module.train_transform = delete_after_first_batch
    try:
        with pytest.warns(UserWarning, match="5.jpg.*skipped"):
            result = fit(folder_config(tmp_path, data, cache=False, epochs=2, val_fraction=0.0))
    finally:
        train_module.train_transform = real_transform
    assert (result.run_dir / "metrics.json").is_file()
    listed = read_bad_files(result.run_dir)
    assert str(victim) in listed and "during training" in listed[str(victim)]


# ----- one line naming the file, the value and the fix, for each bad input ---------------------------

@pytest.mark.parametrize("name, text, words", [
    ("list.yaml", "- lr\n- 0.1\n", "not a mapping"),
    ("notes.txt", "shopping list: flour\nand yeast\n", "not valid YAML"),
    ("plain.txt", "just some words", "not a mapping"),
    ("tag.yaml", "lr: !!python/object:os.system x\n", "not valid YAML"),
    ("scan.yaml", "lr: [0.1\n", "not valid YAML at line 2"),
])
def test_config_file_that_is_not_a_yaml_mapping_is_named(tmp_path, capsys, name, text, words):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ConfigError, match=words) as error:
        Config.from_yaml(path)
    assert str(path) in str(error.value) and "\n" not in str(error.value)
    code = cli_main(["train", "--config", str(path), "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and str(path) in err


@pytest.mark.parametrize("argv, words", [
    (["--device", "tpu"], "device='tpu'"),
    (["--lr", "inf"], "lr=inf must be a finite number"),
    (["--lam", "inf", "--loss", "center"], "lam=inf must be a finite number"),
    (["--pretrained", "/etc/passwd"], "pretrained='/etc/passwd' is not a weights file"),
])
def test_bad_values_get_one_line_naming_the_value(tmp_path, capsys, argv, words):
    code = cli_main(["train", "--data", "dishes", "--dishes-classes", "2", "--dishes-per-class", "4",
                     "--backbone", "smallcnn", "--image-size", "32", "--epochs", "1", "--batch-size", "4",
                     "--quiet", "--no-features", "--out", str(tmp_path / "run"), *argv])
    err = capsys.readouterr().err
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and words in err, err


def test_read_only_out_folder_is_named(tmp_path, monkeypatch):
    import tempfile

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")  # what a read-only folder gives a non-root user

    monkeypatch.setattr(tempfile, "TemporaryFile", refuse)
    with pytest.raises(ConfigError, match=r"out='.*run'.*cannot write into .*Permission denied.*writable"):
        fit(tiny_config(tmp_path, epochs=1))


def test_suite_named_dot_dot_cannot_write_above_its_runs_folder(tmp_path):
    from foodlib.suite import SuiteError, load_suite

    with pytest.raises(SuiteError, match="'..'.*only dots"):
        load_suite("name: ..\nbase: {epochs: 1}\nlosses: [softmax]\n", tmp_path / "runs")


def test_data_check_counts_a_decompression_bomb_as_unusable(tmp_path, monkeypatch):
    from foodlib.data.scan import scan_dataset

    data = tmp_path / "data"
    make_image_folder(data, bad_files=False)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 48x48 = 2304 px > 2 x 1000: a "bomb"
    report = scan_dataset(data, progress=False, hash_duplicates=False)
    assert report.by_kind("huge") and len(report.bad_files) == len(report.by_kind("huge"))
    assert f"{len(report.bad_files)} files cannot be used" in report.to_text()


# ----- a full disk: one line naming the disk and the space needed ------------------------------------

def test_full_disk_during_cache_build_is_named_instead_of_a_sigbus(tmp_path, monkeypatch):
    import errno
    from collections import namedtuple

    import foodlib.files as io_module
    from foodlib.data.cache import build_cache
    from foodlib.files import NoSpaceError

    paths = small_photos(tmp_path / "photos")

    def no_blocks(fd, offset, length):  # the disk fills between the free-space check and the write
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", no_blocks)
    with pytest.raises(NoSpaceError, match=r"no space left on /.* for the decoded image cache.*need 1 MB in") as error:
        build_cache(paths, side=16, cache_dir=tmp_path / "cache", progress=False)
    assert "\n" not in str(error.value) and "cache_dir" in str(error.value)
    assert not list((tmp_path / "cache" / "decoded").glob("*.u8*"))  # nothing half-built left behind

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(io_module.shutil, "disk_usage", lambda path: usage(10**9, 10**9, 1000))
    with pytest.raises(NoSpaceError, match="1 MB in .*0 MB free"):
        build_cache(paths, side=16, cache_dir=tmp_path / "cache", progress=False)


def test_full_disk_during_checkpoint_save_keeps_the_old_one_and_names_the_disk(tmp_path, monkeypatch):
    from collections import namedtuple

    import foodlib.files as io_module
    from foodlib.files import NoSpaceError

    path = tmp_path / "last.pt"
    atomic_torch_save(path, {"w": torch.ones(4)})
    before = path.read_bytes()
    usage = namedtuple("usage", "total used free")
    free = iter([10**9, 0])  # room at the check, none by the time torch writes
    monkeypatch.setattr(io_module.shutil, "disk_usage", lambda p: usage(10**9, 10**9, next(free)))

    def zip_writer_fails(obj, f):
        raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 64 vs 0")

    monkeypatch.setattr(torch, "save", zip_writer_fails)
    with pytest.raises(NoSpaceError, match=r"no space left on /.* for the checkpoint last.pt \(the previous one is kept\)"):
        atomic_torch_save(path, {"w": torch.ones(2**20)})
    assert path.read_bytes() == before


def test_full_disk_through_the_cli_is_one_line_with_exit_code_2(tmp_path, monkeypatch, capsys):
    from collections import namedtuple

    import foodlib.files as io_module

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(io_module.shutil, "disk_usage", lambda path: usage(10**9, 10**9, 1000))
    code = cli_main(["train", "--data", "dishes", "--dishes-classes", "2", "--dishes-per-class", "4", "--image-size", "32",
                     "--backbone", "smallcnn", "--epochs", "1", "--quiet", "--cache-dir", str(tmp_path / "cache"),
                     "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "no space left on" in err, err
