"""foodlib.tuning (foodlib tune): the search section, a tiny study that prunes, never opening test, shared storage, resuming.

The studies run on embedded dishes made easy on purpose (no intra-class variation, very different
recipes, 4 classes, 32 px, smallcnn): a sensible lr then learns in 3 epochs while lr=1e-8 cannot
move the weights at all, so the median pruner stops the 1e-8 trial by construction.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

import foodlib.suite as S
import foodlib.tuning as T

REPO = Path(__file__).resolve().parents[1]
TINY_BASE = {"data": "dishes", "dishes_classes": 4, "dishes_per_class": 40, "val_fraction": 0.25, "intra": 0.0,
             "inter": 1.0, "image_size": 32, "backbone": "smallcnn", "epochs": 2, "batch_size": 16, "workers": 0,
             "augment": "none", "threads": 1}


def tune_text(search=None, **keys) -> str:
    spec = {"name": "tiny-tune", "base": dict(TINY_BASE), "losses": ["softmax"], "seeds": [3, 4],
            "search": search or {"trials": 2, "shared": {"lr": {"float": [1.0e-3, 1.0e-2], "log": True}}}}
    spec.update(keys)
    return yaml.safe_dump(spec, sort_keys=False)


def write_suite(tmp_path, text: str) -> Path:
    path = tmp_path / "tiny-tune.yaml"
    path.write_text(text)
    return path


# ----- the search section ----------------------------------------------------------------------------

def test_search_section_parses_shared_and_per_loss_params(tmp_path):
    search = {"trials": 5, "objective": "val.loss", "shared": {"lr": {"float": [1.0e-4, 1.0e-2], "log": True},
                                                               "weight_decay": {"choice": [0.0, 0.05]}},
              "losses": {"center": {"lam": {"float": [0.001, 0.1], "log": True}, "lam_warmup_epochs": {"int": [0, 2]}}}}
    spec, parsed = T.load_tune(tune_text(search, losses=["softmax", "center"]), tmp_path)
    assert [p.name for p in parsed.space("softmax")] == ["lr", "weight_decay"]
    assert [p.name for p in parsed.space("center")] == ["lr", "weight_decay", "lam", "lam_warmup_epochs"]
    assert parsed.trials == 5 and parsed.direction == "minimize" and parsed.metric == "loss"
    assert parsed.shared["lr"].log and parsed.per_loss["center"]["lam_warmup_epochs"].kind == "int"
    assert spec.seeds == [3, 4]
    flat = T.trial_overrides(spec, "center", {"lam": 0.01})
    assert flat["eval_test"] is False and flat["seed"] == 3 and flat["loss"] == "center"


@pytest.mark.parametrize("search, words", [
    ({"shared": {"lrr": {"float": [0.001, 0.01]}}}, ["search.shared", "'lrr'", "lr"]),
    ({"shared": {"lr": {"float": [0.01, 0.001]}}}, ["search.shared.lr", "below"]),
    ({"shared": {"lr": {"float": [0.0, 0.01], "log": True}}}, ["search.shared.lr", "low > 0"]),
    ({"shared": {"momentum": {"float": [0.5, 1.5]}}}, ["search.shared.momentum", "1.5", "invalid for softmax"]),
    ({"shared": {"lr": [0.001, 0.01]}}, ["search.shared.lr", "float"]),
    ({"shared": {"lr": {"float": [0.001, 0.01], "int": [1, 2]}}}, ["search.shared.lr", "exactly one"]),
    ({"shared": {"epochs": {"int": [1.5, 3]}}}, ["search.shared.epochs", "integers"]),
    ({"shared": {"optimizer": {"choice": []}}}, ["search.shared.optimizer", "non-empty"]),
    ({"shared": {"optimizer": {"choice": ["adamw", "rmsprop"]}}}, ["optimizer", "'rmsprop'"]),
    ({"shared": {"eval_test": {"choice": [True, False]}}}, ["'eval_test'", "tuner sets it"]),
    ({"losses": {"lgm": {"alpha": {"float": [0.1, 1.0]}}}}, ["search.losses", "'lgm'", "not in the suite"]),
    ({"objective": "test.top1"}, ["objective", "val metric"]),
    ({"trials": 0}, ["search.trials", ">= 1"]),
    ({"sampler": "tpe"}, ["unknown key", "sampler"]),
])
def test_bad_search_sections_fail_in_one_line_naming_the_field(tmp_path, search, words):
    with pytest.raises(T.TuneError) as error:
        T.load_tune(tune_text(search), tmp_path)
    message = str(error.value)
    assert "\n" not in message
    for word in words:
        assert word in message, message


def test_a_tuning_suite_is_not_an_ordinary_suite_and_has_no_grid(tmp_path):
    with pytest.raises(S.SuiteError, match="foodlib tune"):
        S.load_suite(tune_text())
    with pytest.raises(T.TuneError, match="grid"):
        T.load_tune(tune_text(grid=[{"lr": 0.01}]), tmp_path)


def test_the_tune_command_is_registered():
    from foodlib.cli import build_parser

    args = build_parser().parse_args(["tune", "x.yaml", "--trials", "3", "--storage", "journal:/tmp/j.log"])
    assert args.trials == 3 and args.storage == "journal:/tmp/j.log"
    import foodlib

    assert callable(foodlib.tune)


def test_stale_trials_are_those_of_dead_processes_or_silent_heartbeats():
    from datetime import datetime

    from optuna.trial import FrozenTrial, TrialState

    def running(**attrs):
        return FrozenTrial(number=0, state=TrialState.RUNNING, value=None, datetime_start=datetime.now(),
                           datetime_complete=None, params={}, distributions={}, user_attrs=attrs, system_attrs={},
                           intermediate_values={}, trial_id=0)

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    now = time.time()
    assert T.is_stale(running(host=T.HOST, pid=dead.pid, heartbeat=now), grace_s=60)
    assert not T.is_stale(running(host=T.HOST, pid=os.getpid(), heartbeat=now), grace_s=60)
    assert not T.is_stale(running(host="elsewhere", pid=dead.pid, heartbeat=now), grace_s=60)  # can't see its pids
    assert T.is_stale(running(host="elsewhere", pid=1, heartbeat=now - 120), grace_s=60)


# ----- a tiny study ---------------------------------------------------------------------------------

@pytest.mark.slow
def test_tiny_study_prunes_writes_a_runnable_best_suite_and_never_opens_test(tmp_path, monkeypatch):
    import optuna
    import PIL.Image

    import foodlib.data as D

    search = {"trials": 3, "shared": {"lr": {"choice": [0.01, 1.0e-8]}},
              "pruner": {"startup_trials": 2, "warmup_epochs": 2}}
    path = write_suite(tmp_path, tune_text(search, base={**TINY_BASE, "epochs": 4}))
    spec, _ = T.load_tune(path, tmp_path / "runs")
    from foodlib.config import Config

    D.resolve_data_root("dishes", Config.from_flat(**T.trial_overrides(spec, "softmax", {})))  # generated before the watch
    # Order the trials by construction: two that learn, then one that cannot (lr 1e-8).
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    study = optuna.create_study(study_name="tiny-tune/softmax", storage=storage, direction="maximize")
    for lr in (0.01, 0.01, 1.0e-8):
        study.enqueue_trial({"lr": lr})

    opened, decoded = [], []
    open_image, build_cache = PIL.Image.open, D.build_cache
    monkeypatch.setattr(PIL.Image, "open", lambda fp, *a, **k: (opened.append(str(fp)), open_image(fp, *a, **k))[1])
    monkeypatch.setattr(D, "build_cache", lambda paths, *a, **k: (decoded.extend(paths), build_cache(paths, *a, **k))[1])
    result = T.tune(path, storage=storage, out_dir=tmp_path / "runs", log=lambda line: None)

    trials = optuna.load_study(study_name="tiny-tune/softmax", storage=storage).get_trials()
    states = [t.state.name for t in trials]
    assert len(trials) == 3 and states[:2] == ["COMPLETE", "COMPLETE"]
    assert states[2] == "PRUNED" and trials[2].params == {"lr": 1.0e-8}  # the median rule stopped it early
    assert max(trials[2].intermediate_values) < 4
    # test never loaded: no test file decoded or opened, no test metrics anywhere
    assert decoded and not [p for p in decoded + opened if "/test/" in p.replace(os.sep, "/")]
    for run in (result.tune_dir / "trials").iterdir():
        assert not (run / "splits" / "test.txt").exists()
        if (run / "metrics.json").exists():
            assert "test" not in json.loads((run / "metrics.json").read_text())
    # the best-settings suite: valid, original seeds, the best lr, test evaluation back on
    best = S.load_suite(result.best_suite, tmp_path / "runs")
    assert best.seeds == [3, 4] and best.losses == ["softmax"] and best.loss_params["softmax"]["lr"] == 0.01
    assert all(run.config.train.eval_test for run in S.plan_suite(best))
    report = result.report.read_text()
    assert "| softmax | " in report and "pruned" in report
    assert (result.tune_dir / "report" / "softmax" / "history.png").stat().st_size > 0
    assert (result.tune_dir / "report" / "softmax" / "trials.csv").read_text().count("\n") == 4


def _tune_process(suite: Path, cwd: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-c", "import sys; from foodlib.cli import main; sys.exit(main())",
                             "tune", str(suite), "--threads", "1", *extra],
                            cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finished(storage: str) -> list:
    import optuna

    trials = optuna.load_study(study_name="tiny-tune/softmax", storage=storage).get_trials()
    return [t for t in trials if t.state.name in ("COMPLETE", "PRUNED") and not t.user_attrs.get("surplus")]


@pytest.mark.slow
def test_two_workers_on_one_storage_finish_n_trials_none_twice(tmp_path):
    path = write_suite(tmp_path, tune_text({"trials": 3, "shared": {"lr": {"float": [1.0e-3, 1.0e-2], "log": True}}},
                                           base={**TINY_BASE, "epochs": 1}))
    workers = [_tune_process(path, tmp_path) for _ in range(2)]
    outputs = [w.communicate(timeout=600)[0] for w in workers]
    assert [w.returncode for w in workers] == [0, 0], outputs
    finished = _finished(f"sqlite:///{tmp_path / 'runs' / 'tiny-tune' / 'study.db'}")
    runs = [t.user_attrs["run"] for t in finished]
    assert len(finished) == 3 and len(set(runs)) == 3
    for run in runs:  # each trained exactly once: one first epoch in its log
        log = (tmp_path / "runs" / "tiny-tune" / "trials" / run / "fit.log").read_text()
        assert log.count("epoch 1/1") == 1, log
    assert S.load_suite(tmp_path / "runs" / "tiny-tune" / "best.yaml").losses == ["softmax"]


@pytest.mark.slow
def test_a_tune_killed_mid_trial_resumes_it(tmp_path):
    path = write_suite(tmp_path, tune_text({"trials": 2, "shared": {"lr": {"float": [1.0e-3, 1.0e-2], "log": True}}},
                                           base={**TINY_BASE, "epochs": 3}))
    trials_dir = tmp_path / "runs" / "tiny-tune" / "trials"
    worker = _tune_process(path, tmp_path)
    deadline = time.time() + 240
    while not list(trials_dir.glob("*/last.pt")) and time.time() < deadline and worker.poll() is None:
        time.sleep(0.2)
    worker.send_signal(signal.SIGKILL)  # mid-trial: after its first epoch's checkpoint, before its last
    worker.wait()
    killed = sorted(p.parent.name for p in trials_dir.glob("*/last.pt"))
    assert killed and not (trials_dir / killed[0] / "metrics.json").exists()

    lines: list[str] = []
    T.tune(path, out_dir=tmp_path / "runs", log=lines.append)
    storage = f"sqlite:///{tmp_path / 'runs' / 'tiny-tune' / 'study.db'}"
    finished = _finished(storage)
    assert len(finished) == 2
    retry = [t for t in finished if t.user_attrs.get("retry_of") is not None]
    assert len(retry) == 1 and retry[0].user_attrs["run"] == killed[0], lines
    log = (trials_dir / killed[0] / "fit.log").read_text()
    assert "resuming" in log and log.count("epoch 1/3") == 1  # the finished epoch was kept, not retrained
    assert (trials_dir / killed[0] / "metrics.json").exists()


def test_every_suite_in_the_repository_loads():
    for path in sorted((REPO / "suites").glob("*.yaml")):
        if "search:" in path.read_text():
            spec, search = T.load_tune(path)
            assert search.space(spec.losses[0]), path
        else:
            S.load_suite(path)


@pytest.mark.parametrize("kind", ["sqlite", "journal"])
def test_an_interrupted_trial_is_requeued_once_with_its_settings_and_folder(tmp_path, kind):
    import optuna

    storage = T.open_storage(f"sqlite:///{tmp_path / 's.db'}" if kind == "sqlite" else f"journal:{tmp_path / 'j.log'}",
                             tmp_path)
    study = optuna.create_study(study_name="s/softmax", storage=storage, direction="maximize")
    trial = study.ask()
    trial.suggest_float("lr", 1e-3, 1e-2, log=True)
    trial.set_user_attr("run", "softmax-t000")
    frozen = storage.get_trial(trial._trial_id)
    assert T.fail_and_requeue(storage, study, frozen, "was interrupted", log=lambda line: None)
    assert not T.fail_and_requeue(storage, study, frozen, "was interrupted", log=lambda line: None)  # once only
    trials = study.get_trials()
    assert [t.state.name for t in trials] == ["FAIL", "WAITING"]
    assert trials[0].user_attrs["failed_because"] == "was interrupted"
    assert trials[1].user_attrs == {"retry_of": 0, "run": "softmax-t000"}
    assert T.budget(trials) == (0, 1, True)  # the failed one no longer counts, its retry does
    retry = study.ask()
    assert retry.number == 1 and retry.suggest_float("lr", 1e-3, 1e-2, log=True) == frozen.params["lr"]


def test_a_leftover_run_folder_is_never_overwritten(tmp_path):
    import optuna

    leftover = tmp_path / "runs" / "tiny-tune" / "trials" / "softmax-t000"
    leftover.mkdir(parents=True)
    (leftover / "metrics.json").write_text("{}")
    with pytest.raises(T.TuneError, match="softmax-t000 already holds a run"):
        T.tune(write_suite(tmp_path, tune_text()), out_dir=tmp_path / "runs", log=lambda line: None)
    assert (leftover / "metrics.json").read_text() == "{}"
    study = optuna.load_study(study_name="tiny-tune/softmax", storage=f"sqlite:///{tmp_path / 'runs/tiny-tune/study.db'}")
    assert [t.state.name for t in study.get_trials()] == ["FAIL"]
