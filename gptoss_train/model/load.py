"""Load gpt-oss for training: experts dequantized to a dense dtype, or kept resident in MXFP4.

``load_model(path_or_id, experts="bf16")`` builds transformers' ``GptOssForCausalLM`` from a config *without*
``quantization_config`` and fills it tensor by tensor from the checkpoint, experts decoded by our codec
(``quant.mxfp4.decode``, bit-identical to transformers') into the dense ``[E, in, out]`` layout. Why not
``from_pretrained(..., Mxfp4Config(dequantize=True))``: on transformers 5.23 a model loaded that way saves expert
tensors under ``*_blocks`` names and re-initialises them on reload (cpu-gotchas #13); ours has no weight conversions
attached, so ``save_pretrained`` round-trips (tested). The model is built on the meta device and each tensor is
materialised once, in its final dtype and device: no full-size float32 copy on the way.

``experts="mxfp4"`` keeps the frozen expert matrices as the checkpoint's uint8 ``_blocks``/``_scales`` buffers
(:class:`Mxfp4GptOssExperts`) and decodes one layer at a time inside its forward. ``gate_up_proj``/``down_proj`` are
zero-stride placeholders of the dense shape (2 bytes each) so PEFT ``target_parameters`` LoRA still finds, sizes and
places its adapters; while PEFT's parametrization is active, the placeholder reads as ``0 + ΔW`` and the module adds
the decoded base. With gradient checkpointing only the layer being recomputed holds a decoded copy; without it
autograd keeps each layer's decoded weight for backward (the same as a bf16 model), so enable checkpointing.
The buffer names match the checkpoint and ``gptoss_train.kernels.moe`` (which reads the bytes in its fused path).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import torch
from torch import nn

from gptoss_train.model.checkpoint import EXPERT_MATRICES, CheckpointError, CheckpointReader
from gptoss_train.quant import mxfp4

log = logging.getLogger(__name__)

EXPERT_MODES = ("bf16", "mxfp4")
# transformers keeps these in float32 under a bf16/fp16 load (GptOssPreTrainedModel._keep_in_fp32_modules)
_KEEP_FP32 = re.compile(r"(^|\.)(input_layernorm|post_attention_layernorm|norm)\.weight$")


def default_dtype(device: torch.device) -> torch.dtype:
    """float32 on CPU (bf16 matmuls are ~20x slower there, cpu-gotchas #10), bfloat16 on accelerators."""
    return torch.float32 if device.type == "cpu" else torch.bfloat16


def _placeholder(shape, dtype, device) -> nn.Parameter:
    # One real element expanded to the dense shape: PEFT reads shape/dtype/device from it, nothing else does.
    return nn.Parameter(torch.zeros(1, dtype=dtype, device=device).expand(*shape), requires_grad=False)


class Mxfp4GptOssExperts(nn.Module):
    """``GptOssExperts`` whose matrices stay MXFP4 (HF layout buffers) and are decoded per forward.

    Same attributes and forward signature as transformers' ``GptOssExperts``; the dense computation itself is
    transformers' own experts implementation (``config._experts_implementation``) run on the decoded weights, so
    the two loading modes give identical results.
    """

    def __init__(self, config, blocks_and_scales: dict[str, torch.Tensor], biases: dict[str, torch.Tensor], dtype):
        super().__init__()
        self.config = config
        self.intermediate_size = config.intermediate_size
        self.num_experts = config.num_local_experts
        self.hidden_size = config.hidden_size
        # transformers < 5.2x has no config.swiglu_alpha; 1.702 is hard-coded in every gpt-oss implementation.
        self.alpha = getattr(config, "swiglu_alpha", 1.702)
        self.limit = config.swiglu_limit
        # what transformers' use_experts_implementation decorator sets (PEFT reads is_transposed)
        self.has_gate, self.has_bias, self.has_post_expert_norm = True, True, False
        self.is_transposed, self.is_concatenated, self._is_expert_parallel = True, False, False
        self.mxfp4_resident = True
        for name, tensor in blocks_and_scales.items():
            self.register_buffer(name, tensor, persistent=True)
        device = self.gate_up_proj_blocks.device
        self.gate_up_proj = _placeholder((self.num_experts, self.hidden_size, 2 * self.intermediate_size), dtype, device)
        self.down_proj = _placeholder((self.num_experts, self.intermediate_size, self.hidden_size), dtype, device)
        self.gate_up_proj_bias = nn.Parameter(biases["gate_up_proj_bias"])
        self.down_proj_bias = nn.Parameter(biases["down_proj_bias"])

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.gate_up_proj_bias.dtype

    def dense_weight(self, name: str) -> torch.Tensor:
        """The weight ``name`` (gate_up_proj / down_proj) as transformers uses it, ``[E, in, out]``: decoded base,
        plus PEFT's LoRA delta while its parametrization is active."""
        decoded = mxfp4.decode(
            getattr(self, f"{name}_blocks"), getattr(self, f"{name}_scales"), dtype=self.compute_dtype, transpose=True
        )
        if nn.utils.parametrize.is_parametrized(self, name):
            # PEFT's proxy returns placeholder + scaling·lhs@rhs: a fresh full-size tensor holding ΔW. Adding the
            # decoded base in place is autograd-safe (baddbmm's backward does not read its output) and saves a copy.
            return getattr(self, name).add_(decoded)
        return decoded

    def forward(self, hidden_states: torch.Tensor, router_indices=None, routing_weights=None) -> torch.Tensor:
        from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts

        view = _DenseExpertsView(self, self.dense_weight("gate_up_proj"), self.dense_weight("down_proj"))
        # transformers' own forward on the view: in 5.x it dispatches on config._experts_implementation
        # (eager / grouped_mm / batched_mm) exactly as for a dense model.
        return GptOssExperts.forward(view, hidden_states, router_indices, routing_weights)

    def _apply_gate(self, gate_up: torch.Tensor) -> torch.Tensor:
        from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts

        return GptOssExperts._apply_gate(self, gate_up)

    def _apply(self, fn, recurse=True):
        # Module.to()/cuda()/half() would materialise the expanded placeholders (1 GB each at 20b): apply fn to their
        # single real element and expand again.
        shapes = {}
        for name in EXPERT_MATRICES:
            param = self._parameters.get(name)
            if param is not None and param.dim() == 3 and param.stride() == (0, 0, 0):
                shapes[name] = param.shape
                self._parameters[name] = nn.Parameter(param.as_strided((1,), (1,)), requires_grad=False)
        try:
            return super()._apply(fn, recurse)
        finally:
            for name, shape in shapes.items():
                self._parameters[name] = nn.Parameter(self._parameters[name].data.expand(*shape), requires_grad=False)

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, hidden={self.hidden_size}, intermediate={self.intermediate_size}, mxfp4"


class _DenseExpertsView:
    """What transformers' experts functions read from ``self``: the dense weights, everything else from the owner."""

    def __init__(self, owner: Mxfp4GptOssExperts, gate_up_proj: torch.Tensor, down_proj: torch.Tensor):
        self._owner = owner
        self.gate_up_proj = gate_up_proj
        self.down_proj = down_proj

    def __getattr__(self, name):
        return getattr(self._owner, name)


def _set_tensor(model: nn.Module, name: str, tensor: torch.Tensor, *, parameter: bool = True) -> None:
    module_name, _, leaf = name.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    if parameter:
        module._parameters[leaf] = nn.Parameter(tensor, requires_grad=tensor.is_floating_point())
    else:
        module._buffers[leaf] = tensor


def build_config(raw: dict, *, attn_implementation: str | None = None):
    """``GptOssConfig`` without ``quantization_config`` (the dense/our-own-MXFP4 model), eager attention by default.

    Eager because transformers refuses SDPA for gpt-oss (sinks) and flash attention has no sink backward; faster
    paths come from ``gptoss_train.kernels``."""
    from transformers import GptOssConfig

    raw = {k: v for k, v in raw.items() if k != "quantization_config"}
    config = GptOssConfig.from_dict(raw)
    config._attn_implementation = attn_implementation or "eager"
    return config


def load_model(
    path_or_id: str | Path,
    *,
    experts: str = "bf16",
    dtype: torch.dtype | str | None = None,
    device: str | torch.device = "cpu",
    attn_implementation: str | None = None,
    revision: str | None = None,
):
    """A ``GptOssForCausalLM`` from a hub id or a folder (HF or ``original/`` layout).

    ``experts``: ``"bf16"`` decodes the MXFP4 experts to dense ``dtype`` parameters (trainable, mergeable, saveable);
    ``"mxfp4"`` keeps them as uint8 buffers decoded per layer (frozen-base LoRA; see module docstring).
    ``dtype``: None -> float32 on CPU, bfloat16 elsewhere (the name "bf16" refers to the dense layout, not the
    dtype). Norm weights stay float32, as transformers keeps them. The model is returned in eval mode.
    """
    if experts not in EXPERT_MODES:
        raise ValueError(f"experts must be one of {', '.join(EXPERT_MODES)}, got {experts!r}")
    device = torch.device(device)
    if isinstance(dtype, str):
        dtype = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
                 "fp32": torch.float32, "float32": torch.float32}[dtype]
    dtype = dtype or default_dtype(device)
    reader = CheckpointReader.open(path_or_id) if not isinstance(path_or_id, CheckpointReader) else path_or_id
    config = build_config(reader.config, attn_implementation=attn_implementation)
    config.dtype = dtype

    from transformers import GptOssForCausalLM
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssRotaryEmbedding

    with torch.device("meta"):
        model = GptOssForCausalLM(config)
    available = set(reader.names())
    for layer_index, layer in enumerate(model.model.layers):
        prefix = f"model.layers.{layer_index}.mlp.experts."
        raw = {f"{m}_{kind}": reader.get(prefix + f"{m}_{kind}").to(device) for m in EXPERT_MATRICES for kind in ("blocks", "scales")}
        biases = {f"{m}_bias": reader.get(prefix + f"{m}_bias").to(device=device, dtype=dtype) for m in EXPERT_MATRICES}
        for name in list(raw) + list(biases):
            available.discard(prefix + name)
        if experts == "mxfp4":
            layer.mlp.experts = Mxfp4GptOssExperts(config, raw, biases, dtype)
            continue
        for matrix in EXPERT_MATRICES:
            dense = mxfp4.decode(raw[f"{matrix}_blocks"], raw[f"{matrix}_scales"], dtype=dtype, transpose=True)
            _set_tensor(model, prefix + matrix, dense)
            _set_tensor(model, prefix + f"{matrix}_bias", biases[f"{matrix}_bias"])
        del raw
    for name, param in list(model.named_parameters()):
        if param.device.type != "meta":
            continue
        if name not in available:
            raise CheckpointError(f"{reader.folder}: checkpoint has no tensor {name!r} that the model needs")
        available.discard(name)
        target = torch.float32 if _KEEP_FP32.search(name) and dtype in (torch.bfloat16, torch.float16) else dtype
        tensor = reader.get(name)
        if tuple(tensor.shape) != tuple(param.shape):
            raise CheckpointError(f"{name}: checkpoint shape {tuple(tensor.shape)} != model {tuple(param.shape)}")
        _set_tensor(model, name, tensor.to(device=device, dtype=target))
    if available:
        raise CheckpointError(f"{reader.folder}: tensors the model does not use: {', '.join(sorted(available)[:8])}")
    # non-persistent buffers (rotary frequencies) are computed, not loaded
    with torch.device("cpu"):  # computed in float32 on the CPU as from_pretrained does, then moved
        model.model.rotary_emb = GptOssRotaryEmbedding(config).to(device)
    leftover = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.device.type == "meta"]
    if leftover:
        raise CheckpointError(f"tensors left uninitialised: {leftover[:8]}")
    _load_generation_config(model, reader.folder)
    model.gptoss_source = {"path": str(reader.folder), "layout": reader.layout, "experts": experts}
    model.eval()
    log.info("loaded %s (%s layout) with %s experts, %s on %s", reader.folder, reader.layout, experts, dtype, device)
    return model


def _load_generation_config(model, folder: Path) -> None:
    if (Path(folder) / "generation_config.json").is_file():
        from transformers import GenerationConfig

        try:
            model.generation_config = GenerationConfig.from_pretrained(str(folder))
        except (OSError, ValueError) as err:  # a malformed optional file must not block loading
            log.warning("ignoring %s/generation_config.json: %s", folder, err)


def _base_model(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _unwrapped_experts(module):
    while hasattr(module, "base_layer"):  # PEFT ParamWrappers
        module = module.base_layer
    return module


def expert_sources(model) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The original MXFP4 bytes of every expert matrix, keyed by HF name (``model.layers.N.mlp.experts.gate_up_proj``).

    MXFP4-resident models return their buffers (no copy); dense ones re-read the checkpoint they were loaded from
    (``model.gptoss_source``), so requantize can compare against the decoded original and pass untouched blocks
    through byte for byte."""
    base = _base_model(model)
    sources: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    reader = None
    for index, layer in enumerate(base.model.layers):
        experts = _unwrapped_experts(layer.mlp.experts)
        for matrix in EXPERT_MATRICES:
            name = f"model.layers.{index}.mlp.experts.{matrix}"
            if getattr(experts, f"{matrix}_blocks", None) is not None:
                sources[name] = (getattr(experts, f"{matrix}_blocks"), getattr(experts, f"{matrix}_scales"))
                continue
            if reader is None:
                source = getattr(base, "gptoss_source", None)
                if not source:
                    raise CheckpointError("the model was not loaded by gptoss_train.model.load: no source checkpoint known")
                reader = CheckpointReader.open(source["path"])
            sources[name] = (reader.get(f"{name}_blocks"), reader.get(f"{name}_scales"))
    return sources


def untouched_blocks(model, name: str) -> torch.Tensor:
    """Per 32-element block of expert matrix ``name`` ([E, out, G] bool): True where the model's current values equal
    the decoded original bytes (requantize can keep those bytes)."""
    base = _base_model(model)
    layer = int(re.search(r"layers\.(\d+)\.", name).group(1))
    matrix = name.rsplit(".", 1)[1]
    experts = _unwrapped_experts(base.model.layers[layer].mlp.experts)
    blocks, scales = expert_sources(model)[name]
    if getattr(experts, "mxfp4_resident", False):
        return torch.ones(scales.shape, dtype=torch.bool, device=scales.device)
    current = getattr(experts, matrix).detach().transpose(-1, -2).float()  # [E, out, in]
    original = mxfp4.decode(blocks.to(current.device), scales.to(current.device), dtype=torch.float32)
    same = (current == original) | (torch.isnan(current) & torch.isnan(original))
    return same.reshape(*scales.shape, mxfp4.BLOCK_SIZE).all(-1)
