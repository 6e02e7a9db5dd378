"""Fixtures for the training tests: a tiny base with LoRA applied, and a small batch of demo rows."""

import pytest


@pytest.fixture()
def tiny_lora_cfg(tiny_checkpoint, tmp_path):
    from gptoss_train.train.config import load_config

    return load_config(None, [f"model.path={tiny_checkpoint}", "model.dtype=float32", "lora.r=4", "lora.alpha=8",
                              "data.train_files=[demo:train]", "data.limit=8", "data.max_length=512",
                              f"train.output_dir={tmp_path / 'run'}", "train.logging=none", "train.progress=false"])


@pytest.fixture()
def demo_rows(tiny_lora_cfg):
    from gptoss_train.train.dataset import load_training_examples, rows_from_examples

    examples, _ = load_training_examples(tiny_lora_cfg.data)
    return examples, rows_from_examples(examples, packing=False, max_length=512)
