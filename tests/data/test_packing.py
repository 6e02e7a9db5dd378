"""Packing: rows, position ids, and a tiny GptOss proving that packed examples never attend to each other."""

from __future__ import annotations

import pytest
import torch

from gptoss_train.data import PackedSequence, enable_packed_attention, pack_examples, packing_efficiency
from gptoss_train.data.collator import IGNORE_INDEX, HarmonyDataCollator
from gptoss_train.data.packing import packed_attention_masks


def _example(length, seed):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 50_000, (length,), generator=generator).tolist()
    mask = [0] * (length // 2) + [1] * (length - length // 2)
    return {"input_ids": ids, "loss_mask": mask}


def test_best_fit_decreasing_and_positions():
    examples = [_example(n, i) for i, n in enumerate([30, 70, 20, 50, 45, 10])]
    rows = pack_examples(examples, 100)
    assert [row.lengths for row in rows] == [[70, 30], [50, 45], [20, 10]]
    for row in rows:
        assert len(row) <= 100
        expected = [p for n in row.lengths for p in range(n)]
        assert row.position_ids == expected
    # Every example appears exactly once, its tokens and mask intact and contiguous.
    pieces = []
    for row in rows:
        offset = 0
        for n in row.lengths:
            pieces.append((row.input_ids[offset:offset + n], row.loss_mask[offset:offset + n]))
            offset += n
    assert sorted(pieces) == sorted((e["input_ids"], e["loss_mask"]) for e in examples)
    assert packing_efficiency(rows, 100) == pytest.approx(225 / 300)


def test_too_long_example_is_an_error():
    with pytest.raises(ValueError, match="example 1 has 12 tokens > max_length=10"):
        pack_examples([_example(5, 0), _example(12, 1)], 10)


def test_collator_packed_and_unpacked():
    rows = [PackedSequence(), PackedSequence()]
    rows[0].add([1, 2, 3], [0, 1, 1])
    rows[0].add([4, 5], [0, 1])
    rows[1].add([6, 7], [1, 1])
    batch = HarmonyDataCollator(pad_to_multiple_of=8)([row.to_dict() for row in rows])
    assert set(batch) == {"input_ids", "labels", "position_ids"}  # no attention_mask: packing comes from positions
    assert batch["input_ids"].shape == (2, 8)
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1, 2], [0, 1, 0, 1, 2, 3, 4, 5]]
    assert batch["labels"].tolist() == [[-100, 2, 3, -100, 5, -100, -100, -100], [6, 7] + [IGNORE_INDEX] * 6]
    assert batch["input_ids"][1, 2:].tolist() == [199999] * 6
    plain = HarmonyDataCollator()([{"input_ids": [1, 2, 3], "loss_mask": [0, 0, 1]},
                                   {"input_ids": [4], "assistant_masks": [1]}])
    assert plain["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert plain["labels"].tolist() == [[-100, -100, 3], [4, -100, -100]]
    with pytest.raises(KeyError):
        HarmonyDataCollator()([{"input_ids": [1]}])


@pytest.fixture(scope="module")
def tiny_model():
    from transformers import GptOssConfig, GptOssForCausalLM

    torch.manual_seed(0)
    config = GptOssConfig(vocab_size=201088, hidden_size=32, intermediate_size=32, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_local_experts=4,
                          num_experts_per_tok=2, sliding_window=8,
                          layer_types=["sliding_attention", "full_attention"])
    return GptOssForCausalLM(config).eval()


def test_packed_logits_equal_each_example_alone(tiny_model):
    assert tiny_model.config._attn_implementation == "eager"
    examples = [_example(n, seed) for seed, n in enumerate([23, 31, 12, 27])]  # longer than the sliding window
    rows = pack_examples(examples, 64)
    batch = HarmonyDataCollator()([row.to_dict() for row in rows])
    with torch.no_grad():
        # Without the hook transformers 5.23's GptOss ignores position_ids for masking: attention crosses examples.
        leaky = tiny_model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
        handle = enable_packed_attention(tiny_model)
        try:
            packed = tiny_model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
        finally:
            handle.remove()
        worst_leak = 0.0
        for row_index, row in enumerate(rows):
            offset = 0
            for n in row.lengths:
                alone = tiny_model(input_ids=torch.tensor([row.input_ids[offset:offset + n]])).logits[0]
                torch.testing.assert_close(packed[row_index, offset:offset + n], alone, atol=1e-5, rtol=1e-5)
                worst_leak = max(worst_leak, (leaky[row_index, offset:offset + n] - alone).abs().max().item())
                offset += n
    assert worst_leak > 1e-3  # proves the test can fail: the plain model mixes the examples


def test_packed_masks_are_block_diagonal(tiny_model):
    positions = torch.tensor([[0, 1, 2, 0, 1, 2, 3, 4, 5, 6, 7, 8]])
    masks = packed_attention_masks(tiny_model.config, positions)
    allowed = masks["full_attention"][0, 0] == 0  # eager masks are additive: 0 = attend
    assert allowed[4].tolist() == [False] * 3 + [True] * 2 + [False] * 7
    assert not allowed[:3, 3:].any() and not allowed[3:, :3].any()
    sliding = masks["sliding_attention"][0, 0] == 0
    assert sliding[11].tolist() == [False] * 4 + [True] * 8  # window 8 inside the second example
    assert packed_attention_masks(tiny_model.config, torch.arange(6)[None]) is None


def test_packed_loss_equals_separate_losses(tiny_model):
    """A plain-loop forward on a collated packed batch gives the token-mean loss of the examples run alone."""
    examples = [_example(n, 10 + seed) for seed, n in enumerate([18, 25, 9])]
    batch = HarmonyDataCollator()([row.to_dict() for row in pack_examples(examples, 64)])
    handle = enable_packed_attention(tiny_model)
    try:
        with torch.no_grad():
            packed_loss = tiny_model(**batch).loss
    finally:
        handle.remove()
    total, count = 0.0, 0
    with torch.no_grad():
        for example in examples:
            alone = HarmonyDataCollator()([example])
            n = int((alone["labels"][0, 1:] != IGNORE_INDEX).sum())
            total += tiny_model(**alone).loss.item() * n
            count += n
    assert packed_loss.item() == pytest.approx(total / count, rel=1e-5)
