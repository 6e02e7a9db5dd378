"""gptoss-data: each subcommand through typer's CliRunner."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from gptoss_train.cli.data import app

FIXTURES = Path(__file__).resolve().parents[1] / "data" / "fixtures"
CHAT = str(FIXTURES / "chat.jsonl")
BAD = str(FIXTURES / "bad.jsonl")


@pytest.fixture()
def runner():
    return CliRunner()


def test_help_lists_commands(runner):
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("validate", "render", "inspect", "stats"):
        assert command in result.output
    result = runner.invoke(app, ["render", "--help"])
    assert "--policy" in result.output and "reasoning_final" in result.output and "--pack" in result.output


def test_validate_good_and_bad(runner):
    result = runner.invoke(app, ["validate", CHAT])
    assert result.exit_code == 0, result.output
    assert "5 valid example(s)" in result.output
    result = runner.invoke(app, ["validate", BAD])
    assert result.exit_code == 1
    assert "19 invalid example(s)" in result.output  # 20 lines, one of them only has nothing to train
    for reason in json.loads((FIXTURES / "bad_expected.json").read_text()).values():
        assert reason in result.output


def test_validate_missing_file(runner, tmp_path):
    result = runner.invoke(app, ["validate", str(tmp_path / "none.jsonl")])
    assert result.exit_code == 2 and "no such file" in result.output


def test_render_jsonl(runner, tmp_path, harmony_encoding):
    out = tmp_path / "out.jsonl"
    result = runner.invoke(app, ["render", CHAT, "--out", str(out), "--policy", "final"])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 5 and set(rows[0]) == {"input_ids", "loss_mask"}
    trained = [t for t, m in zip(rows[0]["input_ids"], rows[0]["loss_mask"]) if m]
    assert harmony_encoding.decode(trained) == "<|channel|>final<|message|>84<|return|>"
    again = runner.invoke(app, ["render", CHAT, "--out", str(out)])
    assert again.exit_code == 1 and "--force" in again.output  # never overwrites silently
    assert not list(tmp_path.glob(".out.jsonl.*"))  # no temp file left behind


def test_render_errors_and_skip(runner, tmp_path):
    out = tmp_path / "bad.jsonl"
    result = runner.invoke(app, ["render", BAD, "--out", str(out)])
    assert result.exit_code == 1 and "bad.jsonl:1: invalid JSON" in result.output and not out.exists()
    result = runner.invoke(app, ["render", BAD, "--out", str(out), "--on-error", "skip"])
    assert result.exit_code == 0 and out.read_text() == "" and "skipped 20" in result.output


def test_render_packed_datasets_folder(runner, tmp_path):
    import datasets

    out = tmp_path / "packed"
    result = runner.invoke(app, ["render", CHAT, "--out", str(out), "--format", "datasets", "--pack",
                                 "--max-length", "512"])
    assert result.exit_code == 0, result.output
    dataset = datasets.load_from_disk(str(out))
    assert set(dataset.column_names) == {"input_ids", "loss_mask", "position_ids"}
    assert len(dataset) == 2 and all(len(row["input_ids"]) <= 512 for row in dataset)
    result = runner.invoke(app, ["render", CHAT, "--out", str(out), "--format", "datasets", "--force"])
    assert result.exit_code == 0 and len(datasets.load_from_disk(str(out))) == 5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["packed"]  # staging folders cleaned up


def test_pack_needs_max_length(runner, tmp_path):
    result = runner.invoke(app, ["render", CHAT, "--out", str(tmp_path / "x.jsonl"), "--pack"])
    assert result.exit_code == 1 and "--max-length" in result.output


def test_inspect_marks_trained_tokens(runner):
    result = runner.invoke(app, ["inspect", CHAT, "--index", "0", "--policy", "final"])
    assert result.exit_code == 0, result.output
    assert "<|start|>assistant[[<|channel|>final<|message|>84<|return|>]]" in result.stdout
    assert result.stdout.count("[[") == 1
    result = runner.invoke(app, ["inspect", CHAT, "--index", "0", "--policy", "reasoning_final"])
    assert "[[<|channel|>analysis<|message|>12 * 7 = 84.<|end|><|start|>assistant<|channel|>final" in result.stdout
    result = runner.invoke(app, ["inspect", CHAT, "--index", "9"])
    assert result.exit_code == 1 and "fewer than 10 examples" in result.output


def test_inspect_color(runner):
    result = runner.invoke(app, ["inspect", CHAT, "--index", "0", "--color"])
    assert result.exit_code == 0 and "[[" not in result.stdout and "84" in result.stdout


def test_stats(runner):
    result = runner.invoke(app, ["stats", CHAT, "--json", "--pack", "--max-length", "512", "--workers", "2"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["stats"]["examples"] == 5 and payload["stats"]["packed_rows"] == 2
    assert 0 < payload["stats"]["trained_fraction"] < 1
    result = runner.invoke(app, ["stats", BAD])
    assert result.exit_code == 0 and "examples" in result.output and "skipped" in result.output
    result = runner.invoke(app, ["stats", CHAT, "--max-length", "80"])
    assert "too long" in result.output


def test_inspect_example_with_nothing_trained(runner, tmp_path):
    source = tmp_path / "prompt_only.jsonl"
    source.write_text(json.dumps({"messages": [{"role": "user", "content": "unanswered"}]}) + "\n")
    result = runner.invoke(app, ["inspect", str(source)])
    assert result.exit_code == 0 and "[[" not in result.stdout and "unanswered" in result.stdout
    assert "nothing is trained" in result.output


def test_keep_analysis_under_final_policy(runner):
    """--keep-analysis keeps the reasoning as untrained context; the final policy drops it by default."""
    dropped = runner.invoke(app, ["inspect", CHAT, "--index", "0", "--policy", "final"])
    kept = runner.invoke(app, ["inspect", CHAT, "--index", "0", "--policy", "final", "--keep-analysis"])
    assert "12 * 7 = 84." not in dropped.stdout
    # The model generates the second <|start|>assistant of its turn itself, so it is trained with the final answer.
    assert ("<|channel|>analysis<|message|>12 * 7 = 84.<|end|>[[<|start|>assistant<|channel|>final<|message|>84"
            "<|return|>]]") in kept.stdout
