"""PEFT LoRA targets for gpt-oss: attention projections, every expert, optionally the router.

``target_modules="all-linear"`` misses every expert (3-D parameters of ``GptOssExperts``) and the router (not an
``nn.Linear``), which is how several recipes shipped silently untrained experts (DESIGN.md §2). Experts are adapted
through PEFT ``target_parameters`` (``mlp.experts.gate_up_proj`` / ``mlp.experts.down_proj``, one low-rank pair per
expert), which requires ``lora_dropout=0``. The adapter is plain PEFT format, so vLLM, PEFT and TRL read it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
# Order matters for the saved keys: PEFT nests one ParamWrapper per target parameter, the first innermost
# (``experts.base_layer.lora_A`` = gate_up_proj, ``experts.lora_A`` = down_proj), as the HF gpt-oss recipe does.
EXPERT_PARAMETERS = ("gate_up_proj", "down_proj")
ROUTER_PARAMETER = "weight"


def lora_config(
    *,
    r: int = 8,
    alpha: int = 16,
    attention: bool = True,
    experts: bool = True,
    router: bool = False,
    layers: Iterable[int] | None = None,
    attention_projections: Iterable[str] = ATTENTION_PROJECTIONS,
    init_lora_weights: bool | str = True,
    **extra,
):
    """A ``peft.LoraConfig`` for gpt-oss.

    ``layers``: restrict every adapter to these decoder layers (None = all). ``router=True`` adds a LoRA on each
    router weight (``[E, hidden]``; via target_parameters too, as the router is no ``nn.Linear``). ``extra`` goes to
    ``LoraConfig`` unchanged (``lora_dropout`` must stay 0 when experts or router are targeted).
    """
    from peft import LoraConfig, TaskType

    if not (attention or experts or router):
        raise ValueError("lora_config adapts nothing: enable attention, experts or router")
    layer_list = None if layers is None else sorted({int(i) for i in layers})
    if layer_list is not None and not layer_list:
        raise ValueError("layers is empty: give at least one layer index, or None for all layers")
    projections = tuple(attention_projections)
    unknown = set(projections) - set(ATTENTION_PROJECTIONS)
    if unknown:
        raise ValueError(f"unknown attention projections {sorted(unknown)}; choose from {ATTENTION_PROJECTIONS}")

    target_modules = None
    if attention:
        # A regex (PEFT full-matches it against module names) so `layers` can restrict it.
        layer_re = r"\d+" if layer_list is None else "|".join(map(str, layer_list))
        target_modules = rf"^(?:.*\.)?layers\.(?:{layer_re})\.self_attn\.(?:{'|'.join(projections)})$"

    def owners(suffix: str) -> list[str]:
        # PEFT matches target_parameters as a suffix of "<module name>.<parameter name>"
        if layer_list is None:
            return [suffix]
        return [f"layers.{i}.{suffix}" for i in layer_list]

    target_parameters: list[str] = []
    if experts:
        for name in EXPERT_PARAMETERS:
            target_parameters += owners(f"mlp.experts.{name}")
    if router:
        target_parameters += owners(f"mlp.router.{ROUTER_PARAMETER}")
    if target_parameters and extra.get("lora_dropout", 0.0):
        raise ValueError("lora_dropout must be 0 when experts or the router are adapted (PEFT target_parameters)")
    extra.setdefault("lora_dropout", 0.0)
    return LoraConfig(
        r=r,
        lora_alpha=alpha,
        target_modules=target_modules if target_modules is not None else [],
        target_parameters=target_parameters or None,
        bias="none",
        task_type=TaskType.CAUSAL_LM,
        init_lora_weights=init_lora_weights,
        **extra,
    )


@dataclass
class AdaptedTarget:
    """One adapted weight: the module that owns it, which weight, its group and LoRA shape."""

    module: str  # e.g. model.layers.3.mlp.experts
    parameter: str  # weight | gate_up_proj | down_proj
    group: str  # attention | experts | router | other
    layer: int | None
    rank: int
    experts: int  # 1 for ordinary weights
    lora_parameters: int


def describe_adapted(model) -> list[AdaptedTarget]:
    """Everything a PEFT model adapts, read from its LoRA layers (not from the config: this is what will train)."""
    import re

    from peft.tuners.lora import LoraLayer
    from peft.tuners.lora.layer import ParamWrapper

    targets: list[AdaptedTarget] = []
    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        owner = re.sub(r"(\.base_layer)+$", "", name)
        owner = re.sub(r"^(base_model\.model\.)", "", owner)
        parameter = module.parameter_name if isinstance(module, ParamWrapper) else "weight"
        group = (
            "attention" if ".self_attn." in owner else
            "experts" if owner.endswith("mlp.experts") else
            "router" if owner.endswith("mlp.router") else "other"
        )
        layer = re.search(r"layers\.(\d+)\.", owner)
        for adapter in module.lora_A:
            count = sum(p.numel() for p in (*module.lora_A[adapter].parameters(), *module.lora_B[adapter].parameters()))
            targets.append(
                AdaptedTarget(
                    module=owner, parameter=parameter, group=group, layer=int(layer.group(1)) if layer else None,
                    rank=module.r[adapter], experts=getattr(module, "num_experts", 1), lora_parameters=count,
                )
            )
    return targets
