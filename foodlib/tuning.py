"""Fair tuning: every loss gets the same Optuna search budget, on val only, from one suite file.

"A Metric Learning Reality Check" (Musgrave et al., ECCV 2020) found that most gains of new losses
over old ones vanish once every method gets the same hyperparameter budget, searched by the same
optimiser, on validation data. ``foodlib tune SUITE.yaml`` does exactly that: a suite file with a
``search:`` section (``base``, ``losses``, ``seeds`` and ``loss_params`` as in :mod:`foodlib.suite`)::

    search:
      trials: 20                  # trials per loss, the same for every loss (--trials overrides)
      objective: val.top1         # val.<metric> of the kept (best-val) checkpoint; val.loss is minimised
      direction: maximize         # optional; default: minimize for a loss, maximize for the rest
      seed: 0                     # seeds the TPE sampler
      startup_trials: 8           # random trials per loss before TPE models the results
      pruner: {startup_trials: 4, warmup_epochs: 5}   # median pruner: see below
      shared:                     # searched for every loss, softmax included
        lr: {float: [1.0e-4, 1.0e-2], log: true}
        weight_decay: {float: [1.0e-5, 1.0e-1], log: true}
        warmup_epochs: {float: [0, 3]}
      losses:                     # searched for that loss only
        center: {lam: {float: [1.0e-3, 0.3], log: true}, alpha: {float: [0.1, 0.9]}}
        lgm: {embedding_dim: {choice: [64, 128, 512]}}

A parameter is ``{float: [low, high]}`` (``log: true`` for a log scale, ``step:`` for a grid),
``{int: [low, high]}`` or ``{choice: [a, b, ...]}``; every name is a Config field.

How it runs. One Optuna study per loss (``<suite>/<loss>``) in one storage: an SQLite file
``runs/<suite>/study.db`` by default, or any Optuna storage URL (``--storage postgresql://...``,
or ``journal:PATH`` for a journal file on shared storage where SQLite's locks fail, e.g. NFS).
Every process started with the same suite and storage works on the same studies, so several
processes on one machine, or several machines, share one budget: ``--trials N`` per loss, counted
in the storage; a trial whose number finds N trials already under way is recorded as surplus
(FAIL with ``surplus=True``) and never runs. Each trial is an ordinary run folder
``runs/<suite>/trials/<loss>-tNNN`` trained in this process by :func:`foodlib.train.fit` with
``eval_test=False``, on data loaded without its test split (the test files are never opened).

Sampler: TPE, seeded per trial from (``seed``, trial number), so a study is reproducible for one
worker, workers never propose the same random points, and the first trials of every loss try the
same shared settings (common random numbers); ``constant_liar`` keeps parallel workers apart.

Pruner: the median rule (Optuna's ``MedianPruner``): after ``warmup_epochs`` epochs, a trial whose
val score at an epoch is worse than the median of the earlier trials of the same loss at that
epoch stops. We chose it over successive halving because (a) per-loss budgets are small (tens of
trials) and few run at once, where successive halving's rungs hold a handful of trials and its
first rung would judge every trial after one epoch; (b) regularising losses (center with a lam
warm-up, L-GM with a margin ramp) start slowly, and the warm-up epochs protect them; (c) each loss
is compared only with itself, so pruning never favours one loss over another. A trial whose loss
turns NaN is recorded as pruned (``diverged``).

Interruptions. A running trial writes a heartbeat into the storage (its user attributes; Optuna's
own heartbeat exists only for RDB storages, and journal files need one too). A RUNNING trial whose
process is gone (same host, dead pid) or whose heartbeat is older than ``grace_s`` is marked
FAIL and re-queued with the same parameters; the retry resumes the same run folder from its
``last.pt``. Ctrl-C does the same at once. Finished trials are kept.

Output (written by every worker once all losses have their N trials): ``best.yaml``, the best
settings per loss as a suite (the original seeds, test evaluation on) that ``foodlib suite`` runs
on test; ``report.md`` with a table of every trial and Optuna's figures per loss (optimisation
history, parameter importances, slices) under ``report/<loss>/``.

>>> result = tune("suites/food101-10-scratch-tune.yaml", trials=20)   # doctest: +SKIP
>>> result.best_suite                                           # doctest: +SKIP
PosixPath('runs/food101-10-scratch-tune/best.yaml')
"""
from __future__ import annotations

import contextlib
import math
import os
import socket
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml
from filelock import FileLock

from foodlib.config import Config, ConfigError
from foodlib.files import atomic_write_text
from foodlib.suite import RUNTIME_FIELDS, SUITE_FIELDS, SuiteError, SuiteSpec, load_suite
from foodlib.messages import logger
from foodlib.files import atomic_write_json

SEARCH_KEYS = ("trials", "objective", "direction", "seed", "startup_trials", "pruner", "shared", "losses")
PRUNER_KEYS = ("startup_trials", "warmup_epochs")
#: Fields the tuner sets itself: what a trial computes on (never test) and where it writes.
TUNER_FIELDS = SUITE_FIELDS | RUNTIME_FIELDS | {"eval_test", "features", "figures"}
TUNING_SPLITS = ("train", "val")  # the only splits a trial loads
HOST = socket.gethostname()


class TuneError(SuiteError):
    """A tuning suite or study is unusable; the message names the field or file and the fix."""


# ----- the search space ------------------------------------------------------------------------------

@dataclass(frozen=True)
class SearchParam:
    """One searched Config field: ``float`` / ``int`` in [low, high] (log scale or step), or ``choice``."""

    name: str
    kind: str  # float | int | choice
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    step: float | int | None = None
    choices: tuple = ()

    def suggest(self, trial) -> Any:
        """The value Optuna's sampler proposes for this trial (or the fixed value of a re-queued one)."""
        if self.kind == "float":
            return trial.suggest_float(self.name, self.low, self.high, log=self.log, step=self.step)
        if self.kind == "int":
            return trial.suggest_int(self.name, self.low, self.high, log=self.log, step=self.step or 1)
        return trial.suggest_categorical(self.name, list(self.choices))

    def candidates(self) -> list[Any]:
        """Values that must all be valid Config values (the range ends, every choice)."""
        return list(self.choices) if self.kind == "choice" else [self.low, self.high]

    def describe(self) -> str:
        if self.kind == "choice":
            return f"one of {list(self.choices)}"
        scale = "log" if self.log else ("step " + str(self.step) if self.step else "linear")
        return f"{self.kind} in [{self.low}, {self.high}] ({scale})"


@dataclass
class SearchSpec:
    """The parsed ``search:`` section."""

    shared: dict[str, SearchParam]
    per_loss: dict[str, dict[str, SearchParam]]
    trials: int = 20
    objective: str = "val.top1"
    seed: int = 0
    startup_trials: int = 10
    pruner_startup_trials: int = 5
    pruner_warmup_epochs: int | None = None  # None: a third of the epochs

    @property
    def metric(self) -> str:
        return self.objective.split(".", 1)[1]

    direction_override: str | None = None  # `direction:` in the suite; default: minimise losses, maximise the rest

    @property
    def direction(self) -> str:
        return self.direction_override or ("minimize" if "loss" in self.metric else "maximize")

    def space(self, loss: str) -> list[SearchParam]:
        return [*self.shared.values(), *self.per_loss.get(loss, {}).values()]


def parse_param(name: str, spec: Any, where: str) -> SearchParam:
    """One parameter of a ``search:`` section; a malformed one raises a one-line TuneError naming it."""
    where = f"{where}.{name}"
    example = "e.g. {float: [1.0e-4, 1.0e-2], log: true}, {int: [1, 5]} or {choice: [64, 128]}"
    if not isinstance(spec, dict):
        raise TuneError(f"{where}: {spec!r} is not a parameter; write {example}")
    kinds = [k for k in ("float", "int", "choice") if k in spec]
    stray = sorted(set(spec) - {"float", "int", "choice", "log", "step"})
    if len(kinds) != 1 or stray:
        raise TuneError(f"{where}: give exactly one of float / int / choice (plus log / step); got keys "
                        f"{sorted(spec)}; {example}")
    kind = kinds[0]
    log, step = spec.get("log", False), spec.get("step")
    if not isinstance(log, bool):
        raise TuneError(f"{where}: log must be true or false, got {log!r}")
    if kind == "choice":
        choices = spec["choice"]
        if not isinstance(choices, list) or not choices or "log" in spec or "step" in spec:
            raise TuneError(f"{where}: choice must be a non-empty list, without log / step; got {choices!r}")
        if not all(c is None or isinstance(c, (bool, int, float, str)) for c in choices):
            raise TuneError(f"{where}: choices must be numbers, strings, booleans or null; got {choices!r}")
        return SearchParam(name, "choice", choices=tuple(choices))
    bounds = spec[kind]
    number = (int,) if kind == "int" else (int, float)
    if (not isinstance(bounds, list) or len(bounds) != 2
            or not all(isinstance(b, number) and not isinstance(b, bool) for b in bounds)):
        raise TuneError(f"{where}: {kind} needs [low, high] as two {'integers' if kind == 'int' else 'numbers'}; "
                        f"got {bounds!r}")
    low, high = bounds
    if not low < high:
        raise TuneError(f"{where}: low {low} must be below high {high}")
    if log and low <= 0:
        raise TuneError(f"{where}: a log scale needs low > 0, got {low}; use a linear scale or a positive low")
    if step is not None and (log or not isinstance(step, number) or isinstance(step, bool) or step <= 0):
        raise TuneError(f"{where}: step must be a positive {kind} and cannot go with log; got {step!r}")
    if kind == "float":
        low, high = float(low), float(high)
    return SearchParam(name, kind, low, high, log, step)


def parse_search(spec: SuiteSpec, source: str = "suite") -> SearchSpec:
    """Check the ``search:`` section of a suite read with ``load_suite(..., tuning=True)``.

    Every searched name must be a Config field the tuner does not set itself, and every range end
    and choice must validate for every loss it applies to (on top of ``base`` and ``loss_params``),
    so a bad range fails here, before any trial, with one line naming the field.
    """
    raw = spec.search
    where = f"{source}: search"
    if not raw:
        raise TuneError(f"{source} has no `search:` section; add one (see foodlib/tuning.py) or run it with `foodlib suite`")
    stray = sorted(set(raw) - set(SEARCH_KEYS))
    if stray:
        raise TuneError(f"{where}: unknown key(s) {stray}; valid keys: {', '.join(SEARCH_KEYS)}")
    if spec.grid:
        raise TuneError(f"{source}: a tuning suite has `search:`, not `grid:`; remove the grid (the search replaces it)")

    def positive_int(key: str, value: Any, minimum: int = 1) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise TuneError(f"{where}.{key}: {value!r} must be an integer >= {minimum}")
        return value

    def params(section: Any, at: str) -> dict[str, SearchParam]:
        if section is None:
            return {}
        if not isinstance(section, dict):
            raise TuneError(f"{at} must map Config fields to parameters, e.g. {{lr: {{float: [1.0e-4, 1.0e-2], log: true}}}}")
        index = Config.field_index()
        for name in section:
            if name not in index:
                import difflib

                close = difflib.get_close_matches(str(name), list(index), n=3)
                hint = f"; did you mean {', '.join(close)}?" if close else ""
                raise TuneError(f"{at}: {name!r} is not a Config field{hint}")
            if name in TUNER_FIELDS:
                raise TuneError(f"{at}: {name!r} cannot be searched (the tuner sets it); remove it")
        return {str(name): parse_param(str(name), value, at) for name, value in section.items()}

    shared = params(raw.get("shared"), f"{where}.shared")
    per_loss_raw = raw.get("losses") or {}
    if not isinstance(per_loss_raw, dict):
        raise TuneError(f"{where}.losses must map losses to their parameters, e.g. {{center: {{lam: ...}}}}")
    per_loss = {}
    for loss, section in per_loss_raw.items():
        if loss not in spec.losses:
            raise TuneError(f"{where}.losses has {loss!r}, which is not in the suite's losses {spec.losses}")
        per_loss[loss] = params(section, f"{where}.losses.{loss}")
        both = sorted(set(per_loss[loss]) & set(shared))
        if both:
            raise TuneError(f"{where}.losses.{loss}: {both} also in search.shared; search each field in one place")
    pruner = raw.get("pruner") or {}
    if not isinstance(pruner, dict) or set(pruner) - set(PRUNER_KEYS):
        raise TuneError(f"{where}.pruner: {pruner!r}; valid keys: {', '.join(PRUNER_KEYS)}")
    objective = str(raw.get("objective", "val.top1"))
    if not objective.startswith("val.") or len(objective) <= 4:
        raise TuneError(f"{where}.objective: {objective!r} must be a val metric such as val.top1, val.top5 or val.loss "
                        "(tuning never looks at test)")
    direction = raw.get("direction")
    if direction not in (None, "maximize", "minimize"):
        raise TuneError(f"{where}.direction: {direction!r} must be maximize or minimize (default: minimize for a loss, "
                        "else maximize)")
    search = SearchSpec(
        direction_override=direction, shared=shared, per_loss=per_loss,
        trials=positive_int("trials", raw.get("trials", 20)), objective=objective,
        seed=positive_int("seed", raw.get("seed", 0), 0),
        startup_trials=positive_int("startup_trials", raw.get("startup_trials", 10), 0),
        pruner_startup_trials=positive_int("pruner.startup_trials", pruner.get("startup_trials", 5), 0),
        pruner_warmup_epochs=(None if pruner.get("warmup_epochs") is None
                              else positive_int("pruner.warmup_epochs", pruner["warmup_epochs"], 0)),
    )
    for loss in spec.losses:  # every range end and choice must make a valid config for this loss
        for param in search.space(loss):
            for value in param.candidates():
                try:
                    trial_overrides(spec, loss, {param.name: value})
                except ConfigError as error:
                    section = "shared" if param.name in shared else f"losses.{loss}"
                    raise TuneError(f"{where}.{section}.{param.name}: {value!r} is invalid for {loss}: {error}") from None
    return search


def load_tune(path_or_text: str | Path, out_dir: str | Path = "runs") -> tuple[SuiteSpec, SearchSpec]:
    """Read a tuning suite: the suite part as :func:`foodlib.suite.load_suite` reads it, plus ``search:``."""
    spec = load_suite(path_or_text, out_dir, tuning=True)
    source = str(path_or_text) if "\n" not in str(path_or_text) else "<text>"
    return spec, parse_search(spec, source)


def trial_overrides(spec: SuiteSpec, loss: str, params: dict[str, Any], **runtime: Any) -> dict[str, Any]:
    """The flat Config of one trial: base, the loss's params, the searched values; test stays out.

    Raises ConfigError when a value is invalid (checked for range ends when the suite is read).
    """
    overrides = {**spec.base, **spec.loss_params.get(loss, {}), **params, "loss": loss, "seed": spec.seeds[0],
                 "eval_test": False, "figures": False, **runtime}
    Config.from_flat(**{k: v for k, v in overrides.items() if k != "out"})
    return overrides


def study_fingerprint(spec: SuiteSpec, search: SearchSpec, loss: str) -> str:
    """What a study's trials were computed with; a study is reused only when this still matches."""
    flat = {k: v for k, v in Config.from_flat(**trial_overrides(spec, loss, {})).to_flat().items()
            if k not in RUNTIME_FIELDS}
    space = {p.name: p.describe() for p in search.space(loss)}
    return yaml.safe_dump({"config": flat, "space": space, "objective": search.objective}, sort_keys=True)


# ----- storage, heartbeats, the shared budget --------------------------------------------------------

def open_storage(url: str | None, tune_dir: Path):
    """An Optuna storage: SQLite in the tune folder by default, ``journal:PATH`` for a journal file, or any RDB URL."""
    import optuna

    if url is None:
        tune_dir.mkdir(parents=True, exist_ok=True)
        url = f"sqlite:///{(tune_dir / 'study.db').resolve()}"
    if url.startswith("journal:"):
        from optuna.storages.journal import JournalFileBackend

        path = Path(url.split(":", 1)[1]).expanduser()
        path.parent.mkdir(parents=True, exist_ok=True)
        return optuna.storages.JournalStorage(JournalFileBackend(str(path)))
    if "://" not in url:
        raise TuneError(f"--storage {url!r} is not a storage URL; use sqlite:///PATH, postgresql://..., mysql://... "
                        "or journal:PATH (a journal file, for shared folders such as NFS)")
    engine_kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}  # writers wait, not fail
    return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs)


@contextlib.contextmanager
def _setup_lock(folder: Path | None):
    """Serialise creating the default SQLite database and its studies (concurrent table creation fails)."""
    if folder is None:
        yield
        return
    folder.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder / ".study.lock")):
        yield


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def is_stale(trial, grace_s: float, now: float | None = None) -> bool:
    """A RUNNING trial nobody works on: its process on this host is gone, or its heartbeat is old."""
    attrs = trial.user_attrs
    if attrs.get("host") == HOST and isinstance(attrs.get("pid"), int) and attrs["pid"] != os.getpid():
        if not _pid_alive(attrs["pid"]):
            return True
    started = trial.datetime_start.timestamp() if trial.datetime_start else time.time()
    beat = float(attrs.get("heartbeat", started))
    return (now or time.time()) - beat > grace_s


class Heartbeat:
    """Writes ``heartbeat`` (epoch seconds) into a running trial's user attributes every ``every_s``."""

    def __init__(self, storage, trial_id: int, every_s: float):
        self.storage, self.trial_id, self.every_s = storage, trial_id, every_s
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._beat, daemon=True, name=f"foodlib-heartbeat-{trial_id}")

    def _beat(self) -> None:
        while not self.stop.wait(self.every_s):
            try:
                self.storage.set_trial_user_attr(self.trial_id, "heartbeat", time.time())
            except Exception:  # the trial finished meanwhile, or the storage hiccuped: the next beat retries
                if self.stop.is_set():
                    return

    def __enter__(self) -> "Heartbeat":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()


def fail_and_requeue(storage, study, trial, why: str, log: Callable[[str], None]) -> bool:
    """Mark a RUNNING trial FAIL and queue a retry with its parameters and run folder.

    Only the process whose state change succeeds queues the retry (the storage makes the change
    atomic), so a trial is retried once even when several workers notice it at the same time.
    ``trial._trial_id`` is the storage's id of a FrozenTrial (Optuna has no public accessor).
    """
    from optuna.exceptions import UpdateFinishedTrialError
    from optuna.trial import TrialState

    try:
        storage.set_trial_user_attr(trial._trial_id, "failed_because", why)  # a finished trial takes no attributes
        if not storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL):
            return False
    except (UpdateFinishedTrialError, RuntimeError):
        return False  # another worker got there first, or the trial just finished
    study.enqueue_trial(trial.params, user_attrs={"retry_of": trial.number, "run": trial.user_attrs.get("run")},
                        skip_if_exists=False)
    log(f"  trial {trial.number} ({trial.user_attrs.get('run')}) {why}: queued again, it resumes its run folder")
    return True


def _counted(trial) -> bool:
    from optuna.trial import TrialState

    return (not trial.user_attrs.get("surplus")
            and trial.state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING, TrialState.WAITING))


def budget(trials: list) -> tuple[int, int, bool]:
    """(finished, under way or finished, any waiting) among the trials that count against the budget."""
    from optuna.trial import TrialState

    counted = [t for t in trials if _counted(t)]
    finished = sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in counted)
    return finished, len(counted), any(t.state == TrialState.WAITING for t in counted)


# ----- the worker ----------------------------------------------------------------------------------

@dataclass
class TuneResult:
    tune_dir: Path
    best_suite: Path | None
    report: Path | None
    best: dict[str, dict[str, Any]] = field(default_factory=dict)  # loss -> {value, params, trial, run}
    trials_run: int = 0  # trials this process trained


class _DataCache:
    """The last data a trial loaded, reused while the data settings stay the same (no test split)."""

    def __init__(self):
        self.key, self.data = None, None

    def get(self, cfg: Config, progress: bool):
        from dataclasses import asdict

        from foodlib.data import load_data  # lazy: torch (--report-only and suite parsing need none)

        key = yaml.safe_dump(asdict(cfg.data), sort_keys=True)
        if key != self.key:
            self.data, self.key = None, None  # free the old one first
            self.data = load_data(cfg, progress=progress, splits=TUNING_SPLITS)
            self.key = key
        if "test" in self.data.index.splits:
            raise RuntimeError("tuning data holds a test split; tuning must never load test data")
        if not len(self.data.index.splits.get("val", ())):
            raise TuneError(f"data {cfg.data.data!r} has no val split to tune on; set val_fraction > 0 in base")
        return self.data


def tune(
    suite: str | Path,
    *,
    trials: int | None = None,
    storage: str | None = None,
    out_dir: str | Path = "runs",
    device: str | None = None,
    threads: int | None = None,
    best_out: str | Path | None = None,
    report_only: bool = False,
    heartbeat_s: float = 20.0,
    grace_s: float = 120.0,
    poll_s: float = 5.0,
    quiet: bool = True,
    log: Callable[[str], None] = logger.info,
) -> TuneResult:
    """Tune every loss of ``suite`` with the same budget, then write the best-settings suite and the report.

    Args:
        suite: a tuning suite YAML (a suite with a ``search:`` section).
        trials: trials per loss (default: the suite's ``search.trials``); may grow between calls.
        storage: an Optuna storage URL, or ``journal:PATH``; default ``sqlite:///<out_dir>/<suite>/study.db``.
            Every process given the same storage works on the same studies.
        out_dir: parent of the tune folder ``out_dir/<suite>/`` (trial run folders, report, best.yaml).
        device: ``cpu`` / ``cuda`` / ``auto`` for every trial (overrides the suite).
        threads: torch CPU threads per trial (several workers on one machine: cores // workers).
        best_out: also write the best-settings suite here (e.g. ``suites/food101-10-scratch-best.yaml``).
        report_only: run nothing; write the report and best suite from the storage as it is.
        heartbeat_s, grace_s: a running trial beats every ``heartbeat_s``; one silent for ``grace_s``
            (or whose process on this host died) is retried.
        poll_s: how often a worker that has nothing left to start checks on the others' trials.
        quiet: no progress bars and no per-epoch lines from the trials.
        log: where progress lines go.
    """
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    spec, search = load_tune(suite, out_dir)
    n_trials = trials if trials is not None else search.trials
    if isinstance(n_trials, bool) or not isinstance(n_trials, int) or n_trials < 1:
        raise TuneError(f"--trials {n_trials!r} must be a positive integer")
    tune_dir = spec.out_dir / spec.name
    tune_dir.mkdir(parents=True, exist_ok=True)
    if spec.source_text:
        atomic_write_text(tune_dir / "tune.yaml", spec.source_text)
    with _setup_lock(tune_dir if storage is None else None):  # workers starting together on one SQLite file
        store = open_storage(storage, tune_dir)
        studies = {loss: _open_study(store, spec, search, loss, create=not report_only) for loss in spec.losses}
    result = TuneResult(tune_dir, None, None)
    runtime = {k: v for k, v in (("device", device), ("threads", threads)) if v is not None}
    if not report_only:
        data_cache = _DataCache()
        t0 = time.time()
        for loss in spec.losses:
            result.trials_run += _work_on(studies[loss], store, spec, search, loss, n_trials, tune_dir, runtime,
                                          data_cache, heartbeat_s, grace_s, poll_s, quiet, log)
        log(f"tune {spec.name}: {n_trials} trial(s) per loss finished; this process trained {result.trials_run} "
            f"in {time.time() - t0:.0f} s")
    result.best = {loss: _best_of(study) for loss, study in studies.items() if study is not None}
    result.best = {loss: best for loss, best in result.best.items() if best is not None}
    if result.best:
        result.best_suite = write_best_suite(spec, search, result.best, tune_dir / "best.yaml", n_trials)
        if best_out is not None:
            write_best_suite(spec, search, result.best, Path(best_out), n_trials)
            log(f"best settings -> {best_out}")
    result.report = write_tune_report(spec, search, studies, tune_dir, n_trials)
    log(f"best settings per loss -> {result.best_suite} (run it on test: foodlib suite {result.best_suite})\n"
        f"report -> {result.report}")
    return result


def _open_study(store, spec: SuiteSpec, search: SearchSpec, loss: str, create: bool):
    import optuna

    name = f"{spec.name}/{loss}"
    fingerprint = study_fingerprint(spec, search, loss)
    pruner = optuna.pruners.MedianPruner(
        n_startup_trials=search.pruner_startup_trials,
        n_warmup_steps=1 + warmup_epochs(spec, search, loss))  # steps are 1-based epochs: judged from warm-up + 1
    if not create:
        try:
            return optuna.load_study(study_name=name, storage=store, pruner=pruner)
        except KeyError:
            return None
    study = optuna.create_study(study_name=name, storage=store, direction=search.direction, load_if_exists=True,
                                sampler=_sampler(search, 0), pruner=pruner)
    recorded = study.user_attrs.get("fingerprint")
    if recorded is None:
        study.set_user_attr("fingerprint", fingerprint)
    elif recorded != fingerprint:
        raise TuneError(f"study {name!r} in this storage was run with other settings (base, loss_params, seed, search "
                        "space or objective changed); give the suite another name, or another --storage, so that "
                        "trials of two searches do not mix")
    return study


def warmup_epochs(spec: SuiteSpec, search: SearchSpec, loss: str) -> int:
    """Epochs a trial always trains before the pruner may stop it (default: a third of its epochs)."""
    if search.pruner_warmup_epochs is not None:
        return search.pruner_warmup_epochs
    return Config.from_flat(**trial_overrides(spec, loss, {})).train.epochs // 3


def _sampler(search: SearchSpec, number: int):
    import optuna

    seed = (search.seed * 1_000_003 + number) % 2**32  # per trial: reproducible, and distinct across workers
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # constant_liar
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=search.startup_trials, constant_liar=True)


def _work_on(study, store, spec: SuiteSpec, search: SearchSpec, loss: str, n_trials: int, tune_dir: Path,
             runtime: dict[str, Any], data_cache: _DataCache, heartbeat_s: float, grace_s: float, poll_s: float,
             quiet: bool, log: Callable[[str], None]) -> int:
    """Run trials of one loss until the study holds ``n_trials`` finished ones; returns how many ran here."""
    from optuna.trial import TrialState

    ran, waiting_logged = 0, False
    while True:
        for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if is_stale(t, grace_s):
                fail_and_requeue(store, study, t, "was interrupted (its process is gone or silent)", log)
        finished, allocated, waiting = budget(study.get_trials(deepcopy=False))
        if finished >= n_trials:
            return ran
        if allocated >= n_trials and not waiting:
            if not waiting_logged:
                log(f"{loss}: the last trials run elsewhere; waiting for them")
                waiting_logged = True
            time.sleep(poll_s)
            continue
        trial = study.ask()
        lower = [t for t in study.get_trials(deepcopy=False) if t.number < trial.number and _counted(t)]
        if len(lower) >= n_trials:  # another worker took the last slot between our count and ask()
            trial.set_user_attr("surplus", True)
            study.tell(trial, state=TrialState.FAIL)
            continue
        study.sampler = _sampler(search, trial.number)  # before any suggest_*: TPE samples independently
        ran += 1
        _run_trial(study, store, trial, spec, search, loss, n_trials, tune_dir, runtime, data_cache, heartbeat_s,
                   quiet, log)


def _run_trial(study, store, trial, spec: SuiteSpec, search: SearchSpec, loss: str, n_trials: int, tune_dir: Path,
               runtime: dict[str, Any], data_cache: _DataCache, heartbeat_s: float, quiet: bool,
               log: Callable[[str], None]) -> None:
    import optuna
    from optuna.trial import TrialState

    from foodlib.train import NonFiniteLossError, fit  # lazy: torch, as above

    params = {p.name: p.suggest(trial) for p in search.space(loss)}
    run = trial.user_attrs.get("run") or f"{loss}-t{trial.number:03d}"
    for key, value in (("run", run), ("host", HOST), ("pid", os.getpid()), ("heartbeat", time.time())):
        trial.set_user_attr(key, value)
    run_dir = tune_dir / "trials" / run
    metric, t0 = search.metric, time.time()
    overrides = trial_overrides(spec, loss, params, out=str(run_dir), quiet=quiet, **runtime)
    needs_features = metric not in ("top1", "top5", "loss")  # other val metrics come from the features
    cfg = Config.from_flat(**overrides, features=needs_features, resume=(run_dir / "last.pt").is_file())
    shown = ", ".join(f"{k}={_short(v)}" for k, v in params.items())
    retry = trial.user_attrs.get("retry_of")
    log(f"{loss} trial {trial.number} "
        f"[{sum(_counted(t) for t in study.get_trials(deepcopy=False) if t.number <= trial.number)}/{n_trials}] "
        f"{run}: {shown}" + (f" (retry of trial {retry}, resuming)" if cfg.train.resume else ""))
    reported: set[int] = set()

    def report(epoch: int, trace: list[dict[str, Any]]) -> None:
        for row in trace:
            if row["split"] == "val" and metric in row and row["epoch"] not in reported:
                trial.report(float(row[metric]), step=int(row["epoch"]))
                reported.add(row["epoch"])
        if reported and trial.should_prune():
            raise optuna.TrialPruned(f"val {metric} after epoch {epoch} is worse than the median of earlier trials")

    record = {"trial": trial.number, "study": study.study_name, "loss": loss, "params": params, "retry_of": retry}
    try:
        if retry is None and run_dir.is_dir() and any(run_dir.iterdir()):
            raise TuneError(f"{run_dir} already holds a run that this study has no record of (a study removed or "
                            "renamed?); move that folder away, or give the suite another name")
        with Heartbeat(store, trial._trial_id, heartbeat_s):
            data = data_cache.get(cfg, progress=not quiet)
            run_dir.mkdir(parents=True, exist_ok=True)
            data.index.write_split_files(run_dir)  # what load_data(run_dir=) writes: the run folder stays complete
            with contextlib.ExitStack() as stack:
                if quiet:  # fit's epoch lines go to the run folder, the console gets one line per trial
                    log_file = stack.enter_context(open(run_dir / "fit.log", "a", buffering=1))
                    stack.enter_context(contextlib.redirect_stdout(log_file))
                fit_result = fit(cfg, data=data, on_epoch=report if not needs_features else None)
        if metric not in fit_result.metrics.get("val", {}):
            raise TuneError(f"search.objective {search.objective!r}: the run's val metrics are "
                            f"{sorted(fit_result.metrics.get('val', {}))}; choose one of them")
        value = float(fit_result.metrics["val"][metric])
    except optuna.TrialPruned as pruned:
        study.tell(trial, state=TrialState.PRUNED)
        atomic_write_json(run_dir / "tuning.json", {**record, "state": "pruned", "why": str(pruned)})
        log(f"  pruned after epoch {max(reported, default=0)} ({time.time() - t0:.0f} s): {pruned}")
        return
    except NonFiniteLossError as error:  # a diverging setting is a bad setting, not a broken trial
        trial.set_user_attr("diverged", str(error).split(";")[0])
        study.tell(trial, state=TrialState.PRUNED)
        atomic_write_json(run_dir / "tuning.json", {**record, "state": "pruned", "why": f"diverged: {error}"})
        log(f"  diverged ({time.time() - t0:.0f} s), recorded as pruned: {error}")
        return
    except KeyboardInterrupt:
        fail_and_requeue(store, study, store.get_trial(trial._trial_id), "was interrupted (Ctrl-C)", log)
        raise
    except BaseException as error:
        trial.set_user_attr("error", f"{type(error).__name__}: {error}"[:500])
        study.tell(trial, state=TrialState.FAIL)
        raise
    study.tell(trial, value)
    atomic_write_json(run_dir / "tuning.json", {**record, "state": "complete", "objective": search.objective,
                                                "value": value})
    log(f"  {search.objective} {value:.4f} in {time.time() - t0:.0f} s")


def _best_of(study) -> dict[str, Any] | None:
    from optuna.trial import TrialState

    if study is None or not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        return None
    best = study.best_trial
    return {"value": best.value, "params": dict(best.params), "trial": best.number, "run": best.user_attrs.get("run")}


def _short(value: Any) -> str:
    if isinstance(value, float) and value and not math.isclose(value, round(value, 4)):
        return f"{value:.3g}"
    return str(value)


# ----- output: the best-settings suite and the report ---------------------------------------------

#: Base fields a tuning suite sets for speed or to keep test out; the best-settings suite drops them
#: so its runs evaluate test and write figures (the defaults).
TUNING_ONLY_FIELDS = ("eval_test", "features", "figures")


def write_best_suite(spec: SuiteSpec, search: SearchSpec, best: dict[str, dict[str, Any]], path: Path,
                     n_trials: int) -> Path:
    """The best settings per loss as a suite file that ``foodlib suite`` runs on test with the original seeds."""
    base = {k: v for k, v in spec.base.items() if k not in TUNING_ONLY_FIELDS}
    loss_params = {loss: {**spec.loss_params.get(loss, {}), **best[loss]["params"]} for loss in spec.losses
                   if loss in best}
    untuned = [loss for loss in spec.losses if loss not in best]
    name = (spec.name[: -len("-tune")] if spec.name.endswith("-tune") else spec.name) + "-best"
    body = {"name": name, "base": base, "losses": [loss for loss in spec.losses if loss in best], "seeds": spec.seeds,
            "baseline": spec.baseline if spec.baseline in best else next(iter(best)), "loss_params": loss_params}
    for key in ("notebook", "compare_notebook"):
        if getattr(spec, key) != getattr(SuiteSpec(name="", base={}, losses=[], seeds=[]), key):
            body[key] = str(getattr(spec, key))
    header = [f"# Best settings per loss from `foodlib tune` of suite {spec.name}: {n_trials} trial(s) per loss,",
              f"# TPE (seed {search.seed}) + median pruning, objective {search.objective} on val only (test never loaded).",
              "# Run it on test with the original seeds:  foodlib suite " + str(path),
              *(f"#   {loss}: {search.objective} {b['value']:.4f} (trial {b['trial']}, run {b['run']})"
                for loss, b in best.items())]
    if untuned:
        header.append(f"# not tuned yet (no finished trial): {', '.join(untuned)}")
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, "\n".join(header) + "\n" + yaml.safe_dump(body, sort_keys=False))
    load_suite(path)  # what we hand over must be a valid suite
    return path


def trial_rows(study, search: SearchSpec) -> list[dict[str, Any]]:
    """One row per trial (surplus ones left out): number, state, value, params, epochs, seconds, notes."""
    rows = []
    for t in study.get_trials(deepcopy=False):
        if t.user_attrs.get("surplus"):
            continue
        notes = [f"{k} {t.user_attrs[k]}" for k in ("retry_of", "diverged", "failed_because", "error")
                 if t.user_attrs.get(k) is not None]
        seconds = (t.datetime_complete - t.datetime_start).total_seconds() if t.datetime_complete and t.datetime_start else None
        rows.append({"trial": t.number, "run": t.user_attrs.get("run", ""), "state": t.state.name.lower(),
                     search.objective: t.value if t.value is not None else "",
                     **{p.name: t.params.get(p.name, "") for p in search.space(study.study_name.rsplit("/", 1)[1])},
                     "epochs": max(t.intermediate_values, default=""), "seconds": round(seconds, 1) if seconds else "",
                     "notes": "; ".join(notes)})
    return rows


FIGURE_NOTES = {
    "history": "Optimisation history: one dot per finished (not pruned) trial, its objective value against the trial "
               "number; the line is the best value so far.",
    "importances": "Parameter importances (Optuna's fANOVA evaluator): the share of the objective's variance across "
                   "finished trials that each searched parameter explains; the bars sum to 1. It fits a random forest "
                   "to the finished trials: with a handful of them (or tied values) the bars are noise, not a finding.",
    "slices": "Slices: one panel per parameter, one dot per finished trial at its value of that parameter and its "
              "objective; the dot colour is the trial number (legend bar).",
}


def write_tune_report(spec: SuiteSpec, search: SearchSpec, studies: dict[str, Any], tune_dir: Path,
                      n_trials: int) -> Path:
    """``report.md``: budget, search space, best per loss, every trial; Optuna's figures per loss in ``report/<loss>/``."""
    from collections import Counter

    lines = [f"# Tuning report: {spec.name}", "",
             f"Budget: {n_trials} trial(s) per loss, the same for every loss; objective {search.objective} "
             f"({search.direction}) of the best-val checkpoint, on val only (test is never loaded). TPE sampler, seed "
             f"{search.seed}, {search.startup_trials} random startup trials; median pruner once "
             f"{search.pruner_startup_trials} trials of a loss finished, never during a trial's first "
             f"{'third of its' if search.pruner_warmup_epochs is None else search.pruner_warmup_epochs} epochs. "
             f"Training seed {spec.seeds[0]}.", "", "## Best per loss", "",
             f"| loss | {search.objective} | trial | finished / pruned / failed | trial time (s) | best settings |",
             "|---|---|---|---|---|---|"]
    sections = []
    for loss, study in studies.items():
        if study is None:
            lines.append(f"| {loss} | - | - | no study yet | - | - |")
            continue
        rows = trial_rows(study, search)
        counts = Counter(r["state"] for r in rows)
        seconds = sum(r["seconds"] for r in rows if r["seconds"] != "")
        best = _best_of(study)
        settings = ", ".join(f"{k}={_short(v)}" for k, v in best["params"].items()) if best else "-"
        lines.append(f"| {loss} | {best['value']:.4f} | {best['trial']} ({best['run']}) | " if best else f"| {loss} | - | - | ")
        lines[-1] += (f"{counts.get('complete', 0)} / {counts.get('pruned', 0)} / {counts.get('fail', 0)} | "
                      f"{seconds:.0f} | {settings} |")
        folder = tune_dir / "report" / loss
        folder.mkdir(parents=True, exist_ok=True)
        _write_csv(folder / "trials.csv", rows)
        sections += [f"## {loss}", "", "Searched: " + (", ".join(f"{p.name} {p.describe()}" for p in search.space(loss))
                                                        or "nothing (base settings only)"), ""]
        sections += _figures(study, folder, tune_dir)
        sections += ["Every trial (a pruned trial's value is its val score at the epoch where it was stopped; "
                     f"run folders in {tune_dir / 'trials'}):", "", _markdown_table(rows), ""]
    path = tune_dir / "report.md"
    atomic_write_text(path, "\n".join(lines + [""] + sections) + "\n")
    return path


def _figures(study, folder: Path, tune_dir: Path) -> list[str]:
    """Optuna's own matplotlib figures, each saved atomically (several workers may write the report)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    import optuna
    from optuna.visualization import matplotlib as ovm

    out = []
    makers = {"history": ovm.plot_optimization_history, "importances": ovm.plot_param_importances,
              "slices": ovm.plot_slice}
    for name, make in makers.items():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # experimental-API warnings of optuna.visualization.matplotlib
                ax = make(study)
            figure = (ax.flat[0] if hasattr(ax, "flat") else ax).figure
            figure.set_size_inches(max(6.4, figure.get_size_inches()[0]), 4.2)
            temp = folder / f".{name}.{os.getpid()}.png"
            figure.savefig(temp, dpi=110, bbox_inches="tight")
            plt.close(figure)
            os.replace(temp, folder / f"{name}.png")
            out += [f"![{name}]({(folder / f'{name}.png').relative_to(tune_dir)})", "", FIGURE_NOTES[name], ""]
        except (ValueError, RuntimeError, ZeroDivisionError, optuna.exceptions.OptunaError) as error:
            out += [f"({name}: not drawn: {error})", ""]
    return out


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    import csv
    import io

    buffer = io.StringIO()
    if rows:
        writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    atomic_write_text(path, buffer.getvalue())


def _markdown_table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "(no trials yet)"
    columns = list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(_short(row[c]) if isinstance(row[c], float) else str(row[c]) for c in columns) + " |")
    return "\n".join(lines)
