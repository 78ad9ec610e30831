"""foodlib.suite_workers: several worker processes on one suite folder run each run once, then compare once."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import foodlib.suite as S
from foodlib.cli import main as cli_main
from foodlib.suite_workers import claim, run_worker
from tests.test_suite import FakePapermill, suite_text

REPO = Path(__file__).resolve().parents[1]

# A worker process whose papermill is a fake that "trains" by writing config.yaml + metrics.json.
# Each fake run lasts until a second worker executes a run too (at most 2 minutes), so the runs
# cannot all go to whichever process started first; each run and the comparison record which
# process executed them.
FAKE_WORKER = textwrap.dedent("""
    import json, os, sys, time
    from pathlib import Path
    import foodlib.suite as S
    from foodlib.config import Config
    from foodlib.suite_workers import run_worker

    suite, out = sys.argv[1], sys.argv[2]

    def fake(notebook, output, parameters, quiet=False, env=None):
        output = Path(output)
        if output.name == "compare.ipynb":
            done = sorted(p.parent.name for p in output.parent.glob("*/metrics.json"))
            (output.parent / f"compare_by_{os.getpid()}").write_text(json.dumps(done))
            (output.parent / "report.md").write_text("report")
            output.write_text("{}")
            return
        (output.parent / f"executed_by_{os.getpid()}").write_text("")
        deadline = time.time() + 120
        while len({p.name for p in output.parent.parent.glob("*/executed_by_*")}) < 2 and time.time() < deadline:
            time.sleep(0.1)
        cfg = Config.from_flat(**{k: v for k, v in parameters.items() if k in Config.field_index()})
        cfg.to_yaml(output.parent / "config.yaml")
        (output.parent / "metrics.json").write_text(json.dumps({"test": {"top1": 0.5}}))
        output.write_text("{}")

    S.execute_notebook = fake
    sys.exit(run_worker(suite, out_dir=out, quiet=True, log=lambda line: None).exit_code)
""")


def start_workers(n: int, args_for, tmp_path: Path) -> list[subprocess.Popen]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return [subprocess.Popen(args_for(i), cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True) for i in range(n)]


def wait_all(workers: list[subprocess.Popen], timeout: float) -> list[tuple[int, str]]:
    return [(w.wait(timeout=timeout), w.stdout.read()) for w in workers]


def test_a_claimed_run_is_skipped_and_the_comparison_waits_for_it(tmp_path, monkeypatch):
    fake = FakePapermill()
    monkeypatch.setattr(S, "execute_notebook", fake)
    spec = S.load_suite(suite_text(seeds=[0, 1]), tmp_path)
    suite_dir = tmp_path / "tiny"
    held = claim(suite_dir, "center-s0")  # as if another worker were training it
    assert held is not None and claim(suite_dir, "center-s0") is None  # non-blocking: a second claim fails
    lines = []
    result = run_worker(spec, log=lines.append)
    assert [c[0] for c in fake.calls] == ["softmax-s0", "softmax-s1", "center-s1"]  # no comparison yet
    assert [(r.name, r.detail) for r in result.runs if r.status == "skipped"] == [("center-s0", "claimed")]
    assert result.compare is None and any("foodlib report" in line for line in lines)
    record = json.loads((suite_dir / "suite.json").read_text())
    assert {r["name"]: r.get("status") for r in record["runs"]}["softmax-s1"] == "ok"
    held.release()
    fake.calls.clear()
    result = run_worker(spec, log=lambda line: None)  # the held run is free now: run it, then compare
    assert [c[0] for c in fake.calls] == ["center-s0", "compare.ipynb"] and result.compare.status == "ok"
    fake.calls.clear()
    (suite_dir / "report.md").write_text("report")  # what compare.ipynb writes
    run_worker(spec, log=lambda line: None)  # all complete and the report newer than every run: nothing to do
    assert fake.calls == []


def test_worker_flag_refuses_jobs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "s.yaml").write_text(suite_text())
    assert cli_main(["suite", "s.yaml", "--worker", "--jobs", "2"]) == 2
    assert "start more workers" in capsys.readouterr().err


@pytest.mark.slow
def test_three_worker_processes_share_a_suite(tmp_path):
    """Fake training, real processes and locks: every run once, at least two workers busy, one comparison."""
    (tmp_path / "s.yaml").write_text(suite_text(seeds=[0, 1, 2]))
    workers = start_workers(3, lambda i: [sys.executable, "-c", FAKE_WORKER, "s.yaml", "runs"], tmp_path)
    results = wait_all(workers, timeout=300)
    assert [rc for rc, _ in results] == [0, 0, 0], results
    suite_dir = tmp_path / "runs" / "tiny"
    runs = [r.name for r in S.plan_suite(S.load_suite(tmp_path / "s.yaml", tmp_path / "runs"))]
    executed = {name: sorted(p.name for p in (suite_dir / name).glob("executed_by_*")) for name in runs}
    assert all(len(by) == 1 for by in executed.values()), executed  # no run executed twice
    assert len({by[0] for by in executed.values()}) >= 2  # the work was shared
    compares = list(suite_dir.glob("compare_by_*"))
    assert len(compares) == 1, compares  # one comparison ...
    assert json.loads(compares[0].read_text()) == sorted(runs)  # ... written after every run was complete
    record = json.loads((suite_dir / "suite.json").read_text())
    assert {r["name"]: r["status"] for r in record["runs"]} == {name: "ok" for name in runs}


@pytest.mark.slow
def test_two_real_workers_train_a_tiny_suite(tmp_path):
    """The real thing: two `foodlib suite --worker` processes, papermill and fit() on the tiniest settings."""
    (tmp_path / "s.yaml").write_text(suite_text(base={
        "data": "dishes", "dishes_classes": 3, "dishes_per_class": 30, "image_size": 16, "backbone": "smallcnn",
        "epochs": 1, "batch_size": 8, "workers": 0, "figures": False, "threads": 1}))
    # the `foodlib` script's entry point: `python -m foodlib.cli` runs cli.py as __main__, a second copy of
    # the module into which foodlib.suite does not register its `suite` command
    command = [sys.executable, "-c", "import sys; from foodlib.cli import main; sys.exit(main())", "suite", "s.yaml",
               "--worker", "--quiet"]
    results = wait_all(start_workers(2, lambda i: command, tmp_path), timeout=600)
    assert [rc for rc, _ in results] == [0, 0], results
    suite_dir = tmp_path / "runs" / "tiny"
    for name in ("softmax-s0", "center-s0"):
        metrics = json.loads((suite_dir / name / "metrics.json").read_text())
        assert 0 <= metrics["test"]["top1"] <= 1
    assert (suite_dir / "report.md").is_file() and (suite_dir / "compare.ipynb").is_file()
    skipped = sum(out.count("held by another worker") + out.count("complete, skipped") for _, out in results)
    assert skipped >= 2  # each run was executed by one worker and passed over by the other
