"""Training: one readable ``fit()`` from a Config to a run folder, plus its small helpers.

>>> result = fit(Config.from_flat(data="dishes", backbone="smallcnn", epochs=2, out="runs/try"))  # doctest: +SKIP
>>> result.metrics["test"]["top1"]                                                              # doctest: +SKIP
0.71

The run folder gets ``config.yaml``, ``run.json`` (seed, versions, git commit), ``splits/``,
``trace.csv`` (one row per epoch and split), ``last.pt`` (every epoch, for ``resume``),
``best.pt`` (best val top-1), ``metrics.json`` and, after training, ``features.npz`` and ``figures/``.
Every randomness of epoch e derives from (seed, e): resuming from ``last.pt`` replays exactly the
run that was interrupted, wherever it was killed.
"""
from __future__ import annotations

import contextlib
import csv
import io
import math
import pickle
import platform
import re
import subprocess
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn
from tqdm import tqdm  # text bars: saved in executed notebooks, unlike widgets

from foodlib.config import Config, ConfigError
from foodlib.data import Data, load_data
from foodlib.data.augment import augment_options, eval_transform, normalization, train_transform
from foodlib.analysis import analyse_run
from foodlib.distributed import (DistInfo, all_reduce_sum, average_batchnorm_statistics, barrier, broadcast_state,
                                 check_in_sync, cleanup_distributed, dump_rank_state, in_turns, maybe_sync_batchnorm,
                                 setup_distributed, wrap_ddp)
from foodlib.files import atomic_torch_save, atomic_write_json, atomic_write_text, folder_lock, remove_stale_temp_files
from foodlib.losses import DiscriminativeLoss, create_loss, loss_options
from foodlib.messages import logger
from foodlib.models import EmbeddingNet, backbone_preprocessing, create_model
from foodlib.openset import evaluate_openset
from foodlib.runtime import autocast_dtype, describe_device_and_precision, loader_workers, resolve_device
from foodlib.runfolder import check_resume_config, check_run_folder, check_writable
from foodlib.tensorboard_log import RunBoard
from foodlib.trainable import apply_trainable, cut_for_cache
from foodlib.trunk_cache import with_trunk_features
import foodlib

CHECKPOINT_FORMAT = 1


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or infinite; the message names the epoch, the step and the term."""


class CheckpointError(RuntimeError):
    """A checkpoint is unreadable or does not fit the run (classes, architecture)."""


@dataclass
class RunResult:
    run_dir: Path
    metrics: dict[str, Any]
    model: EmbeddingNet
    loss: DiscriminativeLoss
    data: Data
    trace: list[dict[str, Any]] = field(default_factory=list)


# ----- small helpers beside the loop ------------------------------------------------------------

def build_optimizers(cfg: Config, model: nn.Module, loss: DiscriminativeLoss):
    """The network optimizer (network + loss head) and, for learnable centers, their own SGD.

    Weight decay applies to the network's weight matrices and to the loss parameters the loss
    names in ``loss.weight_decay_parameters()`` (a linear classifier's weight); never to biases,
    norm layers or class state (centers, Gaussian means, log-variances): pulling class state
    towards the origin would fight the loss. Centers in ``update="sgd"`` mode get a plain SGD
    optimizer with ``center_lr`` (the paper's center step, independent of the network's
    optimizer and not scaled by lam).
    """
    state_ids = {id(p) for p in loss.state_parameters()}
    loss_decay_ids = {id(p) for p in loss.weight_decay_parameters()}
    decay, no_decay = [], []
    # Parameter order (network first, then the loss) fixes the optimizer state's layout in last.pt.
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim > 1 else no_decay).append(p)
    for p in loss.parameters():
        if p.requires_grad and id(p) not in state_ids:
            (decay if id(p) in loss_decay_ids else no_decay).append(p)
    groups = [
        {"params": decay, "weight_decay": cfg.optim.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    o = cfg.optim
    if o.optimizer == "sgd":
        optimizer = torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum, nesterov=o.momentum > 0)
    elif o.optimizer == "adamw":
        optimizer = torch.optim.AdamW(groups, lr=o.lr)
    else:  # adagrad, as in the user's earlier ResNet-18 study (README)
        optimizer = torch.optim.Adagrad(groups, lr=o.lr)
    center_params = list(loss.state_parameters())
    center_optimizer = torch.optim.SGD(center_params, lr=cfg.optim.center_lr) if center_params else None
    return optimizer, center_optimizer


def lr_factor(cfg: Config, step: int, steps_per_epoch: int) -> float:
    """Multiplier of the peak lr at a global step: linear warm-up, then cosine / step / constant."""
    total = cfg.train.epochs * steps_per_epoch
    warmup = int(cfg.optim.warmup_epochs * steps_per_epoch)
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    if cfg.optim.schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    if cfg.optim.schedule == "step":  # x0.1 at 50% and again at 75% of training
        return 0.1 ** ((progress >= 0.5) + (progress >= 0.75))
    return 1.0


def loss_kwargs(cfg: Config) -> dict[str, Any]:
    """The config's value of every option the loss's constructor takes; None ("the loss's own
    default") is left out."""
    return {name: getattr(cfg.loss, name) for name in loss_options(cfg.loss.loss)
            if getattr(cfg.loss, name, None) is not None}


def class_balance(cfg: Config, loss: DiscriminativeLoss) -> int:
    """Images per class in each training batch: the config's ``samples_per_class``, else what the
    loss asks for (``loss.samples_per_class``, e.g. 4 for pml pair losses); 0 means plain shuffling."""
    if cfg.train.samples_per_class is not None:
        return cfg.train.samples_per_class
    return int(getattr(loss, "samples_per_class", 0) or 0)


def build_model_and_loss(cfg: Config, num_classes: int) -> tuple[EmbeddingNet, DiscriminativeLoss]:
    torch.manual_seed(cfg.train.seed)  # weights and class state depend on the seed alone
    model = create_model(cfg.model.backbone, cfg.model.embedding_dim, cfg.model.pretrained)
    apply_trainable(model, cfg.model.trainable)  # frozen stages: no gradient, always eval mode
    loss = create_loss(cfg.loss.loss, embedding_dim=model.embedding_dim, num_classes=num_classes, strict=False,
                       **loss_kwargs(cfg))
    return model, loss


def non_finite_tensors(model: nn.Module, loss: DiscriminativeLoss) -> list[str]:
    """Names of floating-point parameters and buffers (BatchNorm statistics, centers) holding NaN or inf."""
    named = [*model.state_dict().items(), *((f"loss.{k}", v) for k, v in loss.state_dict().items())]
    return [name for name, t in named if t.is_floating_point() and not bool(torch.isfinite(t).all())]


def kept_checkpoint(last_path: Path, epoch: int) -> str:
    """What survives a run stopped during (0-based) ``epoch``, for error messages."""
    if epoch == 0:
        return "no epoch finished, so there is no checkpoint"
    return f"{last_path} holds the last good epoch ({epoch})"


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, ks=(1, 5)) -> torch.Tensor:
    """Number of samples whose label is among the top-k logits, for each k (k clamped to C); a tensor."""
    top = logits.topk(min(max(ks), logits.shape[1]), dim=1).indices  # (N, k)
    hits = top == labels[:, None]
    return torch.stack([hits[:, : min(k, logits.shape[1])].any(dim=1).sum() for k in ks])


def batch_stats(out, logits: torch.Tensor, labels: torch.Tensor, term_names) -> torch.Tensor:
    """[n, top-1 hits, top-5 hits, loss * n, term * n ...] as one float64 tensor on the batch's device.

    Summed over an epoch and read once at its end: no per-step device sync on GPUs.
    """
    # torch.full fills on the device; new_tensor(len(labels)) would copy from the host and wait for the GPU
    n = torch.full((1,), float(len(labels)), dtype=torch.float64, device=labels.device)
    hits = topk_correct(logits, labels).double()
    values = torch.stack([out.loss.detach(), *(out.terms[t].detach() for t in term_names)]).double() * n
    return torch.cat([n, hits, values])


def summarise_stats(sums: torch.Tensor, term_names) -> dict[str, float]:
    """Means from summed :func:`batch_stats` (all-reduced across ranks first)."""
    sums = all_reduce_sum(sums).cpu()
    n = max(1.0, float(sums[0]))
    out = {"n": int(sums[0]), "loss": float(sums[3]) / n}
    out.update({t: float(sums[4 + i]) / n for i, t in enumerate(term_names)})
    out.update({"top1": float(sums[1]) / n, "top5": float(sums[2]) / n})
    return out


def epoch_seed(seed: int, epoch: int, rank: int = 0) -> int:
    """A well-mixed 32-bit seed for (seed, epoch, rank): every random draw of an epoch derives from it."""
    return int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1)[0])


def epoch_generator(seed: int, epoch: int, rank: int = 0) -> torch.Generator:
    """The augmentation random stream of one epoch on one rank."""
    return torch.Generator().manual_seed(epoch_seed(seed, epoch, rank))


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                             text=True, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def run_info(cfg: Config, device: torch.device, info: DistInfo) -> dict[str, Any]:
    import torchvision


    return {
        "seed": cfg.train.seed, "device": str(device), "world_size": info.world_size,
        "foodlib": foodlib.__version__, "torch": torch.__version__, "torchvision": torchvision.__version__,
        "python": platform.python_version(), "platform": platform.platform(), "git_commit": _git_commit(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def write_trace(path: Path, rows: list[dict[str, Any]]) -> None:
    """Rewrite trace.csv (atomically) from all rows so far; columns are the union, in first-seen order."""
    columns: list[str] = []
    for row in rows:
        columns += [c for c in row if c not in columns]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, buffer.getvalue())


#: What ``last.pt`` must hold for ``resume`` (best.pt holds only the weights).
RESUME_KEYS = ("config", "classes", "model", "loss", "optimizer", "scaler", "center_optimizer", "epoch",
               "best_top1", "best_epoch", "trace")


def read_resume_checkpoint(path: Path, cfg: Config) -> dict[str, Any]:
    """``last.pt`` checked for resuming ``cfg``: readable, complete, and trained with the same config."""
    ckpt = load_checkpoint(path)
    missing = [key for key in RESUME_KEYS if key not in ckpt]
    if missing:
        raise CheckpointError(f"{path} lacks {missing} and cannot be resumed; it is not a foodlib last.pt")
    check_resume_config(ckpt["config"], cfg, path)
    trained, now = checkpoint_interpolation(ckpt), backbone_preprocessing(cfg.model.backbone).interpolation
    if trained != now:
        raise CheckpointError(f"{path} was trained on {trained}-resampled images (an older foodlib); this foodlib "
                              f"resamples {cfg.model.backbone} {now}, as its weights expect: finish the run with the "
                              "foodlib that started it, or start it afresh with --overwrite")
    return ckpt


def checkpoint_interpolation(ckpt: dict[str, Any]) -> str:
    """The resampling a checkpoint's run decoded and augmented with; bilinear before it was recorded."""
    return ckpt.get("interpolation", "bilinear")


def _first_line(error: BaseException) -> str:
    """The first non-empty line of an error's message: user-facing errors stay on one line."""
    return next((line.strip() for line in str(error).splitlines() if line.strip()), type(error).__name__)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a foodlib checkpoint, with a clear error for a missing, truncated or foreign file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        # weights_only: tensors and plain values only. A run folder may come from someone else, and a
        # full unpickle would run whatever code an object in it names (its __reduce__).
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        refused = re.search(r"GLOBAL ([\w.]+)", str(error))
        if refused is None:
            raise CheckpointError(
                f"checkpoint {path} is corrupt or truncated ({type(error).__name__}: {_first_line(error)}); "
                "delete it and resume from the other checkpoint (last.pt / best.pt) or retrain"
            ) from error
        raise CheckpointError(
            f"checkpoint {path} holds a Python object ({refused.group(1)}), not only tensors and plain values; "
            "foodlib refuses to load it because unpickling it could run code. Retrain, or get the run from its author"
        ) from error
    except Exception as error:
        raise CheckpointError(
            f"checkpoint {path} is corrupt or truncated ({type(error).__name__}: {_first_line(error)}); "
            "delete it and resume from the other checkpoint (last.pt / best.pt) or retrain"
        ) from error
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not a foodlib checkpoint (format {CHECKPOINT_FORMAT})")
    missing = [key for key in ("config", "classes", "model", "loss", "epoch") if key not in ckpt]
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks {missing}; it is damaged or from another program")
    return ckpt


@torch.no_grad()
def evaluate(
    model: nn.Module, loss: DiscriminativeLoss, loader, image_size: int, device: torch.device,
    amp_dtype: torch.dtype | None = None, channels_last: bool = True, progress: bool = False, desc: str = "eval",
) -> dict[str, Any]:
    """Loss (training objective, margin included), each term, and top-1/top-5 from ``loss.predict``.

    Under DDP each rank evaluates its shard and the sums are all-reduced.
    """
    model.eval()
    loss.eval()  # the loop sets both back to train mode at the next epoch
    sums = torch.zeros(4 + len(loss.term_names), dtype=torch.float64, device=device)
    for images, labels in tqdm(loader, desc=desc, disable=not progress, leave=False):
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        x = eval_transform(images, image_size, channels_last, **normalization(model))
        with torch.autocast(device.type, dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None):
            embedding = model(x)
        out = loss(embedding, labels)
        sums += batch_stats(out, loss.predict(embedding), labels, loss.term_names)
    return summarise_stats(sums, loss.term_names)


class NonFiniteWatch:
    """Stops a run whose loss turned NaN or infinite, naming the epoch, the step and the term.

    Reading a loss value back forces the CPU to wait for a GPU, so on GPUs the flags stay on the
    device and are read every ``every`` steps and at the epoch's end; the message still names
    the first bad step. On CPUs the check is free and runs every step.
    """

    def __init__(self, term_names: tuple[str, ...], device: torch.device, steps_per_epoch: int,
                 every: int | None = None):
        self.names = ("total", *term_names)
        self.every = every or (1 if device.type == "cpu" else 10)
        self.last_step = steps_per_epoch - 1
        self.first_bad = torch.full((), -1, dtype=torch.long, device=device)
        self.bad_terms = torch.zeros(len(self.names), dtype=torch.bool, device=device)
        self.bad_value = torch.zeros((), device=device)

    def observe(self, step: int, out) -> None:
        values = torch.stack([out.loss.detach(), *(out.terms[t].detach() for t in self.names[1:])])
        bad = ~torch.isfinite(values)  # (1 + T,)
        first = (self.first_bad < 0) & bad.any()
        self.first_bad = torch.where(first, torch.full_like(self.first_bad, step), self.first_bad)
        self.bad_terms = torch.where(first, bad, self.bad_terms)
        self.bad_value = torch.where(first, values[0].float(), self.bad_value)

    def check(self, epoch: int, step: int, kept: str) -> None:
        if step % self.every and step != self.last_step:
            return
        first_bad = int(self.first_bad)  # the only device sync, every `every` steps
        if first_bad >= 0:
            terms = [name for name, bad in zip(self.names[1:], self.bad_terms[1:].tolist()) if bad] or ["total"]
            raise NonFiniteLossError(
                f"loss is {float(self.bad_value)} at epoch {epoch + 1}, step {first_bad + 1} of {self.last_step + 1} "
                f"(non-finite term(s): {', '.join(terms)}); the run stopped and {kept}. "
                "Lower lr or lam, or check the data."
            )


# ----- the loop -------------------------------------------------------------------------------

def fit(cfg: Config, data: Data | None = None, on_epoch: Callable[[int, list[dict[str, Any]]], None] | None = None
        ) -> RunResult:
    """Train ``cfg`` end to end and write the run folder; returns metrics, model, loss and data.

    Phases per epoch: schedules -> train (lr, forward, loss, backward, step, center update) ->
    val -> trace -> checkpoints. After the last epoch: best checkpoint -> val/test metrics ->
    features, feature metrics and figures (``features`` / ``figures`` config switches).

    One fit() writes a run folder at a time: a second one aimed at the same ``out`` (another
    notebook, terminal or suite) fails at once with :class:`~foodlib.files.FolderBusyError`.

    ``on_epoch(epoch, trace)`` (optional) is called after each epoch's checkpoints are saved, with
    the 1-based epoch and every trace row so far (resumed epochs included); an exception it raises
    stops the run there, its last.pt intact (``foodlib tune`` prunes hopeless trials this way).
    """
    cfg.validate()
    t_start = time.time()
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    device = resolve_device(cfg.train.device)
    info = setup_distributed(device)
    try:
        if info.enabled and device.type == "cuda":
            device = torch.device("cuda", info.local_rank)
        run_dir = Path(cfg.train.out).expanduser()
        new_folder = info.is_main and not run_dir.exists()
        try:
            if info.is_main:
                check_writable(run_dir)  # a read-only or missing parent: one clear line, not a PermissionError deep inside
            # Rank 0 is the folder's only writer, so it alone holds the lock (torchrun stops the other ranks if it fails).
            with folder_lock(run_dir, f"a training run ({cfg.train.out})") if info.is_main else contextlib.nullcontext():
                return _fit(cfg, data, device, info, run_dir, t_start, on_epoch)
        except BaseException:
            if new_folder:
                remove_unstarted_run(run_dir)
            raise
    finally:
        if info.enabled:
            cleanup_distributed()  # also when the run fails: the process group never outlives fit()


def remove_unstarted_run(run_dir: Path) -> None:
    """Remove a run folder that this fit() created and that holds no finished epoch (no trace.csv,
    no checkpoint): a typo in ``data`` or missing weights leaves no half-made run behind."""
    if not any((run_dir / name).exists() for name in ("trace.csv", "last.pt", "best.pt")):
        shutil.rmtree(run_dir, ignore_errors=True)


def _fit(cfg: Config, data: Data | None, device: torch.device, info: DistInfo, run_dir: Path, t_start: float,
         on_epoch: Callable[[int, list[dict[str, Any]]], None] | None = None) -> RunResult:
    """fit()'s body, with the run folder locked: set up, the epoch loop, then the final evaluation."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes (training drops the last partial batch): pick once
    main = info.is_main
    progress = main and not cfg.train.quiet
    log = logger.info if main else (lambda *a, **k: None)
    resume_ckpt = _prepare_run_folder(cfg, run_dir, device, info, log)  # checked before anything is rewritten

    # -- data, model, loss, optimizers --------------------------------------------------------
    if data is None:
        # rank 0 generates / decodes first, the other ranks then reuse its files (no K-fold work)
        data = in_turns(load_data, cfg, run_dir if main else None, progress=progress)
    log(f"data: {data.index.summary()}")
    model, loss = _on_device(cfg, *build_model_and_loss(cfg, data.num_classes), device, info)
    optimizer, center_optimizer = build_optimizers(cfg, model, loss)
    optimizers = [o for o in (optimizer, center_optimizer) if o is not None]
    amp_dtype = autocast_dtype(cfg.train.amp, device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    log(describe_device_and_precision(cfg.train.amp, device, amp_dtype))
    if cfg.model.trainable != "all" and cfg.data.trunk_cache:
        # the frozen part runs once per image and view (cached across runs); batches become its outputs
        _, no_cache = cut_for_cache(model)
        if no_cache:
            log(f"trunk cache: not used ({no_cache}); training on live images")
        else:
            data = with_trunk_features(data, model, cfg, device, amp_dtype, progress=progress)
    loader_kw = _loader_options(cfg, device, info)
    train_loader, val_loader = _training_loaders(cfg, data, loss, loader_kw)
    steps_per_epoch = len(train_loader)
    forward = _step_module(cfg, model, loss, device, info)  # DDP-wrapped and compiled where asked

    # -- resume ------------------------------------------------------------------------------
    base_lrs = [g["lr"] for g in optimizer.param_groups]  # peak lrs: read before a resumed state overwrites them
    checkpoints = _Checkpoints(cfg, run_dir, data.classes, model, loss, optimizer, center_optimizer, scaler)
    run = _Progress()
    if resume_ckpt is not None:
        run = checkpoints.restore(resume_ckpt)
        log(f"resuming {run_dir} after epoch {run.epoch} (best val top-1 {run.best_top1:.4f} at epoch {run.best_epoch})")
    board = RunBoard.open(cfg, run_dir, main, run.epoch)  # TensorBoard (foodlib/tensorboard_log.py)

    for epoch in range(run.epoch, cfg.train.epochs):
        # -- schedules -----------------------------------------------------------------------
        # Everything below is a function of (seed, epoch), never of what ran before in this
        # process, so resuming from last.pt replays the interrupted epoch exactly: lam / margin
        # warm-ups (set_progress), shuffling (set_epoch), augmentation (generator), and any other
        # draw from torch's global generator (dropout in timm backbones, DataLoader worker seeds).
        loss.set_progress(epoch, cfg.train.epochs)
        torch.manual_seed(epoch_seed(cfg.train.seed, epoch, info.rank))
        train_loader.set_epoch(epoch)
        generator = epoch_generator(cfg.train.seed, epoch, info.rank)

        # -- train ---------------------------------------------------------------------------
        model.train()
        loss.train()
        sums = torch.zeros(4 + len(loss.term_names), dtype=torch.float64, device=device)
        watch = NonFiniteWatch(loss.term_names, device, steps_per_epoch)
        t_epoch = time.time()
        bar = tqdm(train_loader, desc=f"epoch {epoch + 1}/{cfg.train.epochs}", disable=not progress, leave=False)
        for step, (images, labels) in enumerate(bar):
            for group, base in zip(optimizer.param_groups, base_lrs):
                group["lr"] = base * lr_factor(cfg, epoch * steps_per_epoch + step, steps_per_epoch)
            images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            x = _training_input(cfg, images, generator, model)  # augmented, normalised (N, 3, S, S)

            with torch.autocast(device.type, dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None):
                embedding, out = forward(x, labels)  # (N, D), LossOutput in float32
            with torch.no_grad():  # top-1/top-5 from the margin-free logits (as in val), before the step changes the head
                predicted = loss.predict(embedding.detach())  # (N, C); loss and terms keep the margin
            watch.observe(step, out)
            watch.check(epoch, step, kept_checkpoint(checkpoints.last_path, epoch))

            for o in optimizers:
                o.zero_grad(set_to_none=True)
            scaler.scale(out.loss).backward()
            for o in optimizers:
                scaler.step(o)
            scaler.update()
            loss.update_centers(embedding.detach().float(), labels)  # Center Loss Algorithm 1 (paper mode)

            sums += batch_stats(out, predicted, labels, loss.term_names)
            if progress and step % 10 == 0:
                bar.set_postfix(loss=f"{float(out.loss.detach()):.3f}", top1=f"{float(sums[1] / sums[0]):.3f}")
        train = summarise_stats(sums, loss.term_names)  # all-reduced: a device sync, then the epoch's time
        train_row = _trace_row(epoch, "train", optimizer.param_groups[0]["lr"], train, time.time() - t_epoch)
        average_batchnorm_statistics(model)  # every rank evaluates and saves the same running statistics

        # -- val -----------------------------------------------------------------------------
        val_row = None
        if val_loader is not None:
            t_val = time.time()
            val = evaluate(model, loss, val_loader, cfg.data.image_size, device, amp_dtype, cfg.train.channels_last,
                           progress, desc="val")
            val_row = _trace_row(epoch, "val", train_row["lr"], val, time.time() - t_val)
        run.trace += [row for row in (train_row, val_row) if row is not None]
        log(_epoch_line(epoch, cfg.train.epochs, train_row, val_row))

        # -- checkpoints ---------------------------------------------------------------------
        check_weights_finite(model, loss, epoch, steps_per_epoch, checkpoints.last_path)
        improved = run.finish_epoch(epoch, (val_row or train_row)["top1"])  # no val split: train accuracy decides
        if main:
            checkpoints.save(run, improved, board)
        barrier()
        if on_epoch is not None:
            on_epoch(epoch + 1, run.trace)

    dump_rank_state(model, loss)  # debugging aid, FOODLIB_RANK_STATE_DIR (docs/distributed.md)
    check_in_sync(model, loss)  # DDP and the center all-reduce must leave every rank with the same state

    # -- final evaluation from the best checkpoint ----------------------------------------------
    checkpoints.load_best()
    metrics: dict[str, Any] = {"best_epoch": run.best_epoch, "epochs": cfg.train.epochs}
    for split in _final_splits(cfg, data):
        loader = data.loader(split, cfg.train.batch_size, shuffle=False, **loader_kw)
        metrics[split] = evaluate(model, loss, loader, cfg.data.image_size, device, amp_dtype,
                                  cfg.train.channels_last, progress, desc=split)
    metrics.update(_speed_metrics(run.trace), bad_files=len(data.bad_files))
    if main:
        if cfg.train.features:
            metrics = _analyse(cfg, run_dir, model, loss, data, metrics, device, run.trace, progress)
        metrics["wall_seconds"] = round(time.time() - t_start, 2)
        atomic_write_json(run_dir / "metrics.json", metrics)
        board.finish(metrics, data, run_dir)
        log(f"done: {run_dir} " + " ".join(
            f"{s} top1 {metrics[s]['top1']:.3f}" for s in ("val", "test") if "top1" in metrics.get(s, {})))
    board.close()
    barrier()
    return RunResult(run_dir, metrics, model, loss, data, run.trace)


# ----- _fit's named steps, in the order it calls them ---------------------------------------------

def _prepare_run_folder(cfg: Config, run_dir: Path, device: torch.device, info: DistInfo,
                        log: Callable[[str], None]) -> dict[str, Any] | None:
    """Check the run folder, read ``last.pt`` when resuming, then write config.yaml and run.json.

    ``last.pt`` is read and checked before anything in the folder is rewritten: a refused resume
    leaves the run's config.yaml and run.json as they were. Returns the checkpoint to resume
    from, or None for a fresh run.
    """
    if info.is_main:
        check_run_folder(run_dir, cfg, log)  # a finished run is replaced only with overwrite=True
    last_path = run_dir / "last.pt"
    resume_ckpt = read_resume_checkpoint(last_path, cfg) if cfg.train.resume and last_path.exists() else None
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        remove_stale_temp_files(run_dir)  # half-written files of a killed run; the real ones are intact
        cfg.with_overrides(overwrite=False).to_yaml(run_dir / "config.yaml")  # never carried on to a rerun
        atomic_write_json(run_dir / "run.json", run_info(cfg, device, info))
    return resume_ckpt


def _on_device(cfg: Config, model: EmbeddingNet, loss: DiscriminativeLoss, device: torch.device, info: DistInfo
               ) -> tuple[EmbeddingNet, DiscriminativeLoss]:
    """Model (SyncBatchNorm where asked, channels-last where asked) and loss moved to ``device``."""
    model = maybe_sync_batchnorm(model, cfg.train.sync_bn, device, info.world_size)
    apply_trainable(model, model.trainable)  # again: the frozen stages must list the SyncBatchNorms that replaced theirs
    memory_format = torch.channels_last if cfg.train.channels_last else torch.contiguous_format
    return model.to(device, memory_format=memory_format), loss.to(device)


def _loader_options(cfg: Config, device: torch.device, info: DistInfo) -> dict[str, Any]:
    """Keyword arguments of every loader of the run: processes, pinned memory, this rank's shard."""
    return dict(workers=loader_workers(cfg, device), pin_memory=device.type == "cuda", rank=info.rank,
                world_size=info.world_size)


def _training_loaders(cfg: Config, data: Data, loss: DiscriminativeLoss, loader_kw: dict[str, Any]):
    """The training loader (class-balanced when the loss or the config asks) and the val loader (or None).

    Raises:
        ConfigError: a batch size that does not split over the processes, that the class balance
            cannot fill, or that is larger than the training split.
    """
    world_size = loader_kw["world_size"]
    if world_size > 1 and cfg.train.batch_size % world_size:
        raise ConfigError(f"batch_size={cfg.train.batch_size} must be divisible by the {world_size} processes")
    train_loader = data.loader("train", cfg.train.batch_size, shuffle=True, seed=cfg.train.seed, **loader_kw)
    samples_per_class = class_balance(cfg, loss)
    if samples_per_class:  # pair / triplet losses: m images per class in every batch (and on every rank)
        try:
            train_loader = data.balanced_loader("train", cfg.train.batch_size, samples_per_class, seed=cfg.train.seed,
                                                **loader_kw)
        except ValueError as error:
            raise ConfigError(f"loss={cfg.loss.loss!r}: {error}") from None
    val_split = "val" if "val" in data.index.splits and len(data.index.splits["val"]) else None
    val_loader = data.loader(val_split, cfg.train.batch_size, shuffle=False, **loader_kw) if val_split else None
    if len(train_loader) == 0:
        raise ConfigError(
            f"batch_size={cfg.train.batch_size} is larger than the {len(data.labels('train'))} training images; "
            "lower batch_size"
        )
    return train_loader, val_loader


def _step_module(cfg: Config, model: EmbeddingNet, loss: DiscriminativeLoss, device: torch.device,
                 info: DistInfo) -> nn.Module:
    """What a training step calls: ``(images, labels) -> (embedding, LossOutput)``.

    The loss joins the DDP module so its parameters (classifier, sgd centers, L-GM means) are
    synchronised like the network's; paper-mode centers all-reduce inside update_centers().
    """
    step_module = _ModelAndLoss(model, loss)
    if info.enabled:
        step_module = wrap_ddp(step_module, device)  # no per-step buffer broadcast: see its docstring
    return torch.compile(step_module) if cfg.train.compile else step_module


@dataclass
class _Progress:
    """Where a run stands; last.pt carries it, so a resumed run goes on from there."""

    epoch: int = 0  # epochs finished
    best_top1: float = -1.0  # best val top-1 so far (train top-1 without a val split)
    best_epoch: int = -1  # its 1-based epoch
    trace: list[dict[str, Any]] = field(default_factory=list)  # the rows of trace.csv

    def finish_epoch(self, epoch: int, score: float) -> bool:
        """Mark (0-based) ``epoch`` finished with val top-1 ``score``; True if it is the best so far."""
        self.epoch = epoch + 1
        improved = score > self.best_top1
        if improved:
            self.best_top1, self.best_epoch = score, epoch + 1
        return improved


class _Checkpoints:
    """A run's ``last.pt`` (every epoch: all that resume needs) and ``best.pt`` (the best epoch's weights)."""

    def __init__(self, cfg: Config, run_dir: Path, classes: list[str], model: EmbeddingNet, loss: DiscriminativeLoss,
                 optimizer: torch.optim.Optimizer, center_optimizer: torch.optim.Optimizer | None,
                 scaler: torch.amp.GradScaler):
        self.cfg, self.run_dir, self.classes = cfg, run_dir, classes
        self.model, self.loss, self.optimizer, self.center_optimizer, self.scaler = (
            model, loss, optimizer, center_optimizer, scaler)
        self.last_path, self.best_path = run_dir / "last.pt", run_dir / "best.pt"

    def restore(self, ckpt: dict[str, Any]) -> _Progress:
        """Put model, loss, optimizers and scaler back where ``ckpt`` (a checked last.pt) stopped."""
        check_checkpoint_classes(ckpt, self.classes, self.cfg.data.data, self.last_path)
        self.model.load_state_dict(ckpt["model"])
        self.loss.load_state_dict(ckpt["loss"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        if self.center_optimizer is not None:
            self.center_optimizer.load_state_dict(ckpt["center_optimizer"])
        self.scaler.load_state_dict(ckpt["scaler"])
        return _Progress(ckpt["epoch"], ckpt["best_top1"], ckpt["best_epoch"], ckpt["trace"])

    def save(self, run: _Progress, improved: bool, board: RunBoard) -> None:
        """After epoch ``run.epoch`` (rank 0 only): best.pt if it improved, trace.csv, TensorBoard, last.pt.

        last.pt comes last: a run killed before it is written resumes from the previous epoch,
        whose trace rows last.pt carries.
        """
        weights = {"format": CHECKPOINT_FORMAT, "config": self.cfg.to_dict(), "classes": self.classes,
                   "model": self.model.state_dict(), "loss": self.loss.state_dict(),
                   "image_size": self.cfg.data.image_size, "embedding_dim": self.model.embedding_dim,
                   "interpolation": normalization(self.model)["interpolation"]}
        if improved:
            atomic_torch_save(self.best_path, {**weights, "epoch": run.epoch, "val_top1": run.best_top1})
        write_trace(self.run_dir / "trace.csv", run.trace)
        board.log_epoch(run.trace, run.epoch)
        atomic_torch_save(self.last_path, {
            **weights, "epoch": run.epoch, "best_top1": run.best_top1, "best_epoch": run.best_epoch,
            "trace": run.trace, "optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict(),
            "center_optimizer": self.center_optimizer.state_dict() if self.center_optimizer is not None else None,
        })

    def load_best(self) -> None:
        """Load best.pt into model and loss (rank 0's copy on every rank, also when ``out`` is not shared)."""
        if self.best_path.exists():
            best = load_checkpoint(self.best_path)
            self.model.load_state_dict(best["model"])
            self.loss.load_state_dict(best["loss"])
        broadcast_state(self.model)
        broadcast_state(self.loss)


def check_checkpoint_classes(ckpt: dict[str, Any], classes: list[str], data_name: str, path: Path) -> None:
    """Raise CheckpointError unless ``ckpt`` was trained on ``classes`` in the same order."""
    if ckpt["classes"] == classes:
        return
    only_ckpt = sorted(set(ckpt["classes"]) - set(classes))
    only_data = sorted(set(classes) - set(ckpt["classes"]))
    raise CheckpointError(
        f"{path} was trained on {len(ckpt['classes'])} classes, the data {data_name!r} has "
        f"{len(classes)}: only in the checkpoint {only_ckpt[:10]}, only in the data {only_data[:10]}"
        + ("" if only_ckpt or only_data else " (same names, different order)")
        + "; resume with the data the run was trained on"
    )


def _training_input(cfg: Config, images: torch.Tensor, generator: torch.Generator, model: EmbeddingNet
                    ) -> torch.Tensor:
    """A training batch as the network sees it: augmented with the epoch's ``generator``, normalised."""
    if cfg.train.augment == "none":
        return eval_transform(images, cfg.data.image_size, cfg.train.channels_last, **normalization(model))
    return train_transform(images, cfg.data.image_size, generator, channels_last=cfg.train.channels_last,
                           **augment_options(cfg.train.augment), **normalization(model))


def _trace_row(epoch: int, split: str, lr: float, stats: dict[str, Any], seconds: float) -> dict[str, Any]:
    """One trace.csv row for (0-based) ``epoch`` from :func:`summarise_stats` / :func:`evaluate` numbers.

    Columns: epoch (1-based), split, lr, loss, each term, top1, top5, seconds, img_per_s.
    """
    return {"epoch": epoch + 1, "split": split, "lr": lr, **{k: v for k, v in stats.items() if k != "n"},
            "seconds": round(seconds, 3), "img_per_s": round(stats["n"] / max(seconds, 1e-9), 1)}


def _epoch_line(epoch: int, epochs: int, train_row: dict[str, Any], val_row: dict[str, Any] | None) -> str:
    """The log line of (0-based) ``epoch`` from its trace rows."""
    return (f"epoch {epoch + 1}/{epochs}: train loss {train_row['loss']:.4f} top1 {train_row['top1']:.3f}"
            + (f" | val loss {val_row['loss']:.4f} top1 {val_row['top1']:.3f}" if val_row is not None else "")
            + f" | {train_row['img_per_s']:.0f} img/s")


def check_weights_finite(model: nn.Module, loss: DiscriminativeLoss, epoch: int, steps_per_epoch: int,
                         last_path: Path) -> None:
    """Raise NonFiniteLossError if a weight or buffer turned NaN or infinite during (0-based) ``epoch``.

    A NaN gradient on the epoch's last step leaves non-finite weights behind a finite loss;
    checked once per epoch, before saving, so that damaged weights never replace the last good last.pt.
    """
    damaged = non_finite_tensors(model, loss)
    if damaged:
        raise NonFiniteLossError(
            f"after epoch {epoch + 1} (step {steps_per_epoch} of {steps_per_epoch}) these weights are NaN or "
            f"infinite: {', '.join(damaged[:5])}{' ...' if len(damaged) > 5 else ''}; the run stopped and "
            f"{kept_checkpoint(last_path, epoch)}. Lower lr or lam, or check the data."
        )


def _final_splits(cfg: Config, data: Data) -> list[str]:
    """The non-empty splits evaluated from the best checkpoint: val, and test unless ``eval_test=False``."""
    splits = [s for s in ("val", "test") if s in data.index.splits and len(data.index.splits[s])]
    return [s for s in splits if cfg.train.eval_test or s != "test"]


def _speed_metrics(trace: list[dict[str, Any]]) -> dict[str, Any]:
    """Training time and median training speed over the run's epochs (resumed ones included)."""
    train_rows = [r for r in trace if r["split"] == "train"]
    return {"train_seconds": round(sum(r["seconds"] for r in train_rows), 2),
            "train_img_per_s": round(float(np.median([r["img_per_s"] for r in train_rows])), 1) if train_rows else None}


def _analyse(cfg: Config, run_dir: Path, model: EmbeddingNet, loss: DiscriminativeLoss, data: Data,
             metrics: dict[str, Any], device: torch.device, trace: list[dict[str, Any]], progress: bool
             ) -> dict[str, Any]:
    """features.npz, feature metrics and figures, then the open-set numbers (``novel_classes``), added to ``metrics``."""

    metrics = analyse_run(run_dir, model, loss, data, cfg, metrics, device=device, figures=cfg.train.figures,
                          trace=trace, progress=progress)
    return evaluate_openset(run_dir, model, loss, data, cfg, metrics, device=device, progress=progress)

class _ModelAndLoss(nn.Module):
    """Network and loss as one module, so DDP synchronises both and autocast covers the forward."""

    def __init__(self, model: nn.Module, loss: DiscriminativeLoss):
        super().__init__()
        self.model, self.loss = model, loss

    def forward(self, images: torch.Tensor, labels: torch.Tensor):
        embedding = self.model(images)  # (N, D)
        return embedding, self.loss(embedding, labels)


def load_run(run_dir: str | Path, checkpoint: str = "best.pt", device: str | torch.device = "cpu"):
    """Model, loss, config and classes of a finished run, in eval mode.

    >>> model, loss, cfg, classes = load_run("runs/demo/softmax-s0")   # doctest: +SKIP
    """
    ckpt = load_checkpoint(Path(run_dir) / checkpoint)
    cfg = Config.from_dict(ckpt["config"])
    model, loss = build_model_and_loss(cfg.with_overrides(pretrained=False), len(ckpt["classes"]))
    # the resampling the run was trained with (older runs: bilinear), which predict and export then use
    model.preprocessing = replace(model.preprocessing, interpolation=checkpoint_interpolation(ckpt))
    model.load_state_dict(ckpt["model"])
    loss.load_state_dict(ckpt["loss"])
    device = torch.device(device)
    return model.to(device).eval(), loss.to(device).eval(), cfg, ckpt["classes"]

