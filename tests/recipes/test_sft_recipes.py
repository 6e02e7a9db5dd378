"""The recipes as users run them (subprocesses): LoRA and full SFT on the tiny model, and a run killed with SIGKILL
mid-way that resumes from its latest checkpoint and reproduces the uninterrupted run's loss curve."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gptoss_train.train.callbacks import read_loss_csv

REPO = Path(__file__).resolve().parents[2]


def _overrides(checkpoint, out, **extra):
    base = {"model.path": checkpoint, "data.train_files": "[demo:train]", "data.limit": 8, "data.max_length": 512,
            "lora.r": 4, "lora.alpha": 8, "lora.modules_to_save": "[]", "train.lr": "1.0e-3",
            "train.lr_scheduler": "linear", "train.lr_scheduler_kwargs": "{}", "train.batch_size": 2,
            "train.output_dir": out, "train.logging": "none", "train.progress": "false"}
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return env


def _recipe(name, config, overrides):
    return [sys.executable, str(REPO / "recipes" / name), "--config", str(REPO / "configs" / "sft" / config),
            *overrides]


@pytest.mark.slow
def test_sigkill_mid_run_then_resume_reproduces_the_loss_curve(tiny_checkpoint, tmp_path):
    steps = 6
    whole = tmp_path / "whole"
    cut = tmp_path / "cut"
    subprocess.run(_recipe("sft_lora.py", "tiny-cpu-lora.yaml",
                           _overrides(tiny_checkpoint, whole, **{"train.steps": steps})),
                   check=True, cwd=REPO, env=_env(), capture_output=True)
    reference = read_loss_csv(whole / "loss.csv")
    assert [s for s, _ in reference] == list(range(1, steps + 1))

    args = _overrides(tiny_checkpoint, cut, **{"train.steps": steps, "train.save_every": 2})
    process = subprocess.Popen(_recipe("sft_lora.py", "tiny-cpu-lora.yaml", args), cwd=REPO, env=_env(),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (cut / "checkpoint-2" / "trainer_state.json").exists():
        assert process.poll() is None, "the run ended before its first checkpoint"
        assert time.time() < deadline
        time.sleep(0.2)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (cut / "final").exists()  # really killed mid-way

    done = subprocess.run(_recipe("sft_lora.py", "tiny-cpu-lora.yaml", [*args, "--resume", "latest"]),
                          cwd=REPO, env=_env(), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resuming from" in done.stdout
    resumed = read_loss_csv(cut / "loss.csv")
    assert [s for s, _ in resumed] == [s for s, _ in reference]
    for (step, expected), (_, got) in zip(reference, resumed):
        assert got == pytest.approx(expected, rel=1e-3, abs=1e-3), f"step {step}"
    assert (cut / "final" / "adapter_model.safetensors").exists()


@pytest.mark.slow
def test_full_recipe_runs_and_writes_a_loadable_model(tiny_checkpoint, tmp_path):
    out = tmp_path / "full"
    args = _overrides(tiny_checkpoint, out, **{"train.steps": 2})
    args = [a for a in args if not a.startswith(("lora.", "train.lr="))] + ["train.lr=1.0e-4"]
    done = subprocess.run(_recipe("sft_full.py", "tiny-cpu-full.yaml", args), cwd=REPO, env=_env(),
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "tokens/s" in done.stdout
    import json

    import torch
    from transformers import GptOssForCausalLM

    config = json.loads((out / "final" / "config.json").read_text())
    assert "quantization_config" not in config  # dense experts: no mxfp4 claim left behind
    model = GptOssForCausalLM.from_pretrained(out / "final", dtype=torch.float32)
    assert torch.isfinite(model.model.layers[0].mlp.experts.gate_up_proj).all()


def test_recipes_refuse_bad_configs(tmp_path):
    done = subprocess.run(_recipe("sft_lora.py", "tiny-cpu-lora.yaml", ["train.learning_rate=1"]), cwd=REPO,
                          env=_env(), capture_output=True, text=True)
    assert done.returncode == 2 and "did you mean 'train.lr'" in done.stderr
    done = subprocess.run(_recipe("sft_full.py", "tiny-cpu-full.yaml", ["model.experts=mxfp4"]), cwd=REPO,
                          env=_env(), capture_output=True, text=True)
    assert done.returncode == 2 and "model.experts must be bf16" in done.stderr


def test_recipes_are_thin_and_distinct():
    lora = (REPO / "recipes" / "sft_lora.py").read_text().splitlines()
    full = (REPO / "recipes" / "sft_full.py").read_text().splitlines()
    assert len(lora) <= 250 and len(full) <= 250
    shared = set(lora) & set(full)
    meaningful = [line for line in shared if line.strip() and not line.strip().startswith("#")]
    assert len(meaningful) / len(lora) < 0.9


@pytest.mark.slow
def test_gpu_sft_script_cpu_path(tmp_path):
    """scripts/gpu_sft.sh's commands (accelerate launch of both recipes, 20b configs) on the tiny preset, on CPU."""
    env = dict(_env(), OUT=str(tmp_path), PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}",
               PYTHON=sys.executable)
    done = subprocess.run(["bash", str(REPO / "scripts" / "gpu_sft.sh"), "cpu-smoke"], cwd=REPO, env=env,
                          capture_output=True, text=True)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    assert sum(line.startswith("trained ") for line in done.stdout.splitlines()) == 2  # one summary per recipe
    assert (tmp_path / "lora-run" / "final" / "adapter_model.safetensors").exists()
    assert (tmp_path / "full-run" / "final" / "config.json").exists()
