"""Typed SFT configuration: dataclasses loaded from YAML, with command-line overrides.

    cfg = load_config("configs/sft/tiny-cpu-lora.yaml", ["train.lr=1e-3", "--train.steps", "20", "--seed=3"])

Overrides are ``section.key=value``, ``--section.key value`` / ``--section.key=value``, or a bare key when exactly one
section has it (``lr=1e-3``). Values are parsed as YAML scalars/lists, then checked against the field's type. An
unknown key is an error naming the key, the file (or "command line") and the closest known key. Why our own and not
``HfArgumentParser``/``TrlParser``: those silently accept nested YAML keys they do not know and have no sections.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import tempfile
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A config file or override is invalid; the message names where and how to fix it."""


@dataclass
class ModelConfig:
    path: str = ""  # hub id or local folder of a gpt-oss checkpoint
    experts: Literal["bf16", "mxfp4"] = "bf16"  # mxfp4: frozen experts stay MXFP4-resident (LoRA only)
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"  # auto: float32 on CPU, bfloat16 on CUDA
    # Build a random tiny checkpoint at `path` when it does not exist (CPU configs and tests; never for real runs).
    build_tiny: Literal["tiny", "20b", "120b"] | None = None
    tiny_overrides: dict = field(default_factory=dict)  # GptOssConfig fields passed to model.tiny.build_checkpoint


@dataclass
class DataConfig:
    # JSONL files in OpenAI chat form (or Harmony message form); "demo:train" / "demo:test" name the bundled demo.
    train_files: list[str] = field(default_factory=list)
    eval_files: list[str] = field(default_factory=list)
    hf_dataset: str | None = None  # a Hugging Face dataset id in the same shape (needs the network)
    hf_split: str = "train"
    policy: Literal["final", "reasoning_final", "all_assistant"] = "all_assistant"
    max_length: int = 2048
    truncation: Literal["drop", "truncate"] = "drop"  # what to do with examples longer than max_length
    packing: bool = False  # several examples per row, position ids restart per example
    # Pad every batch to a multiple of this many tokens. None: on the fast path with packing, pad to max_length
    # (static shapes: the compiled attention/norm kernels otherwise recompile for every new row length).
    pad_to_multiple_of: int | None = None
    limit: int | None = None  # use only the first N examples (smoke tests)


@dataclass
class LoraSection:
    enabled: bool = True  # false in full-parameter configs
    r: int = 8
    alpha: int = 16
    attention: bool = True  # q/k/v/o of every selected layer
    experts: bool = True  # gate_up and down of every expert (PEFT target_parameters)
    router: bool = False
    layers: list[int] | None = None  # None: every layer
    # Per-group rank / alpha; None falls back to r / alpha.
    attention_r: int | None = None
    attention_alpha: int | None = None
    experts_r: int | None = None
    experts_alpha: int | None = None
    # Extra nn.Linear module names to adapt with LoRA. Not lm_head: TRL computes log-probs from lm_head.weight and
    # refuses an adapter there; use modules_to_save for it.
    extra_targets: list[str] = field(default_factory=list)
    # Modules trained in full next to the adapters and saved with them (PEFT modules_to_save). A random tiny base
    # has no vocabulary geometry (its lm_head gives every token the same tiny logit), so the CPU quickstart trains
    # lm_head; on a real gpt-oss leave this empty.
    modules_to_save: list[str] = field(default_factory=list)
    # A config that adapts nothing inside the MoE is refused unless this is set (DESIGN.md §2: silently untrained
    # experts are the most common LoRA mistake on gpt-oss).
    allow_no_moe: bool = False


@dataclass
class TrainSection:
    output_dir: str = "runs/sft"
    lr: float = 2e-4
    steps: int = 0  # > 0 wins over epochs
    epochs: float = 1.0
    batch_size: int = 1  # per device
    grad_accum: int = 1
    gradient_checkpointing: bool = False
    seed: int = 0
    lr_scheduler: str = "cosine"
    # Extra arguments of the scheduler, e.g. {num_decay_steps: 100} for warmup_stable_decay (transformers'
    # get_wsd_schedule: constant lr, then a decay over the last num_decay_steps).
    lr_scheduler_kwargs: dict = field(default_factory=dict)
    warmup_ratio: float = 0.0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    save_every: int = 0  # steps between checkpoints; 0 = only at the end
    save_total_limit: int | None = 2
    resume: str | None = None  # "latest" or a checkpoint folder
    logging: Literal["tensorboard", "trackio", "wandb", "none"] = "tensorboard"
    log_every: int = 1
    merge: bool = False  # also write a merged dense model (LoRA)
    progress: bool = True  # rich progress bar with tokens/s and ETA


@dataclass
class FastSection:
    """Opt-in options of the CUDA fast path (fast_path: auto); see docs/fast-training.md. Defaults keep PEFT's
    numerics and everything on the GPU."""

    lora_matmul_dtype: Literal["float32", "bfloat16"] = "float32"  # bfloat16: PEFT's linear LoRA products in bf16
    offload_layer_inputs: bool = False  # saved layer inputs in pinned host memory between forward and backward
    offload_embeddings: bool = False  # frozen input embedding table in pinned host memory


@dataclass
class SFTConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    lora: LoraSection = field(default_factory=LoraSection)
    train: TrainSection = field(default_factory=TrainSection)
    qat: bool = False  # fake-quantize expert weights to MXFP4 in the forward (gptoss_train.quant.qat)
    qat_options: dict = field(default_factory=dict)  # keyword arguments for quant.qat.enable_qat
    fast_path: Literal["auto", "off"] = "auto"  # auto: gptoss_train.kernels on CUDA when available
    fast: FastSection = field(default_factory=FastSection)


SECTIONS = ("model", "data", "lora", "train", "fast")

# ---------------------------------------------------------------------------------------------------------------
# Building dataclasses from plain dicts, with type checks


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against the annotation ``tp``; allow the lossless int -> float widening."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, option, where)
            except ConfigError as error:
                errors.append(str(error))
        raise ConfigError(f"{where}: {value!r} is not a valid {_type_name(tp)}")
    if origin is Literal:
        if value not in args:
            choices = ", ".join(repr(a) for a in args)
            raise ConfigError(f"{where}: {value!r} is not one of {choices}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_coerce(item, args[0] if args else Any, f"{where}[{i}]") for i, item in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):
            # PyYAML (YAML 1.1) reads "3e-3" as a string: accept any spelling Python reads as a number.
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{where}: unsupported type {_type_name(tp)}")


# Names users bring from transformers / TRL / PEFT, mapped to ours for the did-you-mean.
_FAMILIAR_NAMES = {
    "learning_rate": "lr", "max_steps": "steps", "num_train_epochs": "epochs",
    "per_device_train_batch_size": "batch_size", "gradient_accumulation_steps": "grad_accum",
    "save_steps": "save_every", "logging_steps": "log_every", "report_to": "logging",
    "resume_from_checkpoint": "resume", "lora_alpha": "alpha", "rank": "r", "lr_scheduler_type": "lr_scheduler",
    "model_name_or_path": "path", "dataset_name": "hf_dataset", "max_seq_length": "max_length",
}


def _unknown_key_error(key: str, known: list[str], where: str, source: str) -> ConfigError:
    last = key.rsplit(".", 1)[-1]
    familiar = _FAMILIAR_NAMES.get(last)
    candidates = [k for k in known if familiar and k.rsplit(".", 1)[-1] == familiar]
    guess = candidates or difflib.get_close_matches(key, known, n=1)
    hint = f"; did you mean {where + guess[0]!r}?" if guess else f"; known keys: {', '.join(known)}"
    return ConfigError(f"{source}: unknown key {where + key!r}{hint}")


def _build(cls: type, data: dict, source: str, prefix: str = "") -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: {prefix.rstrip('.') or 'the file'} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            raise _unknown_key_error(str(key), names, prefix, source)
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value or {}, source, f"{prefix}{key}.")
        else:
            kwargs[key] = _coerce(value, tp, f"{source}: {prefix}{key}")
    return cls(**kwargs)


def config_to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


# ---------------------------------------------------------------------------------------------------------------
# Overrides


def _section_of_bare_key(key: str) -> str | None:
    hits = [s for s in SECTIONS if key in {f.name for f in dataclasses.fields(getattr(SFTConfig(), s))}]
    return hits[0] if len(hits) == 1 else None


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    """``a.b=v``, ``--a.b v``, ``--a.b=v`` -> [("a.b", parsed v)]; values parsed as YAML."""
    pairs: list[tuple[str, Any]] = []
    i = 0
    while i < len(overrides):
        item = overrides[i]
        if item.startswith("--"):
            item = item[2:]
            if "=" not in item:
                if i + 1 >= len(overrides):
                    raise ConfigError(f"command line: --{item} needs a value")
                item = f"{item}={overrides[i + 1]}"
                i += 1
        if "=" not in item:
            raise ConfigError(f"command line: {overrides[i]!r} is not key=value")
        key, raw = item.split("=", 1)
        key = key.replace("-", "_")
        pairs.append((key, yaml.safe_load(raw) if raw != "" else ""))
        i += 1
    return pairs


def _apply_override(data: dict, key: str, value: Any) -> None:
    top = {f.name for f in dataclasses.fields(SFTConfig)}
    parts = key.split(".")
    if parts[0] not in top:
        section = _section_of_bare_key(parts[0]) if len(parts) == 1 else None
        if section is None:
            known = sorted(top | {f"{s}.{f.name}" for s in SECTIONS
                                  for f in dataclasses.fields(getattr(SFTConfig(), s))})
            raise _unknown_key_error(key, known, "", "command line")
        parts = [section, parts[0]]
    node = data
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"command line: {key} goes through a non-mapping value")
    node[parts[-1]] = value


def load_config(path: str | os.PathLike | None, overrides: list[str] | None = None) -> SFTConfig:
    """Read a YAML config (or start from defaults when ``path`` is None), apply overrides, check every key and type."""
    data: dict = {}
    source = "defaults"
    if path is not None:
        source = str(path)
        try:
            text = Path(path).read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as error:
            raise ConfigError(f"{path}: not valid YAML: {error}") from None
    # The file's own keys are checked before overrides, so a typo is reported against the file that has it.
    _build(SFTConfig, data, source)
    for key, value in parse_overrides(list(overrides or [])):
        _apply_override(data, key, value)
    cfg = _build(SFTConfig, data, f"{source} + command line" if overrides else source)
    check_scheduler_kwargs(cfg, f"{source} + command line" if overrides else source)
    if cfg.train.resume:
        # Here, not only when the trainer resumes: a config that cannot resume is reported before the model loads.
        from gptoss_train.train.trainer import find_latest_checkpoint

        checkpoint = (find_latest_checkpoint(cfg.train.output_dir) if cfg.train.resume == "latest"
                      else cfg.train.resume)
        if checkpoint is not None:
            check_resume_config(cfg, checkpoint)
    return cfg


def check_scheduler_kwargs(cfg: SFTConfig, source: str) -> None:
    """train.lr_scheduler_kwargs must be arguments of train.lr_scheduler's schedule function: otherwise the trainer
    fails with a TypeError at its first step (e.g. num_decay_steps left in a file after lr_scheduler=linear on the
    command line)."""
    kwargs = cfg.train.lr_scheduler_kwargs
    if not kwargs:
        return
    import inspect

    from transformers.optimization import TYPE_TO_SCHEDULER_FUNCTION, SchedulerType

    try:
        function = TYPE_TO_SCHEDULER_FUNCTION[SchedulerType(cfg.train.lr_scheduler)]
    except (ValueError, KeyError):
        return  # an unknown scheduler name is reported by the trainer itself, with the valid names
    accepted = set(inspect.signature(function).parameters) - {"optimizer", "num_warmup_steps", "num_training_steps"}
    unknown = sorted(set(kwargs) - accepted)
    if unknown:
        raise ConfigError(
            f"{source}: train.lr_scheduler_kwargs {unknown} are not arguments of the {cfg.train.lr_scheduler!r} "
            f"schedule (it takes: {', '.join(sorted(accepted)) or 'none'}). Drop them "
            f"(train.lr_scheduler_kwargs={{}}) or choose the scheduler they belong to.")


def save_config(cfg: SFTConfig, path: str | os.PathLike) -> Path:
    """Write the resolved config as YAML, atomically; loading it back gives an equal config."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".config.", suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        yaml.safe_dump(config_to_dict(cfg), handle, sort_keys=False)
    os.chmod(tmp, 0o644)  # mkstemp creates 0600; these are ordinary output files
    os.replace(tmp, path)
    return path


# Settings that may differ between a run and its resumption: how long it goes on, where and how it reports. Anything
# else changes what the checkpoint's weights, optimizer state or data order mean (a LoRA rank, the rows, the lr ...).
RESUME_MAY_CHANGE = frozenset({
    "train.steps", "train.epochs", "train.resume", "train.output_dir", "train.save_every", "train.save_total_limit",
    "train.logging", "train.log_every", "train.progress", "train.merge", "data.eval_files", "fast_path",
    "fast.lora_matmul_dtype", "fast.offload_layer_inputs", "fast.offload_embeddings",
})


def _flat_sections(data: dict) -> dict[str, Any]:
    flat = {}
    for key, value in data.items():
        if key in SECTIONS and isinstance(value, dict):
            flat.update({f"{key}.{name}": item for name, item in value.items()})
        else:
            flat[key] = value
    return flat


def resume_config_changes(checkpoint_config: dict, cfg: SFTConfig) -> list[tuple[str, Any, Any]]:
    """(key, checkpoint value, current value) for every setting that must not change on resume.

    Keys the checkpoint's config does not have (written by an older version) are not compared."""
    saved = _flat_sections(checkpoint_config or {})
    # a YAML round trip, so both sides have the same value types (lists, not tuples)
    current = _flat_sections(yaml.safe_load(yaml.safe_dump(config_to_dict(cfg))))
    return [(key, saved[key], value) for key, value in current.items()
            if key in saved and key not in RESUME_MAY_CHANGE and saved[key] != value]


def check_resume_config(cfg: SFTConfig, checkpoint: str | os.PathLike) -> None:
    """Refuse to resume ``checkpoint`` under a config that changes its meaning, naming every changed key.

    Without this check a changed LoRA rank or module list dies deep inside the state-dict or optimizer loading
    (size mismatch, KeyError), and a changed data setting silently continues on other rows."""
    path = Path(checkpoint) / "config.yaml"
    if not path.exists():  # checkpoints written before configs were saved with them
        return
    try:
        saved = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML ({error}); resume from another checkpoint") from None
    changes = resume_config_changes(saved, cfg)
    if not changes:
        return
    lines = "\n".join(f"  {key}: {old!r} in the checkpoint, {new!r} now" for key, old, new in changes)
    raise ConfigError(
        f"cannot resume {checkpoint}: the config differs from the one it was trained with:\n{lines}\n"
        "These settings change what the checkpoint's weights, optimizer state or data order mean. Either resume "
        f"with the checkpoint's settings (drop those overrides, or --config {path}), or start a new run "
        "(another train.output_dir, or no --resume). Only "
        f"{', '.join(sorted(RESUME_MAY_CHANGE))} may change on resume.")


def split_cli(argv: list[str]) -> tuple[str | None, list[str]]:
    """Pull ``--config PATH`` out of argv; the rest are overrides (``--resume X`` is short for ``train.resume=X``)."""
    rest, config = [], None
    i = 0
    while i < len(argv):
        if argv[i] == "--resume" and i + 1 < len(argv):
            rest.append(f"train.resume={argv[i + 1]}")
            i += 2
            continue
        if argv[i].startswith("--resume="):
            rest.append("train.resume=" + argv[i].split("=", 1)[1])
            i += 1
            continue
        if argv[i] == "--config":
            if i + 1 >= len(argv):
                raise ConfigError("command line: --config needs a path")
            config = argv[i + 1]
            i += 2
            continue
        if argv[i].startswith("--config="):
            config = argv[i].split("=", 1)[1]
        else:
            rest.append(argv[i])
        i += 1
    return config, rest
