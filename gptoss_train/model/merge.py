"""Fold a PEFT LoRA adapter (attention and expert adapters) into dense gpt-oss weights.

PEFT's own ``merge_and_unload`` does the arithmetic (it handles the nested expert ParamWrappers exactly); what we add
is getting a model it can merge into: experts must be dense parameters, so an MXFP4-resident model is densified first
(decoded once, layer by layer), and a path is loaded with our loader (float32 on CPU by default so the small LoRA
delta is not rounded away in bf16 before requantization).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from gptoss_train.model.checkpoint import EXPERT_MATRICES
from gptoss_train.model.load import Mxfp4GptOssExperts, load_model
from gptoss_train.quant import mxfp4


def densify_experts(model) -> int:
    """Replace every :class:`Mxfp4GptOssExperts` of ``model`` by transformers' dense ``GptOssExperts`` holding the
    decoded weights (in the experts' compute dtype). Returns the number of layers converted."""
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts

    converted = 0
    for layer in model.model.layers:
        experts = layer.mlp.experts
        if not isinstance(experts, Mxfp4GptOssExperts):
            continue
        with torch.device("meta"):
            dense = GptOssExperts(experts.config)
        dtype = experts.compute_dtype
        for matrix in EXPERT_MATRICES:
            weight = mxfp4.decode(
                getattr(experts, f"{matrix}_blocks"), getattr(experts, f"{matrix}_scales"), dtype=dtype, transpose=True
            )
            dense._parameters[matrix] = nn.Parameter(weight)
            dense._parameters[f"{matrix}_bias"] = nn.Parameter(getattr(experts, f"{matrix}_bias").detach().clone())
        layer.mlp.experts = dense
        converted += 1
    return converted


def merge_adapter(model_or_path, adapter_dir: str | Path, *, dtype: torch.dtype | None = None, device="cpu"):
    """A dense ``GptOssForCausalLM`` with the adapter in ``adapter_dir`` merged into its weights.

    ``model_or_path``: a model from :func:`load_model` (either experts mode; it is modified in place) or a checkpoint
    folder / hub id (loaded dense; ``dtype`` defaults to float32 so the merge is not rounded to bf16).
    """
    from peft import PeftModel

    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{adapter_dir}: no adapter_config.json (expected a PEFT adapter folder)")
    if isinstance(model_or_path, (str, Path)):
        model = load_model(model_or_path, experts="bf16", dtype=dtype or torch.float32, device=device)
    else:
        model = model_or_path
        if hasattr(model, "peft_config"):
            raise ValueError("pass the base model, not a PeftModel (or call merge_and_unload() on it yourself)")
        densify_experts(model)
    source = getattr(model, "gptoss_source", None)
    peft_model = PeftModel.from_pretrained(model, str(adapter_dir))
    merged = peft_model.merge_and_unload()
    if source is not None:
        merged.gptoss_source = {**source, "experts": "bf16", "adapter": str(adapter_dir)}
    merged.eval()
    return merged
