"""BFCL function docs -> OpenAI function tools, as BFCL's own OpenAI function-calling handler prepares them.

BFCL writes parameter types in Python terms (``dict``, ``float``, ``tuple``, ``any``); JSON schema wants
``object``, ``number``, ``array``, ``string``. Function names with dots (``math.factorial``) are not valid OpenAI
tool names, so dots become underscores (what the official handler does for OpenAI-style models) and the names are
mapped back before checking. Python categories also get the official " Note that the provided function is in
Python 3 syntax." hint, so prompts match what BFCL sends.
"""

from __future__ import annotations

import copy
import re

# BFCL type name -> JSON-schema type (bfcl_eval.constants.type_mappings.GORILLA_TO_OPENAPI, same mapping).
BFCL_TO_JSON_SCHEMA = {
    "integer": "integer", "number": "number", "float": "number", "string": "string", "boolean": "boolean",
    "bool": "boolean", "array": "array", "list": "array", "dict": "object", "object": "object", "tuple": "array",
    "any": "string", "byte": "integer", "short": "integer", "long": "integer", "double": "number", "char": "string",
    "ArrayList": "array", "Array": "array", "HashMap": "object", "Hashtable": "object", "Queue": "array",
    "Stack": "array", "Any": "string", "String": "string", "Bigint": "integer",
}
PYTHON_HINT = " Note that the provided function is in Python 3 syntax."


def sanitize_name(name: str) -> str:
    return re.sub(r"\.", "_", name)


def _convert_schema(schema: dict, *, is_item: bool = False) -> dict:
    """Map one parameter schema's types recursively (properties, items, nested items). Like the official handler,
    only named parameters (not array items) get the float hint."""
    converted = dict(schema)
    bfcl_type = converted.get("type")
    if bfcl_type is None:
        converted["type"] = "string"  # the official handler's default for an untyped parameter
    else:
        if bfcl_type == "float" and not is_item:
            converted["format"] = "float"
            converted["description"] = converted.get("description", "") + " This is a float type value."
        converted["type"] = BFCL_TO_JSON_SCHEMA.get(bfcl_type, "string")
    if "properties" in converted and isinstance(converted["properties"], dict):
        converted["properties"] = {key: _convert_schema(value) for key, value in converted["properties"].items()}
    if "items" in converted and isinstance(converted["items"], dict):
        converted["items"] = _convert_schema(converted["items"], is_item=True)
    return converted


def to_openai_tools(functions: list[dict]) -> tuple[list[dict], dict[str, str]]:
    """OpenAI tools for a BFCL entry, and the map from the tool names shown to the model back to BFCL's names."""
    tools, name_map = [], {}
    for function in copy.deepcopy(functions):
        shown = sanitize_name(function["name"])
        name_map.setdefault(shown, function["name"])
        parameters = function.get("parameters") or {}
        properties = {key: _convert_schema(value) for key, value in (parameters.get("properties") or {}).items()}
        json_parameters = {**parameters, "type": "object", "properties": properties}
        tools.append({"type": "function", "function": {
            "name": shown,
            "description": (function.get("description") or "") + PYTHON_HINT,
            "parameters": json_parameters,
        }})
    return tools, name_map
