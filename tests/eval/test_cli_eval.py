"""``gptoss-eval`` command line: run, list, compare, report, config files and errors."""

import json

import pytest

from gptoss_train.cli.eval import main


def _run(argv, capsys):
    try:
        main(argv)
        code = 0
    except SystemExit as exit_:
        code = exit_.code or 0
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def test_list_shows_suites(capsys):
    code, output = _run(["list"], capsys)
    assert code == 0
    for name in ("aime25", "gpqa-diamond", "gsm8k", "math500", "demo"):
        assert name in output


def test_run_sweep_then_report_and_compare(tmp_path, capsys):
    out = tmp_path / "run"
    code, output = _run(["--suite", "gsm8k", "--model", "oracle", "--data", "bundled", "--effort", "low,high",
                         "--out", str(out), "--no-progress"], capsys)
    assert code == 0, output
    assert "1.000" in output
    results = json.loads((out / "results.json").read_text())
    assert set(results["metrics"]) == {"low", "high"}
    (out / "report.html").unlink()
    assert _run(["report", str(out)], capsys)[0] == 0 and (out / "report.html").is_file()
    code, output = _run(["compare", str(out), str(out), "--out", str(tmp_path / "cmp")], capsys)
    assert code == 0 and (tmp_path / "cmp" / "compare.html").is_file()


def test_config_file_and_flag_override(tmp_path, capsys):
    config = tmp_path / "eval.yaml"
    config.write_text("suite: math500\nmodel: oracle\ndata: bundled\neffort: [low, medium]\nlimit: 3\n")
    code, output = _run(["--config", str(config), "--limit", "2", "--out", str(tmp_path / "r"), "--no-progress"],
                        capsys)
    assert code == 0, output
    results = json.loads((tmp_path / "r" / "results.json").read_text())
    assert results["suite"] == "math500" and results["data"]["n"] == 2 and set(results["metrics"]) == {"low", "medium"}


@pytest.mark.parametrize("argv, message", [
    (["--suite", "gsm8k"], "--suite and --model are required"),
    (["--suite", "nope", "--model", "oracle"], "unknown suite"),
    (["--suite", "gsm8k", "--model", "oracle", "--data", "bundled", "--effort", "max"], "reasoning effort"),
    (["--suite", "gsm8k", "--model", "missing.gguf", "--data", "bundled"], "does not exist"),
])
def test_errors_are_clear(argv, message, capsys):
    code, output = _run(argv + ["--no-progress"], capsys)
    assert code == 2 and message in output


def test_every_shipped_eval_config_uses_known_options():
    import inspect
    from pathlib import Path

    import yaml

    from gptoss_train.cli.eval import run_command

    known = set(inspect.signature(run_command).parameters) | {"out"}
    configs = sorted((Path(__file__).resolve().parents[2] / "configs" / "eval").glob("*.yaml"))
    assert configs
    for path in configs:
        keys = {key.replace("-", "_") for key in (yaml.safe_load(path.read_text()) or {})}
        assert keys <= known, f"{path.name}: unknown option(s) {sorted(keys - known)}"


def test_selfcheck_config_scores_one(tmp_path, capsys):
    from pathlib import Path

    config = Path(__file__).resolve().parents[2] / "configs" / "eval" / "selfcheck.yaml"
    code, output = _run(["--config", str(config), "--out", str(tmp_path), "--no-progress"], capsys)
    assert code == 0, output
    results = json.loads((tmp_path / "results.json").read_text())
    assert all(m["score"] == 1.0 for m in results["metrics"].values()) and len(results["metrics"]) == 3
