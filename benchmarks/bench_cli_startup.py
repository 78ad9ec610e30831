"""Benchmark: how long the ``foodlib`` command takes to answer ``--help`` or a mistyped command.

Target: ``foodlib --help``, ``foodlib train --help`` and a typo answer in well under 1 s: the
arguments are parsed before torch is imported (``foodlib/cli.py``). ``python -c "import torch"``
is timed next to them as the cost that parsing first avoids. Each timing is a fresh process, as a
user's shell starts one; the commands run in interleaved rounds (so load changes hit all of them)
and the median per command is reported, with the load average at start and end.

    .venv/bin/python benchmarks/bench_cli_startup.py             # 5 rounds
    .venv/bin/python benchmarks/bench_cli_startup.py --rounds 10

Prints a Markdown table for RESULTS.md.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

COMMANDS = {
    "foodlib --help": ["-m", "foodlib.cli", "--help"],
    "foodlib trian (typo)": ["-m", "foodlib.cli", "trian"],
    "foodlib train --help": ["-m", "foodlib.cli", "train", "--help"],
    "foodlib train --epohcs 3 (typo)": ["-m", "foodlib.cli", "train", "--epohcs", "3"],
    "foodlib suite --help": ["-m", "foodlib.cli", "suite", "--help"],
    "foodlib predict --help (imports torch)": ["-m", "foodlib.cli", "predict", "--help"],
    'python -c "import torch" (reference)': ["-c", "import torch"],
}


def time_once(args: list[str]) -> float:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    start = time.perf_counter()
    subprocess.run([sys.executable, *args], cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    load_start = os.getloadavg()[0]
    for command in COMMANDS.values():  # warm the file cache: the first run of each reads .pyc files from disk
        time_once(command)
    times: dict[str, list[float]] = {name: [] for name in COMMANDS}
    for _ in range(args.rounds):
        for name, command in COMMANDS.items():
            times[name].append(time_once(command))
    load_end = os.getloadavg()[0]

    print(f"{args.rounds} rounds, fresh process each; load average (1 min) {load_start:.1f} at start, "
          f"{load_end:.1f} at end; {os.cpu_count()} CPUs; Python {sys.version.split()[0]}\n")
    print("| command | median (s) | min (s) | max (s) |")
    print("|---|---:|---:|---:|")
    for name, values in times.items():
        print(f"| `{name}` | {statistics.median(values):.2f} | {min(values):.2f} | {max(values):.2f} |")


if __name__ == "__main__":
    main()
