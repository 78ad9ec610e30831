"""The ``foodlib`` command itself: arguments parsed before torch is imported, every command listed,
input errors as one line with exit code 2 (a traceback only with --debug / FOODLIB_DEBUG=1).

Start-up *time* is measured in benchmarks/bench_cli_startup.py, not here; these tests check the
cause of a slow start (torch imported before parsing), which does not depend on the machine.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import foodlib.cli as cli
from foodlib.cli import main as cli_main

REPO = Path(__file__).resolve().parents[1]


def run_python(code: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    environment = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.run([sys.executable, *args] if not code else [sys.executable, "-c", code],
                          capture_output=True, text=True, cwd=REPO, env=environment, timeout=120)


def test_every_command_is_in_the_one_table_and_names_a_real_function():
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert set(sub.choices) == set(cli.COMMANDS)
    assert {"train", "suite", "report", "tune", "predict", "embed", "neighbours", "export", "enroll", "cache",
            "analyse", "data-check"} <= set(cli.COMMANDS)


def test_cli_choices_match_the_library():
    from foodlib import inference

    assert cli.METRICS == inference.METRICS
    assert cli.EXPORT_FORMATS == inference.EXPORT_FORMATS


@pytest.mark.parametrize("argv", [["--help"], ["trian"], ["train", "--help"], ["suite", "--help"],
                                  ["train", "--epohcs", "3"]], ids=" ".join)
def test_parsing_imports_no_torch(argv):
    code = textwrap.dedent(f"""
        import sys
        from foodlib.cli import main
        try:
            main({argv!r})
        except SystemExit as exit:
            print("exit", exit.code)
        print("torch imported:", "torch" in sys.modules)
    """)
    result = run_python(code)
    assert "torch imported: False" in result.stdout, result.stdout + result.stderr
    assert "exit 0" in result.stdout if "--help" in argv else "exit 2" in result.stdout


def test_python_dash_m_lists_every_command():
    result = run_python("", "-m", "foodlib.cli", "--help")
    assert result.returncode == 0, result.stderr
    for name in ("train", "suite", "report", "predict", "embed", "neighbours", "export"):
        assert name in result.stdout, name


# ----- errors ---------------------------------------------------------------------------------------

def failing_command(monkeypatch, error: BaseException) -> None:
    def run(args):
        raise error

    monkeypatch.setitem(cli.COMMANDS, "cache", cli.COMMANDS["cache"]._replace(run=run))


@pytest.mark.parametrize("error", [
    FileNotFoundError("no dataset at data/fod101: check --data"),
    ValueError("lam must be a number in [0.0, inf), got lam=-1"),
    __import__("foodlib.errors", fromlist=["PretrainedWeightsError"]).PretrainedWeightsError("offline"),
], ids=lambda e: type(e).__name__)
def test_user_errors_are_one_line_and_exit_2(monkeypatch, capsys, error):
    failing_command(monkeypatch, error)
    monkeypatch.delenv("FOODLIB_DEBUG", raising=False)
    assert cli_main(["cache"]) == 2
    assert capsys.readouterr().err == f"foodlib cache: error: {error}\n"


def test_a_multi_line_message_becomes_one_line(monkeypatch, capsys):
    failing_command(monkeypatch, ValueError("2 bad files:\n  a.jpg\n  b.jpg\n"))
    monkeypatch.delenv("FOODLIB_DEBUG", raising=False)
    assert cli_main(["cache"]) == 2
    assert capsys.readouterr().err == "foodlib cache: error: 2 bad files:; a.jpg; b.jpg\n"


@pytest.mark.parametrize("how", ["--debug first", "--debug last", "FOODLIB_DEBUG=1"])
def test_debug_shows_the_traceback(monkeypatch, how):
    failing_command(monkeypatch, FileNotFoundError("missing.yaml"))
    monkeypatch.delenv("FOODLIB_DEBUG", raising=False)
    argv = {"--debug first": ["--debug", "cache"], "--debug last": ["cache", "--debug"]}.get(how, ["cache"])
    if how.startswith("FOODLIB_DEBUG"):
        monkeypatch.setenv("FOODLIB_DEBUG", "1")
    with pytest.raises(FileNotFoundError, match="missing.yaml"):
        cli_main(argv)


def test_resnet18_pretrained_offline_is_one_line_and_exit_2(tmp_path, monkeypatch, capsys):
    """The real download path (torchvision's get_state_dict) failing as it does without network."""
    import torchvision

    weights = torchvision.models.ResNet18_Weights.DEFAULT

    def offline(self, *args, **kwargs):
        raise OSError("<urlopen error [Errno -3] Temporary failure in name resolution>")

    monkeypatch.setattr(type(weights), "get_state_dict", offline)
    monkeypatch.delenv("FOODLIB_DEBUG", raising=False)
    code = cli_main(["train", "--data", "dishes", "--dishes-classes", "2", "--dishes-per-class", "6",
                     "--image-size", "32", "--backbone", "resnet18", "--pretrained", "true", "--epochs", "1",
                     "--workers", "0", "--quiet", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("foodlib train: error: could not download pretrained weights for resnet18")
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "--pretrained PATH" in err  # the fix is named


# ----- a run that fails before training ---------------------------------------------------------------

def test_a_run_that_fails_before_training_leaves_no_folder(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("FOODLIB_DEBUG", raising=False)
    out = tmp_path / "runs" / "typo"
    code = cli_main(["train", "--data", str(tmp_path / "fod101"), "--quiet", "--out", str(out)])
    assert code == 2 and str(tmp_path / "fod101") in capsys.readouterr().err
    assert not out.exists()  # no config.yaml / run.json of a run that never started
    kept = tmp_path / "runs" / "mine"
    kept.mkdir()
    (kept / "notes.txt").write_text("mine")
    assert cli_main(["train", "--data", str(tmp_path / "fod101"), "--quiet", "--out", str(kept)]) == 2
    assert (kept / "notes.txt").read_text() == "mine"  # a folder that existed before is never removed


def test_a_folder_without_test_split_says_val_is_all_it_reports(tmp_path):
    from PIL import Image

    from foodlib.data.folders import carve_val, index_image_folder

    for name in ("pho", "ramen"):
        (tmp_path / name).mkdir()
        for i in range(5):
            Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(tmp_path / name / f"{i}.png")
    summary = carve_val(index_image_folder(tmp_path), 0.2, 0).summary()
    assert "no test split" in summary and "val is all the run reports" in summary
