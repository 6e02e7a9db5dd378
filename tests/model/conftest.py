"""Fixtures for the model tests: tokens and the tiny checkpoint loaded both ways (loaded once per module)."""

from __future__ import annotations

import pytest
import torch

# 24 tokens: longer than the tiny model's sliding window (16), Harmony specials included
TOKENS = [200006, 17360, 200008, 3575, 553, 261, 10297, 20837, 13, 200007, 200006, 1428, 200008, 12194, 0, 1, 2, 3,
          4, 5, 6, 7, 8, 200007]


@pytest.fixture(scope="module")
def input_ids():
    return torch.tensor([TOKENS, TOKENS[::-1]])


@pytest.fixture(scope="module")
def dense_model(tiny_checkpoint):
    from gptoss_train.model.load import load_model

    return load_model(tiny_checkpoint, experts="bf16")


@pytest.fixture(scope="module")
def mxfp4_model(tiny_checkpoint):
    from gptoss_train.model.load import load_model

    return load_model(tiny_checkpoint, experts="mxfp4")
