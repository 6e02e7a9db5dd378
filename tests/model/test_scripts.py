"""The GPU/benchmark scripts run end to end on CPU with the tiny preset (what the coordinator runs on the device)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"


def _load(name):
    sys.path.insert(0, str(SCRIPTS))
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_mxfp4_tiny(tmp_path, capsys):
    bench = _load("bench_mxfp4")
    bench.main(["--preset", "tiny", "--json", str(tmp_path / "codec.json")])
    result = json.loads((tmp_path / "codec.json").read_text())
    assert result["elements"] == 2 * 4 * (128 * 64 + 64 * 64) and result["layers_run"] == 2
    assert "decode + encode" in capsys.readouterr().out


def test_gpu_model_io_tiny_on_cpu(tmp_path, tiny_checkpoint, capsys):
    script = _load("gpu_model_io")
    result = script.main(["--preset", "tiny", "--device", "cpu", "--batch", "1", "--seq", "24",
                          "--checkpoint", str(tiny_checkpoint), "--json", str(tmp_path / "io.json")])
    assert result["adapted_expert_tensors"] == 4 and result["loss"] > 0
    assert "peak memory" in capsys.readouterr().out
    assert json.loads((tmp_path / "io.json").read_text())["experts"] == "mxfp4"
