"""Raw rows -> Harmony conversations -> rendered training examples, with validation and a truncation policy.

Row shapes (auto-detected per row):

* OpenAI-style chat: ``{"messages": [...], "tools": [...]?, "reasoning_effort": "low"?,
  "developer": "..."? (or "developer_instructions"), "conversation_start_date": "2025-01-01"?}``.
  ``developer`` is used only when the messages carry no system/developer message of their own (Hugging Face
  datasets such as HuggingFaceH4/Multilingual-Thinking repeat the developer prompt in both places).
* Column form without ``messages``: ``{"developer"?, "user", "analysis"?, "final"}`` (a single turn).
* Harmony form: ``{"messages": [Message.to_dict(), ...]}`` (messages carry ``channel``/``recipient``).

Problems raise :class:`DataError` naming file and line (``on_error="error"``) or are skipped and counted
(``on_error="skip"``). Examples with no trained token under the chosen policy (e.g. a conversation ending with a
user message) are always skipped and counted as ``no trained tokens``: they are valid data with nothing to learn.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from enum import Enum
from typing import Any

from gptoss_train.data.readers import SourceRecord
from gptoss_train.data.validation import BuildReport, DataError
from gptoss_train.harmony.conversation import ConversationError, conversation_from_chat
from gptoss_train.harmony.render import MaskPolicy, render_for_training


class Truncation(str, Enum):
    """What to do with an example longer than ``max_length``."""

    DROP = "drop"  # skip it (counted as "too long")
    TRUNCATE = "truncate"  # keep the first max_length tokens (the prompt stays whole; the end is cut)
    ERROR = "error"  # stop with a DataError naming the example


class OnError(str, Enum):
    ERROR = "error"
    SKIP = "skip"


@dataclass
class TrainingExample:
    """A rendered example and where it came from."""

    input_ids: list[int]
    loss_mask: list[int]
    source: str = ""
    location: str = ""
    truncated: bool = False

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def num_trained(self) -> int:
        return sum(self.loss_mask)

    def to_dict(self) -> dict[str, list[int]]:
        return {"input_ids": self.input_ids, "loss_mask": self.loss_mask}


_INSTRUCTION_ROLES = ("system", "developer")


def record_to_conversation(record: SourceRecord, *, reasoning_effort: str | None = "medium"):
    """Build the Harmony conversation of one row; raises :class:`DataError` naming the row."""
    if record.error is not None:
        raise record.error
    row = record.data
    if not isinstance(row, dict):
        raise record.fail(f"expected a JSON object, got {type(row).__name__}", "not an object")
    messages = row.get("messages")
    developer = row.get("developer_instructions", row.get("developer"))
    if messages is None and "user" in row and "final" in row:
        # Column form (e.g. Multilingual-Thinking's user/analysis/final columns).
        messages = [{"role": "user", "content": row["user"]},
                    {"role": "assistant", "thinking": row.get("analysis"), "content": row["final"]}]
    if messages is None:
        raise record.fail("no \"messages\" list", "missing messages")
    if not isinstance(messages, list):
        raise record.fail(f"\"messages\" must be a list, got {type(messages).__name__}", "missing messages")
    if any(isinstance(m, dict) and m.get("role") in _INSTRUCTION_ROLES for m in messages):
        developer = None  # the conversation brings its own developer prompt
    effort = row.get("reasoning_effort") or reasoning_effort
    tools = _tools_of(record, row.get("tools"))
    try:
        return conversation_from_chat(
            messages,
            tools=tools,
            reasoning_effort=effort,
            developer_instructions=developer if isinstance(developer, str) and developer.strip() else None,
            conversation_start_date=row.get("conversation_start_date"),
        )
    except ConversationError as exc:
        raise record.fail(str(exc), exc.reason) from None


def _drop_nulls(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _drop_nulls(item) for key, item in value.items() if item is not None}
    if isinstance(value, list):
        return [_drop_nulls(item) for item in value]
    return value


def _tools_of(record: SourceRecord, tools: Any) -> list | None:
    """The row's tools: a list, or a JSON string of one (datasets often store tools as text).

    Keys whose value is null are dropped: Arrow gives every row the union of all rows' schema keys and fills the
    missing ones with None, which would otherwise show up as bogus parameters in the rendered tool definitions.
    """
    if tools is None or tools == "":
        return None
    if isinstance(tools, str):
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError as exc:
            raise record.fail(f"\"tools\" is a string but not JSON ({exc.msg})", "invalid tools") from None
    return _drop_nulls(tools)


def render_record(
    record: SourceRecord,
    *,
    policy: MaskPolicy | str = MaskPolicy.ALL_ASSISTANT,
    max_length: int | None = None,
    truncation: Truncation | str = Truncation.DROP,
    reasoning_effort: str | None = "medium",
    auto_drop_analysis: bool | None = None,
) -> TrainingExample:
    """One row -> one :class:`TrainingExample` (raises :class:`DataError`).

    ``auto_drop_analysis``: None = the policy's default (see :mod:`gptoss_train.harmony.render`); False keeps all
    reasoning in the sequence (e.g. as untrained context under the ``final`` policy).
    """
    conv = record_to_conversation(record, reasoning_effort=reasoning_effort)
    rendered = render_for_training(conv, policy, auto_drop_analysis=auto_drop_analysis)
    example = TrainingExample(rendered.input_ids, rendered.loss_mask, record.source, record.location)
    if not any(example.loss_mask):
        raise record.fail(f"nothing to train under policy {MaskPolicy.parse(policy).value!r}", "no trained tokens")
    if max_length is not None and len(example) > max_length:
        truncation = Truncation(truncation)
        if truncation is Truncation.TRUNCATE:
            if not any(example.loss_mask[:max_length]):
                raise record.fail(
                    f"{len(example)} tokens and the first trained token comes after max_length={max_length}",
                    "prompt too long")
            example.input_ids = example.input_ids[:max_length]
            example.loss_mask = example.loss_mask[:max_length]
            example.truncated = True
        else:
            raise record.fail(f"{len(example)} tokens > max_length={max_length}", "too long")
    return example


def _render_or_error(record: SourceRecord, options: dict) -> TrainingExample | DataError:
    try:
        return render_record(record, **options)
    except DataError as error:
        return error


def _rendered(records: Iterable[SourceRecord], options: dict, workers: int) -> Iterator[TrainingExample | DataError]:
    """Results in input order; with ``workers > 1`` rendered in worker processes (openai-harmony holds the GIL)."""
    if workers <= 1:
        for record in records:
            yield _render_or_error(record, options)
        return
    import functools
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=workers) as pool:
        yield from pool.map(functools.partial(_render_or_error, options=options), records, chunksize=32)


def iter_examples(
    records: Iterable[SourceRecord],
    *,
    policy: MaskPolicy | str = MaskPolicy.ALL_ASSISTANT,
    max_length: int | None = None,
    truncation: Truncation | str = Truncation.DROP,
    on_error: OnError | str = OnError.ERROR,
    reasoning_effort: str | None = "medium",
    report: BuildReport | None = None,
    workers: int = 1,
    auto_drop_analysis: bool | None = None,
) -> Iterator[TrainingExample]:
    """Render every record; bad ones raise (``on_error="error"``) or are counted in ``report`` and skipped.

    ``workers > 1`` renders in that many processes; results, errors and the report are the same as with one.
    """
    on_error = OnError(on_error)
    truncation = Truncation(truncation)
    report = report if report is not None else BuildReport()
    options = dict(policy=MaskPolicy.parse(policy), max_length=max_length, truncation=truncation,
                   reasoning_effort=reasoning_effort, auto_drop_analysis=auto_drop_analysis)
    for result in _rendered(records, options, workers):
        report.read += 1
        if isinstance(result, DataError):
            error = result
            # Over-long examples follow the truncation policy, whatever on_error says; examples with nothing to
            # train are valid data and always just counted.
            if error.reason == "too long":
                if truncation is Truncation.ERROR:
                    raise error
            elif error.reason != "no trained tokens" and on_error is OnError.ERROR:
                raise error
            report.skip(error)
            continue
        report.kept += 1
        report.truncated += int(result.truncated)
        yield result


def build_examples(records: Iterable[SourceRecord], *, progress: bool = False, total: int | None = None,
                   report: BuildReport | None = None, **options: Any) -> tuple[list[TrainingExample], BuildReport]:
    """All examples of ``records`` and the report (options as :func:`iter_examples`); optional rich progress bar."""
    report = report if report is not None else BuildReport()
    iterator = iter_examples(records, report=report, **options)
    if not progress:
        return list(iterator), report
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    examples: list[TrainingExample] = []
    columns = [TextColumn("rendering"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn()]
    # On stderr, so stdout stays clean for data (e.g. `gptoss-data stats --json`).
    with Progress(*columns, transient=True, console=Console(stderr=True)) as bar:
        task = bar.add_task("render", total=total)
        for example in iterator:
            examples.append(example)
            bar.update(task, completed=report.read)
        bar.update(task, completed=report.read)
    return examples, report


def load_examples(source, *, split: str = "train", progress: bool = False,
                  **options: Any) -> tuple[list[TrainingExample], BuildReport]:
    """Render a whole source (JSONL path, datasets folder, ``hf:NAME[:SPLIT]``, or an iterable of rows).

    ``options``: ``policy``, ``max_length``, ``truncation``, ``on_error``, ``reasoning_effort``, ``workers``,
    ``auto_drop_analysis`` (see
    :func:`iter_examples`). Returns the examples and a :class:`BuildReport` of what was skipped.
    """
    from gptoss_train.data.readers import open_source, read_rows

    if isinstance(source, (str, bytes)) or hasattr(source, "__fspath__"):
        records = open_source(source, split=split)
    else:
        records = read_rows(source)
    total = None
    if progress:
        records = list(records)
        total = len(records)
    return build_examples(records, progress=progress, total=total, **options)
