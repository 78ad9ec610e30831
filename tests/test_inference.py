"""Tests for foodlib.inference: predict / embed agree with the run's own evaluation, unreadable files
are listed, nearest neighbours are exact and ordered, the TorchScript export runs without foodlib.

One tiny run (embedded dishes, 4 classes, smallcnn at 32 px, 2 epochs, center loss) is trained once
for the module. Its last.pt is then replaced by a deterministically perturbed copy of its weights, so
that best.pt and last.pt differ on every CPU and using the wrong one shows (whether the 2-epoch run
itself gets worse in its last epoch depends on the CPU's floating-point path: bf16 or float32). Expected values come from the run's own files (features.npz, metrics.json, splits/) or are
recomputed here with numpy loops, never from the code under test.
"""
from __future__ import annotations

import csv
import doctest
import io
import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import foodlib
import foodlib.inference as inference
from conftest import tiny_config
from foodlib.errors import UserError
from foodlib.cli import main as cli_main
from foodlib.data.augment import eval_transform
from foodlib.data.images import load_image_array
from foodlib.features import load_features
from foodlib.inference import (InferenceModule, InferenceRun, collect_image_paths, confused_pairs, embed,
                               export_model, nearest_neighbours, predict, read_split_file,
                               trace_module)
from foodlib.losses import create_loss, list_losses
from foodlib.models import create_model


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("inference")
    # float32 (amp="off"): the exported model runs in float32, and its logits are compared with
    # the run's features.npz; on AMX CPUs amp="auto" would train and extract in bf16
    result = foodlib.fit(tiny_config(root, loss="center", device="cpu", amp="off"))
    run_dir = Path(result.run_dir)
    perturb_last_checkpoint(run_dir)
    return run_dir


def perturb_last_checkpoint(run_dir: Path) -> None:
    """Overwrite ``last.pt`` with its own weights plus fixed-seed noise, so that last.pt differs from
    best.pt by construction (features.npz and metrics.json still come from best.pt)."""
    last = torch.load(run_dir / "last.pt", map_location="cpu", weights_only=True)
    generator = torch.Generator().manual_seed(0)
    for name, tensor in last["model"].items():
        if tensor.is_floating_point() and "running_" not in name:  # BatchNorm statistics stay valid
            noise = torch.randn(tensor.shape, generator=generator, dtype=tensor.dtype)
            scale = (tensor.std() if tensor.numel() > 1 else tensor.abs().mean()) + 0.01
            last["model"][name] = tensor + 0.5 * scale * noise
    torch.save(last, run_dir / "last.pt")


@pytest.fixture(scope="module")
def run(run_dir) -> InferenceRun:
    return InferenceRun.load(run_dir, device="cpu")


@pytest.fixture(scope="module")
def features(run_dir) -> dict:
    return load_features(run_dir / "features.npz")


@pytest.fixture()
def messy_folder(tmp_path, run_dir) -> Path:
    """Two good images (a PNG and a JPEG), a truncated JPEG, a text file named .jpg, a hidden file."""
    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    train_paths, _ = read_split_file(run_dir, "train")
    shutil.copy(train_paths[0], folder / "good.png")
    buffer = io.BytesIO()
    Image.open(train_paths[1]).convert("RGB").resize((64, 64)).save(buffer, "JPEG", quality=90)
    (folder / "sub" / "good.jpg").write_bytes(buffer.getvalue())
    (folder / "truncated.jpg").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    (folder / "notes.jpg").write_text("this is not an image\n")
    (folder / ".hidden.png").write_bytes(b"")
    return folder


def test_fixture_best_and_last_checkpoints_differ(run_dir):
    # Otherwise the tests below could not tell best.pt from last.pt.
    best = torch.load(run_dir / "best.pt", map_location="cpu", weights_only=True)
    last = torch.load(run_dir / "last.pt", map_location="cpu", weights_only=True)
    assert best["model"].keys() == last["model"].keys()
    assert not all(torch.equal(best["model"][k], last["model"][k]) for k in best["model"])


# ----- predict ----------------------------------------------------------------------------------

def test_predict_agrees_with_the_runs_test_evaluation(run, run_dir, features):
    test_paths, test_names = read_split_file(run_dir, "test")
    test_folder = Path(test_paths[0]).parents[1]  # test/<class>/<file>
    preds = predict(run, test_folder, top_k=3, progress=False)

    assert sorted(preds.paths) == sorted(test_paths) and not preds.skipped
    row = {path: i for i, path in enumerate(preds.paths)}
    order = [row[p] for p in test_paths]  # features.npz rows follow splits/test.txt
    run_argmax = features["test"]["logits"].argmax(1)
    assert np.array_equal(preds.logits[order].argmax(1), run_argmax)

    predicted = [preds.predicted[i] for i in order]
    top1 = sum(p == t for p, t in zip(predicted, test_names)) / len(test_names)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["test"]["n"] == len(test_names)
    assert top1 == pytest.approx(metrics["test"]["top1"], abs=1e-12)


def test_predict_probabilities_and_top_k(run, run_dir):
    paths, _ = read_split_file(run_dir, "val")
    preds = predict(run, paths[:5], top_k=2, progress=False)
    logits = preds.logits.astype(np.float64)
    for i in range(len(preds)):
        exp = [np.exp(z - logits[i].max()) for z in logits[i]]  # soft-max by hand
        expected = [e / sum(exp) for e in exp]
        np.testing.assert_allclose(preds.probabilities[i], expected, rtol=1e-5)
        best_two = sorted(range(len(expected)), key=lambda j: -expected[j])[:2]
        row = preds.rows()[i]
        assert [row["class_1"], row["class_2"]] == [run.classes[j] for j in best_two]
        assert row["probability_1"] >= row["probability_2"]
    assert "class_3" not in preds.rows()[0]
    assert preds.paths == paths[:5]  # files keep the order given


def test_predict_uses_the_best_checkpoint_not_the_last(run_dir, features):
    test_paths, _ = read_split_file(run_dir, "test")
    best = predict(run_dir, test_paths[:8], device="cpu", progress=False)
    last = predict(run_dir, test_paths[:8], device="cpu", checkpoint="last.pt", progress=False)
    np.testing.assert_allclose(best.logits, features["test"]["logits"][:8], atol=1e-5)
    assert not np.allclose(last.logits, best.logits, atol=1e-5)


def test_unreadable_files_are_listed_not_fatal(run, messy_folder):
    preds = predict(run, messy_folder, progress=False)
    assert sorted(Path(p).name for p in preds.paths) == ["good.jpg", "good.png"]
    assert set(preds.skipped) == {str(messy_folder / "truncated.jpg"), str(messy_folder / "notes.jpg")}
    assert "truncated" in preds.skipped[str(messy_folder / "truncated.jpg")]
    assert preds.logits.shape == (2, len(run.classes)) and np.isfinite(preds.logits).all()


def test_only_unreadable_files_give_empty_arrays(run, messy_folder):
    preds = predict(run, [messy_folder / "notes.jpg", messy_folder / "truncated.jpg"], progress=False)
    assert len(preds) == 0 and len(preds.skipped) == 2
    assert preds.embeddings.shape == (0, run.model.embedding_dim)
    assert preds.logits.shape == (0, len(run.classes))
    assert preds.table() == "(no readable images)"


def test_small_batches_give_the_same_result(run, run_dir):
    paths, _ = read_split_file(run_dir, "val")
    whole = predict(run, paths, batch_size=64, progress=False)
    pieces = predict(run, paths, batch_size=3, progress=False)
    assert pieces.paths == whole.paths
    np.testing.assert_allclose(pieces.embeddings, whole.embeddings, atol=1e-5)


def test_collect_image_paths(messy_folder, tmp_path):
    found = collect_image_paths([messy_folder, messy_folder / "good.png"])
    names = [str(Path(p).relative_to(messy_folder)) for p in found]
    assert names == ["good.png", "notes.jpg", "sub/good.jpg", "truncated.jpg"]  # sorted, hidden left out, once
    odd = tmp_path / "photo.data"
    odd.write_bytes(b"x")
    assert collect_image_paths(odd) == [str(odd.resolve())]  # named explicitly: kept whatever the suffix
    with pytest.raises(FileNotFoundError, match="nowhere.jpg"):
        collect_image_paths([tmp_path / "nowhere.jpg"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no image files"):
        collect_image_paths(tmp_path / "empty")


def test_missing_checkpoint_names_the_alternatives(run_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="last.pt"):
        InferenceRun.load(run_dir, checkpoint="nope.pt", device="cpu")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        InferenceRun.load(tmp_path / "no-run", device="cpu")


# ----- embed ------------------------------------------------------------------------------------

def test_embed_matches_features_npz(run, run_dir, features, tmp_path):
    val_paths, _ = read_split_file(run_dir, "val")
    out = tmp_path / "val.npz"
    result = embed(run, val_paths, out=out, progress=False)
    np.testing.assert_allclose(result.embeddings, features["val"]["embeddings"], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(result.logits, features["val"]["logits"], rtol=1e-4, atol=1e-5)
    with np.load(out) as saved:
        assert list(saved["paths"]) == val_paths
        assert list(saved["classes"]) == run.classes
        np.testing.assert_array_equal(saved["embeddings"], result.embeddings)
        assert saved["skipped_paths"].shape == (0,)
    with pytest.raises(ValueError, match=".npz"):
        embed(run, val_paths[:1], out=tmp_path / "val.csv", progress=False)


# ----- nearest neighbours -----------------------------------------------------------------------

def test_train_image_finds_itself_first(run, run_dir, features):
    train_paths, train_names = read_split_file(run_dir, "train")
    rows = [0, len(train_paths) // 2, len(train_paths) - 1]
    result = nearest_neighbours(run, [train_paths[i] for i in rows], k=4)
    assert result.indices.shape == result.distances.shape == (3, 4)
    assert result.indices[:, 0].tolist() == rows
    assert np.all(result.distances[:, 0] < 1e-3)
    assert np.all(np.diff(result.distances, axis=1) >= 0)
    assert result.query_classes == [train_names[i] for i in rows]
    assert result.metric == "euclidean"


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_neighbours_equal_a_brute_force_search(run, features, metric):
    gallery = features["train"]["embeddings"].astype(np.float64)
    queries = features["test"]["embeddings"][:4]
    result = nearest_neighbours(run, queries, k=5, metric=metric)
    for q, query in enumerate(queries.astype(np.float64)):
        if metric == "euclidean":
            distances = [np.sqrt(((row - query) ** 2).sum()) for row in gallery]
        else:
            distances = [1 - row @ query / np.sqrt((row @ row) * (query @ query)) for row in gallery]
        expected = sorted(range(len(gallery)), key=lambda j: distances[j])[:5]
        assert result.indices[q].tolist() == expected
        np.testing.assert_allclose(result.distances[q], [distances[j] for j in expected], rtol=1e-4, atol=1e-5)
    assert result.query_paths == [None] * 4


def test_neighbour_rows_and_figure(run, run_dir, tmp_path):
    train_paths, train_names = read_split_file(run_dir, "train")
    result = nearest_neighbours(run, train_paths[:2], k=3)
    rows = result.rows()
    assert [r["rank"] for r in rows] == [1, 2, 3, 1, 2, 3]
    assert rows[0]["path"] == train_paths[0] and rows[0]["class"] == train_names[0]
    fig = result.figure()
    assert len(fig.axes) == 2 * (3 + 1)
    assert fig.axes[1].get_title().startswith(train_names[0])  # the image itself, its class
    assert len(fig.axes[0].images) == 1
    saved = result.save(tmp_path / "nn.csv")
    assert len(list(csv.DictReader(saved.open()))) == 6


def test_misaligned_split_file_is_refused(run_dir, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("last.pt", "figures"))
    lines = (copy / "splits" / "train.txt").read_text().splitlines()
    first_other = next(i for i, line in enumerate(lines) if line.split("\t")[1] != lines[0].split("\t")[1])
    lines[0], lines[first_other] = lines[first_other], lines[0]  # swap two files of different classes
    (copy / "splits" / "train.txt").write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match="does not line up"):
        nearest_neighbours(copy, np.zeros((1, 256), np.float32), device="cpu")


# ----- most-confused pairs ----------------------------------------------------------------------

def test_most_frequent_mistakes_by_hand():
    from foodlib.metrics import confusion_matrix, most_frequent_mistakes

    labels = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2])
    predicted = np.array([1, 1, 2, 0, 1, 1, 1, 1, 2])
    # mistakes: 0->1 twice, 0->2 once, 1->0 once, 2->1 three times
    assert most_frequent_mistakes(confusion_matrix(labels, predicted, 3), k=3) == [(2, 1, 3), (0, 1, 2), (0, 2, 1)]
    assert most_frequent_mistakes(confusion_matrix(labels, labels, 3)) == []


def test_confused_pairs_of_the_run(run_dir, features):
    pairs = confused_pairs(run_dir, split="test", n=2)
    test_paths, _ = read_split_file(run_dir, "test")
    classes = json.loads((run_dir / "classes.json").read_text())
    labels, predicted = features["test"]["labels"], features["test"]["logits"].argmax(1)
    for pair in pairs:
        t, p = classes.index(pair.true_class), classes.index(pair.predicted_class)
        expected = [path for path, y, yhat in zip(test_paths, labels, predicted) if y == t and yhat == p]
        assert pair.paths == expected and pair.count == len(expected) > 0 and t != p


# ----- export -----------------------------------------------------------------------------------

LOAD_WITHOUT_FOODLIB = textwrap.dedent("""
    import json, sys
    sys.modules["foodlib"] = None  # any import of foodlib now fails
    try:
        import foodlib
    except ImportError:
        pass
    else:
        raise SystemExit("foodlib was importable")
    import torch
    model_path, input_path, output_path = sys.argv[1:4]
    extra = {"classes.json": "", "preprocessing.json": ""}
    module = torch.jit.load(model_path, _extra_files=extra)
    with torch.no_grad():
        embedding, logits = module(torch.load(input_path))
    torch.save({"embedding": embedding, "logits": logits, "classes": json.loads(extra["classes.json"]),
                "preprocessing": json.loads(extra["preprocessing.json"])}, output_path)
""")


def normalised_test_images(run_dir, n: int) -> torch.Tensor:
    """The first n test images as the exported model takes them: decoded to 37 px, center 32 crop."""
    test_paths, _ = read_split_file(run_dir, "test")
    images = np.stack([load_image_array(p, 37) for p in test_paths[:n]])  # (n, 37, 37, 3)
    return eval_transform(torch.from_numpy(images), 32, channels_last=False)  # (n, 3, 32, 32)


@pytest.mark.slow  # a second Python process importing torch: ~5-15 s on a loaded machine
def test_torchscript_export_runs_without_foodlib(run, run_dir, features, tmp_path):
    model_path = export_model(run_dir, format="torchscript", out=tmp_path / "model.pt")
    # A batch of 5 (the trace used 2) normalised the way preprocessing.json describes.
    torch.save(normalised_test_images(run_dir, 5), tmp_path / "x.pt")
    done = subprocess.run([sys.executable, "-I", "-c", LOAD_WITHOUT_FOODLIB, str(model_path), "x.pt", "y.pt"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    out = torch.load(tmp_path / "y.pt")
    np.testing.assert_allclose(out["logits"].numpy(), features["test"]["logits"][:5], atol=1e-4)
    np.testing.assert_allclose(out["embedding"].numpy(), features["test"]["embeddings"][:5], atol=1e-4)
    assert out["classes"] == run.classes
    pre = out["preprocessing"]
    assert (pre["image_size"], pre["resize_side"], pre["crop_fraction"]) == (32, 37, 0.875)
    assert pre["mean"] == [0.485, 0.456, 0.406] and pre["std"] == [0.229, 0.224, 0.225]


LOAD_PT2_WITHOUT_FOODLIB = textwrap.dedent("""
    import json, sys
    sys.modules["foodlib"] = None  # any import of foodlib now fails
    import torch
    model_path, input_path, output_path = sys.argv[1:4]
    extra = {"classes.json": "", "preprocessing.json": ""}
    program = torch.export.load(model_path, extra_files=extra)
    with torch.no_grad():
        embedding, logits = program.module()(torch.load(input_path))
    torch.save({"embedding": embedding, "logits": logits, "classes": json.loads(extra["classes.json"]),
                "preprocessing": json.loads(extra["preprocessing.json"])}, output_path)
""")


@pytest.mark.slow  # a second Python process importing torch: ~5-15 s on a loaded machine
def test_pt2_export_matches_predict_without_foodlib(run, run_dir, tmp_path):
    model_path = export_model(run_dir, out=tmp_path / "model.pt2")  # the default format: torch.export
    test_paths, _ = read_split_file(run_dir, "test")
    torch.save(normalised_test_images(run_dir, 5), tmp_path / "x.pt")  # batch 5; the export saw 2
    done = subprocess.run([sys.executable, "-I", "-c", LOAD_PT2_WITHOUT_FOODLIB, str(model_path), "x.pt", "y.pt"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr
    out = torch.load(tmp_path / "y.pt")
    expected = predict(run, test_paths[:5], progress=False)
    np.testing.assert_allclose(torch.softmax(out["logits"], 1).numpy(), expected.probabilities, atol=1e-4)
    assert [run.classes[i] for i in out["logits"].argmax(1)] == expected.predicted
    assert out["classes"] == run.classes and out["preprocessing"]["image_size"] == 32


def test_pt2_export_has_a_dynamic_batch_and_json_alongside(run, run_dir, tmp_path):
    path = export_model(run, out=tmp_path / "model.pt2")
    alongside = json.loads((tmp_path / "model.json").read_text())
    assert alongside["classes"] == run.classes and alongside["preprocessing"]["resize_side"] == 37
    assert alongside["model"]["loss"] == "center"
    module = torch.export.load(str(path)).module()
    for n in (1, 7):
        x = torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(n))
        with torch.no_grad():
            embedding, logits = module(x)
            expected = run.loss.predict(run.model(x))
        np.testing.assert_allclose(logits.numpy(), expected.numpy(), atol=1e-4)


def test_cli_export_default_path_and_load_exported(run_dir, features, capsys):
    assert cli_main(["export", str(run_dir)]) == 0
    path = run_dir / "export" / "model.pt2"
    assert f"wrote {path}" in capsys.readouterr().out
    module, meta = inference.load_exported(path)  # torch.export.load with extra_files
    with torch.no_grad():
        embedding, logits = module(normalised_test_images(run_dir, 3))
    np.testing.assert_allclose(logits.numpy(), features["test"]["logits"][:3], atol=1e-4)
    assert meta["model"]["loss"] == "center" and meta["model"]["embedding_dim"] == 256
    assert meta["classes"] == json.loads((run_dir / "classes.json").read_text())


def test_cli_export_takes_the_format_from_the_out_suffix(run_dir, tmp_path, capsys):
    assert cli_main(["export", str(run_dir), "--out", str(tmp_path / "m.pt")]) == 0
    torch.jit.load(str(tmp_path / "m.pt"))  # TorchScript, as the suffix says
    assert cli_main(["export", str(run_dir), "--format", "pt2", "--out", str(tmp_path / "m.pt")]) == 2
    assert "does not end in .pt2" in capsys.readouterr().err


@pytest.mark.parametrize("loss_name", list_losses())
def test_traced_module_matches_eager_at_another_batch_size(loss_name):
    torch.manual_seed(0)
    model = create_model("smallcnn", embedding_dim=8)
    loss = create_loss(loss_name, embedding_dim=8, num_classes=3, strict=False, covariance="diagonal")
    module = InferenceModule(model, loss).eval()
    traced = trace_module(module, 32, check=False)  # compared with eager below instead
    x = torch.randn(5, 3, 32, 32)
    with torch.no_grad():
        eager_embedding, eager_logits = module(x)
        traced_embedding, traced_logits = traced(x)
        expected_logits = loss.predict(model(x))
    torch.testing.assert_close(traced_embedding, eager_embedding)
    torch.testing.assert_close(traced_logits, eager_logits)
    torch.testing.assert_close(eager_logits, expected_logits)


def test_onnx_without_the_package_names_the_install(run_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnx", None)  # as if not installed, whatever this machine has
    with pytest.raises(UserError, match="pip install onnx"):
        export_model(run_dir, format="onnx")
    with pytest.raises(ValueError, match="torchscript, onnx"):
        export_model(run_dir, format="tflite")


@pytest.mark.slow  # only runs where onnx + onnxscript are installed; ~10 s
def test_onnx_export_when_installed(run, run_dir, tmp_path):
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    from onnx.reference import ReferenceEvaluator

    path = export_model(run, format="onnx", out=tmp_path / "model.onnx")
    proto = onnx.load(str(path))
    props = {p.key: p.value for p in proto.metadata_props}
    assert json.loads(props["classes.json"]) == run.classes
    x = torch.randn(3, 3, 32, 32)
    embedding, logits = ReferenceEvaluator(proto).run(None, {"images": x.numpy()})
    with torch.no_grad():
        expected = run.loss.predict(run.model(x))
    np.testing.assert_allclose(logits, expected.numpy(), atol=1e-4)


# ----- command line and public surface ----------------------------------------------------------

def test_cli_predict_table_csv_and_json(run_dir, messy_folder, tmp_path, capsys):
    code = cli_main(["predict", str(run_dir), str(messy_folder), "--top-k", "2", "--device", "cpu", "--quiet",
                     "--out", str(tmp_path / "p.csv")])
    captured = capsys.readouterr()
    assert code == 0
    assert "good.png" in captured.out and "top-2" in captured.out
    assert "skipped 2 unreadable file(s)" in captured.err and "notes.jpg" in captured.err
    rows = list(csv.DictReader((tmp_path / "p.csv").open()))
    assert [bool(r["error"]) for r in rows] == [False, False, True, True]
    assert {"class_1", "probability_2"} <= set(rows[0])

    assert cli_main(["predict", str(run_dir), str(messy_folder / "good.png"), "--device", "cpu", "--quiet",
                     "--out", str(tmp_path / "p.json")]) == 0
    saved = json.loads((tmp_path / "p.json").read_text())
    assert saved["predictions"][0]["path"].endswith("good.png") and len(saved["predictions"][0]["top"]) == 4


def test_cli_embed_and_neighbours(run_dir, tmp_path, capsys):
    train_paths, _ = read_split_file(run_dir, "train")
    assert cli_main(["embed", str(run_dir), train_paths[0], "--out", str(tmp_path / "e.npz"), "--device", "cpu",
                     "--quiet"]) == 0
    assert np.load(tmp_path / "e.npz")["embeddings"].shape == (1, 256)
    assert cli_main(["neighbours", str(run_dir), train_paths[0], "-k", "2", "--device", "cpu", "--quiet",
                     "--figure", str(tmp_path / "nn.png")]) == 0
    assert (tmp_path / "nn.png").stat().st_size > 0
    assert cli_main(["predict", str(run_dir), train_paths[0], "--checkpoint", "nope.pt", "--quiet"]) == 2
    assert "nope.pt" in capsys.readouterr().err


def test_public_names_and_doctests():
    for name in ("predict", "embed", "nearest_neighbours", "export_model"):
        assert getattr(foodlib, name) is getattr(inference, name)
        assert ">>>" in getattr(inference, name).__doc__
    failures, tried = doctest.testmod(inference, optionflags=doctest.ELLIPSIS)
    assert failures == 0 and tried > 0


def test_export_refuses_a_file_name_of_another_format(tmp_path):
    # a torch.export program saved as model.pt would later be read as TorchScript and fail obscurely
    with pytest.raises(ValueError, match=r"does not end in \.pt2.*model\.pt2"):
        export_model(tmp_path / "no-run-needed", out=tmp_path / "model.pt")
    with pytest.raises(ValueError, match=r"does not end in \.onnx"):
        export_model(tmp_path / "no-run-needed", format="onnx", out=tmp_path / "model.pt2")
