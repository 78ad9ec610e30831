"""What the decoded cache's block checksums cost (issue 16): at build, and at first use in a process.

Measures, on real photos (food101-10 train + test) decoded into a fresh cache folder:

1. the cold build (decode + resize + write + checksums) and, within it, the checksum pass alone;
2. reuse in a "new process" (checksums compared, what every training pays once) and a reuse
   already verified in this process (stat + hash of the file list, as before);
3. CRC-32 throughput on a larger synthetic file (``--big-mb``), to scale to a 30,000-photo cache.

Usage (from the repository root)::

    .venv/bin/python benchmarks/bench_cache_checksum.py --data ../shared/data/food101-10 --image-size 64
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import foodlib.data.cache as cache_module  # noqa: E402
from foodlib.config import Config  # noqa: E402
from foodlib.data import load_data  # noqa: E402
from foodlib.data.checksum import block_checksums  # noqa: E402


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "food101-10")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--big-mb", type=int, default=1024, help="size of the synthetic file for throughput (MB)")
    args = p.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        cfg = Config.from_flat(data=str(args.data), image_size=args.image_size, cache_dir=str(Path(tmp) / "cache"))
        cold = timed(lambda: load_data(cfg, progress=False))
        caches = sorted((Path(tmp) / "cache" / "decoded").glob("*.u8"))
        size = sum(f.stat().st_size for f in caches)
        checksum = statistics.median(timed(lambda: [block_checksums(f) for f in caches]) for _ in range(args.repeats))

        def first_use():
            cache_module._VERIFIED.clear()  # what a new process finds
            load_data(cfg, progress=False)

        verify = statistics.median(timed(first_use) for _ in range(args.repeats))
        verified = statistics.median(timed(lambda: load_data(cfg, progress=False)) for _ in range(args.repeats))

        big = Path(tmp) / "big.u8"
        rng = np.random.default_rng(0)
        with open(big, "wb") as f:
            for _ in range(args.big_mb // 16):
                f.write(rng.integers(0, 256, 16 * 2**20, dtype=np.uint8).tobytes())
        big_s = statistics.median(timed(lambda: block_checksums(big)) for _ in range(3))

    report = {
        "images_cache_bytes": size, "cold_build_s": round(cold, 2), "checksum_pass_s": round(checksum, 3),
        "checksum_share_of_build": round(checksum / cold, 4),
        "first_use_reuse_s": round(verify, 3), "verified_reuse_s": round(verified, 3),
        "crc32_gb_per_s": round(args.big_mb * 2**20 / big_s / 1e9, 2),
        "seconds_per_6gb_cache": round(6e9 / (args.big_mb * 2**20 / big_s), 1),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
