"""Reading and writing sharded safetensors folders in the Hugging Face layout.

We write safetensors ourselves instead of calling ``save_pretrained``: in transformers 5.23 a model loaded from MXFP4
(dequantized on CPU) saves float tensors under the ``*_blocks`` names, and on reload its experts are silently
re-initialised (cpu-gotchas #13). Writing the exact tensors we computed, with an index we build, avoids that trap and
lets us decide which tensors share a shard (``_blocks`` and ``_scales`` of one matrix must: llama.cpp's converter reads
them in order, formats.md §4.4).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3


# One error type for bad checkpoints across the package (model.checkpoint defines it).
from gptoss_train.model.checkpoint import CheckpointError  # noqa: E402


class SafetensorsFolder:
    """Lazy access to the tensors of a HF checkpoint folder (single file or sharded with an index)."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        index_path = self.folder / INDEX_NAME
        if index_path.is_file():
            index = json.loads(index_path.read_text())
            if "weight_map" not in index:
                raise CheckpointError(f"{index_path}: no 'weight_map' key")
            self.weight_map: dict[str, str] = dict(index["weight_map"])
        elif (self.folder / SINGLE_NAME).is_file():
            with safe_open(self.folder / SINGLE_NAME, framework="pt") as handle:
                self.weight_map = {name: SINGLE_NAME for name in handle.keys()}
        else:
            raise CheckpointError(
                f"{self.folder}: no {SINGLE_NAME} or {INDEX_NAME}; expected a Hugging Face checkpoint folder"
            )
        self._handles: dict[str, object] = {}

    def _handle(self, shard: str):
        if shard not in self._handles:
            path = self.folder / shard
            if not path.is_file():
                raise CheckpointError(f"{self.folder}: index names shard {shard}, which does not exist")
            self._handles[shard] = safe_open(path, framework="pt")
        return self._handles[shard]

    def keys(self) -> list[str]:
        return list(self.weight_map)

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def get(self, name: str) -> torch.Tensor:
        try:
            shard = self.weight_map[name]
        except KeyError:
            raise KeyError(f"{self.folder}: no tensor named {name}") from None
        return self._handle(shard).get_tensor(name)

    def dtype_of(self, name: str) -> str:
        """The stored dtype as safetensors names it ("U8", "BF16", ...), read from the header only."""
        return self._handle(self.weight_map[name]).get_slice(name).get_dtype()

    def shard_of(self, name: str) -> str:
        return self.weight_map[name]


def tensor_nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def write_safetensors_shards(
    out_dir: str | Path,
    groups: Iterable[dict[str, torch.Tensor]],
    *,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    metadata: dict[str, str] | None = None,
) -> list[Path]:
    """Write tensor groups into ``model-XXXXX-of-YYYYY.safetensors`` shards plus the index.

    A group (e.g. one decoder layer) is never split across shards, so ``_blocks``/``_scales`` pairs stay together.
    Shards are filled up to ``max_shard_bytes`` (a single larger group gets its own shard). Groups are consumed lazily,
    so only one shard's worth of tensors is in memory at a time.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    metadata = {"format": "pt", **(metadata or {})}
    temp_names: list[Path] = []
    weight_map: dict[str, int] = {}
    total = 0
    pending: dict[str, torch.Tensor] = {}
    pending_bytes = 0

    def flush() -> None:
        nonlocal pending, pending_bytes
        if not pending:
            return
        path = out_dir / f".shard-{len(temp_names):05d}.safetensors"
        # contiguous(): safetensors refuses strided views (e.g. the transposed dense experts)
        save_file({k: v.contiguous() for k, v in pending.items()}, str(path), metadata=metadata)
        for name in pending:
            weight_map[name] = len(temp_names)
        temp_names.append(path)
        pending, pending_bytes = {}, 0

    for group in groups:
        group_bytes = sum(tensor_nbytes(t) for t in group.values())
        if pending and pending_bytes + group_bytes > max_shard_bytes:
            flush()
        for name, tensor in group.items():
            if name in pending or name in weight_map:
                raise ValueError(f"tensor {name} written twice")
            pending[name] = tensor
        pending_bytes += group_bytes
        total += group_bytes
    flush()

    count = len(temp_names)
    final_names = [
        SINGLE_NAME if count == 1 else f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)
    ]
    paths = []
    for temp, final in zip(temp_names, final_names):
        target = out_dir / final
        temp.rename(target)
        paths.append(target)
    if count > 1:
        index = {
            "metadata": {"total_size": total},
            "weight_map": {name: final_names[i] for name, i in sorted(weight_map.items())},
        }
        (out_dir / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    return paths


def iter_layer_names(names: Iterable[str]) -> Iterator[tuple[int | None, str]]:
    """(layer index or None, name) for HF gpt-oss tensor names."""
    for name in names:
        parts = name.split(".")
        if len(parts) > 3 and parts[0] == "model" and parts[1] == "layers" and parts[2].isdigit():
            yield int(parts[2]), name
        else:
            yield None, name
