"""Ollama export: GGUF + a Modelfile whose Harmony Go template turns Ollama's Harmony parser on."""

from __future__ import annotations

import re

import pytest

from gptoss_train.export.gguf import read_gguf_metadata
from gptoss_train.export.ollama import HARMONY_GO_TEMPLATE, modelfile_text


def _go_actions(template: str) -> list[str]:
    return re.findall(r"\{\{-?\s*(if|range|with|else|end)\b", template)


def test_template_is_balanced_harmony_go_template():
    # Ollama's shouldUseHarmony needs both tokens in the TEMPLATE (formats.md §5.2)
    assert "<|start|>" in HARMONY_GO_TEMPLATE and "<|end|>" in HARMONY_GO_TEMPLATE
    actions = _go_actions(HARMONY_GO_TEMPLATE)
    openers = sum(a in ("if", "range", "with") for a in actions)
    assert openers == actions.count("end"), actions
    depth = 0
    for action in actions:
        depth += action in ("if", "range", "with")
        depth -= action == "end"
        assert depth >= 0
    assert HARMONY_GO_TEMPLATE.count("{{") == HARMONY_GO_TEMPLATE.count("}}")
    # tools capability needs a .Tools reference; generation ends on the assistant header
    assert ".Tools" in HARMONY_GO_TEMPLATE and "<|start|>assistant\n{{- end }}" in HARMONY_GO_TEMPLATE
    for channel in ("analysis", "commentary", "final"):
        assert f"<|channel|>{channel}" in HARMONY_GO_TEMPLATE


def test_modelfile_lines():
    text = modelfile_text("model.gguf", parameters={"temperature": 0.7})
    lines = text.splitlines()
    assert lines[0] == "FROM ./model.gguf"
    assert 'TEMPLATE """<|start|>system' in text
    assert "PARAMETER temperature 0.7" in lines and "PARAMETER top_p 1.0" in lines
    assert "PARAMETER stop <|return|>" in lines and "PARAMETER stop <|call|>" in lines
    with pytest.raises(ValueError, match="<\\|start\\|>"):
        modelfile_text("model.gguf", template="{{ .Prompt }}")


def test_ollama_export_folder(ollama_export):
    out = ollama_export
    assert sorted(p.name for p in out.iterdir()) == ["Modelfile", "model.gguf"]
    assert (out / "Modelfile").read_text().startswith("FROM ./model.gguf\n")
    kv, _ = read_gguf_metadata(out / "model.gguf")
    assert kv["general.architecture"] == "gpt-oss" and kv["tokenizer.ggml.eos_token_ids"] == [199999, 200002, 200012]
