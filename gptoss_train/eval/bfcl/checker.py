"""BFCL's AST checker for Python function calls, re-implemented to give the official verdicts.

A model answer is a list of calls ``[{function_name: {param: value}}]`` (names as BFCL spells them, i.e. after
mapping sanitised tool names back). A possible answer lists, per expected call, the acceptable values of each
parameter; ``""`` among them marks the parameter as optional. The official rules, all kept here:

* count: simple categories need exactly one call; "multiple" compares the first call only, after the count check;
  "parallel" categories match calls to expected calls in any order (each expected call takes the first unmatched
  call that passes);
* per call: the name must match; every required parameter must be present; no parameter outside the function doc
  or the possible answer; a parameter left out must be optional in the possible answer;
* types are exact Python types of the JSON values (``bool`` is not ``int``) with ``int`` promoted for ``float``
  parameters; ``any`` means a string; when the possible answer's values have another type than the doc declares,
  the value may have that type instead (BFCL treats it as a variable name) and is then compared as is;
  list items are type-checked one level deep;
* values: strings are compared after removing spaces and ``,./-_*^``, lower-casing and turning ``'`` into ``"``;
  lists element-wise the same way; dicts key by key against each allowed dict; lists of dicts position by position;
  everything else by ``in``.

Quirks of the official checker are kept on purpose (e.g. an empty list matches an optional ``""`` answer), because
the point is to reproduce leaderboard numbers, not to improve on them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

PYTHON_TYPES = {
    "string": str, "integer": int, "float": float, "boolean": bool, "array": list, "tuple": list, "dict": dict,
    "any": str,
}
NESTED_TYPES = ("array", "tuple")
_STRIP = re.compile(r"[ \,\.\/\-\_\*\^]")


@dataclass
class Verdict:
    valid: bool
    error_type: str | None = None
    errors: list = field(default_factory=list)

    @classmethod
    def ok(cls) -> "Verdict":
        return cls(True)


def standardize_string(text: str) -> str:
    return _STRIP.sub("", text).lower().replace("'", '"')


def _answer_type(allowed: list):
    """Type of the first non-optional allowed value (how BFCL tells a variable name from a literal)."""
    for value in allowed:
        if value != "":
            return type(value)
    return None


def _check_type(param: str, value, allowed: list, declared: str, expected_type, item_type) -> tuple[Verdict, bool]:
    """(verdict, is_variable). One level of item checking for arrays/tuples, like the official checker."""
    answer_type = _answer_type(allowed)
    is_variable = answer_type is not None and answer_type != expected_type
    nested_failed = False
    if type(value) == expected_type:  # noqa: E721 - exact type on purpose: bool must not pass as int
        if item_type is None:
            return Verdict.ok(), is_variable
        for candidate in allowed:
            items_ok = True
            if type(candidate) == list:  # noqa: E721
                for item in value:
                    verdict, _ = _check_type(param, item, candidate, str(item_type), item_type, None)
                    if not verdict.valid:
                        items_ok = False
                        break
            if items_ok:  # a non-list candidate (e.g. the optional marker) accepts any items
                return Verdict.ok(), is_variable
        nested_failed = True
    if answer_type is not None and type(value) == answer_type:  # noqa: E721
        if nested_failed:
            return Verdict(False, "type_error:nested", [f"item types of {param!r} do not match"]), True
        return Verdict.ok(), True
    if nested_failed:
        return Verdict(False, "type_error:simple", [f"item types of {param!r} do not match; got {value!r}"]), False
    return Verdict(False, "type_error:simple",
                   [f"wrong type for {param!r}: expected {declared}, got {type(value).__name__}"]), False


def _check_string(param: str, value: str, allowed: list) -> Verdict:
    if standardize_string(value) in [standardize_string(a) for a in allowed if type(a) == str]:  # noqa: E721
        return Verdict.ok()
    return Verdict(False, "value_error:string", [f"invalid value for {param!r}: {value!r}; expected one of {allowed}"])


def _standardize_list(values) -> list:
    return [standardize_string(v) if type(v) == str else v for v in values]  # noqa: E721


def _check_list(param: str, value: list, allowed: list) -> Verdict:
    # len()/indexing rather than iteration, as the official checker: an optional "" answer becomes [].
    candidates = [_standardize_list(candidate[j] for j in range(len(candidate))) for candidate in allowed]
    if _standardize_list(value) in candidates:
        return Verdict.ok()
    return Verdict(False, "value_error:list/tuple", [f"invalid value for {param!r}: {value!r}"])


def _check_dict(param: str, value: dict, allowed: list) -> Verdict:
    verdict = Verdict(False, "dict_checker:unclear")
    for candidate in allowed:
        if candidate == "":
            continue
        verdict = Verdict.ok()
        for key, item in value.items():
            if key not in candidate:
                verdict = Verdict(False, "value_error:dict_key", [f"unexpected key {key!r} in {param!r}"])
                break
            standardized = standardize_string(item) if type(item) == str else item  # noqa: E721
            if standardized not in _standardize_list(candidate[key]):
                verdict = Verdict(False, "value_error:dict_value", [f"invalid value for {param!r}[{key!r}]: {item!r}"])
                break
        if verdict.valid:
            for key, options in candidate.items():
                if key not in value and "" not in options:
                    verdict = Verdict(False, "value_error:dict_key", [f"missing key {key!r} in {param!r}"])
                    break
        if verdict.valid:
            return verdict
    return verdict


def _check_list_of_dicts(param: str, value: list, allowed: list) -> Verdict:
    verdict = Verdict(False, "list_dict_checker:unclear")
    for candidate in allowed:
        if len(value) != len(candidate):
            verdict = Verdict(False, "value_error:list_dict_count", [f"wrong number of dicts in {param!r}"])
            continue
        all_ok = True
        for index in range(len(value)):
            verdict = _check_dict(param, value[index], [candidate[index]])
            if not verdict.valid:
                all_ok = False
                break
        if all_ok:
            return Verdict.ok()
    return verdict


def check_call(function_doc: dict, call: dict, expected: dict) -> Verdict:
    """One model call ``{name: params}`` against one expected call ``{name: {param: allowed values}}``."""
    allowed_params = next(iter(expected.values()))
    name = function_doc["name"]
    if name not in call:
        return Verdict(False, "simple_function_checker:wrong_func_name", [f"function {name!r} not called"])
    params = call[name]
    doc_params = function_doc["parameters"]["properties"]
    for required in function_doc["parameters"].get("required", []):
        if required not in params:
            return Verdict(False, "simple_function_checker:missing_required", [f"missing required {required!r}"])
    for param, value in params.items():
        if param not in doc_params or param not in allowed_params:
            return Verdict(False, "simple_function_checker:unexpected_param", [f"unexpected parameter {param!r}"])
        declared = doc_params[param]["type"]
        expected_type = PYTHON_TYPES[declared]
        item_type = PYTHON_TYPES[doc_params[param]["items"]["type"]] if declared in NESTED_TYPES else None
        if declared == "float" and type(value) == int:  # noqa: E721 - Python's int -> float promotion
            value = float(value)
        verdict, is_variable = _check_type(param, value, allowed_params[param], declared, expected_type, item_type)
        if not verdict.valid:
            return verdict
        if not is_variable:
            if expected_type == dict:
                verdict = _check_dict(param, value, allowed_params[param])
            elif expected_type == list and item_type == dict:
                verdict = _check_list_of_dicts(param, value, allowed_params[param])
            elif expected_type == str:
                verdict = _check_string(param, value, allowed_params[param])
            elif expected_type == list:
                verdict = _check_list(param, value, allowed_params[param])
            else:
                verdict = None
            if verdict is not None:
                if not verdict.valid:
                    return verdict
                continue
        if value not in allowed_params[param]:
            return Verdict(False, "value_error:others",
                           [f"invalid value for {param!r}: {value!r}; expected one of {allowed_params[param]}"])
    for param, options in allowed_params.items():
        if param not in params and "" not in options:
            return Verdict(False, "simple_function_checker:missing_optional", [f"{param!r} left out, not optional"])
    return Verdict.ok()


def _doc_for(functions: list[dict], name: str) -> dict | None:
    return next((function for function in functions if function["name"] == name), None)


def check_ast(functions: list[dict], calls: list[dict], ground_truth: list[dict], category: str) -> Verdict:
    """Grade the calls of one entry of an AST category (simple / multiple / parallel / parallel_multiple, live too)."""
    if "parallel" in category:
        if len(calls) != len(ground_truth):
            return Verdict(False, "parallel_function_checker_no_order:wrong_count", ["wrong number of calls"])
        matched: set[int] = set()
        for expected_index, expected in enumerate(ground_truth):
            doc = _doc_for(functions, next(iter(expected)))
            found = False
            for index, call in enumerate(calls):
                if index in matched:
                    continue
                if check_call(doc, call, expected).valid:
                    matched.add(index)
                    found = True
                    break
            if not found:
                return Verdict(False, "parallel_function_checker_no_order:cannot_find_match",
                               [f"no call matches expected call {expected_index}"])
        return Verdict.ok()
    if "multiple" in category:
        if len(calls) != len(ground_truth):
            return Verdict(False, "multiple_function_checker:wrong_count", ["wrong number of calls"])
        return check_call(_doc_for(functions, next(iter(ground_truth[0]))), calls[0], ground_truth[0])
    if len(calls) != 1:
        return Verdict(False, "simple_function_checker:wrong_count", ["wrong number of calls"])
    return check_call(functions[0], calls[0], ground_truth[0])


def is_call_list(calls) -> bool:
    """BFCL's format check: a list of single-key dicts whose value is a dict of parameters."""
    return isinstance(calls, list) and all(
        isinstance(call, dict) and len(call) == 1 and isinstance(next(iter(call.values())), dict) for call in calls)


def check_entry(entry: dict, calls: list[dict] | None) -> Verdict:
    """Grade one BFCL entry. ``calls`` is None when the answer could not be decoded as calls (text, bad JSON)."""
    category = entry["category"]
    if "relevance" in category:
        has_call = calls is not None and is_call_list(calls) and len(calls) > 0 and not (
            len(calls) == 1 and len(calls[0]) == 0)
        if "irrelevance" in category:
            return Verdict.ok() if not has_call else Verdict(False, "irrelevance_error:decoder_success",
                                                             ["called a function when none applies"])
        return Verdict.ok() if has_call else Verdict(False, "relevance_error:decoder_failed", ["no function call"])
    if calls is None:
        return Verdict(False, "ast_decoder:decoder_failed", ["no decodable function call"])
    if not is_call_list(calls):
        return Verdict(False, "ast_decoder:decoder_wrong_output_format", ["calls not in {name: {params}} form"])
    return check_ast(entry["function"], calls, entry["ground_truth"], category)
