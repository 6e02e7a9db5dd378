"""LoRA fine-tuning of gpt-oss (attention + every expert, optionally the router) on Harmony-rendered data.

    accelerate launch recipes/sft_lora.py --config configs/sft/20b-lora.yaml
    python recipes/sft_lora.py --config configs/sft/tiny-cpu-lora.yaml train.steps=20 train.output_dir=runs/try

Overrides: ``section.key=value`` or ``--section.key value`` (see configs/README.md). ``--resume latest`` continues
the newest complete checkpoint of ``train.output_dir``.

The steps, in order: config -> seed -> base model (bf16 or MXFP4-resident experts) -> LoRA (and a check that the
MoE is adapted) -> QAT / fast path -> data (our Harmony builder: ids + loss mask) -> TRL SFTTrainer -> train with
checkpoints -> PEFT adapter (+ merged model). Every step is one call into gptoss_train.train, where it is tested.
"""

from __future__ import annotations

import logging
import sys
import time

from gptoss_train.train import dataset as data_setup
from gptoss_train.train import model_setup, trainer as trainer_setup
from gptoss_train.train.config import ConfigError, load_config, save_config, split_cli


def parse_args(argv: list[str]):
    if any(arg in ("-h", "--help") for arg in argv):
        print(__doc__)
        raise SystemExit(0)
    path, overrides = split_cli(argv)
    return load_config(path, overrides)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        cfg = parse_args(list(sys.argv[1:] if argv is None else argv))
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if not cfg.lora.enabled:
        print("error: lora.enabled is false; use recipes/sft_full.py for full-parameter training", file=sys.stderr)
        return 2

    from transformers import set_seed

    set_seed(cfg.train.seed)

    # 1. The base model, frozen. experts: mxfp4 keeps the frozen experts MXFP4-resident.
    model = model_setup.load_base_model(cfg)

    # 2. LoRA on attention and every expert (PEFT target_parameters); prints what is adapted and refuses a
    #    config that leaves the MoE untouched.
    model = model_setup.apply_lora(model, cfg)
    if cfg.train.gradient_checkpointing:
        model.enable_input_require_grads()  # checkpointed blocks need a grad-carrying input with a frozen embedding

    # 3. Optional MXFP4 fake-quant of the experts (QAT) and the fast training path (CUDA).
    model_setup.apply_qat(model, cfg)
    path_line = model_setup.apply_fast_path(model, cfg)

    # 4. Data: Harmony-rendered ids + loss masks from our builder (optionally packed).
    train_dataset = data_setup.build_dataset(cfg.data, which="train", progress=True)
    eval_dataset = data_setup.build_dataset(cfg.data, which="eval")

    # 5. The trainer: TRL SFTTrainer + accelerate, trained-token loss, atomic checkpoints, logging.
    trainer = trainer_setup.build_trainer(cfg, model, train_dataset, eval_dataset=eval_dataset, full=False,
                                          use_fast_path=path_line.startswith("fast path"))
    save_config(cfg, f"{cfg.train.output_dir}/config.yaml")

    # 6. Train (resuming when asked), then save the adapter in PEFT format and, optionally, a merged model.
    started = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=trainer_setup.resolve_resume(cfg))
    seconds = time.perf_counter() - started
    final = trainer_setup.save_final(trainer, cfg, full=False)
    if trainer.is_world_process_zero():
        print(trainer_setup.run_summary(trainer, result, seconds))
        print(f"adapter: {final}")
        print(f"loss curve: {cfg.train.output_dir}/loss.csv")
    if cfg.train.merge and trainer.is_world_process_zero():
        print(f"merged model: {trainer_setup.save_merged(cfg, final)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
