"""The tensors and config of a Hugging Face gpt-oss export, in either layout vLLM accepts (formats.md §5.1).

* ``mxfp4``: experts as ``*_blocks``/``*_scales`` uint8 + ``quantization_config.quant_method == "mxfp4"`` (what the
  hub checkpoints, vLLM's MXFP4 path and transformers load);
* ``bf16``: experts dense, ``gate_up_proj [E, H, 2I]`` / ``down_proj [E, I, H]`` bf16, and **no** quantization_config
  (vLLM's other path). A leftover ``quantization_config`` on dense weights is the most reported failure (KeyError on
  ``w13_weight_scale``), so the config is always rebuilt from the tensors actually written.

The base checkpoint provides every tensor's name, shape and dtype; the tuned weights (a merged model in memory, or a
merged / full-FT folder) override them. Everything is produced one decoder layer at a time so a 20b export never
holds more than one layer's dense experts.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Protocol

import torch

from gptoss_train.export.safetensors_io import CheckpointError, SafetensorsFolder
from gptoss_train.quant import mxfp4
from gptoss_train.quant.requantize import RequantReport, dense_to_out_in, requantize_experts

EXPERT_PROJECTIONS = ("gate_up_proj", "down_proj")
_EXPERT_RE = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(gate_up_proj|down_proj)(_blocks|_scales)?$")

# What the hub config lists (formats.md §1.1); transformers honours it, vLLM ignores it.
DEFAULT_MODULES_TO_NOT_CONVERT = [
    "model.layers.*.self_attn",
    "model.layers.*.mlp.router",
    "model.embed_tokens",
    "lm_head",
]


class TunedWeights(Protocol):
    """New values for HF tensor names; experts in the dense HF orientation ``[E, in, out]``."""

    def get(self, name: str) -> torch.Tensor | None: ...

    def names(self) -> set[str]: ...


class ModelWeights:
    """Tuned weights from a model in memory (e.g. ``merge_adapter``'s result): its parameters and buffers by name."""

    def __init__(self, model: torch.nn.Module):
        self._state = {name: tensor.detach() for name, tensor in model.state_dict().items()}

    def get(self, name: str) -> torch.Tensor | None:
        return self._state.get(name)

    def names(self) -> set[str]:
        return set(self._state)


class FolderWeights:
    """Tuned weights from a merged or fully fine-tuned HF folder (dense or MXFP4 experts)."""

    def __init__(self, folder):
        self.folder = SafetensorsFolder(folder)
        for name in self.folder.keys():
            if name.endswith("_blocks") and self.folder.dtype_of(name) != "U8":
                # transformers 5.23 writes dequantized floats under *_blocks after an MXFP4 load (cpu-gotchas #13);
                # loading such a folder anywhere re-initialises the experts at random.
                raise CheckpointError(
                    f"{self.folder.folder}: {name} holds {self.folder.dtype_of(name)} values under an MXFP4 name. "
                    "This is transformers' save bug after a dequantized MXFP4 load: the experts in this folder are "
                    "not usable. Export from the adapter instead (--adapter), or re-save with "
                    "model._weight_conversions = None."
                )

    def get(self, name: str) -> torch.Tensor | None:
        if name in self.folder:
            return self.folder.get(name)
        match = _EXPERT_RE.match(name)
        if match and match.group(3) is None:
            blocks_name = f"{name}_blocks"
            if blocks_name in self.folder:
                dense = mxfp4.decode(self.folder.get(blocks_name), self.folder.get(f"{name}_scales"),
                                     dtype=torch.float32)
                return dense.transpose(-1, -2)
        return None

    def names(self) -> set[str]:
        names = set()
        for name in self.folder.keys():
            names.add(re.sub(r"_(blocks|scales)$", "", name) if _EXPERT_RE.match(name) else name)
        return names


@dataclass
class BaseExpert:
    """One expert matrix of the base in MXFP4 form, ``[E, out, in/32, 16]`` + ``[E, out, in/32]``."""

    blocks: torch.Tensor
    scales: torch.Tensor
    bias_name: str


def _layer_of(name: str) -> int | None:
    parts = name.split(".")
    if len(parts) > 3 and parts[:2] == ["model", "layers"] and parts[2].isdigit():
        return int(parts[2])
    return None


def group_names_by_layer(names) -> list[list[str]]:
    """Tensor names grouped per decoder layer (embeddings / final norm / lm_head in their own groups), in layer order."""
    layers: dict[int, list[str]] = {}
    head, tail = [], []
    for name in sorted(names):
        layer = _layer_of(name)
        if layer is not None:
            layers.setdefault(layer, []).append(name)
        elif "embed_tokens" in name:
            head.append(name)
        else:
            tail.append(name)
    groups = [head] if head else []
    groups += [layers[i] for i in sorted(layers)]
    if tail:
        groups.append(tail)
    return groups


def _base_expert(base: SafetensorsFolder, prefix: str, proj: str, rule: str) -> BaseExpert:
    blocks_name, scales_name = f"{prefix}.{proj}_blocks", f"{prefix}.{proj}_scales"
    if blocks_name in base:
        return BaseExpert(base.get(blocks_name), base.get(scales_name), f"{prefix}.{proj}_bias")
    dense_name = f"{prefix}.{proj}"
    if dense_name in base:
        # A dense (bf16) base, e.g. a community BF16 copy: there are no original bytes to keep, so the canonical
        # encoding of its values stands in for them (unchanged experts then encode identically every time).
        blocks, scales = mxfp4.encode(dense_to_out_in(base.get(dense_name).float()), rule=rule)
        return BaseExpert(blocks, scales, f"{prefix}.{proj}_bias")
    raise CheckpointError(f"{base.folder}: neither {blocks_name} nor {dense_name} present")


def base_tensor_names(base: SafetensorsFolder) -> list[str]:
    """The base's non-expert tensor names plus one logical name per expert matrix (``...experts.gate_up_proj``)."""
    names = set()
    for name in base.keys():
        match = _EXPERT_RE.match(name)
        names.add(f"{match.group(1)}.{match.group(2)}" if match else name)
    return sorted(names)


def export_tensor_groups(
    base: SafetensorsFolder,
    tuned: TunedWeights | None,
    *,
    format: str,
    report: RequantReport,
    rule: str = "best",
    device: str | torch.device | None = None,
    on_group: Callable[[int, int], None] | None = None,
) -> Iterator[dict[str, torch.Tensor]]:
    """Yield the export's tensors one group (decoder layer) at a time.

    ``format="mxfp4"``: experts requantized against the base (untouched experts keep their bytes), report filled in.
    ``format="bf16"``: experts dense bf16 (tuned values, or the base's decoded values).
    Non-expert tensors: the tuned value cast to the base's dtype, else the base tensor unchanged.
    """
    if format not in ("mxfp4", "bf16"):
        raise ValueError(f"format must be mxfp4 or bf16, got {format!r}")
    groups = group_names_by_layer(base_tensor_names(base))
    for index, names in enumerate(groups):
        out: dict[str, torch.Tensor] = {}
        for name in names:
            match = _EXPERT_RE.match(name)
            if match:
                prefix, proj = match.group(1), match.group(2)
                new_dense = tuned.get(name) if tuned is not None else None
                if format == "bf16":
                    if new_dense is None:
                        if f"{name}_blocks" in base:
                            new_dense = mxfp4.decode(base.get(f"{name}_blocks"), base.get(f"{name}_scales"),
                                                     dtype=torch.float32).transpose(-1, -2)
                        else:
                            new_dense = base.get(name)
                    out[name] = new_dense.to(torch.bfloat16).contiguous()
                    continue
                base_expert = _base_expert(base, prefix, proj, rule)
                if new_dense is None:
                    blocks, scales = base_expert.blocks, base_expert.scales
                else:
                    blocks, scales, tensor_report = requantize_experts(
                        name, base_expert.blocks, base_expert.scales, dense_to_out_in(new_dense),
                        rule=rule, device=device,
                    )
                    report.tensors.append(tensor_report)
                out[f"{name}_blocks"] = blocks.contiguous()
                out[f"{name}_scales"] = scales.contiguous()
                continue
            base_value = base.get(name)
            new_value = tuned.get(name) if tuned is not None else None
            if new_value is None:
                out[name] = base_value
            else:
                if tuple(new_value.shape) != tuple(base_value.shape):
                    raise CheckpointError(
                        f"tuned tensor {name} has shape {tuple(new_value.shape)}, base has {tuple(base_value.shape)}"
                    )
                out[name] = new_value.detach().to(device="cpu", dtype=base_value.dtype).contiguous()
        if on_group is not None:
            on_group(index + 1, len(groups))
        yield out


def export_config(base_config: Mapping, *, format: str) -> dict:
    """The base config rewritten to agree with the tensors we write (formats.md §5.1)."""
    config = copy.deepcopy(dict(base_config))
    if format == "mxfp4":
        quant = dict(config.get("quantization_config") or {})
        quant["quant_method"] = "mxfp4"
        quant.setdefault("modules_to_not_convert", list(DEFAULT_MODULES_TO_NOT_CONVERT))
        # keep only what Mxfp4Config serializes: a stale 'dequantize: true' would make transformers load dense
        config["quantization_config"] = {
            "modules_to_not_convert": quant["modules_to_not_convert"],
            "quant_method": "mxfp4",
        }
    elif format == "bf16":
        config.pop("quantization_config", None)
        key = "torch_dtype" if "torch_dtype" in config and "dtype" not in config else "dtype"
        config[key] = "bfloat16"
    else:
        raise ValueError(f"format must be mxfp4 or bf16, got {format!r}")
    return config
