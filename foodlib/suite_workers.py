"""Several workers on one suite folder: shared storage across machines, or a SLURM job array.

``foodlib suite SUITE --worker`` (any number of them, on any machines that see the same
``--out-dir``) walks the suite's plan like ``foodlib suite`` does, but claims each run first:
a non-blocking per-run lock ``runs/<suite>/.claims/<run>.lock`` (``filelock``; the OS drops it
when a worker dies, so a killed worker's run is picked up again, resuming from ``last.pt``).
A run another worker holds is skipped; one that is complete is skipped after the claim, so no run
executes twice. The worker that finds every run complete when it finishes writes the comparison
(``compare.ipynb`` and ``report.md``) once; ``foodlib report runs/<suite>`` writes it at any time.

SLURM, one GPU per array task (``docs`` / README: "Several GPUs or machines")::

    #SBATCH --array=0-7 --gpus=1
    foodlib suite suites/food101-10-scratch.yaml --worker --quiet --out-dir /shared/runs

The per-run lock uses ``flock``, which NFSv4 and Lustre / GPFS (mounted with locking) honour; on a
file system without locks, give each worker its runs with ``--only`` instead.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

from foodlib import suite as S
from foodlib.messages import logger
from foodlib.files import atomic_write_text

CLAIMS_DIR = ".claims"  # inside the suite folder; not inside run folders, which a stale rerun may clear
COMPARE_CLAIM = "_compare"
RECORD_CLAIM = "_suite_record"


def claim(suite_dir: Path, name: str, timeout: float = 0):
    """A held ``filelock`` on ``suite_dir/.claims/<name>.lock``, or None when another process holds it."""
    from filelock import FileLock, Timeout

    folder = suite_dir / CLAIMS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(folder / f"{name}.lock"), timeout=timeout)
    try:
        lock.acquire()
    except Timeout:
        return None
    return lock


def run_worker(
    suite: str | Path | S.SuiteSpec,
    *,
    out_dir: str | Path = "runs",
    only: list[str] | None = None,
    quiet: bool = False,
    device: str | None = None,
    readme_pictures: bool | str | Path = False,
    log: Callable[[str], None] = logger.info,
) -> S.SuiteResult:
    """Execute every run of the suite that no other worker holds and that is not complete.

    Args: as :func:`foodlib.suite.run_suite` (no ``jobs``: start more workers instead).

    Returns:
        A :class:`~foodlib.suite.SuiteResult` of this worker's runs (others' show as
        ``skipped`` with detail ``claimed``); ``compare`` is set only if this worker wrote it.
    """
    spec = suite if isinstance(suite, S.SuiteSpec) else S.load_suite(suite, out_dir)
    plan = S.plan_suite(spec)
    if only:
        import fnmatch

        plan = [r for r in plan if any(fnmatch.fnmatchcase(r.name, p) for p in only)]
        if not plan:
            raise S.SuiteError(f"--only {', '.join(only)} matches no run of suite {spec.name}")
    suite_dir = spec.out_dir / spec.name
    suite_dir.mkdir(parents=True, exist_ok=True)
    if spec.source_text:
        atomic_write_text(suite_dir / "suite.yaml", spec.source_text)
    declared = S.notebook_parameters(spec.notebook)
    t_start = time.time()
    outcomes: list[S.RunOutcome] = []
    for number, run in enumerate(plan, 1):
        prefix = f"[{number}/{len(plan)}]"
        lock = claim(suite_dir, run.name)
        if lock is None:
            log(f"{prefix} {run.name}: held by another worker, skipped")
            outcomes.append(S.RunOutcome(run.name, "skipped", detail="claimed"))
            continue
        try:
            outcome = S._run_one(run, spec, declared, quiet, device, log, prefix)
        finally:
            lock.release()
        outcomes.append(outcome)
        _write_record(suite_dir, spec, plan, outcomes)

    compare = None
    missing = [r.name for r in S.plan_suite(spec) if S.run_state(r) != "complete"]
    if missing:
        log(f"{len(missing)} run(s) not complete yet ({', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}): "
            f"the worker that completes the last one writes the comparison (or: foodlib report {suite_dir})")
    else:
        compare = _compare_once(spec, suite_dir, quiet, readme_pictures, log)
    result = S.SuiteResult(spec, suite_dir, outcomes, compare)
    log(S.format_summary(result, time.time() - t_start))
    return result


def _write_record(suite_dir: Path, spec: S.SuiteSpec, plan: list[S.PlannedRun], outcomes: list[S.RunOutcome]) -> None:
    """``suite.json``, read-modify-written under a lock: every worker adds its own runs' status."""
    lock = claim(suite_dir, RECORD_CLAIM, timeout=60)
    if lock is None:  # another worker has been writing it for a minute: this update waits for the next
        return
    try:
        # only what this worker executed: a run it found complete keeps the status its executor wrote
        S._write_suite_record(suite_dir, spec, plan, [o for o in outcomes if o.status in ("ok", "failed")])
    finally:
        lock.release()


def _compare_once(spec: S.SuiteSpec, suite_dir: Path, quiet: bool, readme_pictures, log) -> S.RunOutcome | None:
    """The comparison, by one worker, unless ``report.md`` is already newer than every run's ``metrics.json``."""
    lock = claim(suite_dir, COMPARE_CLAIM)
    if lock is None:
        log("another worker is writing the comparison")
        return None
    try:
        report = suite_dir / "report.md"
        newest = max((r.run_dir / "metrics.json").stat().st_mtime for r in S.plan_suite(spec))
        if report.is_file() and report.stat().st_mtime >= newest:
            log(f"the comparison is up to date: {report}")
            return None
        return S.run_compare(spec, suite_dir, quiet=quiet, readme_pictures=readme_pictures, log=log)
    finally:
        lock.release()
