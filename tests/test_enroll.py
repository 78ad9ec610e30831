"""Enrolling new dishes into a trained run, and the open-set section a run with held-out classes writes.

One small center-loss run on the embedded digits, trained on 6 digits with 4 held out
(``novel_classes=4``), serves every test here (each test works on its own copy of the folder).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from conftest import tiny_config
from foodlib.config import Config
from foodlib.features import load_features
from foodlib.inference import nearest_neighbours, predict, read_split_file

pytestmark = pytest.mark.slow  # one training run (~15 CPU-seconds) for the module


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from foodlib.train import fit

    tmp = tmp_path_factory.mktemp("enroll")
    return fit(tiny_config(tmp, data="digits", limit_per_class=30, image_size=16, epochs=3, lr=3e-3, batch_size=32,
                           loss="center", novel_classes=4))


@pytest.fixture
def run(trained, tmp_path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(trained.run_dir, copy)
    return copy


def _shots(run: Path, folder: Path, shots: int = 5, seed: int = 0) -> list[tuple[str, str]]:
    """Copy ``shots`` photos of each held-out digit into folder/<digit>/; return the other (path, digit)."""
    paths, names = read_split_file(run, "novel")
    rng = np.random.default_rng(seed)
    rest = []
    for name in sorted(set(names)):
        mine = [p for p, n in zip(paths, names) if n == name]
        chosen = set(rng.choice(len(mine), shots, replace=False).tolist())
        (folder / name).mkdir(parents=True)
        for i, path in enumerate(mine):
            if i in chosen:
                shutil.copy(path, folder / name / Path(path).name)
            else:
                rest.append((path, name))
    return rest


def test_run_with_held_out_classes_writes_the_open_set_section(trained):
    metrics = json.loads((trained.run_dir / "metrics.json").read_text())
    novel = metrics["novel"]
    assert novel["classes"] == 4 and len(novel["held_out"]) == 4 and novel["metric"] == "euclidean"
    assert set(novel["held_out"]).isdisjoint(json.loads((trained.run_dir / "classes.json").read_text()))
    for key in ("precision_at_1", "r_precision", "map_at_r", "recall_at_1", "recall_at_8", "shot1_mean", "shot5_mean",
                "shot5_std", "roc_auc", "tar_at_far_0.01", "tar_at_far_0.001"):
        assert 0.0 <= novel[key] <= 1.0, key
    assert novel["episodes"] >= 100 and novel["recall_at_1"] <= novel["recall_at_8"]
    assert {"precision_at_1", "map_at_r", "recall_at_4"} <= set(metrics["test"])  # known classes' test split
    features = load_features(trained.run_dir / "novel_features.npz")
    paths, names = read_split_file(trained.run_dir, "novel")
    assert [features["classes"][y] for y in features["novel"]["labels"]] == names


def test_enrolled_dishes_are_recognised_far_above_chance(run, tmp_path):
    from foodlib.enrolled import enrolled_dishes
    from foodlib.inference import enroll

    rest = _shots(run, tmp_path / "new")
    done = enroll(run, tmp_path / "new", device="cpu")
    assert sorted(done.names) == sorted({n for _, n in rest}) and done.counts == [5, 5, 5, 5]
    preds = predict(run, [p for p, _ in rest], device="cpu", progress=False)
    assert len(preds.classes) == 10 and preds.classes[-4:] == done.names  # 6 trained + 4 enrolled, ranked together
    truth = dict(rest)
    accuracy = np.mean([name == truth[p] for p, name in zip(preds.paths, preds.predicted)])
    assert accuracy > 0.25, accuracy  # chance: 1 in 10
    dishes = enrolled_dishes(run)
    assert dishes.means.shape == (4, dishes.embeddings.shape[1]) and len(dishes.paths) == 20
    found = nearest_neighbours(run, dishes.embeddings[:1], k=1, device="cpu")
    assert found.neighbour_classes(0) == [dishes.names[0]]  # an enrolled photo is its own nearest neighbour


def test_enroll_bad_inputs(run, tmp_path):
    from foodlib.enrolled import check_enrollable, enrolled_dishes, remove_enrolled
    from foodlib.inference import enroll
    from foodlib.data.images import load_image_array  # noqa: F401  (the decoder that must reject the fake)

    trained_name = json.loads((run / "classes.json").read_text())[0]
    clash = tmp_path / "clash" / trained_name
    clash.mkdir(parents=True)
    with pytest.raises(ValueError, match="already exist"):
        enroll(run, tmp_path / "clash", device="cpu")
    (tmp_path / "nothing").mkdir()
    with pytest.raises(ValueError, match="no dish folders"):
        enroll(run, tmp_path / "nothing", device="cpu")

    new = tmp_path / "new"
    _shots(run, new, shots=3)
    (new / "empty_dish").mkdir()
    first = sorted(p.name for p in new.iterdir() if p.name != "empty_dish")[0]
    (new / first / "broken.jpg").write_bytes(b"not a jpeg")
    done = enroll(run, new, device="cpu")
    assert done.empty == ["empty_dish"] and "empty_dish" not in done.names
    assert [Path(p).name for p in done.skipped] == ["broken.jpg"] and done.counts[0] == 3
    with pytest.raises(ValueError, match="already exist"):  # enrolled twice
        enroll(run, new, device="cpu")

    remove_enrolled(run, done.names[0])
    left = enrolled_dishes(run)
    assert left.names == done.names[1:] and len(left.paths) == 9 and set(left.path_labels.tolist()) == {0, 1, 2}
    with pytest.raises(ValueError, match="not enrolled"):
        remove_enrolled(run, done.names[0])
    softmax_run = SimpleNamespace(cfg=Config.from_flat(loss="softmax"), run_dir=run)
    with pytest.raises(ValueError, match="softmax"):
        check_enrollable(softmax_run)


def test_enroll_command_lists_and_removes(run, tmp_path, capsys):
    from foodlib.cli import main

    _shots(run, tmp_path / "new", shots=2)
    assert main(["enroll", str(run), str(tmp_path / "new"), "--device", "cpu", "--quiet"]) == 0
    assert main(["enroll", str(run), "--list"]) == 0
    listed = capsys.readouterr().out
    assert listed.count("\t2 photos") == 4
    name = listed.strip().splitlines()[-1].split("\t")[0]
    assert main(["enroll", str(run), "--remove", name]) == 0
    assert main(["enroll", str(run), "--remove", name]) == 2  # a one-line error, not a traceback
    assert "not enrolled" in capsys.readouterr().err


def test_export_carries_the_enrolled_dishes(run, tmp_path):
    import torch

    from foodlib.enrolled import class_scores
    from foodlib.inference import enroll
    from foodlib.inference import InferenceRun, export_model, load_exported

    _shots(run, tmp_path / "new", shots=3)
    enroll(run, tmp_path / "new", device="cpu")
    module, meta = load_exported(export_model(run, out=tmp_path / "model.pt2"))
    enrolled = meta["enrolled"]
    assert len(enrolled["classes"]) == 10 and enrolled["classes"][-4:] == enrolled["enrolled"]
    loaded = InferenceRun.load(run, device="cpu")
    x = torch.zeros(2, 3, loaded.image_size, loaded.image_size)
    with torch.no_grad():
        embedding, _ = module(x)
    means = np.asarray(enrolled["means"])
    scores = -0.5 * ((embedding.numpy()[:, None, :] - means[None]) ** 2).sum(-1)  # the documented score, var = 1
    names, expected = class_scores(loaded, embedding.numpy())
    assert names == enrolled["classes"]
    np.testing.assert_allclose(scores, expected, rtol=1e-3, atol=1e-3)
