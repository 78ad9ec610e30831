"""torchrun / DistributedDataParallel helpers: who am I, set up, keep ranks in step, launch.

``foodlib train`` started by ``torchrun --nproc_per_node=K`` reads RANK / WORLD_SIZE / LOCAL_RANK
(and MASTER_ADDR / MASTER_PORT) from the environment torchrun sets; a plain ``python`` start is a
world of one and every helper here is then a no-op. ``fit()`` uses them as follows (the full
story, with the commands, is in docs/distributed.md):

* :func:`setup_distributed`: one process group, nccl on GPUs and gloo on CPUs, plus a gloo
  side group with a long timeout for the waits on rank 0's file work (:func:`barrier`).
* :func:`in_turns`: data preparation (dishes generation, decoded cache) runs on rank 0 first,
  then on the first process of every other node, then everywhere else; the others reuse it.
* :func:`wrap_ddp`: the network and the loss in one DDP module (the loss's parameters too).
* :func:`maybe_sync_batchnorm`, :func:`average_batchnorm_statistics`: BatchNorm across ranks.
* :func:`check_in_sync`, :func:`dump_rank_state`: proof that the ranks ended with the same state.
* :func:`broadcast_state`: rank 0's best checkpoint on every rank, also when ``out`` is node-local.

>>> dist_info()           # in a plain python process
DistInfo(rank=0, world_size=1, local_rank=0)
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Callable, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from foodlib.errors import ConfigError
from foodlib.files import atomic_torch_save

T = TypeVar("T")

#: Timeout of the waits in :func:`barrier` and :func:`in_turns`. Other ranks wait there while rank 0
#: decodes the cache or extracts features and draws figures, which can take far longer than nccl's
#: default 10 minutes on a large dataset; a crashed rank is still noticed at once, because torchrun
#: stops the whole group when one process dies.
WAIT_FOR_MAIN_TIMEOUT = timedelta(hours=6)

#: Environment variable naming a folder where every rank writes ``rank{r}.pt`` (its model and loss
#: state at the end of training, before the best checkpoint is reloaded). A debugging aid.
RANK_STATE_DIR_ENV = "FOODLIB_RANK_STATE_DIR"

_wait_group = None  # the gloo side group of the waits, made by setup_distributed()


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def dist_info() -> DistInfo:
    """This process's place, from torchrun's environment variables (a world of one without them)."""
    return DistInfo(
        rank=int(os.environ.get("RANK", 0)),
        world_size=int(os.environ.get("WORLD_SIZE", 1)),
        local_rank=int(os.environ.get("LOCAL_RANK", 0)),
    )


def setup_distributed(device: torch.device) -> DistInfo:
    """Initialise the process group when started by torchrun: nccl on GPUs, gloo on CPUs.

    Each GPU process binds to GPU ``LOCAL_RANK``. Also makes the gloo group with the long
    timeout that :func:`barrier` and :func:`in_turns` wait on.

    Raises:
        RuntimeError: WORLD_SIZE > 1 without MASTER_ADDR / MASTER_PORT (not started by torchrun),
            or more processes on a node than it has GPUs.
    """
    global _wait_group
    info = dist_info()
    if not info.enabled or dist.is_initialized():
        return info
    missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if name not in os.environ]
    if missing:
        raise RuntimeError(
            f"WORLD_SIZE={info.world_size} but {', '.join(missing)} is not set: start distributed runs with "
            "torchrun (see docs/distributed.md), or unset WORLD_SIZE for a single process"
        )
    if device.type == "cuda":
        if info.local_rank >= torch.cuda.device_count():
            raise RuntimeError(
                f"LOCAL_RANK={info.local_rank} but this node sees {torch.cuda.device_count()} GPU(s): "
                "pass --nproc_per_node at most the number of GPUs (or check CUDA_VISIBLE_DEVICES)"
            )
        torch.cuda.set_device(info.local_rank)  # before init: nccl binds each process to its own GPU
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    _wait_group = dist.new_group(backend="gloo", timeout=WAIT_FOR_MAIN_TIMEOUT)
    return info


def cleanup_distributed() -> None:
    global _wait_group
    _wait_group = None
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """In-place sum across ranks (a no-op in a single process); returns the tensor."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def barrier() -> None:
    """Wait until every rank gets here (on the long-timeout gloo group when there is one)."""
    if is_distributed():
        dist.barrier(group=_wait_group)


def broadcast_object(obj, src: int = 0):
    """Send a picklable object from ``src`` to every rank (identity in a single process)."""
    if not is_distributed():
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=src)
    return holder[0]


# ----- data preparation: rank 0 first ------------------------------------------------------------

def in_turns(fn: Callable[..., T], *args, **kwargs) -> T:
    """``fn(*args, **kwargs)`` on global rank 0 first, then each node's local rank 0, then the rest.

    For work whose result lands on disk and is reused: generating the embedded dishes and building
    the decoded cache. With the cache on shared storage rank 0 builds it and everyone else reads
    it; with a node-local cache the first process of each node builds that node's copy. (The
    cache's file lock would serialise concurrent builds anyway; the turns also avoid K processes
    generating the same dataset at once.) When ``fn`` fails on one rank every rank raises, instead
    of the others waiting forever.

    >>> data = in_turns(load_data, cfg, run_dir, progress=False)   # doctest: +SKIP
    """
    if not is_distributed():
        return fn(*args, **kwargs)
    rank = dist.get_rank()
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    my_turn = 0 if rank == 0 else 1 if local_rank == 0 else 2
    result, error = None, None
    for turn in range(3):
        if turn == my_turn:
            try:
                result = fn(*args, **kwargs)
            except Exception as caught:  # re-raised below, after telling the other ranks
                error = caught
        failed = torch.tensor([int(error is not None)], device=_wait_device())
        dist.all_reduce(failed, group=_wait_group)  # doubles as the barrier between turns
        if error is not None:
            raise error
        if int(failed.item()):
            raise RuntimeError(
                f"rank {rank}: another rank failed in {getattr(fn, '__name__', fn)!r} (turn {turn}); "
                "its error is printed above"
            )
    return result


def _wait_device() -> torch.device:
    """Where the tensors of the waits live: CPU on the gloo side group, the GPU under nccl."""
    if _wait_group is None and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# ----- keeping the ranks' state identical ---------------------------------------------------------

def maybe_sync_batchnorm(model: nn.Module, sync_bn: bool, device: torch.device, world_size: int) -> nn.Module:
    """Turn BatchNorm layers into SyncBatchNorm when ``sync_bn`` and several processes (GPU only).

    Without it every rank normalises with the statistics of its own share of the batch
    (batch_size / world_size images), which is noisier than the global batch's; SyncBatchNorm
    computes the statistics over the global batch, at one all-gather per BatchNorm layer. The
    state dict keys are unchanged, so checkpoints load into a plain model.

    Raises:
        ConfigError: ``sync_bn`` with several CPU processes: torch's SyncBatchNorm has no CPU kernel.
    """
    if not sync_bn or world_size <= 1:
        return model
    if device.type != "cuda":
        raise ConfigError(
            f"sync_bn=True with {world_size} processes on {device.type}: torch's SyncBatchNorm runs on GPUs "
            "only; set sync_bn=False on CPUs (each process then normalises with its own share of the batch)"
        )
    try:  # timm's converter keeps its BatchNorm + activation layers (EfficientNet-Lite) whole; torch's drops the activation
        from timm.layers import convert_sync_batchnorm
    except ImportError:
        convert_sync_batchnorm = nn.SyncBatchNorm.convert_sync_batchnorm
    return convert_sync_batchnorm(model)


def wrap_ddp(module: nn.Module, device: torch.device) -> nn.parallel.DistributedDataParallel:
    """``module`` under DistributedDataParallel, without the per-forward broadcast of buffers.

    Parameters and buffers are copied from rank 0 once, at wrapping. After that DDP keeps the
    parameters identical by averaging gradients; buffers are not re-broadcast from rank 0 before
    every forward (DDP's default): paper-mode centers stay identical through their own
    all-reduce (a broadcast would hide a rank that drifted), and BatchNorm running statistics,
    unused in training mode, are averaged once per epoch by :func:`average_batchnorm_statistics`.
    """
    import inspect

    ddp = nn.parallel.DistributedDataParallel
    if "forward_sync_buffers" in inspect.signature(ddp.__init__).parameters:  # torch >= 2.14
        no_forward_broadcast = {"forward_sync_buffers": False}
    else:
        no_forward_broadcast = {"broadcast_buffers": False}
    return ddp(module, device_ids=[device.index] if device.type == "cuda" else None, **no_forward_broadcast)


@torch.no_grad()
def average_batchnorm_statistics(module: nn.Module) -> None:
    """Replace every BatchNorm running mean and variance by its average over the ranks.

    DDP keeps parameters identical but not buffers once ``broadcast_buffers=False``: each rank's
    running statistics follow its own share of the batches. Averaging them (once per epoch,
    before evaluation and checkpoints) gives every rank the same statistics, closer to the
    global batch's than any single rank's. Other buffers (Center Loss centers) are left alone:
    they are kept identical by their own all-reduce.
    """
    if not is_distributed():
        return
    world_size = dist.get_world_size()
    for layer in module.modules():
        if isinstance(layer, nn.modules.batchnorm._BatchNorm) and layer.track_running_stats:
            for stats in (layer.running_mean, layer.running_var):
                if stats is not None:
                    dist.all_reduce(stats, op=dist.ReduceOp.SUM)
                    stats.div_(world_size)


@torch.no_grad()
def broadcast_state(module: nn.Module, src: int = 0) -> None:
    """Overwrite every parameter and buffer of ``module`` with rank ``src``'s, in place."""
    if not is_distributed():
        return
    for tensor in module.state_dict().values():  # detached views sharing storage with the module
        if tensor.is_contiguous() or tensor.is_contiguous(memory_format=torch.channels_last):
            dist.broadcast(tensor, src=src)
        else:  # collectives want dense tensors
            dense = tensor.contiguous()
            dist.broadcast(dense, src=src)
            tensor.copy_(dense)


def state_fingerprints(*modules: nn.Module) -> tuple[list[str], torch.Tensor]:
    """Names and a ``(T, 3)`` float64 fingerprint (sum, sum of squares, position-weighted sum) per tensor.

    Identical tensors give bitwise identical fingerprints (same values, same order of
    summation); two different tensors almost surely do not.
    """
    names, rows = [], []
    for i, module in enumerate(modules):
        for name, tensor in module.state_dict().items():
            values = tensor.detach().reshape(-1).double()  # (P,)
            weights = torch.linspace(1.0, 2.0, max(1, values.numel()), dtype=torch.float64, device=values.device)
            names.append(f"{type(module).__name__}[{i}].{name}")
            rows.append(torch.stack([values.sum(), values.pow(2).sum(), (values * weights[: values.numel()]).sum()]))
    device = rows[0].device if rows else torch.device("cpu")
    return names, torch.stack(rows) if rows else torch.zeros(0, 3, dtype=torch.float64, device=device)


def check_in_sync(*modules: nn.Module) -> None:
    """Raise a RuntimeError naming the tensors whose values differ between ranks (no-op in one process).

    Every rank must hold the same weights, centers and Gaussian parameters after each step: DDP
    averages the gradients and the paper-mode center update all-reduces its sums and counts.
    ``fit()`` checks this once after training (one all-gather of 3 numbers per tensor).
    """
    if not is_distributed():
        return
    names, mine = state_fingerprints(*modules)
    gathered = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, mine)
    reference = gathered[0]
    differs = torch.zeros(len(names), dtype=torch.bool, device=mine.device)
    for other in gathered[1:]:
        differs |= ~torch.isclose(other, reference, rtol=0.0, atol=0.0, equal_nan=True).all(dim=1)
    bad = [name for name, d in zip(names, differs.tolist()) if d]
    if bad:
        raise RuntimeError(
            f"the ranks hold different values of {len(bad)} tensor(s): {', '.join(bad[:5])}"
            + (" ..." if len(bad) > 5 else "")
            + "; a loss or layer updates state outside DDP without all-reducing it (see docs/distributed.md)"
        )


def dump_rank_state(model: nn.Module, loss: nn.Module, folder: str | Path | None = None) -> Path | None:
    """Save this rank's model and loss state to ``folder/rank{r}.pt`` (a debugging aid).

    ``folder`` defaults to the environment variable ``FOODLIB_RANK_STATE_DIR``; without either
    nothing is written. ``fit()`` calls this right after the last epoch, so the files hold the
    final training state of each rank (not the reloaded best checkpoint) and can be compared.

    >>> # FOODLIB_RANK_STATE_DIR=/tmp/states torchrun --nproc_per_node 2 -m foodlib.cli train ...
    """
    folder = folder or os.environ.get(RANK_STATE_DIR_ENV)
    if not folder:
        return None

    rank = dist.get_rank() if is_distributed() else 0
    world_size = dist.get_world_size() if is_distributed() else 1
    cpu = lambda state: {k: v.detach().cpu().clone() for k, v in state.items()}  # noqa: E731
    path = Path(folder).expanduser() / f"rank{rank}.pt"
    return atomic_torch_save(path, {"rank": rank, "world_size": world_size,
                                    "model": cpu(model.state_dict()), "loss": cpu(loss.state_dict())})
