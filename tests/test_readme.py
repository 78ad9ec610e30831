"""The README's pictures and its figure legend agree with the files and with the commands that make them.

Every picture the README shows exists in readme_pictures/, every file there is in the legend, and
the legend's command for it writes exactly that file name: ``--readme-pictures`` commands are
checked by running :func:`foodlib.report.write_report` (what they call) on a small hand-made suite
of the same name, papermill commands by the notebook's parameters and the name it copies to.
"""
from __future__ import annotations

import ast
import json
import re
import shlex
from pathlib import Path

import pytest
import yaml

from foodlib.report import write_report
from test_report import make_features, write_run

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()
PICTURES = REPO / "readme_pictures"


def legend_rows() -> list[tuple[list[str], str]]:
    """(picture names, command) of each legend row that names a readme_pictures/ file."""
    section = README.split("## Figures and where they come from", 1)[1].split("\n## ", 1)[0]
    rows, command = [], ""
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 2 or "readme_pictures/" not in cells[0]:
            continue
        names = re.findall(r"readme_pictures/([\w.-]+\.png)", cells[0])
        command = command if cells[1] == "same" else cells[1]
        rows.append((names, command))
    return rows


def commands_in(cell: str) -> list[list[str]]:
    """The shell commands in a legend cell's backticks, split into words (``&&`` separates commands)."""
    commands = []
    for code in re.findall(r"`([^`]+)`", cell):
        commands += [shlex.split(part) for part in code.split("&&")]
    return commands


def test_every_readme_picture_exists_and_is_in_the_legend():
    shown = set(re.findall(r"!\[[^\]]*\]\(readme_pictures/([\w.-]+\.png)\)", README))
    listed = {name for names, _ in legend_rows() for name in names}
    assert shown, "the README shows no picture: did the pattern break?"
    assert shown <= {p.name for p in PICTURES.glob("*.png")}, "the README shows a picture that is not there"
    assert shown <= listed, f"pictures without a legend row: {sorted(shown - listed)}"
    stale = {p.name for p in PICTURES.glob("*.png")} - listed
    assert not stale, f"files in readme_pictures/ that no legend row makes: {sorted(stale)}"


def notebook_parameters(notebook: Path) -> set[str]:
    """Names assigned in the notebook's parameters cell (read as JSON: nbformat's validation is slow)."""
    names: set[str] = set()
    for cell in json.loads(notebook.read_text())["cells"]:
        if cell["cell_type"] == "code" and "parameters" in cell.get("metadata", {}).get("tags", []):
            for node in ast.parse("".join(cell["source"])).body:
                targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
                names.update(t.id for t in targets if isinstance(t, ast.Name))
    return names


def suite_name_of(words: list[str]) -> str | None:
    """The suite whose report a ``foodlib suite FILE`` / ``foodlib report FOLDER`` command writes."""
    if "suite" in words:
        spec = yaml.safe_load((REPO / words[words.index("suite") + 1]).read_text())
        return spec["name"]
    if "report" in words:
        return Path(words[words.index("report") + 1]).name
    return None


_REPORTED: dict[str, set[str]] = {}  # suite name -> the files write_report copies (made once per name)


def pictures_of_a_report(name: str, folder: Path) -> set[str]:
    """The file names ``write_report(copy_to=...)`` writes for a (tiny, hand-made) suite called ``name``."""
    if name not in _REPORTED:
        suite = folder / name
        for loss in ("softmax", "center"):
            write_run(suite, f"{loss}-s0", {"top1": 0.6}, loss=loss, seed=0,
                      features=make_features([(0, 1, 3), (2, 3, 1)]))
        write_report(suite, copy_to=folder / "copied")
        _REPORTED[name] = {p.name for p in (folder / "copied").glob("*.png")}
    return _REPORTED[name]


@pytest.mark.parametrize("row", legend_rows(), ids=lambda row: row[0][0])
def test_the_legend_command_writes_each_picture_under_its_exact_name(row, tmp_path):
    names, cell = row
    made: set[str] = set()
    for words in commands_in(cell):
        if "--readme-pictures" in words:
            name = suite_name_of(words)
            assert name, f"cannot tell which suite {' '.join(words)} reports"
            made |= pictures_of_a_report(name, tmp_path)
        elif words[:1] == ["cp"] and len(words) == 3 and words[2].startswith("readme_pictures/"):
            assert words[1].startswith("runs/"), f"{words[1]}: the legend copies a picture a run or script made"
            made.add(Path(words[2]).name)
        elif words and words[0].endswith("papermill"):
            notebook = REPO / words[1]
            given = {words[i + 1]: words[i + 2] for i, w in enumerate(words[:-2]) if w == "-p"}
            assert set(given) <= notebook_parameters(notebook), f"{notebook.name} has no parameter among {given}"
            assert Path(words[2]).parent.as_posix() in cell.split("papermill")[0], \
                "papermill needs the output folder to exist: create it first (mkdir -p)"
            if given.get("copy_to") == "readme_pictures":
                source = notebook.with_suffix(".py").read_text()
                made |= set(re.findall(r'Path\(copy_to\) / "([\w.-]+\.png)"', source))
    assert set(names) <= made, f"{cell} writes {sorted(made)}, not {sorted(set(names) - made)}"
