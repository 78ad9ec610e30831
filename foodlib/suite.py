"""Suites: the experiment notebook run with papermill for every (loss, seed, override set), then compared.

A suite is a small YAML file; every key under ``base``, ``loss_params`` and ``grid`` is a
:class:`~foodlib.config.Config` field, so a suite reads like a set of notebook parameters::

    name: demo                    # run folders go to runs/demo/ (default: the file's stem)
    base:                         # Config fields shared by every run
      data: dishes
      backbone: smallcnn
      image_size: 64
      epochs: 8
    losses: [softmax, center, lgm, island]
    seeds: [0, 1]
    loss_params:                  # optional, per loss
      center: {lam: 0.01}
    grid:                         # optional: each entry is one more override set (multiplies the runs)
      - {lr: 0.001}
      - {name: fast, lr: 0.003}   # `name` labels the set in run names (default: its keys and values)
      - {name: lam0.1, lam: 0.1, losses: [center]}   # `losses` limits an entry to some losses (tuning)
    baseline: softmax             # optional: what the report compares against (default: first loss)

Run ``r`` is the executed notebook ``runs/<suite>/<r>/experiment.ipynb`` next to its run folder
(the notebook's ``out``). A run whose ``metrics.json`` exists and whose resolved config equals the
recorded ``config.yaml`` (runtime-only fields aside) is skipped; an interrupted one resumes from
``last.pt``; a failed one is reported at the end while the others and the comparison still run.
Then ``compare.ipynb`` runs into ``runs/<suite>/compare.ipynb`` and writes ``report.md``.
``jobs=2`` (``foodlib suite --jobs 2``) executes two runs at a time, each with ``threads`` = cores // 2:
on a CPU, two single-thread trainings get through more images per second together than one
two-thread training (see benchmarks/RESULTS.md).

>>> spec = load_suite("base: {data: dishes, epochs: 2}\\nlosses: [softmax, center]\\nseeds: [0, 1]\\n")
>>> [run.name for run in plan_suite(spec)]
['softmax-s0', 'center-s0', 'softmax-s1', 'center-s1']
"""
from __future__ import annotations

import fnmatch
import json
import logging
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

from foodlib.config import Config, ConfigError, runtime_fields
from foodlib.gpu_slots import GpuSlots, kernel_manager_with_env
from foodlib.files import FolderBusyError, atomic_write_json, folder_lock
from foodlib.messages import logger
from foodlib.runfolder import retire_run_folder

#: Config fields that change how a run executes, not what it computes (marked ``RUNTIME`` in
#: foodlib/config.py): ignored when deciding whether a finished run still matches the suite
#: (moving runs/ or switching cpu/cuda keeps them).
RUNTIME_FIELDS = runtime_fields()
#: Fields a suite sets itself; ``base`` / ``grid`` may not set them.
SUITE_FIELDS = frozenset({"loss", "seed", "out", "resume"})
GRID_KEYS = frozenset({"name", "losses"})  # grid-entry keys that are not Config fields
SUITE_KEYS = ("name", "base", "losses", "seeds", "loss_params", "grid", "baseline", "notebook", "compare_notebook",
              "out_dir", "search")  # `search:` belongs to `foodlib tune` (foodlib/tuning.py reads it)
KERNEL_NAME = "python3"  # the venv's ipykernel; jupyter_client starts it with this interpreter (sys.executable)
EXPERIMENT_NOTEBOOK = "experiment.ipynb"
COMPARE_NOTEBOOK = "compare.ipynb"


class SuiteError(ValueError):
    """A suite file is malformed; the message names the key, the value and the fix."""


@dataclass
class SuiteSpec:
    """A parsed suite file (see the module docstring for the keys)."""

    name: str
    base: dict[str, Any]
    losses: list[str]
    seeds: list[int]
    loss_params: dict[str, dict[str, Any]] = field(default_factory=dict)
    grid: list[dict[str, Any]] = field(default_factory=list)
    baseline: str = "softmax"
    notebook: Path = field(default_factory=lambda: notebooks_dir() / EXPERIMENT_NOTEBOOK)
    compare_notebook: Path = field(default_factory=lambda: notebooks_dir() / COMPARE_NOTEBOOK)
    out_dir: Path = Path("runs")
    source_text: str = ""
    search: dict[str, Any] = field(default_factory=dict)  # the `search:` section (foodlib tune), unparsed


@dataclass
class PlannedRun:
    """One run of a suite: its name, what it overrides, where it goes, and whether it is valid."""

    name: str  # e.g. "center-lam0.1-s2"
    variant: str  # the name without the seed: the group the report averages over seeds
    loss: str
    seed: int
    overrides: dict[str, Any]  # Config leaves this run sets (base, loss params, grid, loss, seed)
    run_dir: Path
    config: Config | None  # resolved config; None when the overrides are invalid
    error: str | None = None  # why the overrides are invalid


@dataclass
class RunOutcome:
    """What happened to one run (or to the comparison notebook)."""

    name: str
    status: str  # "ok" | "skipped" | "failed" | "planned"
    seconds: float = 0.0
    error: str | None = None
    notebook: Path | None = None
    test_top1: float | None = None
    detail: str = ""  # new | resume | stale | complete (dry runs, logs)


@dataclass
class SuiteResult:
    suite: SuiteSpec
    suite_dir: Path
    runs: list[RunOutcome]
    compare: RunOutcome | None = None

    @property
    def failed(self) -> list[RunOutcome]:
        return [r for r in self.runs if r.status == "failed"]

    @property
    def exit_code(self) -> int:
        """0 when every run and the comparison succeeded (or were skipped), else 1."""
        compare_failed = self.compare is not None and self.compare.status == "failed"
        return 1 if self.failed or compare_failed else 0


# ----- reading and planning -----------------------------------------------------------------------

def notebooks_dir() -> Path:
    """The project's notebooks/ folder (next to the foodlib package in a checkout / editable install)."""
    return Path(__file__).resolve().parents[1] / "notebooks"


def load_suite(path_or_text: str | Path, out_dir: str | Path = "runs", tuning: bool = False) -> SuiteSpec:
    """Parse a suite YAML file (or YAML text) and check its structure and field names.

    Values are checked per run by :func:`plan_suite` (an invalid value fails that run only);
    structure errors and unknown field names fail here, before anything runs. A suite with a
    ``search:`` section is read only with ``tuning=True`` (by :mod:`foodlib.tuning`).

    >>> load_suite("base: {epochs: 2}\\nlosses: [softmax]\\n").seeds
    [0]
    """
    text, source = _read_text(path_or_text)
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as error:
        raise SuiteError(f"suite {source} is not valid YAML: {error}") from None
    if not isinstance(raw, dict):
        raise SuiteError(f"suite {source} must be a mapping with keys {', '.join(SUITE_KEYS)}")
    unknown = sorted(set(raw) - set(SUITE_KEYS))
    if unknown:
        raise SuiteError(f"suite {source}: unknown key(s) {unknown}; valid keys: {', '.join(SUITE_KEYS)}")

    if raw.get("search") is not None and not tuning:
        raise SuiteError(f"suite {source} has a `search:` section: it is a tuning suite; run it with "
                         f"`foodlib tune {source}` (its best settings then go to a suite you run with `foodlib suite`)")
    name = str(raw.get("name") or (Path(source).stem if source != "<text>" else "suite"))
    if not re.fullmatch(r"[A-Za-z0-9._-]+", name) or set(name) == {"."}:  # ".." would write above out_dir
        raise SuiteError(f"suite name {name!r} must use only letters, digits, '.', '_' and '-', and not only dots "
                         "(it names a folder inside out_dir); set `name:` in the suite file")
    base = _mapping(raw.get("base"), f"{source}: base")
    _check_fields(base, f"{source}: base")
    losses = _as_list(raw.get("losses", [base.get("loss", "softmax")]), f"{source}: losses")
    seeds = _as_list(raw.get("seeds", [0]), f"{source}: seeds")
    if not losses or not seeds:
        raise SuiteError(f"suite {source}: losses and seeds must each list at least one value")
    if len(set(map(str, losses))) != len(losses) or len(set(map(str, seeds))) != len(seeds):
        raise SuiteError(f"suite {source}: losses {losses} or seeds {seeds} repeat a value")
    for seed in seeds:
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise SuiteError(f"suite {source}: seed {seed!r} is not an integer; write e.g. seeds: [0, 1, 2]")
    base.pop("loss", None)  # `losses:` decides; a base `loss` only serves as the default list above
    base.pop("seed", None)
    loss_params = _mapping(raw.get("loss_params"), f"{source}: loss_params")
    for loss, params in loss_params.items():
        if loss not in losses:
            raise SuiteError(f"suite {source}: loss_params has {loss!r}, which is not in losses {losses}")
        loss_params[loss] = _mapping(params, f"{source}: loss_params.{loss}")
        _check_fields(loss_params[loss], f"{source}: loss_params.{loss}")
    grid = _as_list(raw.get("grid") or [], f"{source}: grid")
    for i, entry in enumerate(grid):
        grid[i] = _mapping(entry, f"{source}: grid[{i}]")
        _check_fields({k: v for k, v in grid[i].items() if k not in GRID_KEYS}, f"{source}: grid[{i}]")
        if "losses" in grid[i]:
            only = grid[i]["losses"] = [str(x) for x in _as_list(grid[i]["losses"], f"{source}: grid[{i}].losses")]
            stray = [x for x in only if x not in map(str, losses)]
            if stray or not only:
                raise SuiteError(f"suite {source}: grid[{i}].losses {only} must name losses of the suite's "
                                 f"`losses:` list {losses}")
    baseline = str(raw.get("baseline") or ("softmax" if "softmax" in losses else losses[0]))
    if baseline not in losses:
        raise SuiteError(f"suite {source}: baseline {baseline!r} is not in losses {losses}")
    here = Path(source).parent if source != "<text>" else Path.cwd()
    spec = SuiteSpec(name=name, base=base, losses=[str(x) for x in losses], seeds=[int(s) for s in seeds],
                     loss_params=loss_params, grid=grid, baseline=baseline,
                     out_dir=Path(raw.get("out_dir") or out_dir), source_text=text,
                     search=_mapping(raw.get("search"), f"{source}: search") if tuning else {})
    for key in ("notebook", "compare_notebook"):
        if raw.get(key):  # relative to the suite file, like an include
            setattr(spec, key, (here / str(raw[key])).resolve())
    return spec


def plan_suite(spec: SuiteSpec) -> list[PlannedRun]:
    """Every run of the suite, in execution order: seeds outermost, then grid entries, then losses.

    Seeds outermost so that an interrupted suite already holds one seed of every loss. A run
    whose values do not validate is planned with ``error`` set (it will be reported failed).
    """
    runs, seen = [], {}
    suite_dir = spec.out_dir / spec.name
    for seed in spec.seeds:
        for grid_entry in spec.grid or [{}]:
            label = _grid_label(grid_entry)
            for loss in grid_entry.get("losses", spec.losses):
                variant = f"{loss}-{label}" if label else loss
                name = f"{variant}-s{seed}"
                if name in seen:
                    raise SuiteError(f"suite {spec.name}: two runs are both named {name!r}; give the grid entries a "
                                     "distinct `name:`")
                seen[name] = True
                overrides = {**spec.base, **spec.loss_params.get(loss, {}),
                             **{k: v for k, v in grid_entry.items() if k not in GRID_KEYS}, "loss": loss,
                             "seed": seed}
                config, error = None, None
                try:
                    config = Config.from_flat(**overrides)
                except ConfigError as exc:
                    error = f"invalid parameters: {exc}"
                runs.append(PlannedRun(name, variant, loss, seed, overrides, suite_dir / name, config, error))
    return runs


def run_state(run: PlannedRun) -> str:
    """``complete`` (skip it), ``resume`` (same config, interrupted), ``stale`` (other config), or ``new``."""
    recorded = run.run_dir / "config.yaml"
    if not recorded.is_file():
        return "stale" if run.run_dir.exists() and any(run.run_dir.iterdir()) else "new"
    try:
        previous = Config.from_yaml(recorded)
    except (ConfigError, OSError, yaml.YAMLError):
        return "stale"
    if run.config is None or _comparable(previous) != _comparable(run.config):
        return "stale"
    if (run.run_dir / "metrics.json").is_file():
        return "complete"
    return "resume" if (run.run_dir / "last.pt").is_file() else "new"


def _comparable(cfg: Config) -> dict[str, Any]:
    return {k: v for k, v in cfg.to_flat().items() if k not in RUNTIME_FIELDS}


# ----- running ------------------------------------------------------------------------------------

def run_suite(
    suite: str | Path | SuiteSpec,
    *,
    out_dir: str | Path = "runs",
    only: list[str] | None = None,
    dry_run: bool = False,
    quiet: bool = False,
    device: str | None = None,
    readme_pictures: bool | str | Path = False,
    jobs: int = 1,
    log: Callable[[str], None] = logger.info,
) -> SuiteResult:
    """Run every planned run that is not complete, then the comparison notebook.

    Args:
        suite: a suite YAML path (or a :class:`SuiteSpec`).
        out_dir: parent of the suite folder (``out_dir/<name>/``) unless the suite sets ``out_dir``.
        only: run only these run names (shell patterns allowed, e.g. ``"center-*"``).
        dry_run: list the runs and their state, execute nothing.
        quiet: no progress bars and no notebook output on the console, one line per run.
        device: ``cpu`` / ``cuda`` / ``auto`` for every run (overrides the suite's ``device``).
        readme_pictures: also copy the report figures to ``readme_pictures/`` (or this folder).
        jobs: runs executed at a time; with ``jobs > 1`` each run gets ``threads`` = cores // jobs
            (unless the suite sets ``threads``) and runs quietly, its output in its notebook.
        log: where progress lines go.

    Returns:
        A :class:`SuiteResult`; its ``exit_code`` is 1 if any run or the comparison failed.

    Raises:
        FolderBusyError: another ``run_suite`` is running in the same suite folder.

    >>> result = run_suite("suites/demo.yaml", only=["softmax-*"])   # doctest: +SKIP
    >>> result.exit_code                                              # doctest: +SKIP
    0
    """
    spec = suite if isinstance(suite, SuiteSpec) else load_suite(suite, out_dir)
    plan = plan_suite(spec)
    suite_dir = spec.out_dir / spec.name
    if only:
        unmatched = [p for p in only if not any(fnmatch.fnmatchcase(r.name, p) for r in plan)]
        if unmatched:
            raise SuiteError(f"--only {', '.join(unmatched)} matches no run of suite {spec.name}; runs: "
                             + ", ".join(r.name for r in plan))
        plan = [r for r in plan if any(fnmatch.fnmatchcase(r.name, p) for p in only)]
    if device is not None:  # a typo, or cuda on a machine without a GPU, fails here, before the first run
        from foodlib.runtime import resolve_device  # lazy: torch (the suite runs notebooks; it trains nothing itself)

        try:
            resolve_device(device)
        except (RuntimeError, ConfigError) as error:
            raise SuiteError(f"--device {device!r}: {error}") from None
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise SuiteError(f"jobs={jobs!r} must be an integer >= 1 (runs executed at a time)")
    outcomes: list[RunOutcome] = []
    if dry_run:
        for run in plan:
            state = "invalid" if run.error else run_state(run)
            outcomes.append(RunOutcome(run.name, "planned", detail=state, error=run.error))
            shown = ", ".join(f"{k}={v}" for k, v in run.overrides.items() if k not in spec.base)
            log(f"{run.name:<28} {state:<9} {shown}" + (f"  ({run.error})" if run.error else ""))
        return SuiteResult(spec, suite_dir, outcomes)

    # One suite process per folder: a second one would run the same runs into the same folders.
    with folder_lock(suite_dir, f"`foodlib suite` {spec.name}"):
        if spec.source_text:
            (suite_dir / "suite.yaml").write_text(spec.source_text)
        declared = notebook_parameters(spec.notebook)
        t_suite = time.time()
        try:
            if jobs == 1:
                for number, run in enumerate(plan, 1):
                    outcome = _run_one(run, spec, declared, quiet, device, log, prefix=f"[{number}/{len(plan)}]")
                    outcomes.append(outcome)
                    _write_suite_record(suite_dir, spec, plan, outcomes)
            else:
                _run_parallel(plan, spec, declared, device, log, jobs, outcomes, suite_dir)
            compare = run_compare(spec, suite_dir, quiet=quiet, readme_pictures=readme_pictures, log=log)
        finally:
            _write_suite_record(suite_dir, spec, plan, outcomes)
    result = SuiteResult(spec, suite_dir, outcomes, compare)
    log(format_summary(result, time.time() - t_suite))
    return result


def _run_parallel(plan: list[PlannedRun], spec: SuiteSpec, declared: set[str], device: str | None,
                  log: Callable[[str], None], jobs: int, outcomes: list[RunOutcome], suite_dir: Path) -> None:
    """Execute ``plan`` ``jobs`` runs at a time (each notebook is its own kernel process).

    Threads only wait on the kernels; ``outcomes`` ends in plan order. On Ctrl-C the runs not yet
    started are cancelled; the kernels receive the same SIGINT, and an interrupted run resumes
    from its ``last.pt`` next time.
    """
    from concurrent.futures import ThreadPoolExecutor, as_completed

    threads = max(1, available_cores() // jobs)
    log(f"{jobs} runs at a time, {threads} thread(s) each")
    slots = GpuSlots.for_suite(jobs, device)  # several GPUs: each concurrent run on its own (gpu_slots.py)
    if slots.enabled:
        log(f"one GPU per run: CUDA_VISIBLE_DEVICES from {', '.join(slots.gpu_ids)}")

    def run_in_slot(run: PlannedRun, prefix: str) -> RunOutcome:
        with slots.slot(device or (run.config.train.device if run.config else "cpu")) as env:
            return _run_one(run, spec, declared, True, device, log, prefix, threads, env=env)

    pool = ThreadPoolExecutor(max_workers=jobs)
    futures = [pool.submit(run_in_slot, run, f"[{number}/{len(plan)}]") for number, run in enumerate(plan, 1)]
    try:
        for future in as_completed(futures):
            outcomes.append(future.result())
            _write_suite_record(suite_dir, spec, plan, outcomes)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    order = {run.name: i for i, run in enumerate(plan)}
    outcomes.sort(key=lambda o: order[o.name])


def available_cores() -> int:
    """CPU cores this process may use (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def _run_one(run: PlannedRun, spec: SuiteSpec, declared: set[str], quiet: bool, device: str | None,
             log: Callable[[str], None], prefix: str, threads: int | None = None,
             env: dict[str, str] | None = None) -> RunOutcome:
    notebook_out = run.run_dir / EXPERIMENT_NOTEBOOK
    if run.error:
        log(f"{prefix} {run.name}: FAILED before start: {run.error}")
        return RunOutcome(run.name, "failed", error=run.error, detail="invalid")
    state = run_state(run)
    if state == "complete":
        log(f"{prefix} {run.name}: complete, skipped")
        return RunOutcome(run.name, "skipped", notebook=notebook_out, test_top1=_test_top1(run.run_dir),
                          detail=state)
    if state == "stale" and run.run_dir.exists():
        try:
            retired = retire_run_folder(run.run_dir)  # moved aside, never deleted: nothing computed is lost
            log(f"{prefix} {run.name}: the recorded config differs from the suite's; moved the old run to "
                f"{retired} and rerunning from scratch")
        except FolderBusyError as error:
            log(f"{prefix} {run.name}: FAILED before start: {error}")
            return RunOutcome(run.name, "failed", error=str(error), detail=state)
    parameters = notebook_run_parameters(run, declared, quiet=quiet, device=device, resume=state == "resume")
    if threads is not None and "threads" not in run.overrides:
        parameters["threads"] = threads
    log(f"{prefix} {run.name}: {'resuming' if state == 'resume' else 'running'} -> {notebook_out}")
    t0 = time.time()
    try:
        run.run_dir.mkdir(parents=True, exist_ok=True)
        execute_notebook(spec.notebook, notebook_out, parameters, quiet=quiet, **({"env": env} if env else {}))
    except KeyboardInterrupt:
        raise
    except Exception as error:  # a failed run must not stop the suite: record it, go on
        message = _error_text(error)
        log(f"{prefix} {run.name}: FAILED after {time.time() - t0:.0f} s: {message} (see {notebook_out})")
        return RunOutcome(run.name, "failed", time.time() - t0, message, notebook_out, detail=state)
    top1 = _test_top1(run.run_dir)
    log(f"{prefix} {run.name}: done in {time.time() - t0:.0f} s"
        + (f", test top-1 {top1:.3f}" if top1 is not None else ""))
    return RunOutcome(run.name, "ok", time.time() - t0, None, notebook_out, top1, detail=state)


def run_compare(spec: SuiteSpec, suite_dir: Path, quiet: bool = False, readme_pictures: bool | str | Path = False,
                log: Callable[[str], None] = logger.info) -> RunOutcome:
    """Execute the comparison notebook into ``suite_dir/compare.ipynb`` (it writes ``report.md``)."""
    notebook_out = suite_dir / COMPARE_NOTEBOOK
    copy_to = None
    if readme_pictures:
        copy_to = str(Path("readme_pictures" if readme_pictures is True else readme_pictures).resolve())
    parameters = {"suite_dir": str(suite_dir.resolve()), "baseline": spec.baseline, "copy_to": copy_to}
    log(f"comparison -> {notebook_out}")
    t0 = time.time()
    try:
        execute_notebook(spec.compare_notebook, notebook_out, parameters, quiet=quiet)
    except KeyboardInterrupt:
        raise
    except Exception as error:
        message = _error_text(error)
        log(f"comparison FAILED: {message} (see {notebook_out})")
        return RunOutcome("compare", "failed", time.time() - t0, message, notebook_out)
    return RunOutcome("compare", "ok", time.time() - t0, None, notebook_out)


def notebook_parameters(notebook: str | Path) -> set[str]:
    """Names assigned in a notebook's ``parameters``-tagged cell.

    Parsed with ``ast`` rather than papermill's line regex, which skips annotations it does not
    know (``int | None``) and lines with a second ``=``.
    """
    import ast

    import nbformat

    notebook = Path(notebook)
    if not notebook.is_file():
        raise FileNotFoundError(f"notebook {notebook} does not exist; set `notebook:` in the suite file "
                                "or run from a foodlib checkout")
    nb = nbformat.read(notebook, as_version=4)
    names: set[str] = set()
    for cell in nb.cells:
        if cell.cell_type == "code" and "parameters" in cell.get("metadata", {}).get("tags", []):
            for node in ast.parse(cell.source).body:
                targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
                names.update(t.id for t in targets if isinstance(t, ast.Name))
    return names


def notebook_run_parameters(run: PlannedRun, declared: set[str], quiet: bool = False, device: str | None = None,
                            resume: bool = False) -> dict[str, Any]:
    """The papermill parameters of one run.

    Every parameter the notebook declares gets the resolved config's value, so the notebook's
    own smoke-test defaults never leak into a suite run; the run's overrides are passed even
    when the notebook does not declare them (it reads every Config field it finds).
    """
    if run.config is None:
        raise SuiteError(f"run {run.name} has invalid parameters: {run.error}")
    flat = run.config.to_flat()
    names = [k for k in flat if k in declared or k in run.overrides]
    parameters = {k: flat[k] for k in names}
    parameters["out"] = str(run.run_dir.resolve())
    parameters["resume"] = resume
    parameters["quiet"] = True if "quiet" not in run.overrides else flat["quiet"]  # progress bars bloat notebooks
    if device is not None:
        parameters["device"] = device
    return parameters


class _KnownConfigFieldFilter(logging.Filter):
    """Papermill warns about parameters absent from the parameters cell; Config fields are expected."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        prefix = "Passed unknown parameter: "
        return not (message.startswith(prefix) and message[len(prefix):] in Config.field_index())


def execute_notebook(notebook: str | Path, output: str | Path, parameters: dict[str, Any], quiet: bool = False,
                     env: dict[str, str] | None = None) -> None:
    """Run ``notebook`` with papermill into ``output`` on the ``python3`` kernel, from the current folder.

    ``env`` adds variables to the kernel's environment (``CUDA_VISIBLE_DEVICES`` of its GPU slot).

    Raises papermill's ``PapermillExecutionError`` (naming the failing cell) when a cell raises.
    """
    import papermill

    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    log_filter = _KnownConfigFieldFilter()
    papermill_log = logging.getLogger("papermill")
    papermill_log.addFilter(log_filter)
    extra = {"kernel_manager_class": kernel_manager_with_env(env)} if env else {}
    try:
        papermill.execute_notebook(
            str(notebook), str(output), parameters=parameters, kernel_name=KERNEL_NAME, cwd=os.getcwd(),
            progress_bar=not quiet, stdout_file=None if quiet else sys.stdout,
            stderr_file=None if quiet else sys.stderr,
            # the kernel's own start-up warnings (ipykernel's "running over TCP without encryption" on
            # every local kernel) are not the user's concern; the cells' warnings and errors still show
            extra_arguments=["--IPKernelApp.log_level=ERROR"], **extra,
        )
    finally:
        papermill_log.removeFilter(log_filter)


# ----- records and summaries ----------------------------------------------------------------------

def _write_suite_record(suite_dir: Path, spec: SuiteSpec, plan: list[PlannedRun], outcomes: list[RunOutcome]) -> None:
    """``suite.json``: each run's variant, loss, seed, overrides and last status (the report reads it)."""
    record = {"name": spec.name, "baseline": spec.baseline, "losses": spec.losses, "seeds": spec.seeds, "runs": []}
    previous = {}
    if (suite_dir / "suite.json").is_file():
        try:
            previous = {r["name"]: r for r in json.loads((suite_dir / "suite.json").read_text()).get("runs", [])}
        except (ValueError, KeyError, TypeError):
            previous = {}
    by_name = {o.name: o for o in outcomes}
    for run in plan_suite(spec):  # the whole suite, also when --only ran a part of it
        outcome = by_name.get(run.name)
        entry = {"name": run.name, "variant": run.variant, "loss": run.loss, "seed": run.seed,
                 "overrides": run.overrides}
        if outcome is not None:
            entry.update(status=outcome.status, seconds=round(outcome.seconds, 1), error=outcome.error)
        elif run.name in previous:
            entry.update({k: previous[run.name].get(k) for k in ("status", "seconds", "error")})
        record["runs"].append(entry)
    atomic_write_json(suite_dir / "suite.json", record)


def format_summary(result: SuiteResult, seconds: float) -> str:
    """The end-of-suite table: one line per run, then the failures again with their errors."""
    lines = [f"suite {result.suite.name}: {len(result.runs)} run(s) in {seconds:.0f} s -> {result.suite_dir}"]
    for r in result.runs:
        top1 = f"{r.test_top1:.3f}" if r.test_top1 is not None else "-"
        lines.append(f"  {r.name:<28} {r.status:<8} {r.seconds:7.0f} s  test top-1 {top1}")
    if result.compare is not None:
        lines.append(f"  {'compare':<28} {result.compare.status:<8} {result.compare.seconds:7.0f} s  "
                     f"{result.suite_dir / 'report.md'}")
    failures = result.failed + ([result.compare] if result.compare and result.compare.status == "failed" else [])
    if failures:
        lines.append(f"{len(failures)} FAILED:")
        lines += [f"  {r.name}: {r.error}" + (f" (see {r.notebook})" if r.notebook else "") for r in failures]
    return "\n".join(lines)


def _test_top1(run_dir: Path) -> float | None:
    try:
        return float(json.loads((run_dir / "metrics.json").read_text())["test"]["top1"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _error_text(error: BaseException) -> str:
    ename, evalue = getattr(error, "ename", None), getattr(error, "evalue", None)
    if ename:  # PapermillExecutionError: the exception raised inside the notebook
        return f"{ename}: {evalue}"
    return f"{type(error).__name__}: {error}"


def _read_text(path_or_text: str | Path) -> tuple[str, str]:
    text = str(path_or_text)
    if isinstance(path_or_text, Path) or ("\n" not in text and text.endswith((".yaml", ".yml"))):
        path = Path(text)
        if not path.is_file():
            raise FileNotFoundError(f"suite file {path} does not exist (suites live in suites/*.yaml)")
        return path.read_text(), str(path)
    return text, "<text>"


def _mapping(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise SuiteError(f"{where} must be a mapping of Config fields to values, e.g. {{epochs: 8}}; got {value!r}")
    return dict(value)


def _as_list(value: Any, where: str) -> list:
    if isinstance(value, (str, int)) and not isinstance(value, bool):
        return [value]
    if not isinstance(value, list):
        raise SuiteError(f"{where} must be a list, e.g. [softmax, center]; got {value!r}")
    return list(value)


def _check_fields(values: dict[str, Any], where: str) -> None:
    index = Config.field_index()
    for name in values:
        if name not in index:
            import difflib

            close = difflib.get_close_matches(name, list(index), n=3)
            raise SuiteError(f"{where}: {name!r} is not a Config field"
                             + (f"; did you mean {', '.join(close)}?" if close else "; see foodlib train --help"))
        if name in SUITE_FIELDS - {"loss", "seed"}:
            raise SuiteError(f"{where}: {name!r} is set by the suite runner (out = runs/<suite>/<run>); remove it")
    if "loss" in values and not where.endswith(": base"):
        raise SuiteError(f"{where}: set losses with the `losses:` list, not `loss`")
    if "seed" in values and not where.endswith(": base"):
        raise SuiteError(f"{where}: set seeds with the `seeds:` list, not `seed`")


def _grid_label(entry: dict[str, Any]) -> str:
    if "name" in entry:
        label = str(entry["name"])
    else:
        label = "-".join(f"{k}{v}" for k, v in entry.items() if k not in GRID_KEYS)
    return re.sub(r"[^A-Za-z0-9._-]+", "_", label)
