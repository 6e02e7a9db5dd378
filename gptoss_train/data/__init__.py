"""Training data: read chat / Harmony datasets, validate with file:line errors, render, pack, collate, count.

Typical use::

    from gptoss_train.data import load_examples, pack_examples, HarmonyDataCollator
    examples, report = load_examples("train.jsonl", policy="all_assistant", max_length=4096, on_error="skip")

The collator lives in :mod:`gptoss_train.data.collator` (it imports torch); ``gptoss_train.data.demo`` is the bundled
demo dataset.
"""

from gptoss_train.data.build import (
    OnError,
    TrainingExample,
    Truncation,
    build_examples,
    iter_examples,
    load_examples,
    record_to_conversation,
    render_record,
)
from gptoss_train.data.packing import PackedSequence, enable_packed_attention, pack_examples, packing_efficiency
from gptoss_train.data.readers import SourceRecord, load_hf_dataset, open_source, read_jsonl, read_rows
from gptoss_train.data.stats import DatasetStats, compute_stats
from gptoss_train.data.validation import BuildReport, DataError, DataSourceError


def __getattr__(name):
    # The collator needs torch; import it only when asked for.
    if name in ("HarmonyDataCollator", "labels_from_mask"):
        from gptoss_train.data import collator

        return getattr(collator, name)
    raise AttributeError(name)


__all__ = [
    "BuildReport", "DataError", "DataSourceError", "DatasetStats", "HarmonyDataCollator", "OnError", "PackedSequence",
    "SourceRecord", "TrainingExample", "Truncation", "build_examples", "compute_stats", "enable_packed_attention",
    "iter_examples", "labels_from_mask", "load_examples", "load_hf_dataset", "open_source", "pack_examples",
    "packing_efficiency", "read_jsonl", "read_rows", "record_to_conversation", "render_record",
]
