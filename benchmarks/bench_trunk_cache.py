"""What the frozen-trunk cache costs and saves (issue 24), on real food101-10 photos, EfficientNet-Lite0.

Three measurements, each in one run:

1. ``build``: the trunk cache's build speed (decode-cache read + augmentation of K views + the
   frozen trunk's forward + the float16 write, ``foodlib.trunk_cache.trunk_features``) against the
   backbone's plain inference speed (the same trunk, the same batch size, on normalised batches
   already in memory), at ``--image-size`` (160). Interleaved rounds, medians; each build goes to a
   fresh cache folder, so nothing is reused. Target: build >= 0.9 x plain inference.
2. ``head``: a head-only epoch on cached features, as ``fit()`` runs it (FeatureLoader batches ->
   linear softmax head -> AdamW), over an ``(8, N, 1280)`` view array against a ``(1, N, 1280)`` one
   with N = food101-10's 3,375 training images (random float16 values: the time does not depend on
   them), so the cost of 30 epochs over 8 views follows without building 8 views of every photo.
   The full ``fit()`` wall time on the real (clean-view) cache is in RESULTS.md from the study runs.
3. ``last``: a ``trainable="last:1"`` training step (the trunk's last stage, the 256-d neck and a
   softmax head learn; AdamW) on the frozen stages' cached maps against the same step on images,
   where the whole trunk runs forward every step (what training ``last:1`` costs without the cache),
   batch 64 at ``--image-size``, interleaved rounds, medians and the median per-round ratio.

Usage (from the repository root)::

    nice -n 10 .venv/bin/python benchmarks/bench_trunk_cache.py --sections build head
    .venv/bin/python benchmarks/bench_trunk_cache.py --sections last --threads 1
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from foodlib.data.augment import cache_side, eval_transform, normalization  # noqa: E402
from foodlib.data.cache import build_cache  # noqa: E402
from foodlib.data.loader import ImageSource  # noqa: E402
from foodlib.losses import create_loss  # noqa: E402
from foodlib.models import create_model  # noqa: E402
from foodlib.trainable import TrunkCut, apply_trainable, trunk_stages  # noqa: E402
from foodlib.runtime import autocast_dtype  # noqa: E402
import foodlib.trunk_cache as tc  # noqa: E402

# ../shared/data/food101-10 from a checkout; from a worktree under /work/wt/<branch>, two levels up
DATA = next((p for p in (REPO.parent / "shared" / "data" / "food101-10", REPO.parents[1] / "shared" / "data" / "food101-10")
             if p.is_dir()), REPO.parent / "shared" / "data" / "food101-10")


def _loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


def bench_build(args) -> None:
    paths = sorted(str(p) for p in (Path(args.data) / "train").rglob("*.jpg"))[:: max(1, 3750 // args.images)][: args.images]
    if not paths:
        raise SystemExit(f"no photos under {args.data}/train; pass --data ROOT (food101-10)")
    side = cache_side(args.image_size)
    source = ImageSource(paths, side, build_cache(paths, side, args.decoded_cache, progress=False))
    model = apply_trainable(create_model("efficientnet_lite0", pretrained=True), "head").eval()
    model = model.to(memory_format=torch.channels_last)
    device, amp = torch.device("cpu"), autocast_dtype("auto", torch.device("cpu"))
    norm = normalization(model)
    batches = [eval_transform(torch.from_numpy(np.ascontiguousarray(source.get_batch(np.arange(s, min(s + tc.BUILD_BATCH, len(paths)))))),
                              args.image_size, **norm) for s in range(0, len(paths), tc.BUILD_BATCH)]

    def plain() -> float:
        start = time.perf_counter()
        with torch.no_grad(), torch.autocast("cpu", dtype=amp or torch.bfloat16, enabled=amp is not None):
            for _ in range(args.views):
                for x in batches:
                    model.backbone(x)
        return args.views * len(paths) / (time.perf_counter() - start)

    def build() -> float:
        with tempfile.TemporaryDirectory() as folder:
            start = time.perf_counter()
            tc.trunk_features(model.backbone, source, args.image_size, norm, "standard", args.views, device, amp,
                              cache_dir=folder, progress=False)
            return args.views * len(paths) / (time.perf_counter() - start)

    with torch.no_grad():
        model.backbone(batches[0])  # warm-up: kernels picked before timing
    rates = {"plain": [], "build": []}
    print(f"load average at start: {_loadavg()}", file=sys.stderr)
    for r in range(args.rounds):
        for name, fn in (("plain", plain), ("build", build))[:: 1 if r % 2 == 0 else -1]:
            rates[name].append(fn())
            print(f"round {r + 1}: {name} {rates[name][-1]:.1f} img/s", file=sys.stderr)
    ratios = [b / p for b, p in zip(rates["build"], rates["plain"])]
    print(f"\n### Trunk cache build vs plain inference (EfficientNet-Lite0, {args.image_size} px, "
          f"{len(paths)} photos x {args.views} views, batch {tc.BUILD_BATCH}, {torch.get_num_threads()} threads, "
          f"amp {amp})\n")
    print("| | img/s (median of rounds) |\n|---|---|")
    print(f"| plain inference (normalised batches in memory) | {statistics.median(rates['plain']):.1f} |")
    print(f"| cache build (read + augment + forward + fp16 write) | {statistics.median(rates['build']):.1f} |")
    print(f"| ratio (median of per-round ratios) | {statistics.median(ratios):.2f} |")
    print(f"\nload average at end: {_loadavg()}; rounds: {args.rounds}")


def bench_head(args) -> None:
    n, dim, classes, epochs = 3375, 1280, 10, args.epochs
    rng = np.random.default_rng(0)
    labels = rng.integers(0, classes, n)
    results = {}
    print(f"load average at start: {_loadavg()}", file=sys.stderr)
    for views in (1, 8):
        clean = rng.standard_normal((1, n, dim)).astype(np.float16)
        augmented = rng.standard_normal((views, n, dim)).astype(np.float16) if views > 1 else None
        loader = tc.FeatureLoader(tc.FeatureSource(clean, augmented), labels, 64, shuffle=True, drop_last=True)
        torch.manual_seed(0)
        model = apply_trainable(create_model("efficientnet_lite0"), "head")  # the trunk never runs on features
        loss = create_loss("softmax", embedding_dim=dim, num_classes=classes)
        optimizer = torch.optim.AdamW(list(loss.parameters()), lr=2e-3)
        start = time.perf_counter()
        for epoch in range(epochs):
            loader.set_epoch(epoch)
            for features, y in loader:
                out = loss(model(features), y)
                optimizer.zero_grad(set_to_none=True)
                out.loss.backward()
                optimizer.step()
        results[views] = time.perf_counter() - start
        print(f"{views} view(s): {results[views]:.1f} s for {epochs} epochs", file=sys.stderr)
    print(f"\n### Head-only training on cached features ({n} x {dim} float16, batch 64, {epochs} epochs, softmax + AdamW, "
          f"{torch.get_num_threads()} threads)\n")
    print("| views K | seconds for the epochs | per epoch |\n|---|---|---|")
    for views, seconds in results.items():
        print(f"| {views} | {seconds:.1f} | {seconds / epochs:.2f} |")
    print(f"\nload average at end: {_loadavg()}")


def bench_last(args) -> None:
    torch.manual_seed(0)
    model = apply_trainable(create_model("efficientnet_lite0", pretrained=True, embedding_dim=256), "last:1")
    cut = TrunkCut(model.backbone, len(trunk_stages(model.backbone)) - 1)
    loss = create_loss("softmax", embedding_dim=256, num_classes=10)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad] + list(loss.parameters()), lr=1e-3)
    images = torch.randn(64, 3, args.image_size, args.image_size)  # normalised batch in memory: the trunk's cost only
    labels = torch.randint(0, 10, (64,))
    with torch.no_grad():
        maps = cut.first(images.contiguous()).half()  # what the cache stores for this batch
    model.cut = cut

    def step(x: torch.Tensor) -> None:
        out = loss(model(x), labels)
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        optimizer.step()

    def window(x: torch.Tensor) -> float:
        step(x)  # warm-up
        start = time.perf_counter()
        for _ in range(args.steps):
            step(x)
        return (time.perf_counter() - start) / args.steps

    model.train()
    print(f"load average at start: {_loadavg()}", file=sys.stderr)
    seconds = {"live": [], "cached": []}
    for r in range(args.rounds):
        for name, x in (("live", images), ("cached", maps))[:: 1 if r % 2 == 0 else -1]:
            seconds[name].append(window(x))
            print(f"round {r + 1}: {name} {seconds[name][-1] * 1000:.0f} ms/step", file=sys.stderr)
    ratio = statistics.median(a / b for a, b in zip(seconds["live"], seconds["cached"]))
    print(f"\n### trainable=last:1 step: cached maps vs the live trunk (EfficientNet-Lite0, {args.image_size} px, batch 64, "
          f"maps {tuple(maps.shape[1:])} float16, softmax + AdamW, {torch.get_num_threads()} threads, float32)\n")
    print("| input | ms per step (median of rounds) | steps of 64 |\n|---|---|---|")
    for name, label in (("live", "images: the whole trunk forward, the last stage backward"),
                        ("cached", "cached maps: the last stage, pooling, neck and head only")):
        print(f"| {label} | {statistics.median(seconds[name]) * 1000:.0f} | {args.steps} x {args.rounds} rounds |")
    print(f"| speed-up (median of per-round ratios) | {ratio:.1f}x | |")
    print(f"\nload average at end: {_loadavg()}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sections", nargs="+", default=["build", "head"], choices=["build", "head", "last"])
    parser.add_argument("--steps", type=int, default=5, help="timed steps per window (last)")
    parser.add_argument("--data", default=str(DATA))
    parser.add_argument("--image-size", type=int, default=160)
    parser.add_argument("--images", type=int, default=128, help="photos in the build benchmark")
    parser.add_argument("--views", type=int, default=2, help="augmented views built per photo (build benchmark)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--decoded-cache", default=None, help="decoded-image cache folder (default: foodlib's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if "build" in args.sections:
        bench_build(args)
    if "head" in args.sections:
        bench_head(args)
    if "last" in args.sections:
        bench_last(args)


if __name__ == "__main__":
    main()
