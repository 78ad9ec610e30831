"""Every third-party package that foodlib or its notebooks import is declared in pyproject.toml
(dependencies or an extra) and in environment.yml, so a fresh install can run them."""
from __future__ import annotations

import ast
import re
import sys
import tomllib
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
# import name -> distribution name, where they differ
DISTRIBUTION = {"PIL": "pillow", "sklearn": "scikit-learn", "umap": "umap-learn", "yaml": "pyyaml",
                "pytorch_metric_learning": "pytorch-metric-learning",
                "IPython": "ipykernel"}  # IPython comes with ipykernel, which the notebooks need anyway
OPTIONAL = {"timm", "onnx"}  # extras: imported only when asked for, with an error naming the install


def imported_packages() -> set[str]:
    names = set()
    for path in [*(REPO / "foodlib").rglob("*.py"), *(REPO / "notebooks").glob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return {n for n in names if n not in sys.stdlib_module_names and n != "foodlib"}


def requirement_name(spec: str) -> str:
    return re.split(r"[<>=!~\[ ;]", spec.strip(), maxsplit=1)[0].lower()


def test_every_import_is_declared_in_pyproject_and_environment_yml():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    required = {requirement_name(s) for s in project["dependencies"]}
    extras = {requirement_name(s) for specs in project["optional-dependencies"].values() for s in specs}
    conda = set()
    for entry in yaml.safe_load((REPO / "environment.yml").read_text())["dependencies"]:
        for spec in entry["pip"] if isinstance(entry, dict) else [entry]:
            conda.add(requirement_name(spec))
    for name in sorted(imported_packages()):
        distribution = DISTRIBUTION.get(name, name).lower()
        if name in OPTIONAL:
            assert distribution in extras, f"{name} is imported but in no extra of pyproject.toml"
            continue
        assert distribution in required, f"{name} is imported but not in pyproject.toml's dependencies"
        assert distribution in conda, f"{name} is imported but not in environment.yml"
