"""One GPU per concurrent suite run: ``foodlib suite --jobs N`` on a machine with several GPUs.

Each of the ``N`` concurrent runs holds a *slot* while it executes; slot ``i`` is GPU ``i mod G``
(``G`` visible GPUs), so with ``N <= G`` no two runs share a GPU, and with ``N > G`` they share
round-robin. The run's notebook kernel is started with ``CUDA_VISIBLE_DEVICES`` naming its GPU
only, so inside the kernel that GPU is ``cuda`` / ``cuda:0`` (no stray context on GPU 0, and
``device: auto`` needs no change). When the suite process itself sees a subset
(``CUDA_VISIBLE_DEVICES=2,3``), the slots use those ids.

Slots are used only where the runs may choose their GPU: ``--device`` unset, ``auto`` or
``cuda``, and the run's ``device`` config ``auto`` or ``cuda``; ``--device cpu`` / ``cuda:1`` and
single-GPU or CPU machines keep today's behaviour.

>>> pool = GpuSlots.for_suite(jobs=4, device=None)   # doctest: +SKIP
>>> with pool.slot() as env:                          # doctest: +SKIP
...     execute_notebook(..., env=env)                # env == {"CUDA_VISIBLE_DEVICES": "2"}
"""
from __future__ import annotations

import os
import queue
from contextlib import contextmanager
from typing import Iterator

#: Device settings under which a run may be placed on any GPU.
PLACEABLE_DEVICES = frozenset({"auto", "cuda"})


def visible_gpu_ids() -> list[str]:
    """The GPU ids this process may hand out: its ``CUDA_VISIBLE_DEVICES`` entries, else 0..count-1."""
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        return []
    listed = [x.strip() for x in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if x.strip()]
    return listed[:count] if len(listed) >= count else [str(i) for i in range(count)]


class GpuSlots:
    """``jobs`` slots over the visible GPUs, taken by a run for as long as it executes."""

    def __init__(self, gpu_ids: list[str], jobs: int):
        self.gpu_ids = list(gpu_ids)
        self._free: queue.Queue[str] = queue.Queue()
        for i in range(jobs if self.gpu_ids else 0):
            self._free.put(self.gpu_ids[i % len(self.gpu_ids)])

    @classmethod
    def for_suite(cls, jobs: int, device: str | None) -> "GpuSlots":
        """The suite's slots: over the visible GPUs when there are several and ``device`` allows it, else none."""
        if jobs < 2 or (device is not None and device not in PLACEABLE_DEVICES):
            return cls([], jobs)
        ids = visible_gpu_ids()
        return cls(ids if len(ids) > 1 else [], jobs)

    @property
    def enabled(self) -> bool:
        return bool(self.gpu_ids)

    @contextmanager
    def slot(self, run_device: str = "auto") -> Iterator[dict[str, str] | None]:
        """The environment for one run's kernel (``{"CUDA_VISIBLE_DEVICES": id}``), or None: no placement.

        Args:
            run_device: the run's own ``device`` setting; ``cpu`` or ``cuda:N`` is left alone.
        """
        if not self.enabled or run_device not in PLACEABLE_DEVICES:
            yield None
            return
        gpu = self._free.get()  # never blocks for long: at most `jobs` runs execute at a time
        try:
            yield {"CUDA_VISIBLE_DEVICES": gpu}
        finally:
            self._free.put(gpu)


def kernel_manager_with_env(env: dict[str, str]):
    """A jupyter kernel manager class that starts its kernel with ``env`` added to this process's environment.

    Papermill passes ``kernel_manager_class`` on to nbclient, which has no other way to give one
    kernel its own environment while other threads start theirs.
    """
    from jupyter_client.manager import AsyncKernelManager

    extra = dict(env)

    class EnvKernelManager(AsyncKernelManager):
        async def start_kernel(self, **kw):
            kw["env"] = {**(kw.get("env") or os.environ), **extra}
            return await super().start_kernel(**kw)

    EnvKernelManager.__name__ = EnvKernelManager.__qualname__ = "EnvKernelManager"
    return EnvKernelManager
