"""gptoss-export: argument handling, exit codes and messages (the library is tested in test_api.py)."""

from __future__ import annotations

import json

import pytest

from gptoss_train.cli.export import main


def _run(args, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    captured = capsys.readouterr()
    return exit_info.value.code, " ".join((captured.out + captured.err).split())  # rich wraps long lines


def test_export_then_validate(export_base, tmp_path, capsys):
    out = tmp_path / "exp"
    code, text = _run(["--base", str(export_base), "--format", "mxfp4", "--out", str(out)], capsys)
    assert code == 0, text
    assert "wrote" in text and (out / "config.json").is_file()
    code, text = _run(["validate", str(out)], capsys)
    assert code == 0 and "layout OK" in text

    code, text = _run(["--base", str(export_base), "--format", "mxfp4", "--out", str(out)], capsys)
    assert code == 2 and "--force" in text

    config = json.loads((out / "config.json").read_text())
    config.pop("quantization_config")
    (out / "config.json").write_text(json.dumps(config))
    code, text = _run(["validate", str(out)], capsys)
    assert code == 1 and "no quantization_config" in text


def test_bad_inputs_are_clear(export_base, tmp_path, capsys):
    code, text = _run(["--base", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and "not a local folder" in text
    code, text = _run(["--base", str(export_base), "--adapter", str(tmp_path), "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and "adapter_config.json" in text
    code, text = _run(["--base", str(export_base), "--format", "onnx", "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and "onnx" in text
    assert not (tmp_path / "o").exists()


def test_help_lists_formats(capsys):
    code, text = _run(["--help"], capsys)
    assert code == 0
    for word in ("mxfp4", "bf16", "gguf", "ollama", "--adapter", "--force"):
        assert word in text


def test_broken_model_folder_is_a_clear_error(export_base, tmp_path, capsys):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text("{}")  # a config but no weights
    code, text = _run(["--base", str(export_base), "--model", str(bad), "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and "no model.safetensors" in text and not (tmp_path / "o").exists()
