"""Fixtures for the export tests: a tiny base checkpoint in the hub layout, loaded models, a tuned copy."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

# Small enough for 2 CPU cores, yet every MXFP4 axis is real: hidden and intermediate are multiples of 32.
TINY_CONFIG = dict(
    hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    head_dim=16, num_local_experts=4, num_experts_per_tok=2, vocab_size=201088, sliding_window=8,
    max_position_embeddings=4096,
)


def _build_standin_checkpoint(out_dir: Path, seed: int = 0) -> Path:
    """The hub layout (MXFP4 experts, bf16 rest, tokenizer files) from a random transformers model.

    Used only while gptoss_train.model.tiny is not importable; the real fixture comes from tests/conftest.py.
    """
    from safetensors.torch import save_file
    from transformers import GptOssConfig, GptOssForCausalLM

    from gptoss_train.harmony.tokenizer import copy_tokenizer_files
    from gptoss_train.quant import mxfp4

    torch.manual_seed(seed)
    config = GptOssConfig(**TINY_CONFIG)
    model = GptOssForCausalLM(config)
    tensors = {}
    for name, value in model.state_dict().items():
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            blocks, scales = mxfp4.encode(value.transpose(-1, -2).float() * 20)
            tensors[name + "_blocks"], tensors[name + "_scales"] = blocks, scales
        else:
            tensors[name] = (value.float() * (5 if value.dim() > 1 else 1)).to(torch.bfloat16)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    cfg = config.to_dict()
    cfg["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
    cfg["architectures"] = ["GptOssForCausalLM"]
    (out_dir / "config.json").write_text(json.dumps(cfg, indent=2))
    copy_tokenizer_files(out_dir)
    return out_dir


@pytest.fixture(scope="session")
def export_base(tmp_path_factory) -> Path:
    """A tiny gpt-oss base checkpoint (MXFP4 experts) in the hub layout."""
    try:
        from gptoss_train.model.tiny import build_checkpoint
    except ImportError:
        return _build_standin_checkpoint(tmp_path_factory.mktemp("tiny-base"))
    return build_checkpoint(tmp_path_factory.mktemp("tiny-base"), preset="tiny", seed=0)


def load_float32(path) -> torch.nn.Module:
    """Plain transformers load in float32 (MXFP4 experts are dequantized on CPU), eval mode."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    return model.eval()


@pytest.fixture(scope="session")
def load_f32():
    """The loader above as a fixture (test modules here are not a package, so they cannot import conftest)."""
    return load_float32


@pytest.fixture(scope="session")
def ollama_export(export_base, tmp_path_factory) -> Path:
    """One Ollama export (model.gguf + Modelfile) shared by the GGUF and Ollama tests: writing the 201k-token
    vocabulary into a GGUF takes seconds, so it is done once."""
    from gptoss_train.export import export_model

    return export_model(export_base, out_dir=tmp_path_factory.mktemp("ollama") / "ollama", format="ollama",
                        progress=False)
