"""scripts/bench_export.py runs end to end on the tiny preset (the GPU run uses --preset 20b)."""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "bench_export.py"


def test_bench_export_tiny_cpu(tmp_path, monkeypatch):
    pytest.importorskip("gptoss_train.model.tiny")
    out = tmp_path / "bench.json"
    monkeypatch.setattr(sys, "argv", [str(SCRIPT), "--preset", "tiny", "--device", "cpu", "--work", str(tmp_path),
                                      "--json", str(out), "--formats", "mxfp4"])
    runpy.run_path(str(SCRIPT), run_name="__main__")
    results = json.loads(out.read_text())
    # (the GGUF path of export_model is timed on the GPU machine; tests/export/test_gguf.py covers it here)
    assert set(results["exports"]) == {"mxfp4"}
    for fmt in ("mxfp4",):
        export = results["exports"][fmt]
        assert export["seconds"] > 0 and export["bytes"] > 0
        # every adapter matrix is non-zero, so every expert changes
        assert export["requantize"]["experts_changed"] == export["requantize"]["experts"] > 0
    assert not (tmp_path / "export-mxfp4").exists()  # exports are cleaned up unless --keep
