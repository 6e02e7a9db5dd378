"""Suite definitions live in ``evals/<suite>/suite.yaml`` (data source, field names, prompt, grader, token budgets);
grading code lives here in ``gptoss_train.eval``. This module finds and reads them."""

from __future__ import annotations

import os
from pathlib import Path

import yaml


class DefinitionError(RuntimeError):
    pass


def evals_dir() -> Path:
    """``$GPTOSS_EVALS_DIR``, else the ``evals/`` folder of this checkout."""
    configured = os.environ.get("GPTOSS_EVALS_DIR")
    if configured:
        return Path(configured)
    return Path(__file__).resolve().parents[2] / "evals"


def suite_dir(name: str) -> Path:
    return evals_dir() / name


def load_definition(name: str) -> dict:
    path = suite_dir(name) / "suite.yaml"
    if not path.is_file():
        raise DefinitionError(
            f"suite definition {path} not found. Run from a gptoss-train checkout, or set GPTOSS_EVALS_DIR to the "
            "folder holding evals/<suite>/suite.yaml."
        )
    with open(path, encoding="utf-8") as handle:
        definition = yaml.safe_load(handle) or {}
    if definition.get("name") != name:
        raise DefinitionError(f"{path}: 'name' is {definition.get('name')!r}, expected {name!r}")
    return definition
