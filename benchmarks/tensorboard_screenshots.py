"""Open a suite's TensorBoard in a real browser and save screenshots of its scalars, hparams and projector pages.

The end-to-end check of foodlib's TensorBoard output (foodlib/tensorboard_log.py): TensorBoard
itself serves the suite folder on the loopback, headless Chromium (Debian's ``chromium``
package) renders each page, and the PNGs land in ``--out``. Look at them: each page must show
foodlib's runs (the scalars' ``loss/train`` ... charts, one hparams row per run, the projector's
test points). It fails when TensorBoard does not list the runs or Chromium writes no picture.

    .venv/bin/foodlib suite suites/demo.yaml
    sudo apt-get install -y chromium
    .venv/bin/python benchmarks/tensorboard_screenshots.py runs/demo --out runs/demo/screenshots

Chromium runs with a fresh profile and no network beyond 127.0.0.1 (``--no-sandbox`` because it
usually runs as root in containers; WebGL for the projector comes from SwiftShader).
"""
from __future__ import annotations

import argparse
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

PAGES = {  # file name -> TensorBoard page (the part after '#'), with its URL settings
    "scalars": "scalars&tagFilter=" + urllib.parse.quote("^(loss|top1)/", safe=""),  # the per-epoch curves
    "hparams": "hparams",
    "projector": "projector",
}
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars",
                  "--enable-unsafe-swiftshader", "--use-angle=swiftshader"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_runs(base: str, timeout: float = 120.0) -> list[str]:
    """Poll TensorBoard until it lists at least one run (it loads event files in the background)."""
    deadline = time.time() + timeout
    runs: list[str] = []
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(f"{base}/data/runs", timeout=5) as response:
                runs = json.loads(response.read())
            if runs:
                return runs
        except OSError:
            pass
        time.sleep(1)
    raise RuntimeError(f"TensorBoard at {base} listed no runs within {timeout:.0f} s (got {runs})")


def screenshot(chromium: str, url: str, out: Path, size: str, budget_ms: int) -> None:
    with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile:
        command = [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--window-size={size}",
                   f"--virtual-time-budget={budget_ms}", f"--screenshot={out}", url]
        subprocess.run(command, check=False, capture_output=True, timeout=180)
    if not out.is_file() or out.stat().st_size == 0:
        raise RuntimeError(f"Chromium wrote no screenshot for {url} ({' '.join(command)})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("logdir", help="a suite folder (runs/demo) or one run folder")
    parser.add_argument("--out", default=None, help="folder for the PNGs (default: LOGDIR/screenshots)")
    parser.add_argument("--chromium", default=shutil.which("chromium") or "chromium")
    parser.add_argument("--size", default="1400,900", help="browser window, WIDTH,HEIGHT px")
    parser.add_argument("--budget-ms", type=int, default=20000, help="virtual time each page gets to render")
    args = parser.parse_args(argv)

    logdir = Path(args.logdir).resolve()
    out = Path(args.out or logdir / "screenshots")
    out.mkdir(parents=True, exist_ok=True)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "tensorboard.main", "--logdir", str(logdir), "--host", "127.0.0.1",
                               "--port", str(port), "--load_fast", "false"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        runs = wait_for_runs(base)
        print(f"TensorBoard {base} lists {len(runs)} run(s): {', '.join(runs[:8])}")
        for name, page in PAGES.items():
            path = out / f"tensorboard_{name}.png"
            t0 = time.time()
            screenshot(args.chromium, f"{base}/#{page}", path, args.size, args.budget_ms)
            print(f"{name:<10} {path} ({path.stat().st_size // 1024} KiB, {time.time() - t0:.0f} s)")
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
    return 0


if __name__ == "__main__":
    sys.exit(main())
