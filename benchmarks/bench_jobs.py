"""Suite throughput on a CPU: runs one after another at all threads vs ``--jobs`` runs at a time.

Trains the same small set of runs both ways, interleaved over rounds, with ``foodlib train`` in
fresh processes (as ``foodlib suite --jobs`` does through papermill kernels), and prints the wall
time of each round, the medians and their ratio. The decoded cache is built before timing.

    .venv/bin/python benchmarks/bench_jobs.py --data ../shared/data/food101-10 --image-size 64 \\
        --epochs 2 --runs 2 --rounds 3
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def train_command(args, out: Path, threads: int, seed: int) -> list[str]:
    return [sys.executable, "-m", "foodlib.cli", "train", "--data", args.data, "--image-size", str(args.image_size),
            "--backbone", args.backbone, "--epochs", str(args.epochs), "--seed", str(seed), "--threads", str(threads),
            "--no-eval-test", "--no-features", "--no-figures", "--quiet", "--out", str(out)]


def timed(commands: list[list[str]], jobs: int) -> float:
    """Wall seconds to finish ``commands``, ``jobs`` at a time."""
    t0 = time.perf_counter()
    pending, running = list(commands), []
    while pending or running:
        while pending and len(running) < jobs:
            running.append(subprocess.Popen(pending.pop(0), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
        for process in list(running):
            if process.poll() is not None:
                running.remove(process)
                if process.returncode:
                    raise RuntimeError(f"{' '.join(process.args)} failed:\n{process.stderr.read().decode()}")
        time.sleep(0.05)
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="../shared/data/food101-10")
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--runs", type=int, default=2, help="runs per round (a suite's runs)")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--cores", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        timed([train_command(args, tmp / "warm", args.cores, 0)], 1)  # builds the cache
        times: dict[str, list[float]] = {"sequential": [], "parallel": []}
        for r in range(args.rounds):
            for mode in ("sequential", "parallel") if r % 2 == 0 else ("parallel", "sequential"):
                jobs, threads = (1, args.cores) if mode == "sequential" else (args.jobs, max(1, args.cores // args.jobs))
                commands = [train_command(args, tmp / f"{mode}-{r}-{i}", threads, i) for i in range(args.runs)]
                times[mode].append(timed(commands, jobs))
                print(f"round {r} {mode:<10} {times[mode][-1]:6.1f} s", flush=True)
    seq, par = statistics.median(times["sequential"]), statistics.median(times["parallel"])
    print(f"{args.runs} runs of {args.backbone} {args.image_size}px x {args.epochs} epochs: sequential "
          f"({args.cores} threads) median {seq:.1f} s, {args.jobs} jobs x {max(1, args.cores // args.jobs)} thread(s) "
          f"median {par:.1f} s -> {seq / par:.2f}x")


if __name__ == "__main__":
    main()
