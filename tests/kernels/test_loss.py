"""Chunked linear + cross-entropy vs transformers' full-logits loss."""

import copy

import torch
import torch.nn.functional as F

from gptoss_train.kernels.loss import causal_lm_chunked_loss, chunked_linear_cross_entropy, install_chunked_loss

from conftest import add_lora, build_tiny_model, lora_grads, rel_err


def _data(seed=0, n=37, hidden=16, vocab=50):
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(n, hidden, generator=gen, requires_grad=True)
    w = torch.randn(vocab, hidden, generator=gen, requires_grad=True)
    labels = torch.randint(0, vocab, (n,), generator=gen)
    labels[::5] = -100
    return h, w, labels


def test_value_and_gradients_match_full_logits_across_chunk_boundaries():
    h, w, labels = _data()
    ref = F.cross_entropy(h @ w.t(), labels, ignore_index=-100)
    ref_h, ref_w = torch.autograd.grad(ref, (h, w))
    loss = chunked_linear_cross_entropy(h, w, labels, chunk_size=8)  # 37 rows: 5 chunks, the last partial
    got_h, got_w = torch.autograd.grad(loss * 1.0, (h, w))
    assert rel_err(loss, ref) < 1e-6
    assert rel_err(got_h, ref_h) < 1e-5 and rel_err(got_w, ref_w) < 1e-5


def test_sum_over_num_items_in_batch_and_upstream_scale():
    h, w, labels = _data(1)
    ref = F.cross_entropy(h @ w.t(), labels, ignore_index=-100, reduction="sum") / 100
    (ref_h,) = torch.autograd.grad(3 * ref, (h,))
    loss = chunked_linear_cross_entropy(h, w.detach(), labels, num_items_in_batch=100, chunk_size=16)
    (got_h,) = torch.autograd.grad(3 * loss, (h,))
    assert rel_err(loss, ref) < 1e-6 and rel_err(got_h, ref_h) < 1e-5


def test_no_gradient_work_under_no_grad():
    h, w, labels = _data(2)
    with torch.no_grad():
        loss = chunked_linear_cross_entropy(h, w, labels, chunk_size=8)
    assert not loss.requires_grad
    assert rel_err(loss, F.cross_entropy(h @ w.t(), labels)) < 1e-6


def test_causal_shift_matches_transformers_loss():
    model = build_tiny_model()
    ids = torch.randint(0, 512, (2, 9), generator=torch.Generator().manual_seed(3))
    labels = ids.clone()
    labels[0, :3] = -100
    hidden = model.model(input_ids=ids).last_hidden_state
    expected = model(input_ids=ids, labels=labels).loss
    assert rel_err(causal_lm_chunked_loss(hidden, model.lm_head.weight, labels, chunk_size=4), expected) < 1e-6


def test_installed_loss_trains_like_reference():
    model = build_tiny_model()
    reference = add_lora(copy.deepcopy(model))
    fast = add_lora(copy.deepcopy(model))
    install_chunked_loss(fast, chunk_size=5)
    ids = torch.randint(0, 512, (2, 11), generator=torch.Generator().manual_seed(4))
    ref_out, fast_out = reference(input_ids=ids, labels=ids), fast(input_ids=ids, labels=ids)
    assert fast_out.logits is None
    ref_out.loss.backward()
    fast_out.loss.backward()
    assert rel_err(fast_out.loss, ref_out.loss) < 1e-6
    ref_grads = lora_grads(reference)
    for name, grad in lora_grads(fast).items():
        assert rel_err(grad, ref_grads[name]) < 1e-2, name
    with torch.no_grad():  # without labels the model's own forward (logits) is used
        assert fast(input_ids=ids).logits.shape == (2, 11, 512)


def test_trl_fused_lm_head_calls_pass_through():
    """TRL's SFTTrainer calls model(..., fused_lm_head=True) and reads log_probs: our loss must not intercept it."""
    from trl.trainer.utils import add_fused_lm_head

    model = build_tiny_model()
    ids = torch.randint(0, 512, (1, 8), generator=torch.Generator().manual_seed(5))
    expected = model(input_ids=ids, labels=ids).loss
    add_fused_lm_head(model)
    install_chunked_loss(model)
    out = model(input_ids=ids, labels=ids, fused_lm_head=True)
    assert rel_err(-out.log_probs.sum() / 7, expected) < 1e-5  # 7 scored positions (the last has no target)
    assert rel_err(model(input_ids=ids, labels=ids).loss, expected) < 1e-6  # plain calls use the chunked loss


def test_fused_chunk_gradient_equals_softmax_minus_onehot():
    """The per-chunk function compiled on CUDA: summed loss and (softmax - onehot) on valid rows, 0 on ignored."""
    from gptoss_train.kernels.loss import _chunk_loss_and_grad

    gen = torch.Generator().manual_seed(4)
    logits = torch.randn(9, 50, generator=gen, requires_grad=True)
    labels = torch.randint(0, 50, (9,), generator=gen)
    labels[2] = -100
    ref = F.cross_entropy(logits, labels, ignore_index=-100, reduction="sum")
    (ref_grad,) = torch.autograd.grad(ref, (logits,))
    loss_sum, grad = _chunk_loss_and_grad(logits.detach(), labels, -100)
    assert rel_err(loss_sum, ref) < 1e-6 and rel_err(grad, ref_grad) < 1e-6
    assert grad[2].abs().sum() == 0
