"""GGUF for llama.cpp and Ollama, written with gguf-py's ``GGUFWriter`` (formats.md §4).

What llama.cpp's own converter (``conversion/gpt_oss.py``) writes, reproduced from our in-memory export so that:

* the expert bytes are *our* MXFP4 bytes, repacked to ggml's ``block_mxfp4`` (type 39) by a bit permutation only
  (formats.md §4.3) - no BF16 round trip through llama-quantize, which would requantize with a different rule and
  turn every other 2-D tensor into Q8_0;
* gate/up are split from the interleaved HF rows (row 2i gate, 2i+1 up; §4.4), biases likewise;
* norms, sinks, biases and the router are F32 (the converter forces FFN_GATE_INP to F32); other matrices BF16;
* the tokenizer is gpt2-BPE with pre-tokenizer ``gpt-4o`` (the o200k regex), tokens / types / merges read from
  ``tokenizer.json``, and ``tokenizer.ggml.eos_token_ids = [199999, 200002, 200012]`` which Ollama uses for stopping.

``expert_dtype="bf16"|"f32"`` writes dequantized experts instead (debugging: isolates MXFP4 kernels from the rest).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
import torch

from gptoss_train.quant import mxfp4

ARCH = "gpt-oss"
# Ollama stops on any of these (formats.md §5.2); llama.cpp ignores the key and uses its EOG detection.
EOS_TOKEN_IDS = [199999, 200002, 200012]
PRE_TOKENIZER = "gpt-4o"

_LAYER_MAP = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "post_attention_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.o_proj.bias": "attn_output.bias",
    "self_attn.sinks": "attn_sinks.weight",
    "mlp.router.weight": "ffn_gate_inp.weight",
    "mlp.router.bias": "ffn_gate_inp.bias",
    "mlp.experts.down_proj_bias": "ffn_down_exps.bias",
}
_GLOBAL_MAP = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
# Written F32 whatever the outtype: 1-D tensors, norms and the router (llama.cpp converter, prepare_tensors).
_F32_SUFFIXES = ("_norm.weight", ".bias", "attn_sinks.weight", "ffn_gate_inp.weight")


def hf_blocks_to_ggml(blocks: torch.Tensor, scales: torch.Tensor) -> np.ndarray:
    """HF MXFP4 ``[..., G, 16]`` + ``[..., G]`` -> ggml ``block_mxfp4`` bytes ``[..., G*17]`` (lossless permutation).

    HF byte j holds elements 2j (low nibble) and 2j+1 (high); ggml byte k holds elements k (low) and k+16 (high), after
    the scale byte. ggml doubles the E2M1 values and halves the scale, so the codes and the scale byte carry over.
    """
    low = blocks & 0x0F
    high = blocks >> 4
    codes = torch.stack((low, high), dim=-1).flatten(-2)  # [..., G, 32] element codes in order
    ggml_qs = codes[..., :16] | (codes[..., 16:] << 4)
    packed = torch.cat((scales.unsqueeze(-1), ggml_qs), dim=-1)  # [..., G, 17]
    return packed.flatten(-2).contiguous().numpy()


def ggml_to_hf_blocks(packed: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of :func:`hf_blocks_to_ggml` (used by tests and by anyone reading our GGUF back)."""
    data = torch.from_numpy(np.ascontiguousarray(packed)).reshape(*packed.shape[:-1], -1, 17)
    scales, qs = data[..., 0], data[..., 1:]
    codes = torch.cat((qs & 0x0F, qs >> 4), dim=-1)  # elements 0..15 then 16..31
    blocks = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return blocks.contiguous(), scales.contiguous()


def _float_array(tensor: torch.Tensor, dtype: str):
    """(numpy array, raw ggml dtype) for a float tensor written as f32 or bf16."""
    import gguf

    if dtype == "f32":
        return tensor.detach().to(torch.float32).contiguous().numpy(), None
    # numpy has no bfloat16: hand the writer the raw bytes and their ggml type (it derives the shape).
    return tensor.detach().to(torch.bfloat16).contiguous().view(torch.uint8).numpy(), gguf.GGMLQuantizationType.BF16


def gguf_tensor_name(hf_name: str) -> str | None:
    if hf_name in _GLOBAL_MAP:
        return _GLOBAL_MAP[hf_name]
    parts = hf_name.split(".")
    if parts[:2] == ["model", "layers"]:
        suffix = ".".join(parts[3:])
        if suffix in _LAYER_MAP:
            return f"blk.{parts[2]}.{_LAYER_MAP[suffix]}"
    return None


def _tokenizer_metadata(writer, tokenizer_dir: Path, vocab_size: int) -> None:
    import gguf

    tokenizer_json = json.loads((tokenizer_dir / "tokenizer.json").read_text(encoding="utf-8"))
    config_path = tokenizer_dir / "tokenizer_config.json"
    tokenizer_config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    model = tokenizer_json["model"]
    if model.get("type") != "BPE":
        raise ValueError(f"{tokenizer_dir}/tokenizer.json: model type {model.get('type')!r}, expected BPE")
    tokens: list[str | None] = [None] * vocab_size
    types = [gguf.TokenType.UNUSED] * vocab_size
    for text, token_id in model["vocab"].items():
        if token_id < vocab_size:
            tokens[token_id] = text
            types[token_id] = gguf.TokenType.NORMAL
    ids_by_content = {}
    for added in tokenizer_json.get("added_tokens", []):
        token_id = added["id"]
        ids_by_content[added["content"]] = token_id
        if token_id < vocab_size:
            tokens[token_id] = added["content"]
            types[token_id] = gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED
    for token_id, text in enumerate(tokens):
        if text is None:  # ids beyond tokenizer.json exist only as embedding rows (formats.md §4.5)
            tokens[token_id] = f"[PAD{token_id}]"
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]

    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(PRE_TOKENIZER)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)

    def special_id(key: str, default: int) -> int:
        value = tokenizer_config.get(key)
        if isinstance(value, dict):
            value = value.get("content")
        return ids_by_content.get(value, default) if value else default

    writer.add_bos_token_id(special_id("bos_token", 199998))
    writer.add_eos_token_id(special_id("eos_token", 200002))
    writer.add_pad_token_id(special_id("pad_token", 199999))
    writer.add_add_bos_token(False)
    writer.add_array("tokenizer.ggml.eos_token_ids", EOS_TOKEN_IDS)
    template = None
    if (tokenizer_dir / "chat_template.jinja").is_file():
        template = (tokenizer_dir / "chat_template.jinja").read_text(encoding="utf-8")
    elif isinstance(tokenizer_config.get("chat_template"), str):
        template = tokenizer_config["chat_template"]
    if template:
        writer.add_chat_template(template)


def _hparams(writer, config: Mapping, file_type: int) -> None:
    import gguf

    writer.add_block_count(config["num_hidden_layers"])
    writer.add_context_length(config.get("max_position_embeddings", 131072))
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_expert_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config["num_key_value_heads"])
    writer.add_key_length(config["head_dim"])
    writer.add_value_length(config["head_dim"])
    # n_embd / n_head (45 for 20b) is not the head size (64): say it explicitly so RoPE covers the whole head.
    writer.add_rope_dimension_count(config["head_dim"])
    writer.add_layer_norm_rms_eps(config.get("rms_norm_eps", 1e-5))
    writer.add_sliding_window(config.get("sliding_window", 128))
    writer.add_expert_count(config["num_local_experts"])
    writer.add_expert_used_count(config.get("num_experts_per_tok", config.get("experts_per_token", 4)))
    # transformers 5 nests rope_theta and the yarn settings in rope_parameters; 4.x configs use rope_scaling.
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    writer.add_rope_freq_base(float(config.get("rope_theta") or rope.get("rope_theta", 150000)))
    if rope.get("rope_type", rope.get("type")) == "yarn":
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(float(rope.get("factor", 32.0)))
        writer.add_rope_scaling_orig_ctx_len(int(rope.get("original_max_position_embeddings", 4096)))
        if "beta_fast" in rope:
            writer.add_rope_scaling_yarn_beta_fast(float(rope["beta_fast"]))
        if "beta_slow" in rope:
            writer.add_rope_scaling_yarn_beta_slow(float(rope["beta_slow"]))
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def write_gguf(
    out_path,
    groups: Iterable[Mapping[str, torch.Tensor]],
    config: Mapping,
    tokenizer_dir,
    *,
    expert_dtype: str = "mxfp4",
    name: str | None = None,
    on_tensor=None,
) -> Path:
    """Write a llama.cpp GGUF from MXFP4-layout HF tensor groups (what :func:`export_tensor_groups` yields)."""
    import gguf

    if expert_dtype not in ("mxfp4", "bf16", "f32"):
        raise ValueError(f"expert_dtype must be mxfp4, bf16 or f32, got {expert_dtype!r}")
    other_dtype = "f32" if expert_dtype == "f32" else "bf16"
    file_type = {
        "mxfp4": gguf.LlamaFileType.MOSTLY_MXFP4_MOE,
        "bf16": gguf.LlamaFileType.MOSTLY_BF16,
        "f32": gguf.LlamaFileType.ALL_F32,
    }[expert_dtype]
    out_path = Path(out_path)
    writer = gguf.GGUFWriter(str(out_path), ARCH)
    writer.add_type("model")
    writer.add_name(name or "gpt-oss")
    _hparams(writer, config, int(file_type))
    _tokenizer_metadata(writer, Path(tokenizer_dir), config["vocab_size"])

    def add_float(gguf_name: str, tensor: torch.Tensor) -> None:
        dtype = "f32" if gguf_name.endswith(_F32_SUFFIXES) or tensor.dim() == 1 else other_dtype
        array, raw = _float_array(tensor, dtype)
        writer.add_tensor(gguf_name, array, raw_dtype=raw)

    def add_experts(layer: str, proj: str, blocks: torch.Tensor, scales: torch.Tensor) -> None:
        parts = (("gate", blocks[:, 0::2], scales[:, 0::2]), ("up", blocks[:, 1::2], scales[:, 1::2])) \
            if proj == "gate_up_proj" else (("down", blocks, scales),)
        for kind, b, s in parts:
            gguf_name = f"blk.{layer}.ffn_{kind}_exps.weight"
            if expert_dtype == "mxfp4":
                writer.add_tensor(gguf_name, hf_blocks_to_ggml(b.contiguous(), s.contiguous()),
                                  raw_dtype=gguf.GGMLQuantizationType.MXFP4)
            else:
                array, raw = _float_array(mxfp4.decode(b, s, dtype=torch.float32), expert_dtype)
                writer.add_tensor(gguf_name, array, raw_dtype=raw)

    for group in groups:
        for hf_name, tensor in group.items():
            parts = hf_name.split(".")
            if hf_name.endswith("experts.gate_up_proj_bias"):
                add_float(f"blk.{parts[2]}.ffn_gate_exps.bias", tensor[..., 0::2])
                add_float(f"blk.{parts[2]}.ffn_up_exps.bias", tensor[..., 1::2])
            elif hf_name.endswith(("proj_blocks", "proj_scales")):
                if hf_name.endswith("_scales"):
                    continue  # handled with its blocks
                proj = parts[-1][: -len("_blocks")]
                add_experts(parts[2], proj, tensor, group[hf_name[: -len("_blocks")] + "_scales"])
            elif hf_name.endswith(("experts.gate_up_proj", "experts.down_proj")):
                raise ValueError(f"{hf_name}: write_gguf takes MXFP4-layout tensors (dense experts given)")
            else:
                gguf_name = gguf_tensor_name(hf_name)
                if gguf_name is None:
                    raise ValueError(f"no GGUF name for tensor {hf_name}")
                add_float(gguf_name, tensor)
            if on_tensor is not None:
                on_tensor(hf_name)

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out_path


# --- reading back ----------------------------------------------------------------------------------------------------

_SCALAR_FORMATS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_NUMPY_DTYPES = {0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32, 6: np.float32,
                 7: np.bool_, 10: np.uint64, 11: np.int64, 12: np.float64}


def read_gguf_metadata(path) -> tuple[dict, dict[str, dict]]:
    """(key/values, tensor infos) of a GGUF file, read straight from its header.

    Why not gguf-py's ``GGUFReader``: it builds a numpy memmap for every part of every field and takes ~30 s on a
    201k-token vocabulary; this reads the same header in well under a second. Tensor infos hold ``type`` (ggml type
    id), ``shape`` (ggml ne order, innermost first), ``offset`` (absolute, in bytes) and ``nbytes``.
    """
    import struct

    import gguf

    import mmap

    with open(path, "rb") as handle:
        raw = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
    pos = 0

    def take(fmt):
        nonlocal pos
        value = struct.unpack_from(fmt, raw, pos)
        pos += struct.calcsize(fmt)
        return value[0]

    def string():
        nonlocal pos
        length = take("<Q")
        text = raw[pos: pos + length].decode("utf-8", errors="replace")
        pos += length
        return text

    def value(kind):
        nonlocal pos
        if kind == 8:
            return string()
        if kind == 9:
            item_kind, count = take("<I"), take("<Q")
            if item_kind in _NUMPY_DTYPES:
                array = np.frombuffer(raw, dtype=_NUMPY_DTYPES[item_kind], count=count, offset=pos)
                pos += array.nbytes
                return array.tolist()
            return [value(item_kind) for _ in range(count)]
        return take(_SCALAR_FORMATS[kind])

    if raw[:4] != b"GGUF":
        raise ValueError(f"{path}: not a GGUF file")
    pos = 4
    take("<I")  # version
    n_tensors, n_kv = take("<Q"), take("<Q")
    kv = {}
    for _ in range(n_kv):
        key = string()
        kv[key] = value(take("<I"))
    infos = {}
    for _ in range(n_tensors):
        name = string()
        shape = [take("<Q") for _ in range(take("<I"))]
        kind, offset = take("<I"), take("<Q")
        block, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(kind)]
        elements = int(np.prod(shape))
        infos[name] = {"type": kind, "shape": shape, "offset": offset, "nbytes": elements // block * type_size}
    alignment = int(kv.get("general.alignment", 32))
    start = (pos + alignment - 1) // alignment * alignment
    for info in infos.values():
        info["offset"] += start
    return kv, infos


def read_gguf_tensor_bytes(path, info: dict) -> np.ndarray:
    """The raw bytes of one tensor (uint8), from an info returned by :func:`read_gguf_metadata`."""
    return np.fromfile(path, dtype=np.uint8, count=info["nbytes"], offset=info["offset"])


def validate_gguf(path, config: Mapping) -> list[str]:
    """Problems with a gpt-oss GGUF that llama.cpp would refuse or mis-run; empty when every tensor it loads is there.

    Reads the header only (names, ggml types, shapes in ne order) and checks them against ``config`` as llama.cpp's
    ``load_arch_tensors`` for gpt-oss expects them (formats.md §4.2).
    """
    import gguf

    kv, tensors = read_gguf_metadata(path)
    problems = []
    if kv.get("general.architecture") != ARCH:
        problems.append(f"general.architecture is {kv.get('general.architecture')!r}, expected {ARCH!r}")
    H, I, E = config["hidden_size"], config["intermediate_size"], config["num_local_experts"]
    heads, kv_heads, head_dim, vocab = (config["num_attention_heads"], config["num_key_value_heads"],
                                        config["head_dim"], config["vocab_size"])
    expected = {"token_embd.weight": [H, vocab], "output_norm.weight": [H], "output.weight": [H, vocab]}
    for n in range(config["num_hidden_layers"]):
        b = f"blk.{n}."
        expected.update({
            b + "attn_norm.weight": [H], b + "post_attention_norm.weight": [H],
            b + "attn_q.weight": [H, heads * head_dim], b + "attn_q.bias": [heads * head_dim],
            b + "attn_k.weight": [H, kv_heads * head_dim], b + "attn_k.bias": [kv_heads * head_dim],
            b + "attn_v.weight": [H, kv_heads * head_dim], b + "attn_v.bias": [kv_heads * head_dim],
            b + "attn_output.weight": [heads * head_dim, H], b + "attn_output.bias": [H],
            b + "attn_sinks.weight": [heads], b + "ffn_gate_inp.weight": [H, E], b + "ffn_gate_inp.bias": [E],
            b + "ffn_gate_exps.weight": [H, I, E], b + "ffn_up_exps.weight": [H, I, E],
            b + "ffn_down_exps.weight": [I, H, E], b + "ffn_gate_exps.bias": [I, E], b + "ffn_up_exps.bias": [I, E],
            b + "ffn_down_exps.bias": [H, E],
        })
    for name, shape in expected.items():
        info = tensors.get(name)
        if info is None:
            problems.append(f"missing tensor {name}")
        elif info["shape"] != shape:
            problems.append(f"{name}: ne {info['shape']}, expected {shape}")
        elif name.endswith(_F32_SUFFIXES) and info["type"] != gguf.GGMLQuantizationType.F32:
            problems.append(f"{name}: ggml type {info['type']}, expected F32")
    for name in sorted(set(tensors) - set(expected)):
        problems.append(f"unexpected tensor {name}")
    if len(kv.get("tokenizer.ggml.tokens", [])) != vocab:
        problems.append(f"tokenizer.ggml.tokens has {len(kv.get('tokenizer.ggml.tokens', []))} entries, "
                        f"expected vocab_size {vocab}")
    return problems
