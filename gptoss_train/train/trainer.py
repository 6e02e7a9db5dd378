"""SFTTrainer assembly: TRL's SFTTrainer with our loss, atomic checkpoints, resume, logging and callbacks.

What we change in TRL's trainer, and why:

* ``compute_loss``: the logits are computed only at positions whose next token is trained (``logits_to_keep`` with
  the positions), or by the fast path's chunked loss when it is installed. The 201k-entry vocabulary makes full
  logits the largest tensor of a step; TRL's own fused head ignores a LoRA on ``lm_head`` and also computes entropy
  and token accuracy over the whole vocabulary (3.5x slower per step on CPU, cpu-gotchas #15).
* ``_save_checkpoint``: the checkpoint is written into ``OUTPUT/.staging`` and renamed into place, so a crash never
  leaves a half-written ``checkpoint-N`` that ``--resume latest`` would pick. The resolved config is saved with it.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
import shutil
from pathlib import Path

import torch

from gptoss_train.train.callbacks import LossCurveCallback, RichProgressCallback, ThroughputCallback
from gptoss_train.train.config import ConfigError, SFTConfig, check_resume_config, save_config

log = logging.getLogger("gptoss_train.train")

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
STAGING = ".staging"
IGNORE_INDEX = -100


class _TrainedRowsOnly:
    """While active, the output head sees only the hidden states of the selected positions ([1, N, hidden]).

    A forward pre-hook on the model's output-embedding module (lm_head, or PEFT's wrapper around it), so it works
    through PEFT and accelerate wrappers without re-implementing the model's forward.
    """

    def __init__(self, model, select):
        self.head = model.get_output_embeddings()
        self.select = select
        self.handle = None

    def _hook(self, module, args):
        hidden = args[0]
        return (hidden[self.select].unsqueeze(0),) + tuple(args[1:])

    def __enter__(self):
        self.handle = self.head.register_forward_pre_hook(self._hook)
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def trained_token_loss(model, inputs: dict, num_items_in_batch=None, *, use_model_loss: bool = False):
    """Sum of next-token cross-entropy over trained tokens / number of trained tokens (or num_items_in_batch).

    ``use_model_loss``: let the model compute it from ``labels`` (the fast path's chunked loss). Otherwise
    ``lm_head`` runs only on the positions whose next token is trained (the builder's loss mask, as labels).
    Returns (loss, number of trained tokens in this batch).
    """
    labels = inputs["labels"]
    model_inputs = {k: v for k, v in inputs.items() if k != "labels"}
    shifted = labels[:, 1:]
    count = (shifted != IGNORE_INDEX).sum()
    denominator = num_items_in_batch if num_items_in_batch is not None else count.clamp(min=1)
    if use_model_loss:
        out = model(**model_inputs, labels=labels, use_cache=False, num_items_in_batch=denominator)
        return out.loss, count
    select = torch.zeros_like(labels, dtype=torch.bool)
    select[:, :-1] = shifted != IGNORE_INDEX
    with _TrainedRowsOnly(model, select):
        out = model(**model_inputs, use_cache=False, logits_to_keep=0)
    logits = out.logits[0].float()  # [N, vocab], in row-major order of the selected positions
    targets = shifted[shifted != IGNORE_INDEX]
    if targets.numel() == 0:  # nothing trained in this batch: a zero that still touches the graph
        return logits.sum() * 0.0, count
    loss = torch.nn.functional.cross_entropy(logits, targets, reduction="sum")
    return loss / torch.as_tensor(denominator, device=loss.device, dtype=loss.dtype), count


def _sft_trainer_class():
    from trl import SFTTrainer

    class GptOssSFTTrainer(SFTTrainer):
        """TRL SFTTrainer with trained-token logits and atomic checkpoints (see the module docstring)."""

        def __init__(self, *args, resolved_config: SFTConfig | None = None, use_model_loss: bool = False, **kwargs):
            self.resolved_config = resolved_config
            self.use_model_loss = use_model_loss
            self._staging_root = None
            self.tokens_seen = 0
            super().__init__(*args, **kwargs)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss, _ = trained_token_loss(model, inputs, num_items_in_batch, use_model_loss=self.use_model_loss)
            if self.args.average_tokens_across_devices and num_items_in_batch is not None:
                loss = loss * self.accelerator.num_processes
            if model.training:
                if "attention_mask" in inputs:
                    self.tokens_seen += int(inputs["attention_mask"].sum())
                else:
                    self.tokens_seen += int(inputs["input_ids"].numel())
            if return_outputs:
                return loss, {}
            return loss

        def _get_output_dir(self, trial):
            if self._staging_root is not None:
                return self._staging_root
            return super()._get_output_dir(trial)

        def _save_checkpoint(self, model, trial):
            final_root = Path(super()._get_output_dir(trial))
            staging_root = final_root / STAGING
            name = f"checkpoint-{self.state.global_step}"
            if self.args.should_save:
                shutil.rmtree(staging_root / name, ignore_errors=True)
            self._staging_root = str(staging_root)
            try:
                super()._save_checkpoint(model, trial)
            finally:
                self._staging_root = None
            self.accelerator.wait_for_everyone()
            if self.args.should_save:
                if self.resolved_config is not None:
                    save_config(self.resolved_config, staging_root / name / "config.yaml")
                target = final_root / name
                if target.exists():
                    shutil.rmtree(target)
                os.replace(staging_root / name, target)  # the atomic step: the folder appears complete or not at all
                from transformers.trainer_utils import rotate_checkpoints

                rotate_checkpoints(output_dir=str(final_root), save_total_limit=self.args.save_total_limit,
                                   best_model_checkpoint=self.state.best_model_checkpoint, use_mtime=False)
            self.accelerator.wait_for_everyone()

    return GptOssSFTTrainer


def find_latest_checkpoint(output_dir: str | os.PathLike) -> str | None:
    root = Path(output_dir)
    if not root.is_dir():
        return None
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := CHECKPOINT_RE.match(p.name))]
    found = [(step, p) for step, p in found if (p / "trainer_state.json").exists()]
    return str(max(found)[1]) if found else None


def resolve_resume(cfg: SFTConfig) -> str | None:
    """``train.resume``: None, ``latest`` (None when the run has no checkpoint yet: start fresh) or a folder."""
    resume = cfg.train.resume
    if not resume:
        return None
    if resume == "latest":
        latest = find_latest_checkpoint(cfg.train.output_dir)
        if latest is None:
            log.info("resume latest: no checkpoint in %s yet, starting fresh", cfg.train.output_dir)
        else:
            check_resume_config(cfg, latest)
            print(f"resuming from {latest}", flush=True)
        return latest
    if not (Path(resume) / "trainer_state.json").exists():
        raise ConfigError(f"train.resume: {resume} is not a checkpoint folder (no trainer_state.json)")
    check_resume_config(cfg, resume)
    return resume


def report_to(cfg: SFTConfig) -> list[str]:
    backend = cfg.train.logging
    if backend == "none":
        return []
    module = {"tensorboard": "tensorboard", "trackio": "trackio", "wandb": "wandb"}[backend]
    if importlib.util.find_spec(module) is None and not (backend == "tensorboard"
                                                         and importlib.util.find_spec("tensorboardX")):
        raise ConfigError(f"train.logging: {backend} is not installed; pip install {module}, "
                          "or set train.logging to tensorboard or none")
    return [backend]


def make_training_args(cfg: SFTConfig, *, full: bool, use_fast_recompute: bool = False, drop_last: bool = False):
    """TRL SFTConfig from our config (the trainer-facing settings in one place)."""
    from trl import SFTConfig as TrlSFTConfig

    t = cfg.train
    on_cuda = torch.cuda.is_available()
    return TrlSFTConfig(
        output_dir=t.output_dir,
        learning_rate=t.lr,
        max_steps=t.steps if t.steps > 0 else -1,
        num_train_epochs=t.epochs,
        per_device_train_batch_size=t.batch_size,
        gradient_accumulation_steps=t.grad_accum,
        # The fast path recomputes inside its own kernels when asked; don't stack transformers' on top.
        gradient_checkpointing=t.gradient_checkpointing and not use_fast_recompute,
        gradient_checkpointing_kwargs={"use_reentrant": False},
        seed=t.seed,
        data_seed=t.seed,
        lr_scheduler_type=t.lr_scheduler,
        lr_scheduler_kwargs=dict(t.lr_scheduler_kwargs),
        warmup_steps=t.warmup_ratio,
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        save_strategy="steps" if t.save_every > 0 else "no",
        save_steps=t.save_every if t.save_every > 0 else 500,
        save_total_limit=t.save_total_limit,
        logging_steps=t.log_every,
        logging_first_step=True,
        report_to=report_to(cfg),
        disable_tqdm=True,  # our rich bar shows tokens/s and ETA
        # The model is loaded in its training dtype (bf16 on CUDA, float32 on CPU); no autocast on top.
        bf16=False,
        fp16=False,
        optim="adamw_torch_fused" if on_cuda else "adamw_torch",
        max_length=cfg.data.max_length,
        packing=False,  # rows arrive packed (or not) from our builder
        dataset_kwargs={"skip_prepare_dataset": True},
        remove_unused_columns=False,
        dataloader_num_workers=0,
        dataloader_drop_last=drop_last,
        save_only_model=False,
        use_cpu=not on_cuda,
    )


def make_collator(cfg: SFTConfig, *, use_fast_path: bool):
    """The batch collator; on the fast path packed rows are padded to one static length (measured on an H200:
    variable row lengths made every step recompile flex attention, 38 s for the first step and no second one
    within two minutes)."""
    from gptoss_train.data.collator import HarmonyDataCollator

    multiple = cfg.data.pad_to_multiple_of
    if multiple is None and use_fast_path and cfg.data.packing:
        multiple = cfg.data.max_length
    return HarmonyDataCollator(pad_to_multiple_of=multiple)


def fast_path_drops_last_batch(cfg: SFTConfig, train_dataset, *, use_fast_path: bool) -> bool:
    """On the fast path an epoch's short last batch is dropped: its smaller batch dimension recompiles the compiled
    decoder layers (seen on an H100: in a 20b LoRA run with 69 rows at batch 4, steps 11-20, which contain the
    1-row step 18, took 43 s against about 7 s for every later 10 steps). Kept when the dataset has fewer rows than
    one global batch (nothing would be left to train on)."""
    if not use_fast_path:
        return False
    global_batch = cfg.train.batch_size * int(os.environ.get("WORLD_SIZE", "1"))
    rows = len(train_dataset) if hasattr(train_dataset, "__len__") else 0
    left_over = rows % global_batch
    drop = rows >= global_batch and left_over != 0
    if drop:
        log.info("fast path: the last %d rows of each epoch's shuffled order are left out (static batch shape)",
                 left_over)
    return drop


def build_trainer(cfg: SFTConfig, model, train_dataset, *, full: bool, eval_dataset=None, tokenizer=None,
                  use_fast_path: bool = False, callbacks=()):
    """The SFTTrainer, ready for ``trainer.train(resume_from_checkpoint=resolve_resume(cfg))``."""
    from gptoss_train.harmony.tokenizer import load_hf_tokenizer

    if cfg.data.packing:
        from gptoss_train.data import enable_packed_attention

        enable_packed_attention(model)
    args = make_training_args(cfg, full=full, use_fast_recompute=use_fast_path and cfg.train.gradient_checkpointing,
                              drop_last=fast_path_drops_last_batch(cfg, train_dataset, use_fast_path=use_fast_path))
    trainer_cls = _sft_trainer_class()
    trainer = trainer_cls(
        model=model,
        args=args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer or load_hf_tokenizer(),
        data_collator=make_collator(cfg, use_fast_path=use_fast_path),
        resolved_config=cfg,
        use_model_loss=use_fast_path,
        callbacks=[LossCurveCallback(cfg.train.output_dir), *callbacks],
    )
    if cfg.train.progress:
        from transformers.trainer_callback import PrinterCallback

        trainer.remove_callback(PrinterCallback)  # the bar shows the loss; raw log dicts would scroll it away
        trainer.add_callback(RichProgressCallback(trainer))
    trainer.add_callback(ThroughputCallback(trainer))
    return trainer


def _drop_quantization_config(config_path: Path) -> None:
    """A full fine-tune saves dense experts: a leftover mxfp4 quantization_config would make loaders (ours,
    transformers, vLLM) look for *_blocks tensors that are not there. Requantize with gptoss-export instead."""
    import json

    if not config_path.exists():
        return
    config = json.loads(config_path.read_text())
    if config.pop("quantization_config", None) is not None:
        config_path.write_text(json.dumps(config, indent=2) + "\n")


def save_final(trainer, cfg: SFTConfig, *, full: bool) -> Path:
    """Final adapter (PEFT format) or full model, plus the resolved config, written atomically into OUTPUT/final."""
    out = Path(cfg.train.output_dir)
    final, staging = out / "final", out / STAGING / "final"
    if trainer.args.should_save:
        shutil.rmtree(staging, ignore_errors=True)
    trainer.accelerator.wait_for_everyone()
    trainer.save_model(str(staging))  # PEFT adapter (adapter_config.json + adapter_model.safetensors) or full model
    trainer.accelerator.wait_for_everyone()
    if trainer.args.should_save:
        save_config(cfg, staging / "config.yaml")
        if full:
            from gptoss_train.harmony.tokenizer import copy_tokenizer_files

            _drop_quantization_config(staging / "config.json")
            copy_tokenizer_files(staging)
        if final.exists():
            shutil.rmtree(final)
        os.replace(staging, final)
    trainer.accelerator.wait_for_everyone()
    return final


def save_merged(cfg: SFTConfig, adapter_dir: Path) -> Path:
    """Dense merged model next to the adapter (model.merge), for tools that do not read PEFT adapters."""
    from gptoss_train.model.merge import merge_adapter


    base = cfg.model.path
    merged = merge_adapter(base, adapter_dir)
    out = Path(cfg.train.output_dir) / "merged"
    staging = Path(cfg.train.output_dir) / STAGING / "merged"
    shutil.rmtree(staging, ignore_errors=True)
    # cpu-gotchas #13: a model loaded from MXFP4 keeps weight conversions that re-save experts under wrong names.
    merged._weight_conversions = None
    merged.save_pretrained(str(staging))
    from gptoss_train.harmony.tokenizer import copy_tokenizer_files

    copy_tokenizer_files(staging)
    if out.exists():
        shutil.rmtree(out)
    os.replace(staging, out)
    return out


def run_summary(trainer, result, seconds: float) -> str:
    """One line for logs and benchmarks: steps, time, mean loss, tokens/s (non-pad tokens, all ranks) over the whole
    run and after the warm-up steps (compilation), peak GPU memory."""
    ranks = trainer.accelerator.num_processes  # every rank sees its own batches
    tokens = trainer.tokens_seen * ranks
    line = (f"trained {result.global_step} steps in {seconds:.1f} s; mean loss {result.training_loss:.4f}; "
            f"{tokens / max(seconds, 1e-9):,.0f} tokens/s")
    meter = next((cb for cb in trainer.callback_handler.callbacks if isinstance(cb, ThroughputCallback)), None)
    steady = meter.steady_rate() if meter is not None else None
    if steady is not None:
        rate, first, last = steady
        line += f" ({rate * ranks:,.0f} tokens/s over steps {first}-{last}, after the warm-up)"
    if ranks > 1:
        line += f", all {ranks} ranks"
    if torch.cuda.is_available():
        line += f"; peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB (rank 0)"
    return line
