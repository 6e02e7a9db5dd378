"""enable_fast_training: CPU returns None; with force the whole fast path (and each recompute choice) matches eager."""

import copy

import pytest
import torch

from gptoss_train.kernels import RECOMPUTE_CHOICES, enable_fast_training

from conftest import add_lora, assert_same_training, build_tiny_model


def test_cpu_model_keeps_the_reference_path():
    model = build_tiny_model()
    assert enable_fast_training(model) is None
    assert model.config._attn_implementation == "eager"


@pytest.mark.parametrize("recompute", RECOMPUTE_CHOICES)
def test_full_fast_path_matches_reference(recompute):
    model = build_tiny_model()
    reference = add_lora(copy.deepcopy(model))
    fast = add_lora(copy.deepcopy(model))
    reference.train()
    fast.train()
    description = enable_fast_training(fast, recompute=recompute, force=True)
    assert "attention=gptoss_flex_sinks" in description and f"recompute={recompute}" in description
    ids = torch.randint(0, 512, (2, 10), generator=torch.Generator().manual_seed(7))
    assert_same_training(reference, fast, ids, grad_tol=1e-2)


def test_unknown_recompute_is_refused():
    with pytest.raises(ValueError, match="recompute="):
        enable_fast_training(build_tiny_model(), recompute="everything", force=True)
