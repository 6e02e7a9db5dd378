"""Dataset statistics: examples, tokens, trained-token fraction, length distribution and histogram."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class DatasetStats:
    examples: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    min_length: int = 0
    mean_length: float = 0.0
    median_length: float = 0.0
    p95_length: int = 0
    max_length: int = 0
    # (low, high, count): lengths in [low, high)
    histogram: list[tuple[int, int, int]] = field(default_factory=list)
    packed_rows: int | None = None
    packing_efficiency: float | None = None

    @property
    def trained_fraction(self) -> float:
        return self.trained_tokens / self.tokens if self.tokens else 0.0

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["trained_fraction"] = self.trained_fraction
        out["histogram"] = [{"low": low, "high": high, "count": count} for low, high, count in self.histogram]
        return out


def length_histogram(lengths: Sequence[int], *, first_edge: int = 64) -> list[tuple[int, int, int]]:
    """Counts in power-of-two buckets [0, 64), [64, 128), [128, 256), ... up to the longest example."""
    if not lengths:
        return []
    edges = [0, first_edge]
    while edges[-1] <= max(lengths):
        edges.append(edges[-1] * 2)
    counts = [0] * (len(edges) - 1)
    for length in lengths:
        for i in range(len(counts)):
            if edges[i] <= length < edges[i + 1]:
                counts[i] += 1
                break
    return [(edges[i], edges[i + 1], counts[i]) for i in range(len(counts))]


def compute_stats(examples: Sequence[Any], *, packed_rows: Sequence[Any] | None = None,
                  max_length: int | None = None) -> DatasetStats:
    """Statistics of rendered examples (objects or dicts with ``input_ids`` and ``loss_mask``)."""

    def fields(example):
        if isinstance(example, dict):
            return example["input_ids"], example["loss_mask"]
        return example.input_ids, example.loss_mask

    lengths, trained = [], 0
    for example in examples:
        ids, mask = fields(example)
        lengths.append(len(ids))
        trained += sum(mask)
    stats = DatasetStats(examples=len(lengths), tokens=sum(lengths), trained_tokens=trained)
    if lengths:
        ordered = sorted(lengths)
        stats.min_length, stats.max_length = ordered[0], ordered[-1]
        stats.mean_length = sum(lengths) / len(lengths)
        stats.median_length = float(statistics.median(ordered))
        stats.p95_length = ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))]
        stats.histogram = length_histogram(lengths)
    if packed_rows is not None and max_length:
        from gptoss_train.data.packing import packing_efficiency

        stats.packed_rows = len(packed_rows)
        stats.packing_efficiency = packing_efficiency(packed_rows, max_length)
    return stats
