"""One prepared GPU check: ResNet-18 training images/s with foodlib's pipeline (target >= 3,000 on an H200).

For a session lent a GPU machine: run it once, paste the printed results line into
benchmarks/RESULTS.md. The loop is ``fit()``'s training step: uint8 batches from the decoded cache
(a synthetic memory-mapped cache by default, or real photos with ``--data``) through a
``BatchLoader`` with pinned memory -> non-blocking copy -> ``train_transform`` on the GPU ->
bf16 autocast forward (channels_last) -> float32 loss -> backward -> AdamW step (-> center update).
It also times the data path alone (loader + copy + augmentation, no model) so a slow number can
be told apart from a slow model, and optionally a host sync per step (fit() checks the loss for
NaN every step, which is such a sync) to measure what that costs.

Usage (from the repository root)::

    .venv/bin/python benchmarks/gpu_check.py                          # cuda, 224 px, batch 256
    .venv/bin/python benchmarks/gpu_check.py --compile --sync-every-step
    .venv/bin/python benchmarks/gpu_check.py --device cpu --steps 3   # smoke test, any machine
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from foodlib.data.augment import cache_side, train_transform  # noqa: E402
from foodlib.data.cache import DecodedImages  # noqa: E402
from foodlib.data.loader import BatchLoader, ImageSource  # noqa: E402
from foodlib.losses import create_loss  # noqa: E402
from foodlib.models import create_model  # noqa: E402

TARGET_IMG_PER_S = 3000  # on an H200, ResNet-18, 224 px, bf16


def synthetic_cache(folder: Path, count: int, side: int, num_classes: int, seed: int = 0):
    """A decoded-cache-shaped uint8 memmap ``(count, side, side, 3)`` of smooth random images, and labels."""
    rng = np.random.default_rng(seed)
    path = folder / "synthetic.u8"
    array = np.memmap(path, dtype=np.uint8, mode="w+", shape=(count, side, side, 3))
    coarse = rng.integers(0, 256, (count, 8, 8, 3), dtype=np.uint8)  # upsampled blocks: photo-like, not noise
    repeat = -(-side // 8)
    for start in range(0, count, 64):
        block = coarse[start : start + 64].repeat(repeat, axis=1).repeat(repeat, axis=2)
        array[start : start + 64] = block[:, :side, :side]
    array.flush()
    decoded = DecodedImages([f"synthetic/{i}" for i in range(count)], array, {}, str(path))
    return ImageSource(decoded.paths, side, decoded), rng.integers(0, num_classes, count)


def real_cache(root: str, image_size: int, cache_dir: Path | None):
    """The train split of an ImageFolder through foodlib's own load_data (builds the cache once)."""
    from foodlib.config import Config
    from foodlib.data import load_data

    cfg = Config.from_flat(data=root, image_size=image_size, **({"cache_dir": str(cache_dir)} if cache_dir else {}))
    t0 = time.perf_counter()
    data = load_data(cfg, progress=True)
    print(f"cache ready in {time.perf_counter() - t0:.1f} s ({len(data.labels('train'))} train images)", flush=True)
    return data.sources["train"], data.labels("train"), data.num_classes


def repeated(source: ImageSource, labels: np.ndarray, times: int) -> tuple[ImageSource, np.ndarray]:
    """The same cached photos ``times`` over (rows of the same memmap; nothing is copied)."""
    copy = ImageSource.__new__(ImageSource)
    copy.__dict__.update(source.__dict__, paths=source.paths * times, _rows=np.tile(source._rows, times))
    return copy, np.tile(labels, times)


def endless(loader, first_epoch: int = 0):
    """Batches across epoch boundaries, as a long run sees them: each epoch reshuffled (``set_epoch`` where the
    loader has it, as BatchLoader does; a plain DataLoader reshuffles by itself) and its workers started afresh."""
    epoch = first_epoch
    while True:
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)
        yield from loader
        epoch += 1


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", help="cuda | cuda:N | cpu (cpu: a smoke test of the script)")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=None, help="default: 256 on a GPU, 8 on the CPU")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default: 60 on a GPU, 3 on the CPU)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default: 15 on a GPU, 1 on the CPU)")
    p.add_argument("--workers", type=int, default=None, help="loader workers (default: 6 on a GPU, 0 on the CPU)")
    p.add_argument("--images", type=int, default=None,
                   help="synthetic images (default: 32 batches' worth on a GPU, so epoch ends are rare as in a real run)")
    p.add_argument("--data", default=None, help="an ImageFolder root instead of synthetic images")
    p.add_argument("--cache-dir", type=Path, default=None)
    p.add_argument("--loss", default="softmax", help="softmax | center | lgm | island")
    p.add_argument("--num-classes", type=int, default=59, help="classes of the synthetic data")
    p.add_argument("--amp", choices=["bf16", "off"], default="bf16")
    p.add_argument("--no-channels-last", dest="channels_last", action="store_false")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (slow start)")
    p.add_argument("--sync-every-step", action="store_true", help="a host sync per step, like fit()'s NaN check")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA GPU visible; run with --device cpu for a smoke test", file=sys.stderr)
        return 2
    gpu = device.type == "cuda"
    batch = args.batch_size or (256 if gpu else 8)
    steps = args.steps or (60 if gpu else 3)
    warmup = args.warmup if args.warmup is not None else (15 if gpu else 1)
    workers = args.workers if args.workers is not None else (6 if gpu else 0)
    if gpu:
        torch.backends.cudnn.benchmark = True  # fixed shapes: pick the fastest convolution once
    name = torch.cuda.get_device_name(device) if gpu else "CPU"
    print(f"gpu_check: {name}, torch {torch.__version__}, batch {batch}, {args.image_size} px, amp={args.amp}, "
          f"channels_last={args.channels_last}, compile={args.compile}, workers={workers}", flush=True)

    tmp = Path(tempfile.mkdtemp(prefix="foodlib-gpu-check-"))
    try:
        if args.data:
            source, labels, num_classes = real_cache(args.data, args.image_size, args.cache_dir)
            if gpu:  # a small set: go through it several times per epoch, as 28k photos would, so that
                source, labels = repeated(source, labels, -(-32 * batch // len(labels)))  # loader restarts stay rare
        else:
            num_classes = args.num_classes
            count = args.images or batch * (32 if gpu else 2)
            source, labels = synthetic_cache(tmp, count, cache_side(args.image_size), num_classes)
        loader = BatchLoader(source, labels, batch, shuffle=True, seed=0, drop_last=True, workers=workers,
                             pin_memory=gpu)
        batches = endless(loader)
        generator = torch.Generator().manual_seed(0)

        def next_batch():
            images, y = next(batches)
            images, y = images.to(device, non_blocking=True), y.to(device, non_blocking=True)
            return train_transform(images, args.image_size, generator, channels_last=args.channels_last), y

        # -- the data path alone --------------------------------------------------------------
        for _ in range(2):
            next_batch()
        sync(device)
        t0 = time.perf_counter()
        for _ in range(steps):
            next_batch()
        sync(device)
        data_rate = steps * batch / (time.perf_counter() - t0)

        # -- training steps --------------------------------------------------------------------
        torch.manual_seed(0)
        memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
        model = create_model("resnet18").to(device, memory_format=memory_format)
        loss = create_loss(args.loss, embedding_dim=model.embedding_dim, num_classes=num_classes).to(device)
        optimizer = torch.optim.AdamW(list(model.parameters()) + list(loss.parameters()), lr=1e-3, weight_decay=5e-4)
        forward = torch.compile(model) if args.compile else model
        amp = args.amp == "bf16"

        def train_step() -> torch.Tensor:
            x, y = next_batch()
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                embedding = forward(x)  # (N, D)
                out = loss(embedding, y)  # float32 loss math inside
            optimizer.zero_grad(set_to_none=True)
            out.loss.backward()
            optimizer.step()
            loss.update_centers(embedding.detach().float(), y)
            if args.sync_every_step:
                bool(torch.isfinite(out.loss))  # what fit()'s per-step NaN check costs
            return out.loss.detach()

        t_warm = time.perf_counter()
        for _ in range(warmup):
            train_step()
        sync(device)
        warm_s = time.perf_counter() - t_warm
        t0 = time.perf_counter()
        for _ in range(steps):
            last = train_step()
        sync(device)
        seconds = time.perf_counter() - t0
        rate = steps * batch / seconds
        if not torch.isfinite(last):
            print(f"the loss became {float(last)}: the numbers below are not a valid training run", file=sys.stderr)
            return 1
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    memory = f", peak GPU memory {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB" if gpu else ""
    print(f"warm-up {warmup} steps in {warm_s:.1f} s; timed {steps} steps in {seconds:.2f} s{memory}")
    print(f"data path alone (loader + copy + train_transform): {data_rate:,.0f} img/s")
    print(f"training: {rate:,.0f} img/s (final loss {float(last):.3f})")
    verdict = ("meets" if rate >= TARGET_IMG_PER_S else "below") + f" the {TARGET_IMG_PER_S:,} img/s H200 target"
    command = " ".join([".venv/bin/python", "benchmarks/gpu_check.py", *(argv if argv is not None else sys.argv[1:])])
    print("results line for benchmarks/RESULTS.md:")
    print(f"| {time.strftime('%Y-%m-%d')} | {name} | resnet18 {args.image_size} px, {args.loss}, amp={args.amp}, "
          f"channels_last={args.channels_last}, compile={args.compile}, batch {batch}, "
          f"{'real photos' if args.data else 'synthetic cache'}, {workers} workers"
          f"{', sync every step' if args.sync_every_step else ''} | {rate:,.0f} img/s | data path {data_rate:,.0f} img/s "
          f"| {verdict if gpu else 'CPU smoke test, not a measurement'} | `{command}` |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
