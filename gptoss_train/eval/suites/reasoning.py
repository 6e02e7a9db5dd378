"""Reasoning suites: aime25, gpqa-diamond, gsm8k, math500.

Each is defined by ``evals/<name>/suite.yaml`` (where the data lives, the field names, the prompt and the token
budget) and graded by the matching function in :mod:`gptoss_train.eval.graders`, always on the FINAL channel: an
answer that appears only in the analysis scores nothing (DESIGN.md §4, "eval scoring the analysis channel").

Data: the real sets are read from the hub / their public URLs with ``datasets``; ``data=FILE`` (``--data``) reads a
local file in the same schema (JSONL, JSON, CSV or Parquet); ``data="bundled"`` reads the handful of hand-written
items in ``evals/<name>/`` used by the tests (not the benchmark).
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from pathlib import Path
from typing import Any, Iterable

from gptoss_train.eval import graders
from gptoss_train.eval.core import GenerationRequest, Sample, register_suite
from gptoss_train.eval.definitions import load_definition, suite_dir
from gptoss_train.eval.suites.base import SingleTurnSuite, make_request

logger = logging.getLogger(__name__)

REASONING_SUITES = ("aime25", "gpqa-diamond", "gsm8k", "math500")


class DataUnavailableError(RuntimeError):
    """The benchmark data could not be loaded (offline, gated, bad file)."""


def read_rows(path: Path) -> list[dict]:
    """Rows of a local data file; JSONL errors name the line."""
    if not path.is_file():
        raise DataUnavailableError(f"data file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        rows = []
        with open(path, encoding="utf-8") as handle:
            for number, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DataUnavailableError(f"{path}:{number}: not valid JSON ({exc.msg} at column {exc.colno})")
                if not isinstance(row, dict):
                    raise DataUnavailableError(f"{path}:{number}: expected a JSON object, got {type(row).__name__}")
                rows.append(row)
        return rows
    if suffix == ".json":
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
        return data if isinstance(data, list) else data.get("data") or data.get("rows") or []
    import datasets

    kind = {".csv": "csv", ".parquet": "parquet"}.get(suffix)
    if kind is None:
        raise DataUnavailableError(f"{path}: unsupported data file type {suffix!r} (use .jsonl, .json, .csv, .parquet)")
    return list(datasets.load_dataset(kind, data_files=str(path), split="train"))


def load_rows(name: str, definition: dict, data: str | None) -> list[dict]:
    if data == "bundled":
        return read_rows(suite_dir(name) / definition["bundled"])
    if data:
        return read_rows(Path(data))
    source = definition["source"]
    try:
        import datasets

        if "hub" in source:
            dataset = datasets.load_dataset(source["hub"], source.get("config"), split=source.get("split", "test"))
        else:
            urls = source["urls"]
            kind = "csv" if urls[0].endswith(".csv") else "json"
            dataset = datasets.load_dataset(kind, data_files=urls, split="train")
        return list(dataset)
    except Exception as exc:  # offline, gated, renamed: say how to get going anyway
        where = source.get("hub") or ", ".join(source.get("urls", []))
        raise DataUnavailableError(
            f"could not load the {name} data from {where} ({type(exc).__name__}: {str(exc)[:300]}). "
            f"Download it where you have network access and pass it with --data FILE.jsonl "
            f"(same fields as the original: {definition['fields']}); or try the harness with --data bundled "
            f"(a few hand-written items, not the benchmark)."
        ) from exc


class ReasoningSuite(SingleTurnSuite):
    def __init__(self, name: str):
        self.name = name
        self._definition = None

    @property
    def definition(self) -> dict:
        # Unlike the other suites, a reasoning suite cannot run without its definition (field names, answer kind).
        if self._definition is None:
            self._definition = load_definition(self.name)
        return self._definition

    # ------------------------------------------------------------------ data
    def samples(self, *, data: str | None = None, seed: int | None = None, **_: Any) -> Iterable[Sample]:
        definition = self.definition
        fields = definition["fields"]
        rows = load_rows(self.name, definition, data)
        samples = []
        for index, row in enumerate(rows):
            missing = [f for f in _required_fields(fields) if f not in row]
            if missing:
                raise DataUnavailableError(
                    f"{self.name} row {index}: missing field(s) {missing}; expected the original schema "
                    f"{sorted(_required_fields(fields))}"
                )
            sample_id = str(row[fields["id"]]) if fields.get("id") and fields["id"] in row else f"{self.name}-{index}"
            samples.append(Sample(id=sample_id, data=self._normalise(row, sample_id, seed)))
        return samples

    def _normalise(self, row: dict, sample_id: str, seed: int | None) -> dict:
        fields = self.definition["fields"]
        grader = self.definition["grader"]
        if grader == "choice":
            # GPQA: options shuffled per item with a seed derived from the run seed and the item, so every model and
            # every effort sees the same order (published runs shuffle; a fixed "A is correct" would be a giveaway).
            options = [row[fields["correct"]]] + [row[f] for f in fields["incorrect"]]
            rng = random.Random(f"{seed or 0}:{sample_id}")
            order = list(range(len(options)))
            rng.shuffle(order)
            shuffled = [str(options[i]).strip() for i in order]
            gold = "ABCD"[order.index(0)]
            return {"question": str(row[fields["question"]]).strip(), "choices": shuffled, "answer": gold}
        answer = row[fields["answer"]]
        if grader == "gsm8k":
            answer = graders.gsm8k_gold(str(answer))
        return {"question": str(row[fields["question"]]), "answer": str(answer)}

    # ------------------------------------------------------------------ prompting and grading
    def build_request(self, sample: Sample, **options: Any) -> GenerationRequest:
        template = self.definition["prompt"]
        data = sample.data
        if self.definition["grader"] == "choice":
            letters = "ABCD"
            choice_lines = "\n".join(f"{letters[i]}) {text}" for i, text in enumerate(data["choices"]))
            content = template.format(question=data["question"], choices=choice_lines,
                                      **{letters[i]: text for i, text in enumerate(data["choices"])})
        else:
            content = template.format(question=data["question"])
        return make_request(self, sample, [{"role": "user", "content": content}], options)

    def grade(self, sample: Sample, final: str) -> tuple[bool, dict]:
        gold = sample.data["answer"]
        grader = self.definition["grader"]
        if grader == "gsm8k":
            prediction = graders.gsm8k_extract(final)
            correct = graders.gsm8k_equal(prediction, gold)
        elif grader == "aime":
            prediction = graders.aime_extract(final)
            correct = graders.aime_equal(prediction, gold)
        elif grader == "math":
            prediction = graders.math_extract(final)
            correct = graders.math_equal(prediction, gold)
        elif grader == "choice":
            prediction = graders.choice_extract(final)
            correct = prediction == gold
        else:
            raise ValueError(f"{self.name}: unknown grader {grader!r} in suite.yaml")
        return correct, {"prediction": prediction, "gold": gold}

    def oracle(self, sample: Sample):
        """The gold answer, formatted as the prompt asks, in the final channel (after a short analysis)."""
        from gptoss_train.eval.backends.oracle import ScriptedBackend, canned_turn

        gold = sample.data["answer"]
        final = f"Answer: {gold}" if self.definition["grader"] == "choice" else f"The answer is $\\boxed{{{gold}}}$."
        return ScriptedBackend([canned_turn(analysis="Working it out step by step.", final=final)])

    def data_fingerprint(self, samples: list[Sample]) -> str:
        payload = json.dumps([[s.id, s.data] for s in samples], sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _required_fields(fields: dict) -> set[str]:
    names = set()
    for key, value in fields.items():
        if key == "id" or value is None:
            continue
        names.update(value if isinstance(value, list) else [value])
    return names


for _name in REASONING_SUITES:
    register_suite(_name, lambda _name=_name: ReasoningSuite(_name))
