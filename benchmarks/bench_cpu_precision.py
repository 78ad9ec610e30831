"""Model step speed on the CPU: NCHW vs channels_last (NHWC), float32 vs bf16 autocast.

Decides foodlib's CPU defaults (``amp="auto"`` -> bf16 on AMX CPUs, ``channels_last=True``).
Synthetic batches of 64, AdamW step included; prints img/s (median of 4 timed steps after 1 warm-up).

    .venv/bin/python benchmarks/bench_cpu_precision.py 2    # torch threads
"""
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from foodlib.models import create_model  # noqa: E402

BATCH, CASES = 64, [("smallcnn", 48), ("smallcnn", 64), ("resnet18", 112)]


def img_per_s(model, head, optimizer, x, y, amp: bool, steps: int = 5) -> float:
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            loss = torch.nn.functional.cross_entropy(head(model(x)).float(), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        times.append(time.perf_counter() - t0)
    return round(BATCH / statistics.median(times[1:]), 1)  # the first step warms up


def main(threads: int) -> None:
    torch.set_num_threads(threads)
    for name, size in CASES:
        model = create_model(name)
        head = torch.nn.Linear(model.embedding_dim, 10)
        optimizer = torch.optim.AdamW(list(model.parameters()) + list(head.parameters()))
        y = torch.randint(0, 10, (BATCH,))
        result = {}
        for layout, memory_format in (("NCHW", torch.contiguous_format), ("NHWC", torch.channels_last)):
            model.to(memory_format=memory_format)
            x = torch.randn(BATCH, 3, size, size).contiguous(memory_format=memory_format)
            for precision in ("fp32", "bf16"):
                result[f"{layout}-{precision}"] = img_per_s(model, head, optimizer, x, y, amp=precision == "bf16")
        print(name, size, "threads", threads, result, "img/s", flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else torch.get_num_threads())
