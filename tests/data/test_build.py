"""data.build + readers: row shapes, file:line errors for >= 15 malformed inputs, skip counts, truncation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gptoss_train.data import DataError, DataSourceError, load_examples, open_source, read_rows
from gptoss_train.data.build import Truncation, record_to_conversation
from gptoss_train.harmony.render import MaskPolicy

FIXTURES = Path(__file__).parent / "fixtures"
BAD = FIXTURES / "bad.jsonl"
EXPECTED = {int(line): reason for line, reason in json.loads((FIXTURES / "bad_expected.json").read_text()).items()}


def test_good_fixture_renders(harmony_encoding):
    examples, report = load_examples(FIXTURES / "chat.jsonl")
    assert report.read == report.kept == 5 and not report.skipped
    texts = [harmony_encoding.decode(example.input_ids) for example in examples]
    assert "Reasoning: low" in texts[1] and "<|constrain|>json" in texts[1]
    # `developer` column is used when the messages have no system message of their own ...
    assert "# Instructions\n\nAnswer in French.<|end|>" in texts[2]
    # ... and column form (user/analysis/final) builds a single turn.
    assert "<|channel|>analysis<|message|>Eine Primzahl: 7.<|end|>" in texts[3]
    assert "reasoning language: German" in texts[3]
    assert texts[4].endswith("<|start|>assistant<|channel|>final<|message|>Hi!<|return|>")
    assert [e.location for e in examples] == ["1", "2", "3", "4", "5"]


def test_system_message_wins_over_developer_column(harmony_encoding):
    rows = [{"developer": "column prompt", "messages": [{"role": "system", "content": "message prompt"},
                                                        {"role": "user", "content": "q"},
                                                        {"role": "assistant", "content": "a"}]}]
    (example,), _ = load_examples(rows)
    text = harmony_encoding.decode(example.input_ids)
    assert "message prompt" in text and "column prompt" not in text


@pytest.mark.parametrize("line", sorted(EXPECTED), ids=[f"line{n}-{EXPECTED[n]}" for n in sorted(EXPECTED)])
def test_each_bad_line_names_file_line_and_reason(line, tmp_path):
    single = tmp_path / "one.jsonl"
    single.write_text(BAD.read_text().splitlines()[line - 1] + "\n")
    if EXPECTED[line] == "no trained tokens":  # valid data with nothing to learn: always counted, never an error
        examples, report = load_examples(single)
        assert examples == [] and report.skipped == {"no trained tokens": 1}
        return
    with pytest.raises(DataError) as info:
        load_examples(single)
    error = info.value
    assert (error.source, error.location, error.reason) == (str(single), "1", EXPECTED[line])
    assert str(error).startswith(f"{single}:1: ")
    assert error.hint  # every reason comes with how to fix it


def test_bad_fixture_first_error_and_skip_report():
    assert len(EXPECTED) >= 15
    with pytest.raises(DataError, match=rf"^{BAD}:1: invalid JSON"):
        load_examples(BAD)
    examples, report = load_examples(BAD, on_error="skip")
    assert examples == [] and report.read == len(EXPECTED)
    counts: dict[str, int] = {}
    for reason in EXPECTED.values():
        counts[reason] = counts.get(reason, 0) + 1
    assert dict(report.skipped) == counts
    assert report.samples["unknown role"] == [f"{BAD}:5: message 0: unknown role 'human'; expected one of "
                                              "system, developer, user, assistant, tool"]


def test_mixed_file_keeps_good_rows(tmp_path):
    mixed = tmp_path / "mixed.jsonl"
    good = (FIXTURES / "chat.jsonl").read_text().splitlines()
    bad = BAD.read_text().splitlines()
    mixed.write_text("\n".join([good[0], bad[4], "", good[1], bad[0]]) + "\n")
    examples, report = load_examples(mixed, on_error="skip")
    assert [e.location for e in examples] == ["1", "4"]  # the blank line 3 is ignored, numbering is kept
    assert report.to_dict()["skipped"] == {"unknown role": 1, "invalid JSON line": 1}


def test_truncation_policies():
    rows = [{"messages": [{"role": "user", "content": "word " * 50},
                          {"role": "assistant", "content": "answer " * 200}]}]
    (full,), _ = load_examples(rows)
    limit = len(full) - 50
    examples, report = load_examples(rows, max_length=limit, truncation="drop")
    assert examples == [] and report.skipped == {"too long": 1}
    (cut,), report = load_examples(rows, max_length=limit, truncation=Truncation.TRUNCATE)
    assert cut.input_ids == full.input_ids[:limit] and cut.loss_mask == full.loss_mask[:limit]
    assert cut.truncated and report.truncated == 1
    with pytest.raises(DataError, match="too long|max_length"):
        load_examples(rows, max_length=limit, truncation="error", on_error="skip")
    # The prompt alone is longer than max_length: nothing trained would survive, so it is dropped with a reason.
    examples, report = load_examples(rows, max_length=60, truncation="truncate", on_error="skip")
    assert examples == [] and report.skipped == {"prompt too long": 1}


def test_per_sample_effort_and_default(harmony_encoding):
    rows = [{"reasoning_effort": "high", "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
            {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}]
    examples, _ = load_examples(rows, reasoning_effort="low")
    texts = [harmony_encoding.decode(e.input_ids) for e in examples]
    assert "Reasoning: high" in texts[0] and "Reasoning: low" in texts[1]


def test_policy_changes_mask_only():
    rows = [json.loads(line) for line in (FIXTURES / "chat.jsonl").read_text().splitlines()]
    final, _ = load_examples(rows, policy=MaskPolicy.FINAL)
    reasoning, _ = load_examples(rows, policy="reasoning_final")
    assert sum(e.num_trained for e in final) < sum(e.num_trained for e in reasoning)


def test_rows_from_a_datasets_dataset():
    """Arrow stores messages as structs: keys a message lacks come back as None, which must be harmless."""
    import datasets

    rows = [json.loads(line) for line in (FIXTURES / "chat.jsonl").read_text().splitlines()][:3]
    # Tools are commonly stored as JSON text in datasets; reasoning_effort/developer are plain columns.
    dataset = datasets.Dataset.from_list([
        {"messages": row["messages"], "developer": row.get("developer"), "reasoning_effort": row.get("reasoning_effort"),
         "tools": json.dumps(row["tools"]) if "tools" in row else None} for row in rows])
    assert dataset[0]["messages"][1]["tool_calls"] is None  # filled in by Arrow
    examples, report = load_examples(dataset)
    assert report.kept == 3 and [e.location for e in examples] == ["row 0", "row 1", "row 2"]
    direct, _ = load_examples(rows)
    assert [e.input_ids for e in examples] == [e.input_ids for e in direct]


def test_arrow_null_filled_tool_schemas_are_cleaned(harmony_encoding):
    tool = {"type": "function", "function": {"name": "f", "description": "d", "parameters": {
        "type": "object", "properties": {"a": {"type": "string", "enum": None}, "b": None}}}}
    clean = {"type": "function", "function": {"name": "f", "description": "d", "parameters": {
        "type": "object", "properties": {"a": {"type": "string"}}}}}
    chat = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    (dirty_example,), _ = load_examples([{"tools": [tool], "messages": chat}])
    (clean_example,), _ = load_examples([{"tools": json.dumps([clean]), "messages": chat}])  # tools as JSON text
    assert dirty_example.input_ids == clean_example.input_ids


def test_multilingual_thinking_shaped_dataset(tmp_path, harmony_encoding):
    """Columns of HuggingFaceH4/Multilingual-Thinking, saved with save_to_disk and read back as a folder source."""
    import datasets

    rows = [{"reasoning_language": "French", "developer": "reasoning language: French\n\nYou are helpful.",
             "user": f"Question {i}?", "analysis": f"Réflexion {i}.", "final": f"Answer {i}.",
             "messages": [{"role": "system", "content": "reasoning language: French\n\nYou are helpful.", "thinking": None},
                          {"role": "user", "content": f"Question {i}?", "thinking": None},
                          {"role": "assistant", "content": f"Answer {i}.", "thinking": f"Réflexion {i}."}]}
            for i in range(3)]
    folder = tmp_path / "mt"
    datasets.Dataset.from_list(rows).save_to_disk(str(folder))
    examples, report = load_examples(str(folder), policy="reasoning_final")
    assert report.kept == 3 and [e.location for e in examples] == ["row 0", "row 1", "row 2"]
    text = harmony_encoding.decode(examples[1].input_ids)
    assert "<|channel|>analysis<|message|>Réflexion 1.<|end|>" in text
    assert text.count("reasoning language: French") == 1  # the developer column is not duplicated


def test_hub_dataset_offline_fails_clearly(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(DataSourceError) as info:
        list(open_source("hf:HuggingFaceH4/Multilingual-Thinking"))
    message = str(info.value)
    assert "HuggingFaceH4/Multilingual-Thinking" in message and "offline" in message and "to_json" in message


def test_missing_file_and_json_list(tmp_path):
    with pytest.raises(DataSourceError, match="no such file"):
        load_examples(tmp_path / "nope.jsonl")
    as_list = tmp_path / "rows.json"
    as_list.write_text(json.dumps([json.loads(line) for line in (FIXTURES / "chat.jsonl").read_text().splitlines()]))
    examples, _ = load_examples(as_list)
    assert [e.location for e in examples][:2] == ["row 0", "row 1"]


def test_record_to_conversation_rejects_non_object():
    (record,) = read_rows([[1, 2]])
    with pytest.raises(DataError, match="row 0: expected a JSON object"):
        record_to_conversation(record)


def test_workers_give_the_same_result():
    serial, serial_report = load_examples(BAD, on_error="skip")
    parallel, parallel_report = load_examples(BAD, on_error="skip", workers=2)
    assert serial == parallel == [] and serial_report.to_dict() == parallel_report.to_dict()
    good_serial, _ = load_examples(FIXTURES / "chat.jsonl", policy="final")
    good_parallel, _ = load_examples(FIXTURES / "chat.jsonl", policy="final", workers=2)
    assert [e.to_dict() for e in good_serial] == [e.to_dict() for e in good_parallel]
    assert [e.location for e in good_parallel] == ["1", "2", "3", "4", "5"]
    with pytest.raises(DataError, match=r"bad.jsonl:1: invalid JSON"):
        load_examples(BAD, workers=2)
