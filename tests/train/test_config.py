"""Typed SFT configs: YAML + overrides, unknown keys and bad types are errors, every shipped config parses."""

from pathlib import Path

import pytest
import yaml

from gptoss_train.train.config import ConfigError, SFTConfig, load_config, save_config, split_cli

REPO = Path(__file__).resolve().parents[2]
SHIPPED = sorted((REPO / "configs" / "sft").glob("*.yaml"))


def _write(tmp_path, data, name="c.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


def test_defaults_and_overrides_in_every_form(tmp_path):
    path = _write(tmp_path, {"model": {"path": "m"}, "train": {"lr": 1e-3}})
    cfg = load_config(path, ["train.steps=7", "--train.batch_size", "3", "--seed=5", "lora.layers=[0, 1]",
                             "qat=true", "data.train_files=[a.jsonl, b.jsonl]"])
    assert isinstance(cfg, SFTConfig)
    assert cfg.model.path == "m" and cfg.train.lr == 1e-3
    assert cfg.train.steps == 7 and cfg.train.batch_size == 3 and cfg.train.seed == 5
    assert cfg.lora.layers == [0, 1] and cfg.qat is True
    assert cfg.data.train_files == ["a.jsonl", "b.jsonl"]


def test_unknown_key_in_file_names_key_file_and_suggestion(tmp_path):
    path = _write(tmp_path, {"train": {"learning_rate": 1e-3}}, "typo.yaml")
    with pytest.raises(ConfigError) as error:
        load_config(path)
    message = str(error.value)
    assert "typo.yaml" in message and "train.learning_rate" in message and "did you mean 'train.lr'" in message


def test_unknown_section_and_unknown_override(tmp_path):
    with pytest.raises(ConfigError, match="unknown key 'trian'"):
        load_config(_write(tmp_path, {"trian": {}}))
    with pytest.raises(ConfigError, match="command line.*'train.stesp'.*did you mean 'train.steps'"):
        load_config(None, ["train.stesp=3"])


def test_types_are_checked(tmp_path):
    with pytest.raises(ConfigError, match="train.steps: expected an integer"):
        load_config(None, ["train.steps=ten"])
    with pytest.raises(ConfigError, match="model.experts.*not one of"):
        load_config(None, ["model.experts=fp8"])
    with pytest.raises(ConfigError, match="lora.attention: expected true/false"):
        load_config(_write(tmp_path, {"lora": {"attention": "yes please"}}))
    assert load_config(None, ["train.lr=1"]).train.lr == 1.0  # int widens to float
    assert load_config(None, ["train.lr=3e-3"]).train.lr == 3e-3  # YAML 1.1 reads this as a string


def test_saved_config_round_trips(tmp_path):
    cfg = load_config(None, ["model.path=x", "train.steps=3", "lora.extra_targets=[lm_head]"])
    path = save_config(cfg, tmp_path / "out" / "config.yaml")
    assert load_config(path) == cfg


def test_split_cli():
    assert split_cli(["--config", "a.yaml", "x=1", "--resume", "latest"]) == ("a.yaml", ["x=1", "train.resume=latest"])
    assert split_cli(["--config=b.yaml"]) == ("b.yaml", [])


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_every_shipped_sft_config_parses_and_names_its_command(path):
    cfg = load_config(path)
    first = path.read_text().splitlines()[0]
    assert first.startswith("# ") and ("recipes/sft_" in first), first
    script = "sft_full.py" if "-full" in path.name else "sft_lora.py"
    assert script in first
    assert cfg.lora.enabled == ("-full" not in path.name)


def test_shipped_configs_exist():
    names = {p.name for p in SHIPPED}
    assert {"tiny-cpu-lora.yaml", "tiny-cpu-full.yaml", "20b-lora.yaml", "20b-full.yaml", "120b-lora.yaml",
            "120b-full.yaml"} <= names


@pytest.mark.parametrize("path", sorted((REPO / "configs" / "accelerate").glob("*.yaml")),
                         ids=lambda p: p.name)
def test_accelerate_configs_parse_and_name_their_command(path):
    data = yaml.safe_load(path.read_text())
    assert path.read_text().startswith("# accelerate launch --config_file configs/accelerate/")
    assert data["distributed_type"] in ("NO", "FSDP", "DEEPSPEED", "MULTI_GPU")
    if data["distributed_type"] == "FSDP":
        assert data["fsdp_config"]["fsdp_version"] == 2


def _checkpointed_run(tmp_path, data):
    """A run folder whose checkpoint-2 carries the resolved config, as the trainer writes it."""
    path = _write(tmp_path, data)
    out = tmp_path / "run"
    checkpoint = out / "checkpoint-2"
    checkpoint.mkdir(parents=True)
    (checkpoint / "trainer_state.json").write_text("{}")
    save_config(load_config(path, [f"train.output_dir={out}"]), checkpoint / "config.yaml")
    return path, out, checkpoint


def test_resume_with_a_changed_config_names_the_changed_keys(tmp_path):
    path, out, checkpoint = _checkpointed_run(
        tmp_path, {"model": {"path": "m"}, "lora": {"r": 16}, "data": {"max_length": 512}})
    with pytest.raises(ConfigError) as error:
        load_config(path, [f"train.output_dir={out}", "lora.r=8", "data.max_length=256", "--resume", "latest"])
    message = str(error.value)
    assert str(checkpoint) in message
    assert "lora.r: 16 in the checkpoint, 8 now" in message
    assert "data.max_length: 512 in the checkpoint, 256 now" in message
    assert "train.output_dir" in message and "--config" in message  # says how to go on
    assert "lora.alpha" not in message.split("Only")[0]  # unchanged keys are not listed
    with pytest.raises(ConfigError, match="lora.r"):  # an explicit checkpoint path is checked the same way
        load_config(path, [f"train.output_dir={out}", "lora.r=8", f"train.resume={checkpoint}"])


def test_resume_may_extend_the_run_and_change_reporting(tmp_path):
    path, out, _ = _checkpointed_run(tmp_path, {"model": {"path": "m"}, "train": {"steps": 4}})
    cfg = load_config(path, [f"train.output_dir={out}", "train.steps=8", "train.logging=none", "train.resume=latest"])
    assert cfg.train.steps == 8 and cfg.train.resume == "latest"
    # no checkpoint yet: nothing to compare, the run starts fresh
    assert load_config(path, [f"train.output_dir={tmp_path / 'new'}", "lora.r=4", "--resume", "latest"]).lora.r == 4


def test_scheduler_kwargs_must_belong_to_the_scheduler(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  lr_scheduler: warmup_stable_decay\n  lr_scheduler_kwargs: {num_decay_steps: 10}\n")
    assert load_config(path).train.lr_scheduler_kwargs == {"num_decay_steps": 10}
    with pytest.raises(ConfigError, match=r"\['num_decay_steps'\] are not arguments of the 'linear' schedule"):
        load_config(path, ["train.lr_scheduler=linear"])
    assert load_config(path, ["train.lr_scheduler=linear", "train.lr_scheduler_kwargs={}"]).train.lr_scheduler == "linear"
