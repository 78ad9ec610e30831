"""Packaging: environment.yml and pyproject.toml declare the same packages, and foodlib imports only declared ones."""
from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
from pathlib import Path

import pytest
import yaml

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

REPO = Path(__file__).resolve().parents[1]
NOT_PACKAGES = {"python", "pip"}  # environment.yml entries that are the toolchain, not dependencies


def requirement(text: str) -> tuple[str, str]:
    """``"scikit-learn>=1.3"`` -> ``("scikit-learn", ">=1.3")``, names normalised as pip does (PEP 503)."""
    match = re.fullmatch(r"\s*([A-Za-z0-9._-]+)\s*(\[[^\]]*\])?\s*([<>=!~].*)?", text)
    assert match, f"cannot read the requirement {text!r}"
    return re.sub(r"[-_.]+", "-", match.group(1)).lower(), (match.group(3) or "").replace(" ", "")


def pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def pyproject_packages() -> dict[str, str]:
    """Core dependencies plus the dev extra (environment.yml installs ``-e .[dev]``)."""
    project = pyproject()
    return dict(requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["dev"])


def environment_packages() -> dict[str, str]:
    entries = yaml.safe_load((REPO / "environment.yml").read_text())["dependencies"]
    conda = [e for e in entries if isinstance(e, str)]
    pip = [p for e in entries if isinstance(e, dict) for p in e.get("pip", []) if not p.startswith("-e")]
    packages = dict(requirement(r.replace("=", "==") if re.fullmatch(r"[\w.-]+=[\d.]+", r) else r) for r in conda + pip)
    return {name: spec for name, spec in packages.items() if name not in NOT_PACKAGES}


def test_environment_yml_and_pyproject_declare_the_same_packages_and_floors():
    ours, conda = pyproject_packages(), environment_packages()
    assert sorted(set(ours) - set(conda)) == [], "in pyproject.toml, missing from environment.yml"
    assert sorted(set(conda) - set(ours)) == [], "in environment.yml, missing from pyproject.toml"
    assert {n: s for n, s in ours.items() if conda[n] != s} == {}, "floors differ between the two files"


def test_requirement_reader():
    assert requirement("scikit-learn>=1.3") == ("scikit-learn", ">=1.3")
    assert requirement("jupyter_client >= 8") == ("jupyter-client", ">=8")
    assert requirement("PyYAML") == ("pyyaml", "")


def imported_top_level_modules() -> set[str]:
    modules = set()
    for path in (REPO / "foodlib").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                modules |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules.add(node.module.split(".")[0])
    return {m for m in modules if m not in sys.stdlib_module_names and m != "foodlib"}


def test_every_imported_package_is_declared():
    project = pyproject()
    declared = {requirement(r)[0] for r in project["dependencies"]}
    declared |= {requirement(r)[0] for extra in project["optional-dependencies"].values() for r in extra}
    distributions = importlib.metadata.packages_distributions()
    undeclared = {}
    for module in sorted(imported_top_level_modules()):
        names = {requirement(d)[0] for d in distributions.get(module, [module])}  # not installed: same name
        if not names & declared:
            undeclared[module] = sorted(names)
    assert undeclared == {}, "imported by foodlib but declared in neither dependencies nor an extra"
