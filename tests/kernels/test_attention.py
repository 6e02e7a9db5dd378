"""Sink attention (CPU reference path, same mask predicate and sink fold as the FlexAttention path) vs eager."""

import copy

import torch

from gptoss_train.kernels.attention import (ATTENTION_NAME, dense_mask, document_ids_from_positions,
                                            install_sink_attention, make_mask_mod)

from conftest import add_lora, build_tiny_model, lora_grads, rel_err


def test_document_ids_restart_where_positions_restart():
    positions = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3]])
    assert document_ids_from_positions(positions, 1).tolist() == [[1, 1, 1, 2, 2, 3, 3, 3, 3]]
    # a plain arange (one document, broadcast over the batch) is one document per row
    assert document_ids_from_positions(torch.arange(5)[None], 2).tolist() == [[1] * 5, [1] * 5]


def test_mask_combines_causal_window_and_documents():
    doc = torch.tensor([[1, 1, 1, 1, 2, 2]])
    mask = dense_mask(make_mask_mod(doc, None, sliding_window=2), 1, 6, 6, "cpu")[0, 0]
    expected = torch.zeros(6, 6, dtype=torch.bool)
    for q in range(6):
        for k in range(6):
            expected[q, k] = k <= q and k > q - 2 and doc[0, q] == doc[0, k]
    assert torch.equal(mask, expected)


def test_loss_and_lora_grads_match_eager():
    model = build_tiny_model()
    ids = torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(0))
    reference = add_lora(copy.deepcopy(model), experts=False)
    fast = add_lora(copy.deepcopy(model), experts=False)
    assert install_sink_attention(fast) == ATTENTION_NAME
    assert fast.get_base_model().config._attn_implementation == ATTENTION_NAME

    ref_out = reference(input_ids=ids, labels=ids)
    fast_out = fast(input_ids=ids, labels=ids)
    ref_out.loss.backward()
    fast_out.loss.backward()
    assert rel_err(fast_out.logits, ref_out.logits) < 1e-5
    ref_grads = lora_grads(reference)
    for name, grad in lora_grads(fast).items():
        assert rel_err(grad, ref_grads[name]) < 1e-2, name


def test_sink_gradients_match_eager():
    reference = build_tiny_model()
    fast = copy.deepcopy(reference)
    install_sink_attention(fast)
    ids = torch.randint(0, 512, (1, 10), generator=torch.Generator().manual_seed(1))
    for model in (reference, fast):
        model(input_ids=ids, labels=ids).loss.backward()
    for layer in range(2):
        ref_sinks = reference.model.layers[layer].self_attn.sinks.grad
        fast_sinks = fast.model.layers[layer].self_attn.sinks.grad
        assert rel_err(fast_sinks, ref_sinks) < 1e-4


def test_packed_documents_do_not_attend_across():
    """Two examples packed in one row (positions restart at 0) give the same logits as each example alone."""
    model = build_tiny_model()
    fast = copy.deepcopy(model)
    install_sink_attention(fast)
    gen = torch.Generator().manual_seed(2)
    first, second = torch.randint(0, 512, (1, 7), generator=gen), torch.randint(0, 512, (1, 6), generator=gen)
    packed = torch.cat([first, second], dim=1)
    positions = torch.cat([torch.arange(7), torch.arange(6)])[None]
    with torch.no_grad():
        packed_logits = fast(input_ids=packed, position_ids=positions).logits
        alone = torch.cat([model(input_ids=first).logits, model(input_ids=second).logits], dim=1)
        unpacked = fast(input_ids=packed).logits  # without position_ids: one document, so they do mix
    assert rel_err(packed_logits, alone) < 1e-5
    assert rel_err(unpacked[:, 7:], alone[:, 7:]) > 1e-3


def test_right_padding_matches_eager():
    model = build_tiny_model()
    fast = copy.deepcopy(model)
    install_sink_attention(fast)
    ids = torch.randint(1, 512, (2, 9), generator=torch.Generator().manual_seed(3))
    attention_mask = torch.ones_like(ids)
    attention_mask[1, 6:] = 0
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=attention_mask).logits
        out = fast(input_ids=ids, attention_mask=attention_mask).logits
    assert rel_err(out[0], ref[0]) < 1e-5
    assert rel_err(out[1, :6], ref[1, :6]) < 1e-5


def test_block_masks_are_reused_per_input_and_built_without_reading_the_gpu(monkeypatch):
    """One BlockMask per (positions, padding mask, window, shape) object: without positions (transformers' default
    ones, see test_layer) every step reuses it; a new batch's tensors build a new one. Building never reads values
    back: a batch of one document per row still gets the document lookup (same predicate, so the same mask)."""
    import torch.nn.attention.flex_attention as flex

    from gptoss_train.kernels import attention

    monkeypatch.setattr(attention, "_block_masks", attention._BlockMaskCache())
    built = []
    original = flex.create_block_mask
    monkeypatch.setattr(flex, "create_block_mask", lambda mask_mod, **kw: built.append(mask_mod) or original(mask_mod, **kw))
    monkeypatch.setattr(torch.Tensor, "__bool__", lambda self: (_ for _ in ()).throw(AssertionError("read back")))
    first = attention.layer_block_mask(None, None, 4, 2, 16, "cpu")
    assert attention.layer_block_mask(None, None, 4, 2, 16, "cpu") is first and len(built) == 1
    padding = torch.ones(2, 16, dtype=torch.bool)
    padded = attention.layer_block_mask(padding, None, 4, 2, 16, "cpu")
    assert attention.layer_block_mask(padding, None, 4, 2, 16, "cpu") is padded and len(built) == 2
    positions = torch.arange(16)[None]
    with_positions = attention.layer_block_mask(None, positions, 4, 2, 16, "cpu")
    assert len(built) == 3 and attention.layer_block_mask(None, positions.clone(), 4, 2, 16, "cpu") is not first
    monkeypatch.undo()
    assert torch.equal(with_positions.to_dense(), first.to_dense())


def test_mask_builder_hands_over_the_padding_mask_without_testing_it():
    from gptoss_train.kernels.attention import padding_mask_only

    mask = torch.ones(2, 10, dtype=torch.bool)
    assert padding_mask_only(2, 4, 4, attention_mask=None) is None
    assert padding_mask_only(2, 4, 4, attention_mask=mask).shape == (2, 4)
