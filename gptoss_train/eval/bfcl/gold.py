"""The gold answer of a BFCL entry as concrete calls (what the ``--model oracle`` self-test emits).

A possible answer lists, per parameter, the accepted values; ``""`` marks a parameter that may be left out. The
gold call takes the first accepted value, except that optional parameters the function doc doesn't require are
left out: a listed default can clash with the declared type in the data (``0.0`` for an ``integer``), and the
official checker then rejects it, while leaving the parameter out is always accepted.
"""

from __future__ import annotations

_OMIT = object()


def _choose(options, *, required: bool):
    if not isinstance(options, list):
        return options
    if "" in options and not required:
        return _OMIT
    for option in options:
        if option != "":
            return resolve_value(option)
    return "" if required and options else _OMIT  # a required parameter whose only accepted value is ""


def resolve_value(value):
    """Possible answers nest: a dict answer maps each key to *its* accepted values; lists may hold such dicts."""
    if isinstance(value, dict):
        resolved = {}
        for key, options in value.items():
            choice = _choose(options, required=False)
            if choice is not _OMIT:
                resolved[key] = choice
        return resolved
    if isinstance(value, list):
        return [resolve_value(item) for item in value]
    return value


def gold_calls(ground_truth: list[dict], functions: list[dict] | None = None) -> list[dict]:
    """``[{name: {param: [accepted...]}}]`` -> ``[{name: {param: value}}]``."""
    required_of = {f["name"]: set((f.get("parameters") or {}).get("required") or []) for f in functions or []}
    calls = []
    for expected in ground_truth:
        name, params = next(iter(expected.items()))
        required = required_of.get(name, set())
        call_params = {}
        for param, options in params.items():
            choice = _choose(options, required=param in required)
            if choice is not _OMIT:
                call_params[param] = choice
        calls.append({name: call_params})
    return calls
