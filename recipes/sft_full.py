"""Full-parameter fine-tuning of gpt-oss on Harmony-rendered data (FSDP2 or DeepSpeed ZeRO-3 through accelerate).

    accelerate launch --config_file configs/accelerate/fsdp2.yaml recipes/sft_full.py --config configs/sft/20b-full.yaml
    python recipes/sft_full.py --config configs/sft/tiny-cpu-full.yaml train.steps=5

Every weight trains, so the experts must be dense: ``model.experts`` has to be ``bf16`` (MXFP4 is a storage format
for frozen weights; requantize after training with ``gptoss-export``). The result is a consolidated safetensors
model (+ tokenizer) in ``OUTPUT/final``, loadable by transformers and vLLM.

Steps: config -> seed -> base model (dense) -> unfreeze -> QAT / fast path -> data -> TRL SFTTrainer -> train with
checkpoints -> full model. Model assembly and the trainer live in gptoss_train.train; this file only orders them.
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
    cfg = load_config(path, overrides)
    if cfg.model.experts != "bf16":
        raise ConfigError("full fine-tuning trains the experts, so model.experts must be bf16 (MXFP4 is for "
                          "frozen experts); requantize afterwards with gptoss-export")
    return cfg


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        cfg = parse_args(list(sys.argv[1:] if argv is None else argv))
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2

    from transformers import set_seed

    set_seed(cfg.train.seed)

    # 1. The base model with dense experts; every floating-point parameter trains.
    model = model_setup.load_base_model(cfg)
    trainable = model_setup.unfreeze_for_full_training(model)
    print(f"full fine-tuning: {trainable:,} trainable parameters")

    # 2. Optional QAT of the experts, and the fast training path on CUDA.
    model_setup.apply_qat(model, cfg)
    path_line = model_setup.apply_fast_path(model, cfg)

    # 3. Data from our Harmony builder.
    train_dataset = data_setup.build_dataset(cfg.data, which="train", progress=True)
    eval_dataset = data_setup.build_dataset(cfg.data, which="eval")

    # 4. The trainer. Under FSDP2 / ZeRO-3 accelerate shards the model; the checkpoint logic is the same.
    trainer = trainer_setup.build_trainer(cfg, model, train_dataset, eval_dataset=eval_dataset, full=True,
                                          use_fast_path=path_line.startswith("fast path"))
    if trainer.is_world_process_zero():
        save_config(cfg, f"{cfg.train.output_dir}/config.yaml")

    # 5. Train and write the consolidated model.
    started = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=trainer_setup.resolve_resume(cfg))
    seconds = time.perf_counter() - started
    if trainer.is_fsdp_enabled:
        # Gather full (unsharded) weights on rank 0 for a plain safetensors checkpoint.
        trainer.accelerator.state.fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")
    final = trainer_setup.save_final(trainer, cfg, full=True)
    if trainer.is_world_process_zero():
        print(trainer_setup.run_summary(trainer, result, seconds))
        print(f"model: {final}")
        print(f"loss curve: {cfg.train.output_dir}/loss.csv")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
