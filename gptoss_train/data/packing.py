"""Packing several examples into one sequence, with attention that never crosses examples.

A packed row concatenates examples and restarts ``position_ids`` at 0 for each one. Two things keep examples apart:

* the loss: the first token of every example is ``<|start|>`` of its system message, never trained, so no example
  learns to predict another's tokens;
* attention: the model must see a block-diagonal causal mask. transformers builds one from ``position_ids``
  (``masking_utils.find_packed_sequence_indices``) **only if the position ids reach the mask factory**. In
  transformers 5.23 ``GptOssModel.forward`` does not pass ``position_ids`` to ``create_causal_mask`` /
  ``create_sliding_window_causal_mask``, so a packed row silently attends across examples (measured:
  logits of the second example differ by ~0.2 from running it alone, on a tiny random GptOss with eager
  attention). :func:`enable_packed_attention` fixes that with a forward pre-hook that calls transformers' own mask
  factories with the position ids, so the mask has the right format for whichever attention implementation is
  active and the sliding-window layers keep their window.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass
class PackedSequence:
    """Several examples in one row. ``lengths`` are the example lengths in order."""

    input_ids: list[int] = field(default_factory=list)
    loss_mask: list[int] = field(default_factory=list)
    position_ids: list[int] = field(default_factory=list)
    lengths: list[int] = field(default_factory=list)

    def add(self, input_ids: Sequence[int], loss_mask: Sequence[int]) -> None:
        self.input_ids.extend(input_ids)
        self.loss_mask.extend(loss_mask)
        self.position_ids.extend(range(len(input_ids)))
        self.lengths.append(len(input_ids))

    def __len__(self) -> int:
        return len(self.input_ids)

    def to_dict(self) -> dict[str, list[int]]:
        return {"input_ids": self.input_ids, "loss_mask": self.loss_mask, "position_ids": self.position_ids}


def pack_examples(examples: Sequence[Any], max_length: int) -> list[PackedSequence]:
    """Best-fit-decreasing packing of examples (objects with ``input_ids``/``loss_mask`` or such dicts).

    Deterministic: longest first (ties in input order), each into the fullest row that still has room.
    Raises ValueError for an example longer than ``max_length`` (apply a truncation policy first).
    """
    if max_length <= 0:
        raise ValueError("max_length must be positive")

    def fields(example):
        if isinstance(example, dict):
            return example["input_ids"], example.get("loss_mask", example.get("assistant_masks"))
        return example.input_ids, example.loss_mask

    items = [fields(example) for example in examples]
    for index, (ids, _) in enumerate(items):
        if len(ids) > max_length:
            raise ValueError(f"example {index} has {len(ids)} tokens > max_length={max_length}; truncate or drop it")
    order = sorted(range(len(items)), key=lambda i: (-len(items[i][0]), i))
    rows: list[PackedSequence] = []
    free: list[tuple[int, int]] = []  # (room left, row index), sorted: best fit = first entry with enough room
    for index in order:
        ids, mask = items[index]
        slot = bisect.bisect_left(free, (len(ids), -1))
        if slot == len(free):
            rows.append(PackedSequence())
            row_index, room = len(rows) - 1, max_length
        else:
            room, row_index = free.pop(slot)
        rows[row_index].add(ids, mask)
        room -= len(ids)
        if room > 0:
            bisect.insort(free, (room, row_index))
    return rows


def packing_efficiency(rows: Sequence[PackedSequence], max_length: int) -> float:
    """Fraction of the ``rows * max_length`` token slots that hold real tokens."""
    return sum(len(row) for row in rows) / (len(rows) * max_length) if rows else 0.0


# --------------------------------------------------------------------------------------------------------------------
# Attention masks for packed rows


def packed_attention_masks(config, position_ids, *, dtype=None, device=None) -> dict | None:
    """Block-diagonal causal masks (one per layer type) for rows described by ``position_ids``; None if unpacked.

    Built by transformers' own ``create_causal_mask`` / ``create_sliding_window_causal_mask`` from ``position_ids``,
    in the format of ``config._attn_implementation``.
    """
    import torch
    from transformers.masking_utils import (
        create_causal_mask,
        create_sliding_window_causal_mask,
        find_packed_sequence_indices,
    )

    if position_ids.dim() == 1:
        position_ids = position_ids.unsqueeze(0)
    if find_packed_sequence_indices(position_ids) is None:
        return None
    batch, length = position_ids.shape
    # The mask factories read only the batch size, length, dtype and device of the embeddings.
    stand_in = torch.empty((batch, length, 0), dtype=dtype or torch.float32, device=device or position_ids.device)
    common = dict(config=config, inputs_embeds=stand_in, attention_mask=None, past_key_values=None,
                  position_ids=position_ids)
    layer_types = set(getattr(config, "layer_types", None) or ["full_attention"])
    masks = {}
    if "full_attention" in layer_types:
        masks["full_attention"] = create_causal_mask(**common)
    if "sliding_attention" in layer_types:
        masks["sliding_attention"] = create_sliding_window_causal_mask(**common)
    return masks


def _decoder_stack(model):
    """The inner decoder (e.g. ``GptOssModel``): the module holding ``embed_tokens`` and ``layers``."""
    for module in model.modules():
        if hasattr(module, "embed_tokens") and hasattr(module, "layers") and hasattr(module, "config"):
            return module
    raise ValueError(f"cannot find the decoder stack (embed_tokens + layers) in {type(model).__name__}")


def enable_packed_attention(model):
    """Make ``model`` honour packed rows: position ids restarting at 0 start a new, isolated example.

    Applies when a forward call passes ``position_ids`` and no ``attention_mask`` (what
    :class:`~gptoss_train.data.collator.HarmonyDataCollator` produces for packed batches) and no KV cache. Works on
    plain and PEFT-wrapped models. Returns the hook handle (``handle.remove()`` undoes it).
    """
    stack = _decoder_stack(model)

    def add_packed_masks(module, args, kwargs):
        position_ids = kwargs.get("position_ids")
        if position_ids is None or kwargs.get("attention_mask") is not None or kwargs.get("past_key_values") is not None:
            return None
        reference = kwargs.get("inputs_embeds")
        if reference is None:
            reference = module.embed_tokens.weight
        masks = packed_attention_masks(module.config, position_ids, dtype=reference.dtype, device=position_ids.device)
        if masks is None:
            return None
        kwargs["attention_mask"] = masks
        return args, kwargs

    return stack.register_forward_pre_hook(add_packed_masks, with_kwargs=True)
