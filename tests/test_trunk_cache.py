"""Frozen-trunk feature cache: same logits as the live trunk, content / weights keys, corruption, parallel builds."""
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import foodlib.trunk_cache as tc
from foodlib.config import Config
from foodlib.data import Data
from foodlib.data.augment import normalization
from foodlib.data.cache import build_cache
from foodlib.data.loader import ImageSource
from foodlib.losses import create_loss
from foodlib.models import create_model
from foodlib.trainable import apply_trainable

SIZE, SIDE = 24, 28


def _images(folder: Path, n: int = 10, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        path = folder / f"{i:02d}.png"
        Image.fromarray(rng.integers(0, 256, (32, 36, 3), dtype=np.uint8)).save(path)
        paths.append(str(path))
    return paths


def _source(paths, cache_dir) -> ImageSource:
    return ImageSource(paths, SIDE, build_cache(paths, SIDE, cache_dir, progress=False))


def _model(seed: int = 0):
    torch.manual_seed(seed)
    model = apply_trainable(create_model("smallcnn", embedding_dim=6), "head").eval()
    loss = create_loss("softmax", embedding_dim=6, num_classes=3).eval()
    return model, loss


def _build(model, source, cache_dir, augment="standard", views=2):
    return tc.trunk_features(model.backbone, source, SIZE, normalization(model), augment, views, torch.device("cpu"),
                             cache_dir=cache_dir, progress=False)


@torch.no_grad()
def test_head_on_cached_features_gives_the_live_trunks_logits(tmp_path):
    """Every view, and the loader's per-epoch choice of view, against the live frozen trunk on the same pixels."""
    model, loss = _model()
    source = _source(_images(tmp_path / "img"), tmp_path / "cache")
    views = _build(model, source, tmp_path / "cache", views=3)  # (K, N, F) float16
    clean = _build(model, source, tmp_path / "cache", augment=None)
    assert views.shape == (3, 10, 256) and views.dtype == np.float16 and clean.shape == (1, 10, 256)
    live = {}
    for k in range(3):
        x = torch.cat([x for _, x in tc.view_inputs(source, SIZE, normalization(model), "standard", k, torch.device("cpu"))])
        live[k] = loss.predict(model(x))  # (N, C) through the whole network
        cached = loss.predict(model(torch.from_numpy(np.array(views[k]))))
        torch.testing.assert_close(cached, live[k], atol=2e-3, rtol=2e-3)
    assert not torch.allclose(live[0], live[1], atol=1e-3)  # the views differ
    x = torch.cat([x for _, x in tc.view_inputs(source, SIZE, normalization(model), None, 0, torch.device("cpu"))])
    torch.testing.assert_close(loss.predict(model(torch.from_numpy(np.array(clean[0])))), loss.predict(model(x)),
                               atol=2e-3, rtol=2e-3)

    # the training loader: epoch e gives row i view (e + offset_i) mod K, in the BatchLoader's order
    labels = np.arange(10) % 3
    loader = tc.FeatureLoader(tc.FeatureSource(clean, views), labels, batch_size=4, shuffle=True, seed=5)
    for epoch in (0, 1, 4):
        loader.set_epoch(epoch)
        indices = loader.batches()[0]
        features, batch_labels = next(iter(loader))
        expected = torch.stack([live[int((epoch + loader.source.offsets[i]) % 3)][i] for i in indices])
        torch.testing.assert_close(loss.predict(model(features)), expected, atol=2e-3, rtol=2e-3)
        assert torch.equal(batch_labels, torch.from_numpy(labels[indices]))
    evaluation = tc.FeatureLoader(tc.FeatureSource(clean, views), labels, batch_size=4, shuffle=False)
    assert torch.equal(next(iter(evaluation))[0], torch.from_numpy(np.array(clean[0, :4])))


@torch.no_grad()
def test_last_n_on_cached_maps_gives_the_live_networks_logits(tmp_path):
    """trainable=last:1: the cache stores the frozen stages' maps; the model runs its last stage,
    pooling, neck and head on them and gives what the whole network gives on the same pixels."""
    torch.manual_seed(0)
    model = apply_trainable(create_model("smallcnn", embedding_dim=6), "last:1").eval()
    loss = create_loss("softmax", embedding_dim=6, num_classes=3).eval()
    source = _source(_images(tmp_path / "img"), tmp_path / "cache")
    data = Data(index=None, side=SIDE, sources={"train": source})
    cfg = Config.from_flat(image_size=SIZE, augment="standard", trunk_views=2, cache_dir=str(tmp_path / "cache"))
    cached = tc.with_trunk_features(data, model, cfg, torch.device("cpu"), progress=False)
    assert model.cut is not None and model.cut.at == 3
    views, clean = cached.sources["train"].views, cached.sources["train"].clean
    assert views.shape == (2, 10, 128, 3, 3) and views.dtype == np.float16 and clean.shape == (1, 10, 128, 3, 3)
    for k in range(2):
        x = torch.cat([x for _, x in tc.view_inputs(source, SIZE, normalization(model), "standard", k, torch.device("cpu"))])
        maps = torch.from_numpy(np.array(views[k]))
        torch.testing.assert_close(loss.predict(model(maps)), loss.predict(model(x)), atol=2e-3, rtol=2e-3)
    # on cached maps the frozen stages do not run at all; gradients reach the trainable stage
    ran = []
    hook = model.cut.first.register_forward_hook(lambda *a: ran.append(1))
    with torch.enable_grad():
        model.train()
        model(torch.from_numpy(np.array(views[0]))).square().mean().backward()
    hook.remove()
    assert not ran and model.backbone[-5].weight.grad is not None  # the last stage's conv
    # the pooled (head) entry and the maps (last:1) entry are separate
    head_model = apply_trainable(create_model("smallcnn", embedding_dim=6), "head")
    head_model.load_state_dict(model.state_dict())
    tc.with_trunk_features(data, head_model, cfg, torch.device("cpu"), progress=False)
    assert len(list((tmp_path / "cache" / "trunk").glob("*.f16"))) == 4  # (clean, views) x (head, last:1)
    with pytest.raises(ValueError, match="trainable='all': nothing to cache.*trunk_cache: false"):
        tc.with_trunk_features(data, apply_trainable(head_model, "all"), cfg, torch.device("cpu"), progress=False)


def test_class_balanced_batches_of_cached_features_use_each_epochs_view(tmp_path):
    """Pair / triplet losses train on class-balanced batches: over cached features they must get
    epoch e's view of each image, as the plain loader does (they once got the clean view only)."""
    clean = np.zeros((1, 12, 4), np.float16)
    views = np.arange(3 * 12 * 4, dtype=np.float16).reshape(3, 12, 4)  # distinct rows: a row names its view
    labels = np.arange(12) % 3
    data = tc.FeatureData(index=None, side=SIDE, sources={"train": tc.FeatureSource(clean, views)})
    data.labels = lambda split: labels
    loader = data.balanced_loader("train", batch_size=6, samples_per_class=2, seed=3)
    for epoch in (0, 1, 2):
        loader.set_epoch(epoch)
        indices = np.concatenate(loader.batches())
        got = np.concatenate([x.numpy() for x, _ in loader])
        expected = views[(epoch + loader.source.offsets[indices]) % 3, indices]
        assert np.array_equal(got, expected)
        assert np.bincount(labels[loader.batches()[0]], minlength=3).tolist() == [2, 2, 2]


def test_fit_trains_live_when_every_stage_trains(tmp_path, caplog):
    """last:N with N = every stage leaves nothing frozen to cache: fit() says so and trains on images."""
    from conftest import tiny_config

    import foodlib

    result = foodlib.fit(tiny_config(tmp_path, trainable="last:4", epochs=1, features=False, device="cpu", amp="off",
                                     cache_dir=str(tmp_path / "cache")))
    assert type(result.data).__name__ == "Data"
    assert "trunk cache: not used (every stage of the trunk trains)" in caplog.text


def test_changed_content_or_weights_get_their_own_entry(tmp_path):
    model, _ = _model()
    paths = _images(tmp_path / "img")
    first = np.array(_build(model, _source(paths, tmp_path / "cache"), tmp_path / "cache", augment=None))
    again = np.array(_build(model, _source(paths, tmp_path / "cache"), tmp_path / "cache", augment=None))
    assert np.array_equal(first, again) and len(list((tmp_path / "cache" / "trunk").glob("*.f16"))) == 1
    Image.fromarray(np.zeros((32, 36, 3), np.uint8)).save(paths[3])  # one photo replaced
    changed = np.array(_build(model, _source(paths, tmp_path / "cache"), tmp_path / "cache", augment=None))
    assert not np.array_equal(changed[:, 3], first[:, 3]) and np.array_equal(changed[:, 4], first[:, 4])
    other_weights, _ = _model(seed=1)
    assert not np.array_equal(
        np.array(_build(other_weights, _source(paths, tmp_path / "cache"), tmp_path / "cache", augment=None)), changed)
    assert len(list((tmp_path / "cache" / "trunk").glob("*.f16"))) == 3


def test_a_damaged_file_is_detected_and_rebuilt(tmp_path):
    model, _ = _model()
    source = _source(_images(tmp_path / "img"), tmp_path / "cache")
    good = np.array(_build(model, source, tmp_path / "cache"))
    (file,) = (tmp_path / "cache" / "trunk").glob("*.f16")
    raw = bytearray(file.read_bytes())
    raw[100] ^= 0xFF  # one flipped byte, same size
    file.write_bytes(bytes(raw))
    with pytest.raises(tc.TrunkCacheError, match="SHA-256"):
        tc._open_checked(file, file.with_suffix(".json"))
    with pytest.warns(UserWarning, match="damaged"):
        rebuilt = np.array(_build(model, source, tmp_path / "cache"))
    assert np.array_equal(rebuilt, good)


def test_parallel_builders_build_once(tmp_path, monkeypatch):
    """Two runs asking for the same features at once: one computes, the other waits and reads it."""
    model, _ = _model()
    source = _source(_images(tmp_path / "img"), tmp_path / "cache")
    real, calls, results = tc._compute, [], {}

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(tc, "_compute", counted)
    threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, np.array(_build(model, source, tmp_path / "cache"))))
               for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len(results) == 3
    assert all(np.array_equal(results[0], r) for r in results.values())


@pytest.mark.slow
@pytest.mark.parametrize("trainable", ["head", "last:1"])
def test_fit_on_cached_features_matches_the_live_trunk(tmp_path, trainable):
    """fit(trainable=head | last:1) with and without the cache (augment=none: the same inputs): the same run."""
    from conftest import tiny_config

    import foodlib

    common = dict(trainable=trainable, embedding_dim=8, augment="none", device="cpu", amp="off", features=False,
                  cache_dir=str(tmp_path / "cache"))
    cached = foodlib.fit(tiny_config(tmp_path / "a", trunk_cache=True, **common))
    live = foodlib.fit(tiny_config(tmp_path / "b", trunk_cache=False, **common))
    for split in ("val", "test"):
        assert abs(cached.metrics[split]["loss"] - live.metrics[split]["loss"]) < 1e-3
        assert cached.metrics[split]["top1"] == live.metrics[split]["top1"]
    assert type(cached.data).__name__ == "FeatureData" and type(live.data).__name__ == "Data"


def test_held_out_classes_are_evaluated_with_the_trunk_cache(tmp_path):
    """novel_classes with trainable=head: the held-out pool goes through the cache too and the
    run gets its open-set section (it was silently dropped once: FeatureData lost data.novel)."""
    from conftest import tiny_config

    import foodlib

    common = dict(trainable="head", embedding_dim=8, augment="none", device="cpu", amp="off", figures=False,
                  cache_dir=str(tmp_path / "cache"), novel_classes=2, dishes_classes=5, loss="center")
    cached = foodlib.fit(tiny_config(tmp_path / "a", trunk_cache=True, **common))
    live = foodlib.fit(tiny_config(tmp_path / "b", trunk_cache=False, **common))
    assert type(cached.data).__name__ == "FeatureData"
    assert cached.data.novel is not None and (tmp_path / "a" / "run" / "novel_features.npz").is_file()
    assert cached.metrics["novel"]["held_out"] == live.metrics["novel"]["held_out"]
    for key in ("map_at_r", "precision_at_1"):
        assert abs(cached.metrics["novel"][key] - live.metrics["novel"][key]) < 0.05, key  # float16 cache
