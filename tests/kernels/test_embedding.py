"""Frozen input embeddings in host memory (opt-in): same loss and LoRA gradients, restorable, never a trained table."""

import copy

import torch

from gptoss_train.kernels import enable_fast_training, offload_frozen_embeddings, restore_embeddings

from conftest import add_lora, assert_same_training, build_tiny_model


def test_offloaded_embeddings_train_the_same():
    model = build_tiny_model()
    reference, fast = add_lora(copy.deepcopy(model)), add_lora(copy.deepcopy(model))
    reference.train()
    fast.train()
    description = enable_fast_training(fast, recompute="layer", offload_embeddings=True, force=True)
    assert "embeddings=host memory" in description
    embed = fast.get_base_model().model.embed_tokens
    assert embed.weight.shape == (512, 64) and embed.weight.untyped_storage().nbytes() <= 4  # placeholder
    ids = torch.randint(0, 512, (2, 10), generator=torch.Generator().manual_seed(7))
    assert_same_training(reference, fast, ids, grad_tol=1e-4)
    assert restore_embeddings(fast)
    assert torch.equal(fast.get_base_model().model.embed_tokens.weight,
                       reference.get_base_model().model.embed_tokens.weight)


def test_trained_embeddings_stay():
    model = build_tiny_model()
    model.model.embed_tokens.weight.requires_grad_(True)
    assert offload_frozen_embeddings(model) == 0
    assert model.model.embed_tokens.weight.untyped_storage().nbytes() > 4
