"""Check a HF gpt-oss folder against what vLLM's loader needs, before a user finds out on a GPU server.

vLLM picks its loader from ``config.quantization_config.quant_method`` (formats.md §5.1): ``mxfp4`` wants
``*_blocks``/``*_scales`` uint8 of exact, unpadded shapes; anything else wants dense ``gate_up_proj [E, H, 2I]`` /
``down_proj [E, I, H]``. A config that disagrees with the tensors is the most reported export failure (KeyError on
``w13_weight_scale`` / ``w2_weight``). llama.cpp's converter also needs ``_blocks`` and ``_scales`` of one matrix in one
shard. Every rule below returns a message naming the tensor, what was found, what was expected and how to fix it.
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors import safe_open

from gptoss_train.export.safetensors_io import INDEX_NAME, SINGLE_NAME

_FLOAT_DTYPES = {"BF16", "F16", "F32"}


def _read_headers(folder: Path, problems: list[str]) -> tuple[dict[str, tuple[str, list[int]]], dict[str, str]]:
    """name -> (dtype, shape) and name -> shard, read from the safetensors headers only (no tensor data)."""
    index_path = folder / INDEX_NAME
    shards: list[str]
    index_map: dict[str, str] | None = None
    if index_path.is_file():
        try:
            index = json.loads(index_path.read_text())
            index_map = dict(index["weight_map"])
        except (ValueError, KeyError, TypeError) as error:
            problems.append(f"{INDEX_NAME}: unreadable or has no weight_map ({error})")
            index_map = {}
        shards = sorted(set(index_map.values()))
    elif (folder / SINGLE_NAME).is_file():
        shards = [SINGLE_NAME]
    else:
        problems.append(f"no {SINGLE_NAME} and no {INDEX_NAME} in {folder}")
        return {}, {}
    headers: dict[str, tuple[str, list[int]]] = {}
    located: dict[str, str] = {}
    for shard in shards:
        path = folder / shard
        if not path.is_file():
            problems.append(f"{INDEX_NAME} names shard {shard}, which is missing")
            continue
        with safe_open(path, framework="pt") as handle:
            for name in handle.keys():
                sl = handle.get_slice(name)
                headers[name] = (sl.get_dtype(), list(sl.get_shape()))
                located[name] = shard
    if index_map is not None:
        for name, shard in sorted(index_map.items()):
            if name not in located and (folder / shard).is_file():
                problems.append(f"{INDEX_NAME} maps {name} to {shard}, but that shard has no such tensor")
            elif name in located and located[name] != shard:
                problems.append(f"{INDEX_NAME} maps {name} to {shard}, but it is stored in {located[name]}")
        for name in sorted(set(located) - set(index_map)):
            problems.append(f"{name} is in {located[name]} but missing from {INDEX_NAME}")
    if index_path.is_file() and (folder / SINGLE_NAME).is_file() and SINGLE_NAME not in shards:
        problems.append(f"both {SINGLE_NAME} and {INDEX_NAME} present: loaders may read a stale file; delete one")
    return headers, located


def _expect(problems, headers, name, dtype, shape, hint=""):
    found = headers.get(name)
    if found is None:
        problems.append(f"missing tensor {name} (expected {dtype} {shape}){hint}")
        return
    found_dtype, found_shape = found
    allowed = _FLOAT_DTYPES if dtype == "float" else {dtype}
    if found_dtype not in allowed:
        problems.append(f"{name}: dtype {found_dtype}, expected {dtype}{hint}")
    if found_shape != list(shape):
        padded = " (padded? vLLM pads internally; the checkpoint must not be)" if (
            len(found_shape) == len(shape) and any(f > s for f, s in zip(found_shape, shape))
        ) else ""
        problems.append(f"{name}: shape {found_shape}, expected {list(shape)}{padded}{hint}")


def validate_vllm_layout(folder) -> list[str]:
    """Problems that would stop vLLM (or transformers / llama.cpp) from loading ``folder``; empty when valid."""
    folder = Path(folder)
    problems: list[str] = []
    config_path = folder / "config.json"
    if not config_path.is_file():
        return [f"no config.json in {folder}"]
    try:
        config = json.loads(config_path.read_text())
    except ValueError as error:
        return [f"config.json is not valid JSON: {error}"]

    if config.get("model_type") != "gpt_oss":
        problems.append(f"config.json: model_type is {config.get('model_type')!r}, expected 'gpt_oss'")
    if "GptOssForCausalLM" not in (config.get("architectures") or []):
        problems.append(f"config.json: architectures is {config.get('architectures')!r}, expected ['GptOssForCausalLM']")
    required = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_local_experts", "num_attention_heads",
                "num_key_value_heads", "head_dim", "vocab_size")
    missing = [key for key in required if not isinstance(config.get(key), int)]
    if missing:
        problems.append(f"config.json: missing or non-integer {', '.join(missing)}")
        return problems
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    layers, experts = config["num_hidden_layers"], config["num_local_experts"]
    heads, kv_heads, head_dim, vocab = (config["num_attention_heads"], config["num_key_value_heads"],
                                        config["head_dim"], config["vocab_size"])
    quant = config.get("quantization_config")
    quant_method = quant.get("quant_method") if isinstance(quant, dict) else None
    if quant is not None and quant_method != "mxfp4":
        problems.append(f"config.json: quantization_config.quant_method is {quant_method!r}; gpt-oss exports use "
                        "'mxfp4' (MXFP4 experts) or no quantization_config at all (dense bf16 experts)")

    headers, located = _read_headers(folder, problems)
    if not headers:
        return problems

    has_blocks = any(name.endswith(("_blocks", "_scales")) for name in headers)
    has_dense = any(name.endswith(("experts.gate_up_proj", "experts.down_proj")) for name in headers)
    if quant_method == "mxfp4" and has_dense:
        problems.append("config says quant_method 'mxfp4' but the experts are dense (gate_up_proj/down_proj): vLLM "
                        "would look for w13_weight_scale and fail. Remove quantization_config or export --format mxfp4")
    if quant_method != "mxfp4" and has_blocks:
        problems.append("experts are MXFP4 (_blocks/_scales) but config.json has no quantization_config with "
                        "quant_method 'mxfp4': vLLM would look for dense w13_weight and fail")
    mxfp4_layout = quant_method == "mxfp4" if (has_blocks == has_dense) else has_blocks

    expected: dict[str, tuple[str, tuple[int, ...]]] = {
        "model.embed_tokens.weight": ("float", (vocab, hidden)),
        "model.norm.weight": ("float", (hidden,)),
    }
    if not config.get("tie_word_embeddings", False):
        expected["lm_head.weight"] = ("float", (vocab, hidden))
    for n in range(layers):
        p = f"model.layers.{n}"
        expected.update({
            f"{p}.input_layernorm.weight": ("float", (hidden,)),
            f"{p}.post_attention_layernorm.weight": ("float", (hidden,)),
            f"{p}.self_attn.q_proj.weight": ("float", (heads * head_dim, hidden)),
            f"{p}.self_attn.q_proj.bias": ("float", (heads * head_dim,)),
            f"{p}.self_attn.k_proj.weight": ("float", (kv_heads * head_dim, hidden)),
            f"{p}.self_attn.k_proj.bias": ("float", (kv_heads * head_dim,)),
            f"{p}.self_attn.v_proj.weight": ("float", (kv_heads * head_dim, hidden)),
            f"{p}.self_attn.v_proj.bias": ("float", (kv_heads * head_dim,)),
            f"{p}.self_attn.o_proj.weight": ("float", (hidden, heads * head_dim)),
            f"{p}.self_attn.o_proj.bias": ("float", (hidden,)),
            f"{p}.self_attn.sinks": ("float", (heads,)),
            f"{p}.mlp.router.weight": ("float", (experts, hidden)),
            f"{p}.mlp.router.bias": ("float", (experts,)),
            f"{p}.mlp.experts.gate_up_proj_bias": ("float", (experts, 2 * inter)),
            f"{p}.mlp.experts.down_proj_bias": ("float", (experts, hidden)),
        })
        e = f"{p}.mlp.experts"
        if mxfp4_layout:
            if hidden % 32 or inter % 32:
                problems.append(f"hidden_size {hidden} / intermediate_size {inter} must be multiples of 32 for MXFP4")
            expected.update({
                f"{e}.gate_up_proj_blocks": ("U8", (experts, 2 * inter, hidden // 32, 16)),
                f"{e}.gate_up_proj_scales": ("U8", (experts, 2 * inter, hidden // 32)),
                f"{e}.down_proj_blocks": ("U8", (experts, hidden, inter // 32, 16)),
                f"{e}.down_proj_scales": ("U8", (experts, hidden, inter // 32)),
            })
        else:
            expected.update({
                f"{e}.gate_up_proj": ("float", (experts, hidden, 2 * inter)),
                f"{e}.down_proj": ("float", (experts, inter, hidden)),
            })
    layout = "mxfp4" if mxfp4_layout else "dense"
    for name, (dtype, shape) in expected.items():
        _expect(problems, headers, name, dtype, shape)
    for name in sorted(set(headers) - set(expected)):
        problems.append(f"unexpected tensor {name} ({headers[name][0]} {headers[name][1]}) in a {layout} gpt-oss "
                        "export: vLLM's loader has no place for it")
    for name in sorted(headers):
        if name.endswith("_blocks"):
            partner = name[: -len("_blocks")] + "_scales"
            if partner in located and located[partner] != located[name]:
                problems.append(f"{name} is in {located[name]} but {partner} is in {located[partner]}: keep both "
                                "in one shard (llama.cpp's converter pairs them in order)")
    return problems
