"""Test helper: train a Config with K processes on this machine through torchrun, as a subprocess.

The DDP tests use it to compare a 2-process run with a 1-process one. It is not part of foodlib:
users start distributed runs with torchrun itself (docs/distributed.md).
"""
from __future__ import annotations

import collections
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

from foodlib.config import ConfigError


class DistributedLaunchError(RuntimeError):
    """A torchrun launch failed; the message holds the command and the end of its output."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def torchrun_command(config_path: str | Path, nproc_per_node: int, master_port: int,
                     python: str = sys.executable) -> list[str]:
    """The single-node torchrun command line that trains ``config_path`` with ``nproc_per_node`` processes.

    Static rendezvous on 127.0.0.1: nothing listens beyond this machine.

    >>> torchrun_command("runs/a/config.yaml", 2, 29500, python="python")[:4]
    ['python', '-m', 'torch.distributed.run', '--nnodes=1']
    """
    return [
        python, "-m", "torch.distributed.run", "--nnodes=1", "--node_rank=0",
        f"--nproc_per_node={int(nproc_per_node)}", "--master_addr=127.0.0.1", f"--master_port={int(master_port)}",
        "-m", "foodlib.cli", "train", "--config", str(config_path),
    ]


def launch(cfg, nproc_per_node: int = 2, *, master_port: int | None = None, timeout: float | None = None,
           echo: bool = True, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Train ``cfg`` with ``nproc_per_node`` processes on this machine (torchrun); return its metrics.

    Writes the config (``out`` made absolute) to a temporary YAML file, runs
    ``python -m torch.distributed.run --nnodes=1 --nproc_per_node=K --master_addr=127.0.0.1 ...
    -m foodlib.cli train --config FILE`` as a subprocess, and reads back ``<out>/metrics.json``.
    The run folder is laid out exactly as a one-process run's (rank 0 writes its config.yaml;
    the temporary file keeps a refused ``resume`` from touching the folder).
    ``batch_size`` is the global batch: each process takes ``batch_size / nproc_per_node``.
    On CPUs each process gets ``cpu_count / nproc_per_node`` threads unless OMP_NUM_THREADS is set.

    Args:
        cfg: the run's Config (``out`` must not hold a finished run unless ``resume=True``).
        nproc_per_node: processes (GPUs) on this machine; ``batch_size`` must be divisible by it.
        master_port: rendezvous port on 127.0.0.1 (default: a free one).
        timeout: seconds before the whole process group is stopped (None: no limit).
        echo: print the processes' output as it comes (rank 0 logs; the others are quiet).
        env: extra environment variables for the processes.

    Returns:
        The run's metrics.json as a dict (``val``, ``test``, ``best_epoch``, ...).

    Raises:
        DistributedLaunchError: torchrun exited non-zero or timed out (the message has the end of
            the output, where the failing rank's error is).

    >>> metrics = launch(cfg.with_overrides(out="runs/ddp"), nproc_per_node=2)   # doctest: +SKIP
    >>> metrics["test"]["top1"]                                                   # doctest: +SKIP
    0.62
    """
    if int(nproc_per_node) < 1:
        raise ConfigError(f"nproc_per_node={nproc_per_node!r} must be >= 1")
    if cfg.train.batch_size % int(nproc_per_node):
        raise ConfigError(
            f"batch_size={cfg.train.batch_size} is the global batch and must be divisible by "
            f"nproc_per_node={nproc_per_node}; choose a multiple of {nproc_per_node}"
        )
    run_dir = Path(cfg.train.out).expanduser().resolve()
    cfg = cfg.with_overrides(out=str(run_dir))  # the processes may not share the caller's cwd
    handle, config_name = tempfile.mkstemp(prefix="foodlib-launch-", suffix=".yaml")
    os.close(handle)
    config_path = Path(config_name)
    try:
        cfg.to_yaml(config_path)
        return _run_torchrun(torchrun_command(config_path, nproc_per_node, master_port or free_port()),
                             run_dir, int(nproc_per_node), timeout, echo, env)
    finally:
        config_path.unlink(missing_ok=True)


def _run_torchrun(command: list[str], run_dir: Path, nproc_per_node: int, timeout: float | None, echo: bool,
                  env: dict[str, str] | None) -> dict[str, Any]:
    """Run ``command``, echo and keep the end of its output, stop it on timeout or interrupt; read the metrics."""
    child_env = dict(os.environ)
    package_parent = str(Path(__file__).resolve().parents[1])  # foodlib importable without an install
    child_env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_parent, child_env.get("PYTHONPATH")]))
    child_env["PYTHONUNBUFFERED"] = "1"  # lines arrive as they are printed
    child_env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc_per_node)))
    child_env.update(env or {})

    tail: collections.deque[str] = collections.deque(maxlen=60)
    # A session of its own: a notebook's interrupt reaches only this process, which stops the run below.
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env=child_env, start_new_session=True)
    timed_out = threading.Event()

    def stop_on_timeout() -> None:
        timed_out.set()
        _stop_group(process)

    timer = threading.Timer(timeout, stop_on_timeout) if timeout else None
    if timer:
        timer.start()
    try:
        for line in process.stdout:
            tail.append(line)
            if echo:
                print(line, end="", flush=True)
        returncode = process.wait()
    finally:
        if timer:
            timer.cancel()
        if process.poll() is None:  # interrupted (KeyboardInterrupt in a notebook): leave no workers behind
            _stop_group(process)
    if returncode != 0:
        why = f"timed out after {timeout} s" if timed_out.is_set() else f"exited with {returncode}"
        raise DistributedLaunchError(
            f"torchrun {why} (run folder {run_dir}): {' '.join(command)}\n"
            f"--- last lines of its output ---\n{''.join(tail)}"
        )
    return json.loads((run_dir / "metrics.json").read_text())


def _stop_group(process: subprocess.Popen, grace_seconds: float = 40.0) -> None:
    """SIGTERM torchrun, which stops its workers (they run in sessions of their own), then SIGKILL.

    torchrun gives its workers 30 s after SIGTERM before it kills them, hence the grace period.
    """
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(grace_seconds)
            return
        except subprocess.TimeoutExpired:
            continue
