"""Training speed of foodlib's pipeline against the earlier attempt's, on the same photos and model.

The earlier attempt trained at about 230 images/s on a GPU, bound by JPEG decoding in the data
loader, in float32. This script measures, in ONE run so that machine noise hits every number alike:

1. the one-time cost of the decoded cache (cold build, then a warm reuse: stat + hash + open);
2. data-pipeline throughput alone (images/s a loader delivers, no model): the earlier style
   (torchvision ``ImageFolder`` + PIL + ``RandomResizedCrop`` + flip + ``ToTensor`` + ``Normalize``
   in DataLoader workers) against foodlib's ``BatchLoader`` over the cache, with and without
   :func:`foodlib.data.augment.train_transform`;
3. end-to-end steady-state training steps (wait for batch -> augment -> forward, loss, backward,
   optimizer step) of the same ResNet-18 + softmax head at the same image size and batch size,
   with the same DataLoader worker budget: the earlier style in float32 NCHW, foodlib in float32
   NCHW (data pipeline alone changed), and foodlib with bf16 autocast + channels_last (what
   ``fit(amp="bf16")`` does);
4. ``fit()`` itself: its own per-epoch training images/s (second epoch, cache already built);
5. optionally (``--sections levers``) the model step alone under each precision x memory layout x
   thread count, to tell which CPU levers matter on the machine at hand; with ``fit`` in the same
   run, ``fit()``'s img/s over the model step's at fit's own precision and layout (the model-step
   limit: how much of it the whole training loop keeps).

``--backbone efficientnet_lite0 --pretrained`` times full fine-tuning of the pretrained Lite0
(issue 24: ``trainable: all``, every weight trains) instead of ResNet-18 from scratch.

Trials are interleaved: each round runs one timed window of every pipeline, in a rotated order, and
each window opens a fresh loader (its worker start-up and one warm-up step are not timed), so no
pipeline's workers prefetch in the background of another's window. Reported: the median images/s
over windows, the ratio of medians, and the median of per-round ratios (rounds pair neighbouring
windows, so the paired ratio is the more robust number on a shared machine).

Usage (from the repository root)::

    .venv/bin/python benchmarks/bench_pipeline.py --threads 1             # the main RESULTS.md run
    .venv/bin/python benchmarks/bench_pipeline.py                         # torch's default threads
    .venv/bin/python benchmarks/bench_pipeline.py --rounds 2 --steps 2 --sections data e2e   # a quick look
    .venv/bin/python benchmarks/bench_pipeline.py --sections levers --lever-threads 1 2     # CPU levers
    .venv/bin/python benchmarks/bench_pipeline.py --backbone efficientnet_lite0 --pretrained --image-size 160 \
        --sections levers fit --fit-amp off --threads 1                # Lite0 fine-tune vs its model step
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from foodlib.config import Config  # noqa: E402
from foodlib.data import load_data  # noqa: E402
from foodlib.data.augment import IMAGENET_MEAN, IMAGENET_STD, cache_side, train_transform  # noqa: E402
from foodlib.losses import create_loss  # noqa: E402
from gpu_check import endless  # noqa: E402  (benchmarks/ is on the path: this script's folder)
from foodlib.models import create_model  # noqa: E402
from foodlib.runtime import autocast_dtype  # noqa: E402

DEFAULT_DATA = REPO.parent / "shared" / "data" / "food101-10"
SECTIONS = ("data", "e2e", "fit", "levers")


# ----- machine -------------------------------------------------------------------------------

def machine_info() -> dict:
    """CPU model, cores, torch version and threads, bf16 units, load averages: the results' context."""
    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    capabilities = torch.cpu.get_capabilities() if hasattr(torch.cpu, "get_capabilities") else {}
    info = {
        "cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads(),
        "amx_bf16": bool(capabilities.get("amx_bf16", False)),
        "avx512_bf16": bool(capabilities.get("avx512_bf16", False)),
        "python": platform.python_version(), "loadavg_start": _loadavg(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def _loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def median(values) -> float:
    return float(statistics.median(values)) if values else float("nan")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----- the two data pipelines ------------------------------------------------------------------

def earlier_style_loader(root: Path, image_size: int, batch_size: int, workers: int, seed: int, device: torch.device):
    """The earlier attempt's input pipeline: decode + augment every JPEG, every epoch, in the workers."""
    from torchvision import datasets, transforms

    transform = transforms.Compose([
        transforms.RandomResizedCrop(image_size),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])
    dataset = datasets.ImageFolder(str(root / "train"), transform=transform)
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=True, drop_last=True, num_workers=workers,
        pin_memory=device.type == "cuda", generator=torch.Generator().manual_seed(seed),
    )


@dataclass
class Pipeline:
    """One way of feeding the model: ``open(window)`` starts a fresh loader; ``prepare`` runs on the device.

    ``prepare`` turns what the loader yields into the float batch the model sees: foodlib's batch
    augmentation for the cache pipeline, nothing for the earlier style (its workers did it).
    """

    name: str
    open: Callable[[int], Iterator]
    prepare: Callable[[torch.Tensor, torch.Generator, bool], torch.Tensor]  # (batch, generator, channels_last)


def make_pipelines(args, data, device: torch.device) -> dict[str, Pipeline]:
    def open_earlier(window: int) -> Iterator:
        return endless(earlier_style_loader(args.data, args.image_size, args.batch_size, args.workers, window,
                                                  device), window)

    def open_cached(window: int) -> Iterator:
        loader = data.loader("train", args.batch_size, shuffle=True, seed=0, workers=args.workers,
                             pin_memory=device.type == "cuda")
        return endless(loader, 1000 * window)

    def augment(images: torch.Tensor, generator: torch.Generator, channels_last: bool) -> torch.Tensor:
        # as fit() calls it: straight into the model's memory layout
        return train_transform(images.to(device, non_blocking=True), args.image_size, generator,
                               channels_last=channels_last)

    def copy(images: torch.Tensor, generator: torch.Generator, channels_last: bool) -> torch.Tensor:
        return images.to(device, non_blocking=True)

    return {
        "earlier": Pipeline("earlier", open_earlier, copy),
        "cached": Pipeline("cached", open_cached, augment),
        "cached_uint8": Pipeline("cached_uint8", open_cached, copy),
    }


# ----- one training configuration ------------------------------------------------------------

class Trainer:
    """The backbone's embedding (ResNet-18 unless ``--backbone``) + foodlib softmax head + AdamW; one
    optimizer step per call, every weight training.

    Every trainer starts from the same weights (seeded), so variants differ only in precision,
    memory layout and the data pipeline feeding them.
    """

    def __init__(self, num_classes: int, amp: bool, channels_last: bool, device: torch.device, seed: int = 0,
                 backbone: str = "resnet18", pretrained: bool = False):
        torch.manual_seed(seed)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.model = create_model(backbone, pretrained=pretrained).to(device, memory_format=self.memory_format)
        self.loss = create_loss("softmax", embedding_dim=self.model.embedding_dim, num_classes=num_classes).to(device)
        params = list(self.model.parameters()) + list(self.loss.parameters())
        self.optimizer = torch.optim.AdamW(params, lr=1e-3, weight_decay=5e-4)
        self.amp, self.device, self.channels_last = amp, device, channels_last

    def step(self, x: torch.Tensor, labels: torch.Tensor) -> None:
        x = x.contiguous(memory_format=self.memory_format)
        labels = labels.to(self.device, non_blocking=True)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            out = self.loss(self.model(x), labels)  # (N, D) embedding -> LossOutput (float32 math)
        self.optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        self.optimizer.step()


@dataclass
class Variant:
    name: str
    label: str
    pipeline: Pipeline
    trainer: Trainer | None  # None: data pipeline only
    windows: list[dict] = field(default_factory=list)


def run_window(variant: Variant, window: int, steps: int, warmup: int, device: torch.device,
               phase_sync: bool = True) -> dict:
    """Open a fresh loader, run ``warmup`` untimed steps, then time ``steps`` steps phase by phase.

    ``phase_sync``: wait for the device after each phase, so the phase times are device times. Off
    on a GPU by default: the waits would stop the host from queuing the next step while the GPU
    works, which training never does; the phases are then host times and only the total is device time.
    """
    generator = torch.Generator().manual_seed(window)
    batches = variant.pipeline.open(window)

    def one_step(times: dict | None) -> int:
        t0 = time.perf_counter()
        images, labels = next(batches)
        t1 = time.perf_counter()
        x = variant.pipeline.prepare(images, generator, variant.trainer.channels_last if variant.trainer else True)
        if phase_sync:
            sync(device)
        t2 = time.perf_counter()
        if variant.trainer is not None:
            variant.trainer.step(x, labels)
            if phase_sync:
                sync(device)
        t3 = time.perf_counter()
        if times is not None:
            times["wait"] += t1 - t0
            times["prepare"] += t2 - t1
            times["compute"] += t3 - t2
        return len(labels)

    for _ in range(warmup):
        one_step(None)
    sync(device)
    times = {"wait": 0.0, "prepare": 0.0, "compute": 0.0}
    start = time.perf_counter()
    images = sum(one_step(times) for _ in range(steps))
    sync(device)
    seconds = time.perf_counter() - start
    batches = None  # drops the loader, which shuts its workers down: nothing prefetches during other windows
    gc.collect()
    return {"images": images, "seconds": seconds, "img_per_s": images / seconds,
            **{f"{k}_ms_per_batch": 1000 * v / steps for k, v in times.items()}}


def interleave(variants: list[Variant], rounds: int, steps: int, warmup: int, device: torch.device, log) -> None:
    """``rounds`` rounds; each runs one window of every variant, the order rotated every round."""
    for r in range(rounds):
        order = variants[r % len(variants):] + variants[: r % len(variants)]
        for variant in order:
            result = run_window(variant, window=r, steps=steps, warmup=warmup, device=device,
                                phase_sync=device.type != "cuda")
            variant.windows.append(result)
            log(f"  round {r + 1}/{rounds} {variant.name:18s} {result['img_per_s']:8.1f} img/s "
                f"(wait {result['wait_ms_per_batch']:.0f} ms, prepare {result['prepare_ms_per_batch']:.0f} ms, "
                f"compute {result['compute_ms_per_batch']:.0f} ms per batch)")


def summarise(variant: Variant) -> dict:
    rates = [w["img_per_s"] for w in variant.windows]
    out = {"label": variant.label, "img_per_s_median": median(rates), "img_per_s_windows": [round(x, 1) for x in rates]}
    for phase in ("wait", "prepare", "compute"):
        out[f"{phase}_ms_per_batch_median"] = median([w[f"{phase}_ms_per_batch"] for w in variant.windows])
    return out


def ratios(numerator: Variant, denominator: Variant) -> dict:
    """Ratio of medians, and the median of per-round ratios (round r of both: neighbouring windows)."""
    paired = [a["img_per_s"] / b["img_per_s"] for a, b in zip(numerator.windows, denominator.windows)]
    return {"ratio_of_medians": summarise(numerator)["img_per_s_median"] / summarise(denominator)["img_per_s_median"],
            "median_paired_ratio": median(paired), "paired_ratios": [round(x, 2) for x in paired]}


# ----- the cache and fit() ----------------------------------------------------------------------

def time_cache(cfg: Config) -> tuple[object, dict]:
    """Cold build of the decoded cache (fresh folder), then a warm reuse; returns the data and seconds."""
    t0 = time.perf_counter()
    load_data(cfg, progress=False)
    cold = time.perf_counter() - t0
    t0 = time.perf_counter()
    data = load_data(cfg, progress=False)
    warm = time.perf_counter() - t0
    n_images = sum(len(s) for s in data.index.splits.values())
    return data, {"images": n_images, "side": data.side, "cold_build_s": cold, "warm_reuse_s": warm,
                  "build_img_per_s": n_images / cold}


def time_fit(args, cache_dir: Path, out_dir: Path, amp: str, log) -> dict:
    """``fit()`` on a per-class-limited copy of the data; its own per-epoch training img/s."""
    from foodlib.train import fit

    cfg = Config.from_flat(
        data=str(args.data), image_size=args.image_size, backbone=args.backbone, pretrained=args.pretrained,
        trainable="all", loss="softmax",
        epochs=args.fit_epochs, batch_size=args.batch_size, workers=args.workers, amp=amp, channels_last=amp != "off",
        limit_per_class=args.fit_per_class, cache_dir=str(cache_dir), out=str(out_dir / f"fit-{amp}"),
        quiet=True, features=False, figures=False, eval_test=False, device=str(args.device),
    )
    data = load_data(cfg, progress=False)  # build this subset's cache outside fit's timing
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):  # fit's epoch lines are progress, not the report
        result = fit(cfg, data=data)
    wall = time.perf_counter() - t0
    epochs = [row for row in result.trace if row["split"] == "train"]
    log(f"  fit(amp={amp}): " + ", ".join(f"epoch {r['epoch']} {r['img_per_s']:.1f} img/s" for r in epochs))
    return {"amp": amp, "autocast": str(autocast_dtype(amp, torch.device(args.device))),
            "channels_last": cfg.train.channels_last, "train_images": len(data.labels("train")),
            "epoch_img_per_s": [r["img_per_s"] for r in epochs], "steady_img_per_s": epochs[-1]["img_per_s"],
            "wall_s": wall}


# ----- levers of the model step alone -------------------------------------------------------------

def measure_levers(args, num_classes: int, device: torch.device, log) -> dict:
    """The model step alone (a ready float batch, no loader) under each precision x layout x threads.

    Answers which CPU levers matter here: channels_last, bf16 autocast (fast only with AMX units),
    and the number of compute threads (on a shared 2-core machine OpenMP threads that wait for
    each other at every barrier can cost more than they bring). Interleaved like the rest.
    """
    thread_counts = args.lever_threads or [torch.get_num_threads()]
    precisions = [amp == "bf16" for amp in args.lever_amp]
    configs = [(amp, cl, t) for t in thread_counts for amp in precisions for cl in (False, True)]
    trainers = {(amp, cl): Trainer(num_classes, amp=amp, channels_last=cl, device=device, backbone=args.backbone,
                                   pretrained=args.pretrained) for amp in precisions for cl in (False, True)}
    x = torch.randn(args.batch_size, 3, args.image_size, args.image_size, device=device)
    labels = torch.randint(0, num_classes, (args.batch_size,))
    rates: dict[tuple, list[float]] = {c: [] for c in configs}
    for r in range(args.rounds):
        order = configs[r % len(configs):] + configs[: r % len(configs)]
        for amp, cl, threads in order:
            torch.set_num_threads(threads)
            trainer = trainers[(amp, cl)]
            trainer.step(x, labels)  # warm-up after the switch
            sync(device)
            t0 = time.perf_counter()
            for _ in range(args.steps):
                trainer.step(x, labels)
            sync(device)
            rates[(amp, cl, threads)].append(args.steps * args.batch_size / (time.perf_counter() - t0))
        log(f"  round {r + 1}/{args.rounds}: " + ", ".join(
            f"{'bf16' if a else 'fp32'}/{'CL' if c else 'NCHW'}/{t}t {rates[(a, c, t)][-1]:.1f}" for a, c, t in configs))
    torch.set_num_threads(args.threads or thread_counts[0])
    rows = []
    for amp, cl, threads in configs:
        base = rates.get((False, False, threads)) or rates[(amp, False, threads)]
        rows.append({"amp": "bf16" if amp else "fp32", "channels_last": cl, "threads": threads,
                     "img_per_s_median": median(rates[(amp, cl, threads)]),
                     "img_per_s_windows": [round(v, 1) for v in rates[(amp, cl, threads)]],
                     "vs_fp32_nchw_paired": median([a / b for a, b in zip(rates[(amp, cl, threads)], base)])})
    return {"rows": rows}


def levers_markdown(levers: dict) -> list[str]:
    lines = ["", "Model step alone (ready float batch, no loader), by lever:", "",
             "| precision | layout | threads | median img/s | vs float32 NCHW, same threads (median paired) | windows |",
             "|---|---|---:|---:|---:|---|"]
    for row in levers["rows"]:
        lines.append(f"| {row['amp']} | {'channels_last' if row['channels_last'] else 'NCHW'} | {row['threads']} "
                     f"| {row['img_per_s_median']:.1f} | {row['vs_fp32_nchw_paired']:.2f}x "
                     f"| {', '.join(map(str, row['img_per_s_windows']))} |")
    return lines


# ----- report ---------------------------------------------------------------------------------

def markdown(report: dict) -> str:
    a, m = report["args"], report["machine"]
    s, r, c = report["summary"], report["ratios"], report["cache"]
    lines = [
        f"Command: `{report['command']}`  ",
        f"Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']} with {m['threads']} compute thread(s), "
        f"AMX-bf16 {'yes' if m['amx_bf16'] else 'no'}{', GPU ' + m['gpu'] if m.get('gpu') else ''}; load average {m['loadavg_start']} at start, "
        f"{m['loadavg_end']} at end (shared machine). Date {report['date']}, wall time {report['wall_s']:.0f} s.  ",
        f"Setting: {a['backbone']}{' (pretrained, every weight trains)' if a['pretrained'] else ''} + softmax head, "
        f"AdamW, {a['image_size']} px, batch {a['batch_size']}, "
        f"{a['workers']} DataLoader workers for every pipeline, {a['rounds']} interleaved rounds x "
        f"{a['steps']} timed steps after {a['warmup']} warm-up step(s) per window (fresh loader per window)"
        + ("; on the GPU the phase columns are host times (no wait for the device between phases)."
           if a["device"].startswith("cuda") else "."),
        "",
        f"Decoded cache (one-time): {c['images']} images at {c['side']} px built in {c['cold_build_s']:.1f} s "
        f"({c['build_img_per_s']:.0f} img/s); reused (stat + hash + open) in {c['warm_reuse_s']:.2f} s.",
    ]
    if s or report.get("fit"):
        lines += ["", "| pipeline | median img/s | wait for batch | augment / copy | model step | windows (img/s) |",
                  "|---|---:|---:|---:|---:|---|"]
    for key in ("data_earlier", "data_cached_uint8", "data_cached", "e2e_earlier", "e2e_cached_fp32", "e2e_cached_bf16"):
        if key in s:
            v = s[key]
            lines.append(f"| {v['label']} | {v['img_per_s_median']:.1f} | {v['wait_ms_per_batch_median']:.0f} ms "
                         f"| {v['prepare_ms_per_batch_median']:.0f} ms | {v['compute_ms_per_batch_median']:.0f} ms "
                         f"| {', '.join(map(str, v['img_per_s_windows']))} |")
    for f in report.get("fit", []):
        lines.append(f"| `fit()` amp={f['amp']}, channels_last={f['channels_last']} ({f['train_images']} train "
                     f"images, epoch {len(f['epoch_img_per_s'])} of {len(f['epoch_img_per_s'])}) "
                     f"| {f['steady_img_per_s']:.1f} | | | | per epoch: {', '.join(map(str, f['epoch_img_per_s']))} |")
    if r:
        lines += ["", "| ratio | of medians | median of paired rounds | per round |", "|---|---:|---:|---|"]
    for value in r.values():
        lines.append(f"| {value['label']} | {value['ratio_of_medians']:.2f}x | {value['median_paired_ratio']:.2f}x "
                     f"| {', '.join(map(str, value['paired_ratios']))} |")
    for f in report.get("fit", []) if "e2e_earlier" in s else []:
        base = s["e2e_earlier"]["img_per_s_median"]
        lines.append(f"| `fit()` amp={f['amp']} / earlier style (fit not interleaved) "
                     f"| {f['steady_img_per_s'] / base:.2f}x | | |")
    if report.get("levers"):
        lines += levers_markdown(report["levers"])
    lines += fit_limit_markdown(report)
    return "\n".join(lines)


def fit_limit_markdown(report: dict) -> list[str]:
    """``fit()``'s steady img/s over the model step alone at the same precision, layout and threads."""
    rows = []
    for f in report.get("fit", []):
        amp = "bf16" if f.get("autocast") == "torch.bfloat16" else "fp32"
        step = next((r for r in (report.get("levers") or {}).get("rows", []) if r["amp"] == amp
                     and r["channels_last"] == f["channels_last"] and r["threads"] == report["machine"]["threads"]), None)
        if step is not None:
            rows.append(f"| `fit()` amp={f['amp']} ({amp}, {'channels_last' if f['channels_last'] else 'NCHW'}) "
                        f"| {f['steady_img_per_s']:.1f} | {step['img_per_s_median']:.1f} "
                        f"| **{f['steady_img_per_s'] / step['img_per_s_median']:.2f}** |")
    if not rows:
        return []
    return ["", "Model-step limit: what share of the model step alone `fit()` keeps (same precision, layout, threads):", "",
            "| run | fit() img/s (last epoch) | model step alone img/s | fit / step |", "|---|---:|---:|---:|", *rows]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="ImageFolder root with train/ (food101-10)")
    p.add_argument("--image-size", type=int, default=112)
    p.add_argument("--backbone", default="resnet18", help="model of every trainer and of fit() (e.g. efficientnet_lite0)")
    p.add_argument("--pretrained", action="store_true", help="start from the installed ImageNet weights")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers, the same for every pipeline")
    p.add_argument("--threads", type=int, default=None, help="torch compute threads (default: torch's choice)")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds (one window per pipeline each)")
    p.add_argument("--steps", type=int, default=3, help="timed training steps per window")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per window, after the loader opens")
    p.add_argument("--data-batches", type=int, default=8, help="timed batches per data-only window")
    p.add_argument("--fit-amp", nargs="+", default=["bf16", "off"], help="amp settings to time fit() with")
    p.add_argument("--fit-epochs", type=int, default=2)
    p.add_argument("--fit-per-class", type=int, default=48, help="limit_per_class of the fit() run")
    p.add_argument("--cache-dir", type=Path, default=None, help="default: a fresh temporary folder (cold build)")
    p.add_argument("--sections", nargs="+", choices=SECTIONS, default=["data", "e2e", "fit"],
                   help="what to measure: data (loaders alone), e2e (interleaved training steps), fit (fit()'s own "
                        "img/s), levers (the model step alone per precision x layout x threads)")
    p.add_argument("--lever-amp", nargs="+", choices=["fp32", "bf16"], default=["fp32", "bf16"],
                   help="precisions of --sections levers (bf16 is slow without AMX: fp32 alone saves time there)")
    p.add_argument("--lever-threads", type=int, nargs="+", default=None, help="thread counts for --levers (default: current)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", type=Path, default=None, help="also write the raw numbers here")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if not (args.data / "train").is_dir():
        print(f"no ImageFolder train/ under {args.data}; pass --data ROOT (food101-10)", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    log = lambda *a: print(*a, file=sys.stderr, flush=True)  # noqa: E731
    t_start = time.perf_counter()
    machine = machine_info()
    tmp = Path(tempfile.mkdtemp(prefix="foodlib-bench-"))
    cache_dir = args.cache_dir or tmp / "cache"

    log(f"cache: decoding {args.data} at {cache_side(args.image_size)} px into {cache_dir}")
    cfg = Config.from_flat(data=str(args.data), image_size=args.image_size, cache_dir=str(cache_dir))
    data, cache = time_cache(cfg)
    log(f"  cold build {cache['cold_build_s']:.1f} s, warm reuse {cache['warm_reuse_s']:.2f} s")

    pipes = make_pipelines(args, data, device)
    data_variants = [
        Variant("data_earlier", "data only: earlier style (ImageFolder + PIL + RandomResizedCrop, workers)", pipes["earlier"], None),
        Variant("data_cached_uint8", "data only: foodlib BatchLoader over the cache (uint8 batches)", pipes["cached_uint8"], None),
        Variant("data_cached", "data only: foodlib BatchLoader + train_transform (float batches)", pipes["cached"], None),
    ]
    if "data" in args.sections:
        log("data pipeline only")
        interleave(data_variants, args.rounds, args.data_batches, 1, device, log)

    num_classes = data.num_classes
    e2e_variants = []
    if "e2e" in args.sections:
        e2e_variants = [
            Variant("e2e_earlier", "end to end: earlier style, float32, NCHW", pipes["earlier"],
                    Trainer(num_classes, amp=False, channels_last=False, device=device, backbone=args.backbone,
                            pretrained=args.pretrained)),
            Variant("e2e_cached_fp32", "end to end: foodlib cache + batch augment, float32, NCHW", pipes["cached"],
                    Trainer(num_classes, amp=False, channels_last=False, device=device, backbone=args.backbone,
                            pretrained=args.pretrained)),
            Variant("e2e_cached_bf16", "end to end: foodlib cache + batch augment, bf16 autocast, channels_last",
                    pipes["cached"], Trainer(num_classes, amp=True, channels_last=True, device=device,
                                             backbone=args.backbone, pretrained=args.pretrained)),
        ]
        log("end-to-end training steps")
        interleave(e2e_variants, args.rounds, args.steps, args.warmup, device, log)

    levers = None
    if "levers" in args.sections:
        log("model step alone, by lever")
        levers = measure_levers(args, num_classes, device, log)

    fits = []
    if "fit" in args.sections:
        log("fit()")
        for amp in args.fit_amp:
            fits.append(time_fit(args, cache_dir, tmp, amp, log))

    by_name = {v.name: v for v in data_variants + e2e_variants if v.windows}
    pairs = {
        "data_cached": ("data_cached", "data_earlier", "data only: foodlib (+ train_transform) / earlier style"),
        "data_cached_uint8": ("data_cached_uint8", "data_earlier", "data only: foodlib loader (uint8) / earlier style"),
        "e2e_fp32": ("e2e_cached_fp32", "e2e_earlier", "end to end: foodlib float32 / earlier style (data pipeline alone)"),
        "e2e_bf16": ("e2e_cached_bf16", "e2e_earlier", "**end to end: foodlib bf16 + channels_last / earlier style**"),
        "precision": ("e2e_cached_bf16", "e2e_cached_fp32", "end to end: foodlib bf16 + channels_last / foodlib float32"),
    }
    pairs = {k: v for k, v in pairs.items() if v[0] in by_name and v[1] in by_name}
    machine["loadavg_end"] = _loadavg()
    report = {
        "command": " ".join([".venv/bin/python", "benchmarks/bench_pipeline.py", *(argv if argv is not None else sys.argv[1:])]),
        "date": time.strftime("%Y-%m-%d %H:%M"), "machine": machine,
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "cache": cache,
        "summary": {name: summarise(v) for name, v in by_name.items()},
        "ratios": {key: {"label": label, **ratios(by_name[a], by_name[b])} for key, (a, b, label) in pairs.items()},
        "fit": fits, "levers": levers, "wall_s": time.perf_counter() - t_start,
    }
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    print(markdown(report))
    import shutil

    shutil.rmtree(tmp, ignore_errors=True)  # the fit() run folders, and the cache unless --cache-dir
    return 0


if __name__ == "__main__":
    sys.exit(main())
