"""Randomly initialised gpt-oss checkpoints written exactly in the hub layout (formats.md §1).

Tests need a model that behaves like the released checkpoints on disk (MXFP4 experts, sharded safetensors with an
index, the real config and generation config, the tokenizer), and GPU benchmarks need 20b/120b-shaped ones; no
weights can be downloaded here. Presets: ``tiny`` (CPU tests: hidden 64, 2 layers, 4 experts top-2, full 201,088
vocab because the Harmony special tokens live at ids 199998+), ``20b`` and ``120b`` (the real shapes).

Weights are drawn from N(0, initializer_range) (the real init std, 0.02). Unlike transformers' init, biases and
norm weights get random values too (norms 1 + N(0, std)): every tensor is then distinguishable, so a tensor written
or read under the wrong name or orientation changes the logits and fails a test. Expert matrices are drawn in the
checkpoint orientation ``[E, out, in]`` and encoded with our MXFP4 encoder, so the stored model is MXFP4-exact.
Each tensor has its own generator seeded from (seed, name): the values do not depend on the order of writing.

Big presets are streamed layer by layer (on CUDA when available): at most one shard (~4.6 GB, as the hub shards)
plus one layer's float32 experts (in slices of experts) is held at once.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import zlib
from pathlib import Path

import torch

from gptoss_train.model.checkpoint import HF_INDEX_FILE, MODULES_TO_NOT_CONVERT
from gptoss_train.quant import mxfp4

# The released 20b config.json (formats.md §1.1), minus what depends on the preset.
_HUB_CONFIG = {
    "architectures": ["GptOssForCausalLM"],
    "attention_bias": True,
    "attention_dropout": 0.0,
    "eos_token_id": 200002,
    "experts_per_token": 4,
    "head_dim": 64,
    "hidden_act": "silu",
    "hidden_size": 2880,
    "initial_context_length": 4096,
    "initializer_range": 0.02,
    "intermediate_size": 2880,
    "max_position_embeddings": 131072,
    "model_type": "gpt_oss",
    "num_attention_heads": 64,
    "num_experts_per_tok": 4,
    "num_hidden_layers": 24,
    "num_key_value_heads": 8,
    "num_local_experts": 32,
    "output_router_logits": False,
    "pad_token_id": 199999,
    "rms_norm_eps": 1e-05,
    "rope_scaling": {
        "beta_fast": 32.0,
        "beta_slow": 1.0,
        "factor": 32.0,
        "original_max_position_embeddings": 4096,
        "rope_type": "yarn",
        "truncate": False,
    },
    "rope_theta": 150000,
    "router_aux_loss_coef": 0.9,
    "sliding_window": 128,
    "swiglu_limit": 7.0,
    "tie_word_embeddings": False,
    "transformers_version": "4.55.0.dev0",
    "use_cache": True,
    "vocab_size": 201088,
}
GENERATION_CONFIG = {
    "bos_token_id": 199998,
    "do_sample": True,
    "eos_token_id": [200002, 199999, 200012],
    "pad_token_id": 199999,
    "transformers_version": "4.55.0.dev0",
}

PRESETS: dict[str, dict] = {
    "tiny": {
        "hidden_size": 64,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_local_experts": 4,
        "num_experts_per_tok": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        # short enough that test sequences (tens of tokens) actually exercise the sliding layers
        "sliding_window": 16,
    },
    "20b": {"num_hidden_layers": 24, "num_local_experts": 32},
    "120b": {"num_hidden_layers": 36, "num_local_experts": 128},
}
# Hub shards are ~4.6 GB (20b: 13.76 GB in three files); tiny uses a size that still gives three shards.
_SHARD_BYTES = {"tiny": 20_000_000, "20b": 4_700_000_000, "120b": 4_700_000_000}
# CLI/keyword shorthands for config keys
CONFIG_ALIASES = {
    "layers": "num_hidden_layers",
    "experts": "num_local_experts",
    "top_k": "num_experts_per_tok",
    "hidden": "hidden_size",
    "intermediate": "intermediate_size",
    "heads": "num_attention_heads",
    "kv_heads": "num_key_value_heads",
    "vocab": "vocab_size",
}


def preset_config(preset: str = "tiny", **overrides) -> dict:
    """The full HF ``config.json`` dict of a preset with overrides (aliases such as ``layers=4`` accepted)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    config = json.loads(json.dumps(_HUB_CONFIG))
    config.update(PRESETS[preset])
    for key, value in overrides.items():
        key = CONFIG_ALIASES.get(key, key)
        if key not in config and key not in ("layer_types",):
            raise ValueError(f"unknown config key {key!r} for a gpt-oss checkpoint")
        config[key] = value
    config["experts_per_token"] = config["num_experts_per_tok"]
    layers = config["num_hidden_layers"]
    # sliding for even layers, full for odd (formats.md §1.1)
    config.setdefault("layer_types", None)
    if not config["layer_types"] or len(config["layer_types"]) != layers:
        config["layer_types"] = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)]
    for key in ("hidden_size", "intermediate_size"):
        if config[key] % mxfp4.BLOCK_SIZE:
            raise ValueError(f"{key}={config[key]} must be a multiple of {mxfp4.BLOCK_SIZE} (MXFP4 blocks)")
    if config["num_experts_per_tok"] > config["num_local_experts"]:
        raise ValueError("num_experts_per_tok cannot exceed num_local_experts")
    config["quantization_config"] = {
        "modules_to_not_convert": list(MODULES_TO_NOT_CONVERT),
        "quant_method": "mxfp4",
    }
    return dict(sorted(config.items()))


def _generator(seed: int, name: str, device: torch.device) -> torch.Generator:
    gen = torch.Generator(device=device)
    gen.manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63))
    return gen


def _normal(shape, name, seed, std, device, mean=0.0) -> torch.Tensor:
    out = torch.empty(shape, dtype=torch.float32, device=device)
    out.normal_(mean, std, generator=_generator(seed, name, device))
    return out


class _ShardWriter:
    """Groups tensors into ~``max_bytes`` shards, named like the hub (``model-00000-of-00002.safetensors``)."""

    def __init__(self, folder: Path, max_bytes: int):
        self.folder = folder
        self.max_bytes = max_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.written: list[tuple[Path, list[str]]] = []
        self.total_bytes = 0

    def add_group(self, tensors: dict[str, torch.Tensor]) -> None:
        """Tensors that must share a shard (an expert's ``_blocks`` and ``_scales``), in this order."""
        size = sum(t.numel() * t.element_size() for t in tensors.values())
        if self.pending and self.pending_bytes + size > self.max_bytes:
            self.flush()
        for name, tensor in tensors.items():
            self.pending[name] = tensor.detach().to("cpu").contiguous()
        self.pending_bytes += size
        self.total_bytes += size

    def flush(self) -> None:
        if not self.pending:
            return
        from safetensors.torch import save_file

        path = self.folder / f".shard-{len(self.written)}.safetensors"
        save_file(self.pending, str(path), metadata={"format": "pt"})
        self.written.append((path, list(self.pending)))
        self.pending, self.pending_bytes = {}, 0

    def finish(self) -> None:
        self.flush()
        last = len(self.written) - 1
        weight_map = {}
        for i, (path, names) in enumerate(self.written):
            final = f"model-{i:05d}-of-{last:05d}.safetensors"
            os.replace(path, self.folder / final)
            weight_map.update({name: final for name in names})
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        (self.folder / HF_INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")


def _encoded_experts(name: str, shape: tuple[int, int, int], seed: int, std: float, device, slice_elements: int):
    """MXFP4 (blocks, scales) of a random expert stack ``[E, out, in]``, drawn and encoded in slices of experts."""
    experts, rows, cols = shape
    blocks = torch.empty(experts, rows, cols // 32, 16, dtype=torch.uint8, device=device)
    scales = torch.empty(experts, rows, cols // 32, dtype=torch.uint8, device=device)
    per_slice = max(1, slice_elements // (rows * cols))
    gen = _generator(seed, name, device)
    for e0 in range(0, experts, per_slice):
        e1 = min(e0 + per_slice, experts)
        values = torch.empty(e1 - e0, rows, cols, dtype=torch.float32, device=device).normal_(0.0, std, generator=gen)
        blocks[e0:e1], scales[e0:e1] = mxfp4.encode(values)
        del values
    return blocks, scales


def _layer_tensors(config: dict, layer: int, seed: int, device) -> list[dict[str, torch.Tensor]]:
    std = config["initializer_range"]
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    experts = config["num_local_experts"]
    q = config["num_attention_heads"] * config["head_dim"]
    kv = config["num_key_value_heads"] * config["head_dim"]
    p = f"model.layers.{layer}."

    def bf16(shape, suffix, mean=0.0):
        return _normal(shape, p + suffix, seed, std, device, mean).to(torch.bfloat16)

    groups = [
        {
            p + "input_layernorm.weight": bf16((hidden,), "input_layernorm.weight", 1.0),
            p + "post_attention_layernorm.weight": bf16((hidden,), "post_attention_layernorm.weight", 1.0),
            p + "self_attn.q_proj.weight": bf16((q, hidden), "self_attn.q_proj.weight"),
            p + "self_attn.q_proj.bias": bf16((q,), "self_attn.q_proj.bias"),
            p + "self_attn.k_proj.weight": bf16((kv, hidden), "self_attn.k_proj.weight"),
            p + "self_attn.k_proj.bias": bf16((kv,), "self_attn.k_proj.bias"),
            p + "self_attn.v_proj.weight": bf16((kv, hidden), "self_attn.v_proj.weight"),
            p + "self_attn.v_proj.bias": bf16((kv,), "self_attn.v_proj.bias"),
            p + "self_attn.o_proj.weight": bf16((hidden, q), "self_attn.o_proj.weight"),
            p + "self_attn.o_proj.bias": bf16((hidden,), "self_attn.o_proj.bias"),
            p + "self_attn.sinks": bf16((config["num_attention_heads"],), "self_attn.sinks"),
            p + "mlp.router.weight": bf16((experts, hidden), "mlp.router.weight"),
            p + "mlp.router.bias": bf16((experts,), "mlp.router.bias"),
            p + "mlp.experts.gate_up_proj_bias": bf16((experts, 2 * inter), "mlp.experts.gate_up_proj_bias"),
            p + "mlp.experts.down_proj_bias": bf16((experts, hidden), "mlp.experts.down_proj_bias"),
        }
    ]
    slice_elements = 1 << 28 if torch.device(device).type == "cuda" else 1 << 25
    for matrix, shape in (("gate_up_proj", (experts, 2 * inter, hidden)), ("down_proj", (experts, hidden, inter))):
        blocks, scales = _encoded_experts(p + f"mlp.experts.{matrix}", shape, seed, std, device, slice_elements)
        # blocks before scales, in one shard (llama.cpp's converter reads them in this order)
        groups.append({p + f"mlp.experts.{matrix}_blocks": blocks, p + f"mlp.experts.{matrix}_scales": scales})
    return groups


def build_checkpoint(
    out_dir: str | Path,
    *,
    preset: str = "tiny",
    seed: int = 0,
    device: str | torch.device | None = None,
    overwrite: bool = False,
    progress: bool = False,
    tokenizer: bool = True,
    **config_overrides,
) -> Path:
    """Write a random gpt-oss checkpoint in the hub layout to ``out_dir`` and return it.

    ``out_dir`` may be missing or empty (``overwrite=True`` replaces a non-empty one). The folder is written under a
    temporary name next to it and renamed at the end: a crash never leaves a half-written checkpoint behind.
    ``config_overrides`` take HF config keys or the aliases in :data:`CONFIG_ALIASES` (``layers=4, experts=8``).
    ``tokenizer=False`` leaves out the tokenizer files (weight-only benchmarks; building the tokenizer needs the
    o200k vocabulary).
    """
    out_dir = Path(out_dir)
    config = preset_config(preset, **config_overrides)
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise FileExistsError(f"{out_dir} is not empty; choose a new folder or pass overwrite=True (--overwrite)")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() and preset != "tiny" else "cpu"))
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.partial-"))
    try:
        writer = _ShardWriter(staging, _SHARD_BYTES.get(preset, _SHARD_BYTES["20b"]))
        std = config["initializer_range"]
        hidden, vocab = config["hidden_size"], config["vocab_size"]
        layers = config["num_hidden_layers"]
        with _progress(progress, layers + 2, f"building {preset} checkpoint") as advance:
            embed = _normal((vocab, hidden), "model.embed_tokens.weight", seed, std, device)
            writer.add_group({"model.embed_tokens.weight": embed.to(torch.bfloat16)})
            del embed
            advance()
            for layer in range(layers):
                for group in _layer_tensors(config, layer, seed, device):
                    writer.add_group(group)
                advance()
            norm = _normal((hidden,), "model.norm.weight", seed, std, device, 1.0)
            head = _normal((vocab, hidden), "lm_head.weight", seed, std, device)
            writer.add_group({"model.norm.weight": norm.to(torch.bfloat16), "lm_head.weight": head.to(torch.bfloat16)})
            del head
            writer.finish()
            (staging / "config.json").write_text(json.dumps(config, indent=2) + "\n")
            (staging / "generation_config.json").write_text(json.dumps(GENERATION_CONFIG, indent=2) + "\n")
            if tokenizer:
                from gptoss_train.harmony.tokenizer import copy_tokenizer_files

                copy_tokenizer_files(staging)
            advance()
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(staging, out_dir)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return out_dir


@contextlib.contextmanager
def _progress(enabled: bool, total: int, description: str):
    """Yields an ``advance()`` callable; with ``enabled``, a rich progress bar shows the steps."""
    if not enabled:
        yield lambda: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns) as bar:
        task = bar.add_task(description, total=total)
        yield lambda: bar.advance(task)
