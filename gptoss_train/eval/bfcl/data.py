"""BFCL v4 single-turn data as shipped in the ``bfcl-eval`` wheel (Apache-2.0): questions, functions, answers."""

from __future__ import annotations

import functools
import json
from pathlib import Path

PACKAGE = "bfcl-eval"

# Single-turn Python categories we grade: our name -> data file stem (BFCL_v4_<stem>.json).
CATEGORIES = {
    "simple": "simple_python",
    "multiple": "multiple",
    "parallel": "parallel",
    "parallel_multiple": "parallel_multiple",
    "irrelevance": "irrelevance",
    "live_simple": "live_simple",
    "live_multiple": "live_multiple",
    "live_parallel": "live_parallel",
    "live_parallel_multiple": "live_parallel_multiple",
    "live_irrelevance": "live_irrelevance",
    "live_relevance": "live_relevance",
}
# Groups users can name instead of listing categories.
CATEGORY_GROUPS = {
    "all": list(CATEGORIES),
    "non_live": ["simple", "multiple", "parallel", "parallel_multiple", "irrelevance"],
    "live": [name for name in CATEGORIES if name.startswith("live_")],
    "ast": [name for name in CATEGORIES if "relevance" not in name],
}
# Not graded here, and why (README/docs repeat this).
SKIPPED_CATEGORIES = {
    "simple_java": "needs BFCL's Java type converters (values are Java literals in strings)",
    "simple_javascript": "needs BFCL's JavaScript type converters",
    "multi_turn_*": "multi-turn needs BFCL's stateful executable backends; planned",
    "memory / web_search / format_sensitivity": "agentic categories that need live services or prompt formats",
}


class BfclDataError(RuntimeError):
    pass


def data_dir() -> Path:
    try:
        import bfcl_eval
    except ModuleNotFoundError as exc:
        raise BfclDataError(f"bfcl needs the PyPI package {PACKAGE!r} (BFCL data, Apache-2.0): pip install {PACKAGE}") \
            from exc
    return Path(bfcl_eval.__file__).resolve().parent / "data"


def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    with path.open(encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise BfclDataError(f"{path}:{line_number}: not valid JSON ({exc.msg})") from exc
    return rows


def resolve_categories(categories) -> list[str]:
    """``"simple,live"`` / ``["parallel"]`` / ``"all"`` -> category names, in a stable order, no duplicates."""
    if categories is None:
        categories = "all"
    names = categories.split(",") if isinstance(categories, str) else list(categories)
    resolved: list[str] = []
    for name in (part.strip() for part in names):
        if not name:
            continue
        expanded = CATEGORY_GROUPS.get(name, [name])
        for category in expanded:
            if category not in CATEGORIES:
                skipped = f" ({SKIPPED_CATEGORIES[category]})" if category in SKIPPED_CATEGORIES else ""
                raise ValueError(f"unknown BFCL category {category!r}{skipped}; choose from "
                                 f"{', '.join(list(CATEGORY_GROUPS) + list(CATEGORIES))}")
            if category not in resolved:
                resolved.append(category)
    return resolved


@functools.lru_cache(maxsize=None)
def load_category(category: str) -> tuple[dict, ...]:
    """Entries of one category, each with ``category`` and ``ground_truth`` (None for (ir)relevance) attached."""
    stem = CATEGORIES[category]
    root = data_dir()
    entries = _read_jsonl(root / f"BFCL_v4_{stem}.json")
    answer_path = root / "possible_answer" / f"BFCL_v4_{stem}.json"
    answers = {row["id"]: row["ground_truth"] for row in _read_jsonl(answer_path)} if answer_path.is_file() else {}
    out = []
    for entry in entries:
        if "relevance" not in category and entry["id"] not in answers:
            raise BfclDataError(f"{answer_path}: no possible answer for {entry['id']}")
        out.append({**entry, "category": category, "ground_truth": answers.get(entry["id"])})
    return tuple(out)
