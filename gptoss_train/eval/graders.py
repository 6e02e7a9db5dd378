"""Answer extraction and equivalence for the reasoning suites, following each benchmark's published convention.

* GSM8K: the gold is the number after ``####``; the prediction is the last number in the final message (commas and
  ``$`` dropped, ``72.0`` == ``72``), the convention of the original paper and lm-eval's ``flexible-extract``.
* MATH-500: the last ``\\boxed{...}`` (or, failing that, an ``Answer:`` line) is compared after the usual LaTeX
  normalisation (Hendrycks et al.'s ``is_equiv`` strip steps: ``\\left``/``\\right``, ``\\dfrac``, units, spaces,
  ``0.5`` vs ``\\frac{1}{2}``...) and, as in the ``math_equal`` checkers of Qwen/DeepSeek evals, numeric equality
  with a relative tolerance and element-wise tuple/interval comparison. We do not call sympy's LaTeX parser (it needs
  antlr4 and is slow); the normalisation covers the formats MATH-500 gold answers use.
* AIME: an integer 0..999; the boxed value or the last integer in the final message.
* GPQA: the letter after ``Answer:`` (simple-evals' regex), else a lone trailing letter.

Only the FINAL channel is ever passed in: the suites never grade the analysis (DESIGN.md §4).
"""

from __future__ import annotations

import math
import re

_NUMBER = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?|-?\.\d+")


def parse_number(text: str) -> float | None:
    cleaned = text.strip().replace(",", "").replace("$", "").rstrip(".")
    if cleaned.endswith("%"):
        cleaned = cleaned[:-1]
    try:
        return float(cleaned)
    except ValueError:
        frac = re.fullmatch(r"(-?\d+)\s*/\s*(\d+)", cleaned)
        if frac and int(frac.group(2)) != 0:
            return int(frac.group(1)) / int(frac.group(2))
        return None


def last_number(text: str | None) -> str | None:
    if not text:
        return None
    matches = _NUMBER.findall(text)
    return matches[-1] if matches else None


# ---------------------------------------------------------------- GSM8K
def gsm8k_gold(answer_field: str) -> str:
    """``'... #### 1,234'`` -> ``'1234'``."""
    tail = answer_field.split("####")[-1]
    return tail.strip().replace(",", "").replace("$", "")


def gsm8k_extract(final: str | None) -> str | None:
    boxed = last_boxed(final or "")
    candidate = last_number(boxed) if boxed else None
    return candidate if candidate is not None else last_number(final)


def gsm8k_equal(prediction: str | None, gold: str) -> bool:
    if prediction is None:
        return False
    pred, ref = parse_number(prediction), parse_number(gold)
    return pred is not None and ref is not None and math.isclose(pred, ref, rel_tol=0, abs_tol=1e-6)


# ---------------------------------------------------------------- AIME
def aime_extract(final: str | None) -> int | None:
    if not final:
        return None
    boxed = last_boxed(final)
    source = boxed if boxed is not None else final
    numbers = re.findall(r"-?\d+(?:\.\d+)?", source.replace(",", ""))
    if not numbers:
        return None
    value = float(numbers[-1])
    if not value.is_integer() or not 0 <= value <= 999:
        return None  # AIME answers are integers 0..999; anything else is wrong by the rules
    return int(value)


def aime_equal(prediction: int | None, gold) -> bool:
    return prediction is not None and prediction == int(str(gold).strip())


# ---------------------------------------------------------------- GPQA (multiple choice)
_ANSWER_LETTER = re.compile(r"(?i)answer\s*[:：]\s*\**\s*\(?\$?\s*(?:\\text\{|\\textbf\{)?([A-D])\b")


def choice_extract(final: str | None, letters: str = "ABCD") -> str | None:
    if not final:
        return None
    matches = _ANSWER_LETTER.findall(final)
    if matches:
        letter = matches[-1].upper()
        return letter if letter in letters else None
    boxed = last_boxed(final)
    if boxed is not None:
        inner = re.sub(r"\\text\{|\}|\(|\)", "", boxed).strip().upper()
        if inner in letters:
            return inner
    # A reply that is just "C", "(C)" or "C." (common with low effort).
    lone = re.fullmatch(r"\s*\(?([A-D])\)?\.?\s*", final)
    return lone.group(1).upper() if lone else None


# ---------------------------------------------------------------- MATH
def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` / ``\\fbox{...}`` with balanced braces (or ``\\boxed 5``)."""
    index = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if index < 0:
        return None
    rest = text[index:]
    brace = rest.find("{")
    if rest.startswith("\\boxed ") and (brace < 0 or brace > 7):
        return rest[len("\\boxed ") :].split("$")[0].strip()
    if brace < 0:
        return None
    depth = 0
    for position in range(brace, len(rest)):
        if rest[position] == "{":
            depth += 1
        elif rest[position] == "}":
            depth -= 1
            if depth == 0:
                return rest[brace + 1 : position]
    return None


def math_extract(final: str | None) -> str | None:
    if not final:
        return None
    boxed = last_boxed(final)
    if boxed is not None:
        return boxed
    answer_line = re.findall(r"(?i)(?:final answer|answer)\s*(?:is)?\s*[:：]?\s*\$*([^\n$]+)\$*", final)
    if answer_line:
        return answer_line[-1].strip().rstrip(".")
    return None


def _fix_fracs(text: str) -> str:
    # "\frac12" -> "\frac{1}{2}", "\frac1{72}" -> "\frac{1}{72}"
    def fix(match: re.Match) -> str:
        a, b = match.group(1), match.group(2)
        a = a if a.startswith("{") else "{" + a + "}"
        b = b if b.startswith("{") else "{" + b + "}"
        return "\\frac" + a + b

    return re.sub(r"\\frac\s*(\{[^{}]*\}|\d)\s*(\{[^{}]*\}|\d)", fix, text)


def _fix_sqrt(text: str) -> str:
    return re.sub(r"\\sqrt\s*(\d|[a-zA-Z])", r"\\sqrt{\1}", text)


_UNIT_WORDS = (
    "degrees", "degree", "cm", "centimeters", "meters", "meter", "inches", "inch", "feet", "foot", "units", "unit",
    "square", "sq", "dollars", "cents", "mph", "hours", "hour", "minutes", "minute", "seconds", "second", "days",
)


def normalize_math_answer(answer: str) -> str:
    """Hendrycks-style strip of formatting that does not change the value."""
    text = str(answer).strip()
    text = text.replace("\n", "").replace("\\!", "").replace("\\,", "").replace("\\;", "").replace("\\ ", "")
    text = re.sub(r"\\text\{\s*([^{}]*)\}", r"\1", text)
    text = re.sub(r"\\(?:mbox|mathrm|textbf|mathbf)\{\s*([^{}]*)\}", r"\1", text)
    text = text.replace("\\left", "").replace("\\right", "")
    text = text.replace("tfrac", "frac").replace("dfrac", "frac")
    text = text.replace("^\\circ", "").replace("^{\\circ}", "").replace("°", "")
    text = text.replace("\\$", "").replace("$", "").replace("\\%", "").replace("%", "")
    text = re.sub(r"\\(?:displaystyle|quad|qquad)", "", text)
    for word in _UNIT_WORDS:
        text = re.sub(rf"(?<=[\d}}\s]){word}(\^?\{{?\d\}}?)?\s*$", "", text)
    text = text.strip()
    # "x = 5" / "k=5" -> "5" (gold answers never keep the variable)
    if re.match(r"^[a-zA-Z]\w*\s*=", text) and text.count("=") == 1:
        text = text.split("=", 1)[1]
    text = text.replace(" ", "")
    text = re.sub(r"(?<![\d])\.(\d)", r"0.\1", text)  # ".5" -> "0.5"
    text = _fix_sqrt(_fix_fracs(text))
    if text == "0.5":
        text = "\\frac{1}{2}"
    text = re.sub(r"^(\d+)/(\d+)$", r"\\frac{\1}{\2}", text)
    text = re.sub(r"(\d),(?=\d{3}(?!\d))", r"\1", text)  # thousands separators
    text = text.rstrip(".")
    return text


def _latex_to_float(text: str) -> float | None:
    """Evaluate simple numeric LaTeX (ints, decimals, \\frac{a}{b}, -\\frac, a\\sqrt{b}, \\pi multiples)."""
    text = text.strip()
    if "," in text:  # a list, not a number (thousands separators were removed by the normaliser)
        return None
    plain = parse_number(text)
    if plain is not None:
        return plain
    frac = re.fullmatch(r"(-?)\\frac\{(-?[\d.]+)\}\{(-?[\d.]+)\}", text)
    if frac:
        numerator, denominator = float(frac.group(2)), float(frac.group(3))
        if denominator == 0:
            return None
        return (-1 if frac.group(1) else 1) * numerator / denominator
    sqrt = re.fullmatch(r"(-?[\d.]*)\\sqrt\{([\d.]+)\}", text)
    if sqrt:
        coefficient = sqrt.group(1)
        factor = -1.0 if coefficient == "-" else float(coefficient) if coefficient not in ("", "-") else 1.0
        return factor * math.sqrt(float(sqrt.group(2)))
    return None


def _split_top_level(text: str) -> list[str]:
    parts, depth, current = [], 0, ""
    for char in text:
        if char in "({[":
            depth += 1
        elif char in ")}]":
            depth -= 1
        if char == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    parts.append(current)
    return parts


def math_equal(prediction: str | None, gold: str) -> bool:
    """Equivalence in the spirit of ``math_equal``: normalised string, numeric, or element-wise for tuples/sets."""
    if prediction is None:
        return False
    pred, ref = normalize_math_answer(prediction), normalize_math_answer(gold)
    if pred == ref:
        return True
    pred_value, ref_value = _latex_to_float(pred), _latex_to_float(ref)
    if pred_value is not None and ref_value is not None:
        return math.isclose(pred_value, ref_value, rel_tol=1e-4, abs_tol=1e-8)
    # tuples / intervals / lists: same brackets, same number of elements, each equal
    bracket_pairs = {"(": ")", "[": "]", "\\{": "\\}"}
    ordered = False
    for open_, close in bracket_pairs.items():
        if pred.startswith(open_) and pred.endswith(close) and ref.startswith(open_) and ref.endswith(close):
            pred, ref = pred[len(open_) : -len(close)], ref[len(open_) : -len(close)]
            ordered = open_ != "\\{"  # points and intervals are ordered, sets are not
            break
    pred_parts, ref_parts = _split_top_level(pred), _split_top_level(ref)
    if len(ref_parts) > 1 and len(pred_parts) == len(ref_parts):
        if all(math_equal(p, r) for p, r in zip(pred_parts, ref_parts)):
            return True
        # a bare list of solutions ("1, 2" vs "2, 1") or a set is unordered; tuples and intervals are not
        if not ordered:
            return sorted(normalize_math_answer(p) for p in pred_parts) == sorted(normalize_math_answer(r) for r in ref_parts)
    return False
