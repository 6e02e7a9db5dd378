"""Where examples come from: chat JSONL files, Hugging Face datasets (hub or saved folders), in-memory rows.

Each reader yields :class:`SourceRecord` objects (the raw row plus where it came from) so that every later error can
name the file and line, or the dataset row. Turning a row into a Harmony conversation is :mod:`.build`'s job.

Sources, as given on the command line or to :func:`open_source`:

* ``path/to/file.jsonl`` (or ``.json`` holding a list of rows): one example per line;
* ``path/to/folder`` written by ``datasets.Dataset.save_to_disk`` (or a ``DatasetDict``: pick ``split``);
* ``hf:OWNER/NAME`` (optionally ``hf:OWNER/NAME:SPLIT``): a hub dataset through ``datasets.load_dataset``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gptoss_train.data.validation import DataError, DataSourceError

HF_PREFIX = "hf:"


@dataclass
class SourceRecord:
    """One raw example and its origin (``location`` is a 1-based line number or ``row N``, 0-based)."""

    source: str
    location: str
    data: Any
    error: DataError | None = None  # set when the raw line could not even be parsed

    def fail(self, problem: str, reason: str) -> DataError:
        from gptoss_train.data.validation import HINTS

        return DataError(self.source, self.location, problem, reason=reason, hint=HINTS.get(reason))


def read_jsonl(path: str | os.PathLike) -> Iterator[SourceRecord]:
    """Records of a JSONL file; blank lines are ignored, unparseable lines come back with ``error`` set."""
    path = Path(path)
    if not path.is_file():
        raise DataSourceError(f"{path}: no such file")
    name = str(path)
    if path.suffix == ".json":
        # A .json file holding one list of rows (the shape `datasets` also reads).
        try:
            rows = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise DataSourceError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg})") from None
        if not isinstance(rows, list):
            raise DataSourceError(f"{path}: a .json file must hold a list of examples (or use .jsonl)")
        for index, row in enumerate(rows):
            yield SourceRecord(name, f"row {index}", row)
        return
    with open(path, encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, 1):
            if not line.strip():
                continue
            record = SourceRecord(name, str(line_no), None)
            try:
                record.data = json.loads(line.strip())
            except json.JSONDecodeError as exc:
                record.error = record.fail(f"invalid JSON ({exc.msg} at column {exc.colno})", "invalid JSON line")
            yield record


def read_rows(rows: Iterable[Any], *, source: str = "<rows>") -> Iterator[SourceRecord]:
    """Records of in-memory rows (dicts), e.g. a ``datasets.Dataset`` or a list."""
    for index, row in enumerate(rows):
        yield SourceRecord(source, f"row {index}", dict(row) if hasattr(row, "keys") else row)


def load_hf_dataset(name: str, *, split: str = "train", **kwargs: Any):
    """``datasets.load_dataset(name, split=split)``, failing with an actionable message when offline."""
    try:
        import datasets
    except Exception as exc:  # ImportError, or a broken pyarrow/numpy pairing
        raise DataSourceError(f"cannot import the `datasets` library ({exc}); pip install datasets") from exc
    try:
        return datasets.load_dataset(name, split=split, **kwargs)
    except Exception as exc:
        offline = any(os.environ.get(var) == "1" for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))
        why = "offline mode is on (HF_HUB_OFFLINE/HF_DATASETS_OFFLINE=1)" if offline else "no network or no such dataset"
        raise DataSourceError(
            f"could not load Hugging Face dataset {name!r} split {split!r}: {type(exc).__name__}: {exc}\n"
            f"  ({why}). Fix: on a machine with network access run\n"
            f"    python -c \"import datasets; datasets.load_dataset('{name}', split='{split}').to_json('data.jsonl')\"\n"
            f"  and pass data.jsonl here, or save it with Dataset.save_to_disk and pass that folder."
        ) from exc


def read_dataset_folder(path: str | os.PathLike, *, split: str = "train"):
    """A folder written by ``save_to_disk`` (a Dataset, or a DatasetDict from which ``split`` is taken)."""
    try:
        import datasets
    except Exception as exc:
        raise DataSourceError(f"cannot import the `datasets` library ({exc}); pip install datasets") from exc
    loaded = datasets.load_from_disk(str(path))
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise DataSourceError(f"{path}: no split {split!r} (has {', '.join(loaded)})")
        loaded = loaded[split]
    return loaded


def open_source(spec: str | os.PathLike, *, split: str = "train") -> Iterator[SourceRecord]:
    """Records from a JSONL/JSON file, a saved datasets folder, or ``hf:NAME[:SPLIT]``."""
    text = str(spec)
    if text.startswith(HF_PREFIX):
        name = text[len(HF_PREFIX):]
        if name.count(":") == 1:
            name, split = name.split(":")
        dataset = load_hf_dataset(name, split=split)
        return read_rows(dataset, source=f"{name}[{split}]")
    path = Path(text)
    if path.is_dir():
        if not (path / "dataset_info.json").exists() and not (path / "dataset_dict.json").exists():
            raise DataSourceError(f"{path}: a folder must be written by datasets' save_to_disk")
        return read_rows(read_dataset_folder(path, split=split), source=str(path))
    if not path.exists():
        raise DataSourceError(
            f"{path}: no such file. Give a .jsonl file, a datasets folder (save_to_disk), or hf:OWNER/NAME")
    return read_jsonl(path)
