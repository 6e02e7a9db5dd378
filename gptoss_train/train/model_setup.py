"""Model assembly for SFT: load the base, wrap it with LoRA (or unfreeze it), QAT, fast path, start-up checks.

Each step is one function the recipes call in order, so the recipe shows the structure and the numerics live here.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from gptoss_train.train.config import ConfigError, LoraSection, ModelConfig, SFTConfig

log = logging.getLogger("gptoss_train.train")

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def resolve_dtype(name: str, device: str) -> torch.dtype:
    """auto: float32 on CPU (bf16 on CPU is ~20x slower, cpu-gotchas #10), bfloat16 on CUDA."""
    if name == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return _DTYPES[name]


def default_device() -> str:
    if torch.cuda.is_available():
        import os

        return f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    return "cpu"


def ensure_base_checkpoint(cfg: ModelConfig, seed: int = 0) -> str:
    """The checkpoint path; builds a random tiny one first when ``build_tiny`` is set and the folder is missing."""
    if not cfg.path:
        raise ConfigError("model.path is empty: give a hub id (openai/gpt-oss-20b) or a local checkpoint folder")
    path = Path(cfg.path)
    if cfg.build_tiny and not (path / "config.json").exists():
        from gptoss_train.model.tiny import build_checkpoint

        log.info("building a random %s checkpoint at %s", cfg.build_tiny, path)
        build_checkpoint(path, preset=cfg.build_tiny, seed=seed, **cfg.tiny_overrides)
    return str(path)


def load_base_model(cfg: SFTConfig, device: str | None = None):
    """The frozen (LoRA) or trainable (full) base model, through model.load (bf16 or MXFP4-resident experts)."""
    from gptoss_train.model.load import load_model

    device = device or default_device()
    path = ensure_base_checkpoint(cfg.model, seed=cfg.train.seed)
    dtype = resolve_dtype(cfg.model.dtype, device)
    model = load_model(path, experts=cfg.model.experts, dtype=dtype, device=device)
    model.config.use_cache = False  # the KV cache is useless in training and conflicts with checkpointing
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        # FSDP needs one parameter dtype per wrapped module, but transformers keeps the RMSNorm weights in fp32
        # (_keep_in_fp32_modules): seen on 2 H200s as "FSDP expects uniform original parameter dtype". Store them in
        # the training dtype; the norm still computes in fp32 (GptOssRMSNorm upcasts the hidden states).
        model.to(dtype)
    return model


# ---------------------------------------------------------------------------------------------------------------
# LoRA


def build_lora_config(section: LoraSection):
    """PEFT LoraConfig from model.lora.lora_config, plus per-group rank/alpha and extra nn.Linear targets."""
    from gptoss_train.model.lora import lora_config

    config = lora_config(r=section.r, alpha=section.alpha, attention=section.attention, experts=section.experts,
                         router=section.router, layers=section.layers)
    rank_pattern, alpha_pattern = dict(config.rank_pattern or {}), dict(config.alpha_pattern or {})
    # PEFT wraps each pattern as (.*\.)?(PATTERN)$ and matches module names (attention) or module.parameter names
    # (experts, which are target_parameters).
    attention_re = r"self_attn\.(?:q|k|v|o)_proj"
    experts_re = r"mlp\.experts(?:\.(?:gate_up_proj|down_proj))?"
    if section.attention_r is not None:
        rank_pattern[attention_re] = section.attention_r
    if section.attention_alpha is not None:
        alpha_pattern[attention_re] = section.attention_alpha
    if section.experts_r is not None:
        rank_pattern[experts_re] = section.experts_r
    if section.experts_alpha is not None:
        alpha_pattern[experts_re] = section.experts_alpha
    config.rank_pattern, config.alpha_pattern = rank_pattern, alpha_pattern
    if "lm_head" in section.extra_targets:
        raise ConfigError("lora.extra_targets: a LoRA on lm_head is never trained by TRL's SFTTrainer (it reads "
                          "lm_head.weight directly); use lora.modules_to_save: [lm_head] to train the head in full")
    if section.modules_to_save:
        config.modules_to_save = list(section.modules_to_save)
    if section.extra_targets:
        targets = config.target_modules
        if isinstance(targets, str):  # a regex: extend it with alternatives
            extra = "|".join(re.escape(t) for t in section.extra_targets)
            config.target_modules = f"(?:{targets})|(?:^(?:.*\\.)?(?:{extra})$)"
        else:
            config.target_modules = set(targets or ()) | set(section.extra_targets)
    return config


@dataclass
class AdaptedGroup:
    group: str  # attention | experts | router | other
    layers: list[int]
    modules: int
    rank: int
    parameters: int


_LAYER = re.compile(r"\.layers\.(\d+)\.")


def _group_of(name: str) -> str:
    if ".self_attn." in name:
        return "attention"
    if ".mlp.experts" in name:
        return "experts"
    if ".mlp.router" in name:
        return "router"
    if "lm_head" in name:
        return "lm_head"
    return "other"


def describe_adaptation(model) -> list[AdaptedGroup]:
    """What LoRA adapts, by group: from the trainable lora_A/lora_B tensors actually present in the model."""
    groups: dict[tuple[str, int], dict] = {}
    config = getattr(model, "config", None)
    num_experts = getattr(config, "num_local_experts", 1) or 1
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        group = _group_of(name)
        if ".lora_" not in name:  # modules_to_save: trained in full
            entry = groups.setdefault((f"{group} (full)", 0), {"layers": set(), "owners": set(), "params": 0})
            entry["owners"].add(name.rsplit(".", 1)[0])
            entry["params"] += param.numel()
            continue
        layer_match = _LAYER.search(name)
        owner = name.split(".lora_")[0]
        rank = param.shape[0] if ".lora_A" in name else param.shape[-1]
        if group == "experts":  # PEFT stacks one rank-r factor per expert: (r * E, in) and (out, r * E)
            rank //= num_experts
        entry = groups.setdefault((group, rank), {"layers": set(), "owners": set(), "params": 0})
        if layer_match:
            entry["layers"].add(int(layer_match.group(1)))
        entry["owners"].add(owner)
        entry["params"] += param.numel()
    out = []
    for (group, rank), entry in sorted(groups.items()):
        out.append(AdaptedGroup(group, sorted(entry["layers"]), len(entry["owners"]), rank, entry["params"]))
    return out


def check_moe_adapted(groups: list[AdaptedGroup], *, allow_no_moe: bool, num_layers: int | None = None) -> None:
    """Refuse a LoRA that adapts nothing in the MoE (experts or router) unless the config says so."""
    if not groups:
        raise ConfigError("LoRA adapts nothing: check lora.attention / lora.experts / lora.layers")
    moe = [g for g in groups if g.group in ("experts", "router")]
    if not moe and not allow_no_moe:
        raise ConfigError(
            "this LoRA config adapts nothing inside the MoE blocks (no expert or router adapters), so most of "
            "gpt-oss's parameters can never change. Set lora.experts: true (or lora.router: true), or set "
            "lora.allow_no_moe: true if this is really what you want.")


def print_adaptation_table(groups: list[AdaptedGroup], *, console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="LoRA adapters")
    for column in ("group", "layers", "modules", "rank", "trainable params"):
        table.add_column(column, justify="right" if column != "group" else "left")
    for group in groups:
        layers = ",".join(map(str, group.layers)) if group.layers else "-"
        table.add_row(group.group, layers, str(group.modules), str(group.rank), f"{group.parameters:,}")
    (console or Console(stderr=True)).print(table)


def apply_lora(model, cfg: SFTConfig, *, show: bool = True):
    """Wrap with PEFT LoRA per cfg.lora, list what is adapted, refuse a config that misses the MoE."""
    from peft import get_peft_model

    peft_config = build_lora_config(cfg.lora)
    model = get_peft_model(model, peft_config)
    groups = describe_adaptation(model)
    if show:
        print_adaptation_table(groups)
    check_moe_adapted(groups, allow_no_moe=cfg.lora.allow_no_moe)
    return model


def unfreeze_for_full_training(model) -> int:
    """Full-parameter SFT: every floating-point parameter trains. Returns the trainable count."""
    total = 0
    for param in model.parameters():
        if param.is_floating_point():
            param.requires_grad_(True)
            total += param.numel()
    return total


# ---------------------------------------------------------------------------------------------------------------
# QAT and the fast path


def apply_qat(model, cfg: SFTConfig):
    """MXFP4 fake-quant of expert weights (straight-through gradient) when cfg.qat is set."""
    if not cfg.qat:
        return None
    try:
        from gptoss_train.quant.qat import enable_qat
    except ImportError as error:
        raise ConfigError(f"qat: true needs gptoss_train.quant.qat, which cannot be imported ({error})") from None
    description = enable_qat(model, **cfg.qat_options)
    log.info("QAT: %s", description)
    return description


def apply_fast_path(model, cfg: SFTConfig) -> str:
    """Switch to gptoss_train.kernels' fast training path on CUDA; always returns (and logs) the path used."""
    if cfg.fast_path == "off":
        line = "reference path: transformers eager (fast_path: off)"
    elif not torch.cuda.is_available():
        line = "reference path: transformers eager (no CUDA device)"
    else:
        try:
            from gptoss_train.kernels import enable_fast_training
        except ImportError as error:
            line = f"reference path: transformers eager (gptoss_train.kernels unavailable: {error})"
        else:
            # QAT fake-quantises the experts inside the experts module's forward; the fast experts path reads the
            # weights itself and would bypass it, so under QAT the experts stay on the reference path.
            description = enable_fast_training(
                model, experts=not cfg.qat, recompute="layer" if cfg.train.gradient_checkpointing else None,
                lora_matmul_dtype=torch.bfloat16 if cfg.fast.lora_matmul_dtype == "bfloat16" else None,
                offload_layer_inputs=cfg.fast.offload_layer_inputs, offload_embeddings=cfg.fast.offload_embeddings)
            line = (f"fast path: {description}" if description
                    else "reference path: transformers eager (fast path not applicable to this model)")
            if description and cfg.qat:
                line += "; experts on the reference path (qat: true fake-quantises them there)"
    print(line, flush=True)
    log.info(line)
    return line
