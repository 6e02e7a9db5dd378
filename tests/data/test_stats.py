"""Stats: counts, trained fraction, length histogram."""

from gptoss_train.data import compute_stats, pack_examples
from gptoss_train.data.stats import length_histogram


def test_stats_and_histogram():
    examples = [{"input_ids": [0] * n, "loss_mask": [1] * (n // 4) + [0] * (n - n // 4)} for n in (10, 70, 100, 300)]
    stats = compute_stats(examples, packed_rows=pack_examples(examples, 512), max_length=512)
    assert (stats.examples, stats.tokens, stats.trained_tokens) == (4, 480, 2 + 17 + 25 + 75)
    assert abs(stats.trained_fraction - 119 / 480) < 1e-9
    assert (stats.min_length, stats.max_length, stats.median_length) == (10, 300, 85.0)
    assert stats.histogram == [(0, 64, 1), (64, 128, 2), (128, 256, 0), (256, 512, 1)]
    assert stats.packed_rows == 1 and abs(stats.packing_efficiency - 480 / 512) < 1e-9
    assert stats.to_dict()["histogram"][1] == {"low": 64, "high": 128, "count": 2}


def test_empty():
    assert compute_stats([]).examples == 0 and length_histogram([]) == []
