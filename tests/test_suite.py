"""foodlib.suite: reading suite files, planning runs, skipping finished ones, surviving failures.

Most tests replace the papermill call (``foodlib.suite.execute_notebook``) with a fake that writes
what a finished run writes (config.yaml, metrics.json), so they check the runner's decisions in
milliseconds; one slow test runs a tiny suite through papermill for real.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

import foodlib.suite as S
from foodlib.cli import main as cli_main
from foodlib.config import Config
from foodlib.files import FolderBusyError, folder_lock

TINY_BASE = {"data": "dishes", "dishes_classes": 3, "dishes_per_class": 30, "image_size": 32, "backbone": "smallcnn",
             "epochs": 1, "batch_size": 8, "workers": 0}


def suite_text(**keys) -> str:
    spec = {"name": "tiny", "base": dict(TINY_BASE), "losses": ["softmax", "center"], "seeds": [0]}
    spec.update(keys)
    return yaml.safe_dump(spec, sort_keys=False)


# ----- reading and planning ---------------------------------------------------------------------------

def test_plan_expands_losses_seeds_and_grid_in_order(tmp_path):
    spec = S.load_suite(suite_text(seeds=[0, 1], grid=[{"lr": 0.001}, {"name": "fast", "lr": 0.01}]), tmp_path)
    names = [run.name for run in S.plan_suite(spec)]
    assert names == ["softmax-lr0.001-s0", "center-lr0.001-s0", "softmax-fast-s0", "center-fast-s0",
                     "softmax-lr0.001-s1", "center-lr0.001-s1", "softmax-fast-s1", "center-fast-s1"]
    run = S.plan_suite(spec)[6]
    assert (run.variant, run.loss, run.seed) == ("softmax-fast", "softmax", 1)
    assert run.config.optim.lr == 0.01 and run.config.train.seed == 1 and run.config.loss.loss == "softmax"
    assert run.run_dir == tmp_path / "tiny" / "softmax-fast-s1"


def test_overrides_layer_base_then_loss_params_then_grid(tmp_path):
    text = suite_text(base={**TINY_BASE, "lr": 0.002, "epochs": 4}, loss_params={"center": {"lam": 0.5, "lr": 0.004}},
                      grid=[{"epochs": 2}])
    softmax, center = S.plan_suite(S.load_suite(text, tmp_path))
    assert (softmax.config.optim.lr, softmax.config.loss.lam, softmax.config.train.epochs) == (0.002, None, 2)
    assert (center.config.optim.lr, center.config.loss.lam, center.config.train.epochs) == (0.004, 0.5, 2)
    assert center.overrides["loss"] == "center" and center.overrides["seed"] == 0


def test_grid_entry_losses_limit_it_to_those_losses(tmp_path):
    grid = [{}, {"name": "lam0.1", "lam": 0.1, "losses": ["center"]}, {"weight_decay": 0.05, "losses": "softmax"}]
    spec = S.load_suite(suite_text(grid=grid), tmp_path)
    runs = S.plan_suite(spec)
    assert [r.name for r in runs] == ["softmax-s0", "center-s0", "center-lam0.1-s0", "softmax-weight_decay0.05-s0"]
    assert runs[2].config.loss.lam == 0.1 and "losses" not in runs[2].overrides
    assert runs[3].config.optim.weight_decay == 0.05
    with pytest.raises(S.SuiteError, match=r"grid\[0\].losses \['lgm'\] must name losses"):
        S.load_suite(suite_text(grid=[{"lam": 0.1, "losses": ["lgm"]}]), tmp_path)


def test_suite_name_defaults_to_the_file_name(tmp_path):
    path = tmp_path / "my-suite.yaml"
    path.write_text("base: {epochs: 1}\nlosses: [softmax]\n")
    spec = S.load_suite(path, tmp_path / "runs")
    assert spec.name == "my-suite" and spec.seeds == [0] and spec.baseline == "softmax"
    assert [r.run_dir for r in S.plan_suite(spec)] == [tmp_path / "runs" / "my-suite" / "softmax-s0"]


@pytest.mark.parametrize("text, words", [
    ("base: {epoch: 3}\nlosses: [softmax]\n", ["'epoch'", "epochs"]),  # typo: suggestion
    ("base: {out: runs/x}\nlosses: [softmax]\n", ["'out'", "suite runner"]),
    ("losses: [softmax]\nseed: [0]\n", ["unknown key", "seeds"]),
    ("losses: [softmax]\nloss_params: {center: {lam: 0.1}}\n", ["'center'", "not in losses"]),
    ("losses: [softmax, center]\nbaseline: lgm\n", ["baseline 'lgm'"]),
    ("losses: [softmax]\ngrid: [{lr: 0.1}, {lr: 0.1}]\n", ["softmax-lr0.1-s0", "name"]),
    ("losses: [softmax]\nseeds: [0, one]\n", ["'one'", "integer"]),
    ("losses: [softmax]\ngrid: [{seed: 1}]\n", ["seeds"]),
])
def test_malformed_suites_fail_before_anything_runs(text, words):
    with pytest.raises(S.SuiteError) as error:
        S.plan_suite(S.load_suite(text))
    for word in words:
        assert word in str(error.value)


def test_an_invalid_value_fails_only_its_own_runs():
    runs = S.plan_suite(S.load_suite(suite_text(loss_params={"center": {"lr": -1.0}})))
    softmax, center = runs
    assert softmax.error is None and softmax.config is not None
    assert center.config is None and "lr=-1.0" in center.error


def test_notebook_parameters_are_read_with_ast(tmp_path):
    import nbformat

    nb = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_code_cell("x = 1"),
        nbformat.v4.new_code_cell("from typing import Optional\nlam: float | None = None  # a = b\nepochs = 2",
                                  metadata={"tags": ["parameters"]}),
    ])
    nbformat.write(nb, tmp_path / "nb.ipynb")
    assert S.notebook_parameters(tmp_path / "nb.ipynb") == {"lam", "epochs"}


def test_run_parameters_use_the_resolved_config_not_notebook_defaults(tmp_path):
    text = suite_text(base={**TINY_BASE, "weight_decay": 0.001})
    softmax = S.plan_suite(S.load_suite(text, tmp_path))[0]
    params = S.notebook_run_parameters(softmax, declared={"data", "lr", "embedding_dim", "out", "quiet"}, device="cpu")
    # declared names get the resolved value (Config default for lr), undeclared overrides still go in
    assert params["lr"] == Config().optim.lr and params["embedding_dim"] is None
    assert params["weight_decay"] == 0.001 and params["dishes_classes"] == 3 and params["loss"] == "softmax"
    assert params["out"] == str((tmp_path / "tiny" / "softmax-s0").resolve())
    assert params["quiet"] is True and params["resume"] is False and params["device"] == "cpu"
    assert "amp" not in params  # neither declared nor overridden: the notebook's own default applies


# ----- run states ----------------------------------------------------------------------------------------

def write_finished_run(run: S.PlannedRun, top1: float = 0.5, config: Config | None = None, metrics: bool = True):
    run.run_dir.mkdir(parents=True, exist_ok=True)
    (config or run.config).to_yaml(run.run_dir / "config.yaml")
    if metrics:
        (run.run_dir / "metrics.json").write_text(json.dumps({"test": {"top1": top1}, "val": {"top1": top1}}))


def test_run_state(tmp_path):
    run = S.plan_suite(S.load_suite(suite_text(), tmp_path))[0]
    assert S.run_state(run) == "new"
    write_finished_run(run, metrics=False)
    assert S.run_state(run) == "new"  # config written, nothing trained yet
    (run.run_dir / "last.pt").write_bytes(b"x")
    assert S.run_state(run) == "resume"
    write_finished_run(run)
    assert S.run_state(run) == "complete"
    # runtime-only fields (device, workers, out...) do not make a finished run stale
    write_finished_run(run, config=run.config.with_overrides(device="cpu", workers=3, out="/elsewhere"))
    assert S.run_state(run) == "complete"
    write_finished_run(run, config=run.config.with_overrides(epochs=5))
    assert S.run_state(run) == "stale"


# ----- running, with a fake papermill ---------------------------------------------------------------------

class FakePapermill:
    """Stands in for execute_notebook: records calls, 'trains' by writing config.yaml + metrics.json."""

    def __init__(self, fail: set[str] = frozenset()):
        self.calls: list[tuple[str, dict]] = []
        self.fail = fail

    def __call__(self, notebook, output, parameters, quiet=False):
        output = Path(output)
        self.calls.append((output.name if output.name == "compare.ipynb" else output.parent.name, parameters))
        output.write_text("{}")
        if output.name == "compare.ipynb":
            return
        if output.parent.name in self.fail:
            raise RuntimeError(f"boom in {output.parent.name}")
        cfg = Config.from_flat(**{k: v for k, v in parameters.items() if k in Config.field_index()})
        cfg.to_yaml(output.parent / "config.yaml")
        top1 = 0.5 + 0.1 * cfg.train.seed
        (output.parent / "metrics.json").write_text(json.dumps({"test": {"top1": top1}}))


def test_suite_runs_everything_continues_past_a_failure_then_compares(tmp_path, monkeypatch):
    fake = FakePapermill(fail={"center-s0"})
    monkeypatch.setattr(S, "execute_notebook", fake)
    lines = []
    result = S.run_suite(S.load_suite(suite_text(seeds=[0, 1]), tmp_path), log=lines.append)
    assert [c[0] for c in fake.calls] == ["softmax-s0", "center-s0", "softmax-s1", "center-s1", "compare.ipynb"]
    assert {r.name: r.status for r in result.runs} == {"softmax-s0": "ok", "center-s0": "failed",
                                                       "softmax-s1": "ok", "center-s1": "ok"}
    assert result.compare.status == "ok" and result.exit_code == 1
    assert result.failed[0].error == "RuntimeError: boom in center-s0"
    assert "1 FAILED" in lines[-1] and "center-s0: RuntimeError: boom in center-s0" in lines[-1]
    compare_params = fake.calls[-1][1]
    assert compare_params == {"suite_dir": str((tmp_path / "tiny").resolve()), "baseline": "softmax", "copy_to": None}
    record = json.loads((tmp_path / "tiny" / "suite.json").read_text())
    assert [(r["name"], r["variant"], r["seed"], r["status"]) for r in record["runs"]][:2] == [
        ("softmax-s0", "softmax", 0, "ok"), ("center-s0", "center", 0, "failed")]
    assert (tmp_path / "tiny" / "suite.yaml").is_file()


def test_second_run_skips_complete_runs_and_retries_the_failed_one(tmp_path, monkeypatch):
    spec = S.load_suite(suite_text(), tmp_path)
    monkeypatch.setattr(S, "execute_notebook", FakePapermill(fail={"center-s0"}))
    assert S.run_suite(spec, log=lambda line: None).exit_code == 1
    fake = FakePapermill()
    monkeypatch.setattr(S, "execute_notebook", fake)
    result = S.run_suite(spec, log=lambda line: None)
    assert [c[0] for c in fake.calls] == ["center-s0", "compare.ipynb"]
    assert [r.status for r in result.runs] == ["skipped", "ok"] and result.exit_code == 0
    assert result.runs[0].test_top1 == 0.5


def test_changed_parameters_rerun_a_finished_run_from_scratch(tmp_path, monkeypatch):
    monkeypatch.setattr(S, "execute_notebook", FakePapermill())
    S.run_suite(S.load_suite(suite_text(), tmp_path), log=lambda line: None)
    leftover = tmp_path / "tiny" / "softmax-s0" / "old-figure.png"
    leftover.write_text("stale")
    fake = FakePapermill()
    monkeypatch.setattr(S, "execute_notebook", fake)
    S.run_suite(S.load_suite(suite_text(base={**TINY_BASE, "epochs": 2}), tmp_path), log=lambda line: None)
    assert [c[0] for c in fake.calls] == ["softmax-s0", "center-s0", "compare.ipynb"]
    assert not leftover.exists()
    assert Config.from_yaml(tmp_path / "tiny" / "softmax-s0" / "config.yaml").train.epochs == 2


def test_an_outdated_run_a_live_training_still_writes_is_not_deleted(tmp_path, monkeypatch):
    monkeypatch.setattr(S, "execute_notebook", FakePapermill())
    S.run_suite(S.load_suite(suite_text(), tmp_path), log=lambda line: None)
    run_dir = tmp_path / "tiny" / "softmax-s0"
    fake = FakePapermill()
    monkeypatch.setattr(S, "execute_notebook", fake)
    with folder_lock(run_dir, "a training run started by hand"):
        result = S.run_suite(S.load_suite(suite_text(base={**TINY_BASE, "epochs": 2}), tmp_path), log=lambda line: None)
    assert result.runs[0].status == "failed" and "in use by a training run started by hand" in result.runs[0].error
    assert (run_dir / "metrics.json").is_file()  # left alone
    assert [c[0] for c in fake.calls] == ["center-s0", "compare.ipynb"]


def test_interrupted_run_resumes(tmp_path, monkeypatch):
    spec = S.load_suite(suite_text(losses=["softmax"]), tmp_path)
    run = S.plan_suite(spec)[0]
    write_finished_run(run, metrics=False)
    (run.run_dir / "last.pt").write_bytes(b"x")
    fake = FakePapermill()
    monkeypatch.setattr(S, "execute_notebook", fake)
    S.run_suite(spec, log=lambda line: None)
    assert fake.calls[0][1]["resume"] is True


def test_invalid_run_is_reported_without_executing(tmp_path, monkeypatch):
    fake = FakePapermill()
    monkeypatch.setattr(S, "execute_notebook", fake)
    result = S.run_suite(S.load_suite(suite_text(loss_params={"center": {"image_size": 2}}), tmp_path),
                         log=lambda line: None)
    assert [c[0] for c in fake.calls] == ["softmax-s0", "compare.ipynb"]
    assert result.runs[1].status == "failed" and "image_size=2" in result.runs[1].error
    assert result.exit_code == 1


def test_only_dry_run_and_device(tmp_path, monkeypatch):
    fake = FakePapermill()
    monkeypatch.setattr(S, "execute_notebook", fake)
    spec = S.load_suite(suite_text(seeds=[0, 1]), tmp_path)
    lines = []
    planned = S.run_suite(spec, dry_run=True, only=["center-*"], log=lines.append)
    assert [r.name for r in planned.runs] == ["center-s0", "center-s1"] and not fake.calls
    assert lines[0].split()[:2] == ["center-s0", "new"]
    S.run_suite(spec, only=["softmax-s1"], device="cpu", log=lambda line: None)
    assert [c[0] for c in fake.calls] == ["softmax-s1", "compare.ipynb"]
    assert fake.calls[0][1]["device"] == "cpu"
    with pytest.raises(S.SuiteError, match="matches no run"):
        S.run_suite(spec, only=["lgm-*"], log=lambda line: None)
    with pytest.raises(S.SuiteError, match="--device 'gpu'"):
        S.run_suite(spec, device="gpu", log=lambda line: None)


def test_jobs_run_in_parallel_with_split_threads_and_keep_plan_order(tmp_path, monkeypatch):
    import threading

    both_running = threading.Barrier(2, timeout=10)  # fails (BrokenBarrierError) unless 2 runs overlap

    class Overlapping(FakePapermill):
        def __call__(self, notebook, output, parameters, quiet=False):
            if Path(output).name != "compare.ipynb":
                both_running.wait()
            super().__call__(notebook, output, parameters, quiet)

    fake = Overlapping(fail={"center-s0"})
    monkeypatch.setattr(S, "execute_notebook", fake)
    monkeypatch.setattr(S, "available_cores", lambda: 4)
    result = S.run_suite(S.load_suite(suite_text(seeds=[0, 1]), tmp_path), jobs=2, log=lambda line: None)
    assert [r.name for r in result.runs] == ["softmax-s0", "center-s0", "softmax-s1", "center-s1"]
    assert [r.status for r in result.runs] == ["ok", "failed", "ok", "ok"] and result.exit_code == 1
    run_params = [p for name, p in fake.calls if name != "compare.ipynb"]
    assert all(p["threads"] == 2 and p["quiet"] is True for p in run_params)
    assert fake.calls[-1][0] == "compare.ipynb"
    # threads is a runtime field: the finished runs count as complete without --jobs
    fake = FakePapermill()
    monkeypatch.setattr(S, "execute_notebook", fake)
    S.run_suite(S.load_suite(suite_text(seeds=[0, 1]), tmp_path), log=lambda line: None)
    assert [c[0] for c in fake.calls] == ["center-s0", "compare.ipynb"]
    with pytest.raises(S.SuiteError, match="jobs=0"):
        S.run_suite(S.load_suite(suite_text(), tmp_path), jobs=0, log=lambda line: None)


def test_cli_suite_dry_run_and_errors(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "s.yaml").write_text(suite_text())
    assert cli_main(["suite", "s.yaml", "--dry-run"]) == 0
    assert "softmax-s0" in capsys.readouterr().out
    assert not (tmp_path / "runs").exists()
    assert cli_main(["suite", "s.yaml", "--only", "nope"]) == 2
    assert "matches no run" in capsys.readouterr().err
    assert cli_main(["suite", "missing.yaml"]) == 2


def test_a_second_suite_process_on_the_same_folder_is_refused(tmp_path, capsys, monkeypatch):
    fake = FakePapermill()
    monkeypatch.setattr(S, "execute_notebook", fake)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "s.yaml").write_text(suite_text())
    spec = S.load_suite(tmp_path / "s.yaml", tmp_path / "runs")
    with folder_lock(tmp_path / "runs" / "tiny", "`foodlib suite` tiny"):  # as the first process holds it
        with pytest.raises(FolderBusyError, match=r"runs/tiny is in use by `foodlib suite` tiny \(pid "):
            S.run_suite(spec, log=lambda line: None)
        assert cli_main(["suite", "s.yaml"]) == 2
        assert "in use by `foodlib suite` tiny" in capsys.readouterr().err
        assert cli_main(["suite", "s.yaml", "--dry-run"]) == 0  # looking is always allowed
        assert fake.calls == [] and not (tmp_path / "runs" / "tiny" / "suite.json").exists()
    assert S.run_suite(spec, log=lambda line: None).exit_code == 0
    assert len(fake.calls) == 3


def test_repository_suites_are_valid():
    suites = sorted((Path(__file__).resolve().parents[1] / "suites").glob("*.yaml"))
    assert {p.name for p in suites} >= {"demo.yaml", "food101-10-scratch.yaml"}
    for path in suites:
        runs = S.plan_suite(S.load_suite(path, tuning="search:" in path.read_text()))  # tuning suites: foodlib tune
        assert runs and all(r.error is None for r in runs), path
        assert {r.loss for r in runs} >= {"softmax", "center", "lgm", "island"}, path


# ----- the real thing -------------------------------------------------------------------------------------

@pytest.mark.slow
def test_real_suite_survives_a_failing_run_skips_finished_ones_and_compares(tmp_path, monkeypatch):
    """papermill end to end: center fails inside the notebook (batch larger than the data)."""
    monkeypatch.chdir(tmp_path)
    text = suite_text(loss_params={"center": {"batch_size": 100_000}})
    first = S.run_suite(S.load_suite(text, tmp_path / "runs"), quiet=True, log=lambda line: None)
    suite_dir = tmp_path / "runs" / "tiny"
    assert [r.status for r in first.runs] == ["ok", "failed"] and first.exit_code == 1
    assert "batch_size=100000" in first.runs[1].error
    assert (suite_dir / "softmax-s0" / "metrics.json").is_file()
    assert (suite_dir / "softmax-s0" / "experiment.ipynb").is_file()
    assert (suite_dir / "center-s0" / "experiment.ipynb").is_file()  # the failed notebook is kept, error inside
    assert first.compare.status == "ok" and (suite_dir / "compare.ipynb").is_file()
    assert "softmax" in (suite_dir / "report.md").read_text()
    notebook_mtime = (suite_dir / "softmax-s0" / "experiment.ipynb").stat().st_mtime_ns
    second = S.run_suite(S.load_suite(text, tmp_path / "runs"), quiet=True, log=lambda line: None)
    assert [r.status for r in second.runs] == ["skipped", "failed"] and second.exit_code == 1
    assert (suite_dir / "softmax-s0" / "experiment.ipynb").stat().st_mtime_ns == notebook_mtime
