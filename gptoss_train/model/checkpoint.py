"""Reading gpt-oss checkpoints: the HF hub layout and OpenAI's ``original/`` layout (formats.md §1).

We read safetensors ourselves instead of going through ``from_pretrained``'s MXFP4 quantizer: that path needs the hub
``kernels``/triton on GPU, always dequantizes on CPU, and in transformers 5.23 its dequantized models save broken
checkpoints (cpu-gotchas #13). Reading the bytes also lets requantize pass untouched experts through byte for byte.

Both layouts are presented with HF names (``model.layers.N.mlp.experts.gate_up_proj_blocks`` ...): the ``original/``
names are renamed and its fused ``attn.qkv`` is split, exactly as transformers' ``convert_gpt_oss_weights_to_hf.py``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

HF_INDEX_FILE = "model.safetensors.index.json"
HF_SINGLE_FILE = "model.safetensors"
ORIGINAL_DIR = "original"
MXFP4_SUFFIXES = ("_blocks", "_scales")
EXPERT_MATRICES = ("gate_up_proj", "down_proj")
# What the hub configs list as not quantized (formats.md §1.1); kept verbatim in configs we write.
MODULES_TO_NOT_CONVERT = ["model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]

# Files a user needs from the hub; the `original/` copy doubles the download and is only read when it is all there is.
HUB_ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "tokenizer*", "*.txt", "*.model"]


class CheckpointError(RuntimeError):
    """A checkpoint folder that cannot be read (missing files, unknown layout, tensors that disagree)."""


def resolve_checkpoint(path_or_id: str | Path, *, revision: str | None = None) -> Path:
    """A local folder as is; otherwise a hub id downloaded (or found in the cache) with ``snapshot_download``."""
    path = Path(path_or_id).expanduser()
    if path.exists():
        if not path.is_dir():
            raise CheckpointError(f"{path} is a file; pass the checkpoint folder (with config.json and *.safetensors)")
        return path
    if str(path_or_id).count("/") != 1 or str(path_or_id).startswith((".", "/", "~")):
        raise CheckpointError(f"{path_or_id}: no such folder, and not a hub id of the form 'owner/name'")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(str(path_or_id), revision=revision, allow_patterns=HUB_ALLOW_PATTERNS))
    except Exception as err:  # offline, gated, typo: say what to do
        raise CheckpointError(
            f"could not fetch {path_or_id!r} from the Hugging Face hub ({type(err).__name__}: {err}). "
            "Check the id and your network / HF_TOKEN, or pass a local folder."
        ) from err


def checkpoint_layout(folder: Path) -> str:
    """``"hf"`` (config.json + model*.safetensors), ``"original"`` (the reference layout), or an error."""
    folder = Path(folder)
    if (folder / "config.json").is_file() and (
        (folder / HF_INDEX_FILE).is_file() or (folder / HF_SINGLE_FILE).is_file()
    ):
        config = json.loads((folder / "config.json").read_text())
        return "original" if "model_type" not in config and "num_experts" in config else "hf"
    if (folder / ORIGINAL_DIR / "config.json").is_file():
        return "original"
    raise CheckpointError(
        f"{folder} holds no gpt-oss checkpoint: expected config.json with {HF_INDEX_FILE} or {HF_SINGLE_FILE} "
        f"(HF layout) or an {ORIGINAL_DIR}/ folder (reference layout)"
    )


def _original_root(folder: Path) -> Path:
    folder = Path(folder)
    return folder / ORIGINAL_DIR if (folder / ORIGINAL_DIR / "config.json").is_file() else folder


def original_config_to_hf(original: dict) -> dict:
    """HF ``config.json`` fields from ``original/config.json`` (gpt_oss/torch/model.py ModelConfig)."""
    layers = int(original["num_hidden_layers"])
    context = int(original.get("initial_context_length", 4096))
    factor = float(original.get("rope_scaling_factor", 32.0))
    return {
        "architectures": ["GptOssForCausalLM"],
        "model_type": "gpt_oss",
        "num_hidden_layers": layers,
        "num_local_experts": int(original["num_experts"]),
        "num_experts_per_tok": int(original["experts_per_token"]),
        "experts_per_token": int(original["experts_per_token"]),
        "vocab_size": int(original["vocab_size"]),
        "hidden_size": int(original["hidden_size"]),
        "intermediate_size": int(original["intermediate_size"]),
        "swiglu_limit": float(original.get("swiglu_limit", 7.0)),
        "head_dim": int(original["head_dim"]),
        "num_attention_heads": int(original["num_attention_heads"]),
        "num_key_value_heads": int(original["num_key_value_heads"]),
        "sliding_window": int(original.get("sliding_window", 128)),
        "layer_types": ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)],
        "initial_context_length": context,
        "max_position_embeddings": int(context * factor),
        "rope_theta": float(original.get("rope_theta", 150000.0)),
        "rope_scaling": {
            "rope_type": "yarn",
            "factor": factor,
            "beta_fast": float(original.get("rope_ntk_beta", 32.0)),
            "beta_slow": float(original.get("rope_ntk_alpha", 1.0)),
            "original_max_position_embeddings": context,
            "truncate": False,
        },
        "attention_bias": True,
        "attention_dropout": 0.0,
        "hidden_act": "silu",
        "initializer_range": 0.02,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
        "eos_token_id": 200002,
        "pad_token_id": 199999,
        "quantization_config": {"quant_method": "mxfp4", "modules_to_not_convert": list(MODULES_TO_NOT_CONVERT)},
    }


def hf_config_to_original(config: dict) -> dict:
    """The inverse of :func:`original_config_to_hf` (used to write reference-layout copies, e.g. in tests)."""
    rope = config.get("rope_scaling") or config.get("rope_parameters") or {}
    return {
        "num_hidden_layers": config["num_hidden_layers"],
        "num_experts": config["num_local_experts"],
        "experts_per_token": config["num_experts_per_tok"],
        "vocab_size": config["vocab_size"],
        "hidden_size": config["hidden_size"],
        "intermediate_size": config["intermediate_size"],
        "swiglu_limit": config.get("swiglu_limit", 7.0),
        "head_dim": config["head_dim"],
        "num_attention_heads": config["num_attention_heads"],
        "num_key_value_heads": config["num_key_value_heads"],
        "sliding_window": config.get("sliding_window", 128),
        "initial_context_length": rope.get("original_max_position_embeddings", 4096),
        "rope_theta": config.get("rope_theta", rope.get("rope_theta", 150000.0)),
        "rope_scaling_factor": rope.get("factor", 32.0),
        "rope_ntk_alpha": rope.get("beta_slow", 1.0),
        "rope_ntk_beta": rope.get("beta_fast", 32.0),
    }


def read_config(folder: Path) -> dict:
    """The HF-style config dict of a checkpoint folder in either layout."""
    folder = Path(folder)
    if checkpoint_layout(folder) == "hf":
        return json.loads((folder / "config.json").read_text())
    return original_config_to_hf(json.loads((_original_root(folder) / "config.json").read_text()))


# original name -> HF name, per layer (formats.md §1.3); attn.qkv is split separately.
_ORIGINAL_LAYER_RENAMES = {
    "attn.norm.scale": "input_layernorm.weight",
    "attn.sinks": "self_attn.sinks",
    "attn.out.weight": "self_attn.o_proj.weight",
    "attn.out.bias": "self_attn.o_proj.bias",
    "mlp.norm.scale": "post_attention_layernorm.weight",
    "mlp.gate.weight": "mlp.router.weight",
    "mlp.gate.bias": "mlp.router.bias",
    "mlp.mlp1_weight.blocks": "mlp.experts.gate_up_proj_blocks",
    "mlp.mlp1_weight.scales": "mlp.experts.gate_up_proj_scales",
    "mlp.mlp1_bias": "mlp.experts.gate_up_proj_bias",
    "mlp.mlp2_weight.blocks": "mlp.experts.down_proj_blocks",
    "mlp.mlp2_weight.scales": "mlp.experts.down_proj_scales",
    "mlp.mlp2_bias": "mlp.experts.down_proj_bias",
}
_ORIGINAL_GLOBAL_RENAMES = {
    "embedding.weight": "model.embed_tokens.weight",
    "norm.scale": "model.norm.weight",
    "unembedding.weight": "lm_head.weight",
}
_ORIGINAL_BLOCK = re.compile(r"^block\.(\d+)\.(.+)$")


@dataclass
class CheckpointReader:
    """Lazy, name-addressed access to the tensors of a checkpoint (HF names whatever the layout on disk)."""

    folder: Path
    layout: str = ""
    config: dict = field(default_factory=dict)
    _files: dict[str, Path] = field(default_factory=dict)  # on-disk name -> safetensors file
    _names: dict[str, str] = field(default_factory=dict)  # HF name -> on-disk name (qkv parts map to the fused one)

    @classmethod
    def open(cls, path_or_id: str | Path) -> CheckpointReader:
        folder = resolve_checkpoint(path_or_id)
        reader = cls(folder=folder, layout=checkpoint_layout(folder), config=read_config(folder))
        reader._index()
        return reader

    def _index(self) -> None:
        from safetensors import safe_open

        root = self.folder if self.layout == "hf" else _original_root(self.folder)
        index = root / HF_INDEX_FILE
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            for name, file in weight_map.items():
                self._files[name] = root / file
        else:
            files = sorted(root.glob("*.safetensors"))
            if not files:
                raise CheckpointError(f"no *.safetensors in {root}")
            for file in files:
                with safe_open(str(file), framework="pt") as handle:
                    for name in handle.keys():
                        self._files[name] = file
        missing = sorted({str(p) for p in self._files.values() if not p.is_file()})
        if missing:
            raise CheckpointError(f"the index of {root} names shard files that are missing: {', '.join(missing)}")
        if self.layout == "hf":
            self._names = {name: name for name in self._files}
            return
        for disk_name in self._files:
            block = _ORIGINAL_BLOCK.match(disk_name)
            if block:
                layer, rest = block.groups()
                if rest in ("attn.qkv.weight", "attn.qkv.bias"):
                    kind = rest.rsplit(".", 1)[1]
                    for part in ("q_proj", "k_proj", "v_proj"):
                        self._names[f"model.layers.{layer}.self_attn.{part}.{kind}"] = disk_name
                    continue
                if rest in _ORIGINAL_LAYER_RENAMES:
                    self._names[f"model.layers.{layer}.{_ORIGINAL_LAYER_RENAMES[rest]}"] = disk_name
                    continue
            elif disk_name in _ORIGINAL_GLOBAL_RENAMES:
                self._names[_ORIGINAL_GLOBAL_RENAMES[disk_name]] = disk_name
                continue
            raise CheckpointError(f"unknown tensor {disk_name!r} in the original-layout checkpoint {root}")

    def names(self) -> list[str]:
        return sorted(self._names)

    def __contains__(self, name: str) -> bool:
        return name in self._names

    def _read(self, disk_name: str) -> torch.Tensor:
        from safetensors import safe_open

        with safe_open(str(self._files[disk_name]), framework="pt") as handle:
            return handle.get_tensor(disk_name)

    def get(self, name: str) -> torch.Tensor:
        """One tensor by its HF name (the q/k/v part of a fused original ``qkv`` is sliced out)."""
        if name not in self._names:
            raise CheckpointError(f"{self.folder} has no tensor {name!r}")
        disk_name = self._names[name]
        tensor = self._read(disk_name)
        part = re.search(r"self_attn\.([qkv])_proj\.", name)
        if self.layout == "original" and part:
            q = self.config["num_attention_heads"] * self.config["head_dim"]
            kv = self.config["num_key_value_heads"] * self.config["head_dim"]
            start, size = {"q": (0, q), "k": (q, kv), "v": (q + kv, kv)}[part.group(1)]
            tensor = tensor.narrow(0, start, size).clone()
        return tensor

    def iter_tensors(self, prefix: str = "") -> Iterator[tuple[str, torch.Tensor]]:
        for name in self.names():
            if name.startswith(prefix):
                yield name, self.get(name)


def expert_tensor_names(layer: int, matrix: str) -> tuple[str, str, str]:
    """(blocks, scales, bias) HF names of one expert matrix (``gate_up_proj`` or ``down_proj``) of a layer."""
    base = f"model.layers.{layer}.mlp.experts.{matrix}"
    return f"{base}_blocks", f"{base}_scales", f"{base}_bias"


def write_original_layout(hf_folder: str | Path, out_dir: str | Path) -> Path:
    """Write an HF-layout checkpoint as OpenAI's reference layout (``out_dir/original/``: config.json,
    dtypes.json, model.safetensors); the MXFP4 bytes are copied unchanged. Small models only (one file)."""
    from safetensors.torch import save_file

    reader = CheckpointReader.open(hf_folder)
    if reader.layout != "hf":
        raise CheckpointError(f"{hf_folder} is not in the HF layout")
    cfg = reader.config
    root = Path(out_dir) / ORIGINAL_DIR
    root.mkdir(parents=True, exist_ok=True)
    inverse_layer = {v: k for k, v in _ORIGINAL_LAYER_RENAMES.items()}
    inverse_global = {v: k for k, v in _ORIGINAL_GLOBAL_RENAMES.items()}
    tensors: dict[str, torch.Tensor] = {}
    for name in reader.names():
        if name in inverse_global:
            tensors[inverse_global[name]] = reader.get(name)
            continue
        layer, rest = re.match(r"^model\.layers\.(\d+)\.(.+)$", name).groups()
        if rest.startswith("self_attn.") and rest.split(".")[1] in ("q_proj", "k_proj", "v_proj"):
            continue
        tensors[f"block.{layer}.{inverse_layer[rest]}"] = reader.get(name)
    for layer in range(cfg["num_hidden_layers"]):
        for kind in ("weight", "bias"):
            parts = [reader.get(f"model.layers.{layer}.self_attn.{p}.{kind}") for p in ("q_proj", "k_proj", "v_proj")]
            tensors[f"block.{layer}.attn.qkv.{kind}"] = torch.cat(parts, 0)
    save_file({k: v.contiguous() for k, v in sorted(tensors.items())}, str(root / "model.safetensors"))
    (root / "config.json").write_text(json.dumps(hf_config_to_original(cfg), indent=2) + "\n")
    dtypes = {k: ("FP4" if k.endswith(".blocks") else "UE8" if k.endswith(".scales") else "BF16") for k in tensors}
    (root / "dtypes.json").write_text(json.dumps(dtypes, indent=2) + "\n")
    return Path(out_dir)
