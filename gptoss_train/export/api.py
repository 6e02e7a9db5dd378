"""``export_model``: base checkpoint (+ adapter | tuned model) -> a servable folder, atomically.

Formats (formats.md §4-§5):

=========  =====================================================================================================
mxfp4      HF folder, experts MXFP4 + ``quantization_config`` (vLLM's MXFP4 path, transformers). Untouched experts
           keep their original bytes; a ``requantize_report.json`` says what requantization kept of the fine-tune.
bf16       HF folder, dense bf16 experts and no ``quantization_config`` (vLLM's other path; no quantization loss).
gguf       one ``.gguf`` (llama.cpp), experts MXFP4 (type 39) with the same bytes as the mxfp4 export.
ollama     folder with ``model.gguf`` and a ``Modelfile`` whose Harmony TEMPLATE turns Ollama's Harmony parser on.
=========  =====================================================================================================

Every export carries the tokenizer files, chat template and generation config. Output is staged in a hidden sibling
folder and renamed into place only when complete and validated; an existing output is replaced only with ``force``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from gptoss_train.export.hf import FolderWeights, ModelWeights, TunedWeights, export_config, export_tensor_groups
from gptoss_train.export.safetensors_io import (
    DEFAULT_MAX_SHARD_BYTES,
    CheckpointError,
    SafetensorsFolder,
    write_safetensors_shards,
)
from gptoss_train.export.validate import validate_vllm_layout
from gptoss_train.quant.requantize import RequantReport

FORMATS = ("mxfp4", "bf16", "gguf", "ollama")
REPORT_NAME = "requantize_report.json"
# Files that travel from the base with every export (formats.md §6.2: copy, never regenerate).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
)
# The hub's generation_config.json for gpt-oss (formats.md §1.1), written when the base has none.
DEFAULT_GENERATION_CONFIG = {
    "bos_token_id": 199998,
    "do_sample": True,
    "eos_token_id": [200002, 199999, 200012],
    "pad_token_id": 199999,
}


class ExportError(RuntimeError):
    """The export cannot be produced as asked (bad input, existing output, failed validation)."""


def resolve_checkpoint(path_or_id: str | os.PathLike) -> Path:
    """A local folder as is; otherwise a hub id downloaded (config, safetensors, tokenizer files only).

    Not ``model.checkpoint.resolve_checkpoint``: an export reads only the HF layout, so ``original/`` and ``metal/``
    (another 13 GB each for 20b) are not downloaded.
    """
    path = Path(path_or_id)
    if path.is_dir():
        return path
    if path.exists():
        raise ExportError(f"{path} is a file; --base must be a checkpoint folder or a hub id")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(
            str(path_or_id),
            allow_patterns=["*.json", "*.safetensors", "*.jinja", "tokenizer*"],
            ignore_patterns=["original/*", "metal/*"],
        ))
    except Exception as error:  # noqa: BLE001 - any hub failure gets the same advice
        raise ExportError(
            f"{path_or_id} is not a local folder and could not be fetched from the hub ({error}). "
            "Pass the folder that holds config.json and the *.safetensors files."
        ) from error


def copy_serving_files(base: Path, dest: Path) -> list[str]:
    """Tokenizer files, chat template and generation config from the base (our offline tokenizer as a fallback)."""
    dest.mkdir(parents=True, exist_ok=True)
    copied = []
    for name in TOKENIZER_FILES:
        if (base / name).is_file():
            shutil.copy2(base / name, dest / name)
            copied.append(name)
    if "tokenizer.json" not in copied:
        from gptoss_train.harmony.tokenizer import copy_tokenizer_files

        copy_tokenizer_files(dest)
        copied.append("tokenizer.json (built offline: the base had none)")
    if (base / "generation_config.json").is_file():
        shutil.copy2(base / "generation_config.json", dest / "generation_config.json")
    else:
        (dest / "generation_config.json").write_text(json.dumps(DEFAULT_GENERATION_CONFIG, indent=2) + "\n")
    copied.append("generation_config.json")
    return copied


def _tuned_weights(base: Path, adapter, model, device) -> TunedWeights | None:
    if adapter is not None and model is not None:
        raise ExportError("give either an adapter or a tuned model, not both")
    if isinstance(model, torch.nn.Module):
        return ModelWeights(model)
    if model is not None:
        model_dir = Path(model)
        if not (model_dir / "config.json").is_file():
            raise ExportError(f"--model {model_dir}: no config.json; expected a merged or fully fine-tuned HF folder")
        return FolderWeights(model_dir)
    if adapter is not None:
        adapter_dir = Path(adapter)
        if not (adapter_dir / "adapter_config.json").is_file():
            raise ExportError(f"--adapter {adapter_dir}: no adapter_config.json; expected a PEFT adapter folder")
        from gptoss_train.model.load import load_model
        from gptoss_train.model.merge import merge_adapter

        target = torch.device(device or "cpu")
        if target.type == "cpu":
            # float32: a small LoRA delta is not rounded to bf16 before requantization sees it
            merged = merge_adapter(str(base), str(adapter_dir), dtype=torch.float32, device=target)
        else:
            # On a GPU a float32 20b does not fit: experts stay MXFP4-resident until merge_adapter densifies them
            # (bf16). The bf16 rounding of W0 + delta is far below the FP4 step that requantization applies next.
            merged = merge_adapter(load_model(str(base), experts="mxfp4", device=target), str(adapter_dir))
        return ModelWeights(merged)
    return None


def _staging_dir(out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.partial-"))


def _make_readable(staged: Path) -> None:
    """mkdtemp/mkstemp create 0700/0600 entries; a served model must be readable like any file the user writes."""
    umask = os.umask(0)
    os.umask(umask)
    for path in [staged, *staged.rglob("*")]:
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def _move_into_place(staged: Path, out: Path, force: bool) -> None:
    if out.exists() or out.is_symlink():
        if not force:
            raise ExportError(f"{out} exists; pass --force to replace it")
        trash = out.parent / f".{out.name}.old-{os.getpid()}-{int(time.time())}"
        os.replace(out, trash)
        os.replace(staged, out)
        if trash.is_dir():
            shutil.rmtree(trash, ignore_errors=True)
        else:
            trash.unlink(missing_ok=True)
    else:
        os.replace(staged, out)


def export_model(
    base,
    *,
    adapter=None,
    model=None,
    out_dir,
    format: str = "mxfp4",
    force: bool = False,
    rule: str = "best",
    gguf_dtype: str = "mxfp4",
    device: str | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    progress: bool = True,
    on_report: Callable[[RequantReport], None] | None = None,
) -> Path:
    """Export ``base`` (+ ``adapter`` dir, or ``model``: a merged / full-FT folder or a model in memory) to ``out_dir``.

    Returns the path written: the folder (mxfp4 / bf16 / ollama) or the ``.gguf`` file (gguf: ``out_dir`` ending in
    ``.gguf`` is the file itself, otherwise the file is ``out_dir/model.gguf``).
    """
    if format not in FORMATS:
        raise ExportError(f"format must be one of {', '.join(FORMATS)}; got {format!r}")
    out = Path(out_dir)
    if (out.exists() or out.is_symlink()) and not force:
        raise ExportError(f"{out} exists; pass --force to replace it (nothing was written)")
    base_dir = resolve_checkpoint(base)
    if not (base_dir / "config.json").is_file():
        raise ExportError(f"{base_dir}: no config.json; --base must be a gpt-oss checkpoint folder")
    base_config = json.loads((base_dir / "config.json").read_text())
    base_tensors = SafetensorsFolder(base_dir)
    tuned = _tuned_weights(base_dir, adapter, model, device)
    report = RequantReport(rule=rule)
    tensor_format = "bf16" if format == "bf16" else "mxfp4"

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    progress_bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                            disable=not progress, transient=False)
    staged = _staging_dir(out)
    try:
        with progress_bar:
            task = progress_bar.add_task(f"export {format}", total=None)

            def on_group(done, total):
                progress_bar.update(task, completed=done, total=total)

            groups = export_tensor_groups(base_tensors, tuned, format=tensor_format, report=report, rule=rule,
                                          device=device, on_group=on_group)
            if format in ("mxfp4", "bf16"):
                write_safetensors_shards(staged, groups, max_shard_bytes=max_shard_bytes)
                config = export_config(base_config, format=format)
                (staged / "config.json").write_text(json.dumps(config, indent=2) + "\n")
                copy_serving_files(base_dir, staged)
                if report.tensors:
                    report.write_json(staged / REPORT_NAME)
                problems = validate_vllm_layout(staged)
                if problems:
                    raise ExportError("the export failed layout validation:\n  " + "\n  ".join(problems))
            else:
                from gptoss_train.export.gguf import validate_gguf, write_gguf

                tokenizer_dir = staged / "tokenizer"
                copy_serving_files(base_dir, tokenizer_dir)
                gguf_name = out.name if (format == "gguf" and out.suffix == ".gguf") else "model.gguf"
                gguf_path = staged / gguf_name
                write_gguf(gguf_path, groups, base_config, tokenizer_dir, expert_dtype=gguf_dtype,
                           name=base_config.get("_name_or_path") or base_dir.name)
                problems = validate_gguf(gguf_path, base_config)
                if problems:
                    raise ExportError("the GGUF failed validation:\n  " + "\n  ".join(problems))
                shutil.rmtree(tokenizer_dir)
                if report.tensors:
                    report.write_json(staged / REPORT_NAME)
                if format == "ollama":
                    from gptoss_train.export.ollama import modelfile_text

                    (staged / "Modelfile").write_text(modelfile_text(gguf_name))
        _make_readable(staged)
        if on_report is not None and report.tensors:
            on_report(report)
        if format == "gguf" and out.suffix == ".gguf":
            # A single file: move the .gguf itself into place; its report lands beside it.
            _move_into_place(staged / out.name, out, force)
            if (staged / REPORT_NAME).is_file():
                os.replace(staged / REPORT_NAME, out.with_suffix(".requantize_report.json"))
            shutil.rmtree(staged, ignore_errors=True)
            return out
        _move_into_place(staged, out, force)
        return out
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise


__all__ = ["export_model", "ExportError", "FORMATS", "CheckpointError", "copy_serving_files"]
