"""Tiny gpt-oss models for the kernel tests: 2 layers (sliding + full), 4 experts top-2, small vocab, float32 on CPU.

The kernels never look at token ids, so a 512-token vocabulary keeps these tests fast (the 201k one dominates memory)."""

import pytest
import torch
from transformers import GptOssConfig, GptOssForCausalLM


def tiny_config(**overrides) -> GptOssConfig:
    settings = dict(
        vocab_size=512, hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, num_local_experts=4, num_experts_per_tok=2, sliding_window=4,
        layer_types=["sliding_attention", "full_attention"], max_position_embeddings=131072, attention_dropout=0.0,
        tie_word_embeddings=False, pad_token_id=0,
    )
    settings.update(overrides)
    return GptOssConfig(**settings)


def build_tiny_model(seed: int = 0, **overrides) -> GptOssForCausalLM:
    torch.manual_seed(seed)
    config = tiny_config(**overrides)
    config._attn_implementation = "eager"
    model = GptOssForCausalLM(config).float().eval()
    with torch.no_grad():  # non-zero biases and sinks so their paths are exercised
        for name, param in model.named_parameters():
            if name.endswith(("_bias", "sinks")) or "router" in name:
                param.normal_(0, 0.5 if "sinks" in name else 0.05)
    return model


@pytest.fixture
def tiny_model_factory():
    return build_tiny_model


def add_lora(model, *, rank: int = 4, experts: bool = True, seed: int = 1):
    """PEFT LoRA on attention (+ every expert) with random A and B, so every factor receives a non-zero gradient."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
        target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"] if experts else None,
        init_lora_weights=False,
    )
    torch.manual_seed(seed)
    return get_peft_model(model, config)


def lora_grads(model) -> dict:
    return {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-30))


def assert_same_lora_grads(reference, fast, tol: float, *, nonzero: bool = False) -> None:
    """Every trainable parameter's gradient of ``fast`` within ``tol`` (relative) of ``reference``'s."""
    ref_grads = lora_grads(reference)
    for name, grad in lora_grads(fast).items():
        if nonzero:
            assert grad.abs().sum() > 0, name
        assert rel_err(grad, ref_grads[name]) < tol, name


def assert_same_training(reference, fast, ids, *, grad_tol: float, loss_tol: float | None = 1e-5) -> None:
    """One forward + backward of both models on ``ids`` (labels = ids): same loss, same LoRA gradients."""
    ref_loss, fast_loss = reference(input_ids=ids, labels=ids).loss, fast(input_ids=ids, labels=ids).loss
    ref_loss.backward()
    fast_loss.backward()
    if loss_tol is not None:
        assert rel_err(fast_loss, ref_loss) < loss_tol
    assert_same_lora_grads(reference, fast, grad_tol)
