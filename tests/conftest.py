"""Shared fixtures: a per-session cache folder and the real-photo folder (skipped when absent)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FOOD101_10 = REPO.parent / "shared" / "data" / "food101-10"


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """Keep generated datasets and decoded caches out of the user's ~/.cache during tests."""
    folder = tmp_path_factory.mktemp("foodlib-cache")
    old = os.environ.get("FOODLIB_CACHE")
    os.environ["FOODLIB_CACHE"] = str(folder)
    os.environ.setdefault("MPLBACKEND", "Agg")
    yield folder
    if old is None:
        os.environ.pop("FOODLIB_CACHE", None)
    else:
        os.environ["FOODLIB_CACHE"] = old


@pytest.fixture(scope="session")
def food101_10() -> Path:
    if not (FOOD101_10 / "train").is_dir():
        pytest.skip(f"real photos not found at {FOOD101_10} (see the README: shared/data/food101-10)")
    return FOOD101_10


def tiny_config(tmp_path, **overrides):
    """A config that trains in seconds on the embedded dishes (4 classes, 32 px, smallcnn)."""
    from foodlib.config import Config

    base = dict(data="dishes", dishes_classes=4, dishes_per_class=30, image_size=32, backbone="smallcnn", epochs=2,
                batch_size=16, workers=0, quiet=True, out=str(tmp_path / "run"), figures=False)
    base.update(overrides)
    return Config.from_flat(**base)


def rewrite_training_forward(monkeypatch, step: int, rewrite) -> None:
    """Make fit()'s ``step``-th training forward (1-based, over all epochs; evaluation forwards do
    not count) return ``rewrite(out, embedding, labels)`` instead of the loss's output ``out``.

    ``rewrite`` may also raise, to stand in for a crash at that step.
    """
    import foodlib.train as train_module

    create = train_module.create_loss
    calls = {"n": 0}

    def create_rewritten(*args, **kwargs):
        loss = create(*args, **kwargs)
        forward = loss.forward

        def rewritten_forward(embedding, labels):
            out = forward(embedding, labels)
            if loss.training:
                calls["n"] += 1
                if calls["n"] == step:
                    return rewrite(out, embedding, labels)
            return out

        loss.forward = rewritten_forward
        return loss

    monkeypatch.setattr(train_module, "create_loss", create_rewritten)
