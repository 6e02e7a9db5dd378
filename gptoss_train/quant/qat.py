"""Quantization-aware training for gpt-oss experts: the forward pass sees the MXFP4 weights it will ship with.

Plain requantization after fine-tuning erases much of a small LoRA delta: most of it falls under the FP4 grid step
(DESIGN.md §1.3: kept share 0.05-0.20 at a 1% delta; ModelOpt on gpt-oss-20b: 99% after SFT, 89% after PTQ, 100% after
QAT). With :func:`enable_qat` every expert forward uses ``Q(W)`` with ``Q = decode ∘ encode`` - exactly what
:func:`gptoss_train.quant.requantize.requantize_experts` will write - and a straight-through gradient
(``W + (Q(W) - W).detach()``), so training moves the weights to where their *quantized* values work.

LoRA on experts (PEFT ``target_parameters``) applies its delta through ``torch.nn.utils.parametrize`` while the
wrapped module runs. To quantize ``W0 + Δ`` (what will be requantized) and not ``Q(W0) + Δ``, our fake-quant is
appended to the parametrization chain *inside* the experts' forward, after PEFT's proxy, and removed on return. Without
PEFT (full fine-tuning) it is the only parametrization.

MXFP4-resident experts (``load_model(experts="mxfp4")``) already decode base + delta in ``dense_weight``; there the
fake-quant wraps that method and keeps the module's own (checkpoint) scales.

``scales_from``: the released base checkpoint. Requantization keeps each block's original scale when the new values
fit (``keep_scales``), so QAT must round on the same grid; the base's ``_scales`` are read once. Without it the scales
come from encoding the weights present at :func:`enable_qat` time (identical for canonical blocks).
"""

from __future__ import annotations

import re
import types

import torch
from torch.nn.utils import parametrize

from gptoss_train.quant import mxfp4

EXPERT_PARAMS = ("gate_up_proj", "down_proj")
_LAYER_RE = re.compile(r"layers\.(\d+)\.mlp\.experts")
_QAT_ATTR = "_gptoss_qat"


class FakeQuantMXFP4(torch.nn.Module):
    """``W -> W + (Q(W) - W).detach()`` for dense HF experts ``[E, in, out]`` (blocks run along ``in``)."""

    def __init__(self, *, rule: str = "best", keep_scales: torch.Tensor | None = None):
        super().__init__()
        self.rule = rule
        self.register_buffer("keep_scales", keep_scales, persistent=False)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            out_in = weight.detach().transpose(-1, -2)
            if self.keep_scales is not None and self.keep_scales.device != weight.device:
                self.keep_scales = self.keep_scales.to(weight.device)  # once, not every step
            blocks, scales = mxfp4.encode(out_in, rule=self.rule, keep_scales=self.keep_scales)
            quantized = mxfp4.decode(blocks, scales, dtype=weight.dtype, transpose=True)
        return weight + (quantized - weight).detach()


def _is_peft_wrapper(module: torch.nn.Module) -> bool:
    return hasattr(module, "get_base_layer") and hasattr(module, "lora_A")


def expert_modules(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """(name, module) of every module that owns dense expert weights ``gate_up_proj``/``down_proj`` (3-D)."""
    found = []
    for name, module in model.named_modules():
        if _is_peft_wrapper(module):
            continue
        owned = {**module._parameters, **getattr(module, "parametrizations", {})}
        if all(p in owned for p in EXPERT_PARAMS) and getattr(module, "gate_up_proj").dim() == 3:
            found.append((name, module))
    return found


def _read_base_scales(scales_from, layer: int, proj: str) -> torch.Tensor:
    from gptoss_train.export.safetensors_io import SafetensorsFolder

    if not isinstance(scales_from, SafetensorsFolder):
        raise TypeError("internal: scales_from must be opened first")
    name = f"model.layers.{layer}.mlp.experts.{proj}_scales"
    if name not in scales_from:
        raise KeyError(f"{scales_from.folder}: no {name}; scales_from must be the MXFP4 base checkpoint")
    return scales_from.get(name)


def _qat_forward(self, *args, **kwargs):
    state = getattr(self, _QAT_ATTR)
    added = []
    try:
        for proj, fake_quant in state["fake_quants"].items():
            if parametrize.is_parametrized(self, proj):
                # PEFT's LoRA proxy is already in the chain: quantize base + delta, after it
                self.parametrizations[proj].append(fake_quant)
                added.append((proj, False))
            else:
                parametrize.register_parametrization(self, proj, fake_quant, unsafe=True)
                added.append((proj, True))
        return state["forward"](*args, **kwargs)
    finally:
        for proj, registered_here in reversed(added):
            if registered_here:
                parametrize.remove_parametrizations(self, proj, leave_parametrized=False)
            else:
                chain = self.parametrizations[proj]
                del chain[len(chain) - 1]


def _qat_dense_weight(self, name: str) -> torch.Tensor:
    # MXFP4-resident experts (gptoss_train.model.load.Mxfp4GptOssExperts): dense_weight() returns the decoded base
    # plus PEFT's delta, i.e. exactly what will be requantized.
    state = getattr(self, _QAT_ATTR)
    return state["fake_quants"][name](state["dense_weight"](name))


def enable_qat(model: torch.nn.Module, rule: str = "best", *, scales_from=None) -> int:
    """Fake-quantize every expert weight to MXFP4 in the forward pass; returns the number of expert modules.

    ``rule``: the scale rule requantization will use (``mxfp4.encode``). ``scales_from``: the MXFP4 base checkpoint
    folder whose ``_scales`` requantization will keep (recommended; see the module docstring).
    """
    if rule not in mxfp4.RULES:
        raise ValueError(f"unknown MXFP4 rule {rule!r}; choose one of {', '.join(mxfp4.RULES)}")
    folder = None
    if scales_from is not None:
        from gptoss_train.export.safetensors_io import SafetensorsFolder

        folder = SafetensorsFolder(scales_from)
    modules = expert_modules(model)
    if not modules:
        raise ValueError("no gpt-oss expert modules (gate_up_proj / down_proj) found in the model")
    for name, module in modules:
        if hasattr(module, _QAT_ATTR):
            continue
        resident = callable(getattr(module, "dense_weight", None)) and hasattr(module, "gate_up_proj_scales")
        fake_quants = {}
        for proj in EXPERT_PARAMS:
            if resident and folder is None:
                keep = getattr(module, f"{proj}_scales").detach()  # the checkpoint's own scales, already on hand
            elif folder is not None:
                match = _LAYER_RE.search(name)
                if match is None:
                    raise ValueError(f"cannot tell the layer of expert module {name}")
                keep = _read_base_scales(folder, int(match.group(1)), proj)
            else:
                with torch.no_grad():
                    weight = getattr(module, proj)
                    keep = mxfp4.encode(weight.detach().transpose(-1, -2), rule=rule)[1].cpu()
            fake_quants[proj] = FakeQuantMXFP4(rule=rule, keep_scales=keep)
        if resident:
            setattr(module, _QAT_ATTR, {"dense_weight": module.dense_weight, "fake_quants": fake_quants})
            module.dense_weight = types.MethodType(_qat_dense_weight, module)
            continue
        # the instance attribute shadows the class forward (which transformers' experts dispatch decorates)
        setattr(module, _QAT_ATTR, {"forward": module.forward, "fake_quants": fake_quants})
        module.forward = types.MethodType(_qat_forward, module)
    return len(modules)


def disable_qat(model: torch.nn.Module) -> int:
    """Undo :func:`enable_qat`; returns the number of expert modules restored."""
    restored = 0
    for _, module in model.named_modules():
        state = module.__dict__.pop(_QAT_ATTR, None)
        if state is not None:
            del module.__dict__["dense_weight" if "dense_weight" in state else "forward"]  # back to the class method
            restored += 1
    return restored


def qat_enabled(model: torch.nn.Module) -> bool:
    return any(hasattr(module, _QAT_ATTR) for module in model.modules())
