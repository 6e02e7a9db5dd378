"""Batches for training: ``input_ids``, ``labels`` (-100 where the loss mask is 0), ``position_ids``.

Works with a plain PyTorch loop and as the ``data_collator`` of transformers' Trainer / TRL's SFTTrainer (keep the
row columns with ``remove_unused_columns=False``, or name the mask ``assistant_masks``/``completion_mask``).

Rows are right-padded with ``<|endoftext|>`` (label -100). Under causal attention, tokens never attend to later
positions, so right padding cannot change the real tokens' outputs.

* Unpacked rows (no ``position_ids``): the batch also gets the usual 2-D ``attention_mask``.
* Packed rows (with ``position_ids`` restarting at 0 per example): no ``attention_mask``, so the block-diagonal mask
  is derived from ``position_ids``; call :func:`gptoss_train.data.packing.enable_packed_attention` on the model once
  (transformers 5.23's GptOss does not do it by itself). Padding gets positions restarting at 0, its own segment.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from gptoss_train.harmony.encoding import ENDOFTEXT

IGNORE_INDEX = -100
MASK_KEYS = ("loss_mask", "assistant_masks", "completion_mask")


def labels_from_mask(input_ids: Sequence[int], loss_mask: Sequence[int]) -> list[int]:
    """Token ids where the mask is 1, -100 elsewhere (the model shifts labels itself)."""
    return [token if trained else IGNORE_INDEX for token, trained in zip(input_ids, loss_mask)]


@dataclass
class HarmonyDataCollator:
    pad_token_id: int = ENDOFTEXT
    pad_to_multiple_of: int | None = None
    max_length: int | None = None  # rows longer than this are an error (truncate when building the data)

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict:
        import torch

        if not features:
            raise ValueError("empty batch")
        rows = [self._row(feature) for feature in features]
        packed = any(row[2] is not None for row in rows)
        length = max(len(row[0]) for row in rows)
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        input_ids = torch.full((len(rows), length), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long)
        position_ids = torch.zeros((len(rows), length), dtype=torch.long)
        attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
        for i, (ids, row_labels, positions) in enumerate(rows):
            n = len(ids)
            input_ids[i, :n] = torch.tensor(ids, dtype=torch.long)
            labels[i, :n] = torch.tensor(row_labels, dtype=torch.long)
            position_ids[i, :n] = torch.tensor(positions if positions is not None else range(n), dtype=torch.long)
            position_ids[i, n:] = torch.arange(length - n)
            attention_mask[i, :n] = 1
        batch = {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}
        if not packed:
            batch["attention_mask"] = attention_mask
        return batch

    def _row(self, feature: Mapping[str, Any]) -> tuple[list[int], list[int], list[int] | None]:
        ids = list(feature["input_ids"])
        if self.max_length is not None and len(ids) > self.max_length:
            raise ValueError(f"row of {len(ids)} tokens > max_length={self.max_length}")
        if "labels" in feature and feature["labels"] is not None:
            row_labels = list(feature["labels"])
        else:
            mask = next((feature[key] for key in MASK_KEYS if feature.get(key) is not None), None)
            if mask is None:
                raise KeyError(f"a row needs labels or one of {', '.join(MASK_KEYS)}")
            row_labels = labels_from_mask(ids, mask)
        if len(row_labels) != len(ids):
            raise ValueError("labels/mask and input_ids have different lengths")
        positions = feature.get("position_ids")
        return ids, row_labels, (list(positions) if positions is not None else None)
