"""The notebooks: hygiene of every committed notebooks/*.ipynb, and each one executed through papermill.

Hygiene (fast): no outputs, in sync with its jupytext py:percent twin, no def / class / lambda,
a markdown title, one ``parameters`` cell whose every line is an annotated assignment with a
trailing comment (names identical to Config fields in the experiment notebook).

Execution (slow, ~1-2 min on 2 CPU cores): a tiny suite (2 losses, 1 seed, 3 dishes at 32 px,
1 epoch) runs experiment.ipynb twice and compare.ipynb through ``foodlib.suite``; every other
notebook runs through papermill with tiny parameters. The kernel must be the venv's Python.
"""
from __future__ import annotations

import ast
import json
import re
import sys
from pathlib import Path

import jupytext
import nbformat
import pytest

import foodlib.suite as S
from foodlib.config import Config

NOTEBOOKS_DIR = Path(__file__).resolve().parents[1] / "notebooks"
NOTEBOOKS = sorted(NOTEBOOKS_DIR.glob("*.ipynb"))
RUN_BY_THE_SUITE = {"experiment.ipynb", "compare.ipynb"}


def code_cells(nb) -> list:
    return [c for c in nb.cells if c.cell_type == "code"]


def python_source(cell) -> str:
    """Cell source with IPython syntax (``%matplotlib inline``) turned into plain Python."""
    from IPython.core.inputtransformer2 import TransformerManager

    return TransformerManager().transform_cell(cell.source)


def parameters_cell(nb):
    cells = [c for c in nb.cells if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(cells) == 1, f"expected one cell tagged 'parameters', found {len(cells)}"
    return cells[0]


def test_the_expected_notebooks_exist():
    names = {p.name for p in NOTEBOOKS}
    assert {"experiment.ipynb", "compare.ipynb", "paper_2d.ipynb", "data_overview.ipynb"} <= names


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_committed_notebook_has_no_outputs(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    for i, cell in enumerate(code_cells(nb)):
        assert cell.outputs == [] and cell.execution_count is None, f"{path.name} cell {i} has outputs"
    assert "papermill" not in nb.metadata, f"{path.name} is an executed copy (papermill metadata)"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_in_sync_with_its_py_percent_twin(path):
    script = path.with_suffix(".py")
    assert script.is_file(), f"{path.name} has no paired {script.name}; run jupytext --sync"
    assert jupytext.read(script).cells, "empty script"
    from_ipynb, from_py = jupytext.read(path), jupytext.read(script)

    def cells(nb):
        return [(c.cell_type, c.source.strip(), c.metadata.get("tags", [])) for c in nb.cells]

    assert cells(from_ipynb) == cells(from_py), (
        f"{path.name} and {script.name} differ: run `.venv/bin/jupytext --sync notebooks/{script.name}`")
    assert from_ipynb.metadata.get("kernelspec", {}).get("name") == "python3"


def test_jupytext_pairs_notebooks_with_py_percent():
    import tomllib

    config = tomllib.loads((NOTEBOOKS_DIR / "jupytext.toml").read_text())
    assert config["formats"] == "ipynb,py:percent"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_defines_no_functions_or_classes(path):
    nb = nbformat.read(path, as_version=4)
    for i, cell in enumerate(code_cells(nb)):
        for node in ast.walk(ast.parse(python_source(cell))):
            assert not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)), (
                f"{path.name} code cell {i} line {node.lineno}: {type(node).__name__} in a notebook; "
                "move it into foodlib (with a test)")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_shape_title_and_parameters(path):
    nb = nbformat.read(path, as_version=4)
    assert nb.cells[0].cell_type == "markdown" and nb.cells[0].source.startswith("# "), "first cell: a markdown title"
    cell = parameters_cell(nb)
    lines = [line for line in cell.source.splitlines() if line.strip() and not line.startswith(("#", "from ", "import "))]
    assert lines, "the parameters cell is empty"
    tree = ast.parse(cell.source)
    for node in tree.body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            continue
        assert isinstance(node, ast.AnnAssign), f"{path.name}: parameter line {node.lineno} has no type annotation"
    for line in lines:
        assert "  # " in line, f"{path.name}: parameter {line!r} lacks a trailing comment"


def test_experiment_parameters_are_config_fields():
    nb = nbformat.read(NOTEBOOKS_DIR / "experiment.ipynb", as_version=4)
    names = S.notebook_parameters(NOTEBOOKS_DIR / "experiment.ipynb")
    assert names <= set(Config.field_index()), names - set(Config.field_index())
    assert {"data", "loss", "backbone", "image_size", "epochs", "seed", "device", "out"} <= names
    # tiny defaults: the plain notebook is a smoke test
    defaults = {}
    exec(compile(parameters_cell(nb).source, "parameters", "exec"), {}, defaults)
    assert defaults["device"] == "auto" and defaults["backbone"] == "smallcnn"
    assert defaults["epochs"] <= 2 and defaults["image_size"] <= 32 and defaults["dishes_classes"] <= 4


# ----- execution -----------------------------------------------------------------------------------------

TINY_SUITE = """
name: tiny
base: {data: dishes, dishes_classes: 3, dishes_per_class: 30, image_size: 32, backbone: smallcnn, epochs: 1,
       batch_size: 8, workers: 0, device: cpu}
losses: [softmax, center]
seeds: [0]
"""


@pytest.fixture(scope="module")
def tiny_suite(tmp_path_factory):
    """The shared tiny suite: experiment.ipynb per run and compare.ipynb, through foodlib.suite + papermill."""
    runs_dir = tmp_path_factory.mktemp("runs")
    lines = []
    result = S.run_suite(S.load_suite(TINY_SUITE, runs_dir), quiet=True, log=lines.append)
    assert result.exit_code == 0, "\n".join(lines)
    return result


def tiny_parameters(name: str, tmp_path: Path, suite: S.SuiteResult) -> dict:
    """Tiny parameters for a notebook; unknown notebooks get whichever of the generic ones they declare."""
    per_notebook = {
        "paper_2d.ipynb": dict(data="digits", limit_per_class=30, epochs=1, batch_size=16, center_lams=[0.1],
                               device="cpu", out=str(tmp_path / "paper_2d"), copy_to=str(tmp_path / "pictures")),
        "data_overview.ipynb": dict(data="dishes", dishes_classes=3, dishes_per_class=6, samples_per_class=2,
                                    thumbnail_size=32, out=str(tmp_path / "overview")),
    }
    generic = dict(run_dir=str(suite.suite_dir / "softmax-s0"), out=str(tmp_path / "out"), device="cpu", quiet=True,
                   data="dishes", dishes_classes=3, dishes_per_class=30, image_size=32, backbone="smallcnn", epochs=1)
    declared = S.notebook_parameters(NOTEBOOKS_DIR / name)
    return per_notebook.get(name, {k: v for k, v in generic.items() if k in declared})


def errors_in(path: Path) -> list[str]:
    nb = nbformat.read(path, as_version=4)
    return [f"{o.ename}: {o.evalue}" for c in code_cells(nb) for o in c.outputs if o.output_type == "error"]


def printed_text(path: Path) -> str:
    nb = nbformat.read(path, as_version=4)
    return "".join(o.get("text", "") for c in code_cells(nb) for o in c.outputs if o.output_type == "stream")


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_executes_with_tiny_parameters(path, tiny_suite, tmp_path, monkeypatch):
    if path.name in RUN_BY_THE_SUITE:
        executed = [r.notebook for r in tiny_suite.runs] if path.name == "experiment.ipynb" \
            else [tiny_suite.compare.notebook]
    else:
        monkeypatch.chdir(tmp_path)
        executed = [tmp_path / path.name]
        S.execute_notebook(path, executed[0], tiny_parameters(path.name, tmp_path, tiny_suite), quiet=True)
    for notebook in executed:
        assert notebook.is_file() and errors_in(notebook) == []
        assert nbformat.read(notebook, as_version=4).metadata["kernelspec"]["name"] == "python3"


@pytest.mark.slow
def test_experiment_runs_on_the_venv_python_and_writes_its_run(tiny_suite):
    run = tiny_suite.runs[0]
    text = printed_text(run.notebook)
    kernel_python = Path(re.search(r"\| python (\S+) \|", text).group(1))  # "... | python PATH | ..."
    # the kernel is this venv's interpreter (same bin/ folder), not whatever `python` is on PATH
    assert kernel_python.parent.resolve() == Path(sys.executable).parent.resolve(), text
    run_dir = run.notebook.parent
    assert Config.from_yaml(run_dir / "config.yaml").loss.loss == "softmax"
    assert (run_dir / "metrics.json").is_file() and (run_dir / "figures" / "umap.png").is_file()
    nb = nbformat.read(run.notebook, as_version=4)
    outputs = [o for c in code_cells(nb) for o in c.outputs]
    assert sum("image/png" in o.get("data", {}) for o in outputs) >= 3  # the run's figures, shown inline


@pytest.mark.slow
def test_experiment_keeps_test_out_when_tuning(tiny_suite, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    parameters = {**tiny_parameters("experiment.ipynb", tmp_path, tiny_suite), "eval_test": False}
    S.execute_notebook(NOTEBOOKS_DIR / "experiment.ipynb", tmp_path / "tune.ipynb", parameters, quiet=True)
    assert errors_in(tmp_path / "tune.ipynb") == []
    assert "val top-1" in printed_text(tmp_path / "tune.ipynb")
    assert "test" not in json.loads((tmp_path / "out" / "metrics.json").read_text())


@pytest.mark.slow
def test_compare_writes_the_report(tiny_suite):
    report = (tiny_suite.suite_dir / "report.md").read_text()
    assert "| softmax | 1 |" in report and "| center | 1 |" in report
    for figure in ("accuracy_ci", "umap_grid"):
        assert (tiny_suite.suite_dir / "figures" / f"{figure}.png").is_file()
        assert f"figures/{figure}.png" in report
