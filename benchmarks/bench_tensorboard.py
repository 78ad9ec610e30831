"""What TensorBoard costs a run: the per-epoch scalars and the end-of-run projector (foodlib/tensorboard_log.py).

Times :class:`~foodlib.tensorboard_log.RunBoard` on data shaped like a food101-10 run (1,250 test
images, 512-D ResNet-18 embeddings, 10 classes, 64 px stored images) and a Food-101 run (25,250
test images, capped at PROJECTOR_MAX_POINTS in the projector); the network is not involved, so
these are the seconds TensorBoard adds to a run, to compare with its training time.

    .venv/bin/python benchmarks/bench_tensorboard.py
"""
from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from foodlib.config import Config
from foodlib.features import save_features
from foodlib.tensorboard_log import RunBoard


class FakeSource:
    """Stands in for a split's decoded-image cache: random uint8 images ``(B, S, S, 3)``."""

    def __init__(self, n: int, side: int):
        self.images = np.random.default_rng(0).integers(0, 256, (n, side, side, 3), dtype=np.uint8)

    def __len__(self) -> int:
        return len(self.images)

    def get_batch(self, rows):
        return self.images[rows]


def measure(n_test: int, dim: int, classes: int, epochs: int = 30, side: int = 64) -> dict:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, classes, n_test)
    feats = {"test": {"embeddings": rng.normal(size=(n_test, dim)).astype(np.float32),
                      "logits": rng.normal(size=(n_test, classes)).astype(np.float32), "labels": labels}}
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp)
        save_features(run_dir / "features.npz", feats, [f"class_{i}" for i in range(classes)])
        cfg = Config.from_flat(loss="center", out=str(run_dir))
        t0 = time.perf_counter()
        board = RunBoard.open(cfg, run_dir)
        t_open = time.perf_counter() - t0
        row = {"lr": 1e-3, "loss": 1.0, "ce": 0.9, "center": 0.1, "top1": 0.5, "top5": 0.9, "seconds": 10.0,
               "img_per_s": 100.0}
        t0 = time.perf_counter()
        for epoch in range(1, epochs + 1):
            board.log_epoch([{"epoch": epoch, "split": s, **row} for s in ("train", "val")], epoch)
        t_epochs = time.perf_counter() - t0
        data = SimpleNamespace(sources={"test": FakeSource(n_test, side)})
        metrics = {"best_epoch": epochs, "test": {"top1": 0.5, "top5": 0.9, "fisher_ratio": 1.0}}
        t0, cpu0 = time.perf_counter(), time.process_time()
        board.finish(metrics, data, run_dir)
        board.close()
        t_finish, cpu_finish = time.perf_counter() - t0, time.process_time() - cpu0
        size = sum(p.stat().st_size for p in (run_dir / "tensorboard").rglob("*") if p.is_file())
    return {"test_images": n_test, "dim": dim, "open_s": round(t_open, 3),
            "per_epoch_ms": round(1000 * t_epochs / epochs, 2), "finish_s": round(t_finish, 2),
            "finish_cpu_s": round(cpu_finish, 2),
            "tensorboard_MB": round(size / 2**20, 1)}


def main() -> None:
    for n, dim, classes in ((1250, 512, 10), (25250, 512, 101)):
        print(json.dumps(measure(n, dim, classes)))


if __name__ == "__main__":
    main()
