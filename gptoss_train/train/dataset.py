"""Training rows for the trainer: our Harmony builders' ids + loss masks, optionally packed, as a datasets.Dataset.

TRL's SFTTrainer receives rows that are already tokenised and already carry ``labels`` (-100 where the builder's loss
mask is 0), with ``skip_prepare_dataset`` so TRL neither re-tokenises nor rebuilds labels from its own masks
(cpu-gotchas #15). What the loss sees is therefore exactly the builder's mask (tests/train check it).
"""

from __future__ import annotations

import logging
from pathlib import Path

from gptoss_train.train.config import ConfigError, DataConfig

log = logging.getLogger("gptoss_train.train")

DEMO_PREFIX = "demo:"


def resolve_source(spec: str) -> str:
    """``demo:train`` / ``demo:test`` name the bundled demo dataset; anything else is passed through."""
    if spec.startswith(DEMO_PREFIX):
        from gptoss_train.data.demo import demo_path

        return str(demo_path(spec[len(DEMO_PREFIX):]))
    return spec


def load_training_examples(cfg: DataConfig, *, which: str = "train", progress: bool = False):
    """Rendered examples (ids + loss mask) of every configured source, in order, plus the build reports."""
    from gptoss_train.data import load_examples

    specs = list(cfg.train_files if which == "train" else cfg.eval_files)
    if which == "train" and cfg.hf_dataset:
        specs.append(f"hf:{cfg.hf_dataset}:{cfg.hf_split}")
    if which == "train" and not specs:
        raise ConfigError("data: give data.train_files (JSONL files, or demo:train) or data.hf_dataset")
    examples, reports = [], []
    for spec in specs:
        source = resolve_source(spec)
        if not source.startswith("hf:") and not Path(source).exists():
            raise ConfigError(f"data: {spec}: no such file or folder")
        part, report = load_examples(source, policy=cfg.policy, max_length=cfg.max_length,
                                     truncation=cfg.truncation, progress=progress)
        examples.extend(part)
        reports.append(report)
    if cfg.limit is not None:
        examples = examples[: cfg.limit]
    if not examples:
        raise ConfigError(f"data: no usable {which} examples in {', '.join(specs)}")
    return examples, reports


def rows_from_examples(examples, *, packing: bool, max_length: int) -> list[dict]:
    """Trainer rows: input_ids + labels (+ position_ids restarting per example when packed)."""
    from gptoss_train.data import pack_examples
    from gptoss_train.data.collator import labels_from_mask

    if packing:
        rows = []
        for packed in pack_examples(examples, max_length):
            rows.append({"input_ids": packed.input_ids, "labels": labels_from_mask(packed.input_ids, packed.loss_mask),
                         "position_ids": packed.position_ids})
        return rows
    return [{"input_ids": e.input_ids, "labels": labels_from_mask(e.input_ids, e.loss_mask)} for e in examples]


def build_dataset(cfg: DataConfig, *, which: str = "train", progress: bool = False):
    """A datasets.Dataset of trainer rows (None for an eval split with no files)."""
    import datasets

    if which == "eval" and not cfg.eval_files:
        return None
    examples, _ = load_training_examples(cfg, which=which, progress=progress)
    rows = rows_from_examples(examples, packing=cfg.packing, max_length=cfg.max_length)
    trained = sum(sum(1 for t in row["labels"] if t != -100) for row in rows)
    total = sum(len(row["input_ids"]) for row in rows)
    log.info("%s data: %d examples -> %d rows, %d tokens, %.1f%% trained", which, len(examples), len(rows), total,
             100.0 * trained / max(total, 1))
    return datasets.Dataset.from_list(rows)
