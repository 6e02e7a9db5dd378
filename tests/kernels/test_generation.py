"""FastGenerator on CPU against transformers' own generate(): greedy tokens, continuous batching, ring buffers,
unmerged LoRA, stop tokens, seeded sampling."""

from __future__ import annotations

import pytest
import torch
from transformers import GptOssConfig, GptOssForCausalLM

from gptoss_train.kernels.gen_model import KVCache, collect_weights, prefill
from gptoss_train.kernels.generation import FastGenerator, fast_generation_available

WINDOW = 8  # small sliding window: prompts and completions run well past it, so the ring buffer wraps


def _tiny_model(seed: int = 0) -> GptOssForCausalLM:
    # Full 201k vocab so the Harmony stop ids are real tokens; small everything else.
    torch.manual_seed(seed)
    config = GptOssConfig(
        vocab_size=201088, hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, num_local_experts=4, num_experts_per_tok=2, sliding_window=WINDOW,
        layer_types=["sliding_attention", "full_attention"], max_position_embeddings=4096,
    )
    config._attn_implementation = "eager"
    model = GptOssForCausalLM(config).float().eval()
    with torch.no_grad():  # non-zero biases, sinks and router so every path matters
        for name, param in model.named_parameters():
            if name.endswith(("_bias", "sinks")) or "router" in name:
                param.normal_(0, 0.5 if "sinks" in name else 0.05)
    return model


@pytest.fixture(scope="module")
def model():
    return _tiny_model()


PROMPTS = [list(range(5, 18)), [100, 200, 300], list(range(1000, 1030)), [7, 7, 7, 7, 7, 7, 7, 7, 7]]


def _reference(model, prompt: list[int], new: int) -> list[int]:
    out = model.generate(torch.tensor([prompt]), max_new_tokens=new, min_new_tokens=new, do_sample=False)
    return out[0, len(prompt):].tolist()


def test_greedy_matches_transformers_with_continuous_batching(model):
    # 4 prompts of different lengths through 2 slots: slots are freed and refilled while others decode.
    gen = FastGenerator(model, max_batch=2, max_seq_len=64)
    ours = gen.generate(PROMPTS, max_new_tokens=20, temperature=0, stop_ids=())
    assert gen.stats.decode_steps > 0 and gen.stats.prefill_s > 0
    for prompt, completion in zip(PROMPTS, ours):
        assert completion == _reference(model, prompt, 20)


def test_prefill_logits_match_model_forward(model):
    w = collect_weights(model, max_seq_len=64)
    cache = KVCache(w, slots=2, max_seq_len=64)
    prompts = [PROMPTS[0], PROMPTS[2]]  # packed into one forward
    logits = prefill(w, cache, prompts, [1, 0], use_grouped=True, q_chunk=7, all_logits=True)
    start = 0
    for p in prompts:
        with torch.no_grad():
            ref = model(torch.tensor([p])).logits[0]
        got = logits[start:start + len(p)]
        assert float((got - ref).norm() / ref.norm()) < 1e-5
        start += len(p)


def test_unmerged_lora_on_attention_and_experts_matches_peft(model):
    from peft import LoraConfig, get_peft_model

    base = _tiny_model(seed=3)
    config = LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
        target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"], init_lora_weights=False,
    )
    torch.manual_seed(5)
    peft_model = get_peft_model(base, config).eval()
    with torch.no_grad():  # large enough that ignoring any one adapter changes the greedy tokens
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.normal_(0, 0.3)
    prompts = [PROMPTS[0], PROMPTS[1]]
    ours = FastGenerator(peft_model, max_batch=2, max_seq_len=64).generate(
        prompts, max_new_tokens=12, temperature=0, stop_ids=()
    )
    for prompt, completion in zip(prompts, ours):
        assert completion == _reference(peft_model, prompt, 12)
    with peft_model.disable_adapter():
        plain = FastGenerator(peft_model, max_batch=2, max_seq_len=64).generate(
            prompts, max_new_tokens=12, temperature=0, stop_ids=()
        )
    assert plain != ours  # the adapter really is applied


def test_stop_token_ends_only_its_sequence(model):
    gen = FastGenerator(model, max_batch=4, max_seq_len=64)
    free_run = gen.generate(PROMPTS[:2], max_new_tokens=16, temperature=0, stop_ids=())
    stop = free_run[0][5]
    cut = free_run[0].index(stop) + 1
    stopped = gen.generate(PROMPTS[:2], max_new_tokens=16, temperature=0, stop_ids=(stop,))
    assert stopped[0] == free_run[0][:cut]  # stop token included, nothing after it
    expected_second = free_run[1][: free_run[1].index(stop) + 1] if stop in free_run[1] else free_run[1]
    assert stopped[1] == expected_second


def test_max_seq_len_truncates(model):
    gen = FastGenerator(model, max_batch=1, max_seq_len=20)
    out = gen.generate([PROMPTS[0]], max_new_tokens=50, temperature=0, stop_ids=())
    assert len(PROMPTS[0]) + len(out[0]) == 20
    assert out[0] == _reference(model, PROMPTS[0], len(out[0]))


def test_seeded_sampling_is_reproducible(model):
    gen = FastGenerator(model, max_batch=2, max_seq_len=64)
    prompts = PROMPTS[:3]
    a = gen.generate(prompts, max_new_tokens=6, temperature=1.0, seed=123, stop_ids=())
    b = gen.generate(prompts, max_new_tokens=6, temperature=1.0, seed=123, stop_ids=())
    c = gen.generate(prompts, max_new_tokens=6, temperature=1.0, seed=124, stop_ids=())
    assert a == b
    assert a != c
    greedy = gen.generate(prompts, max_new_tokens=6, temperature=0, stop_ids=())
    # A nucleus that holds only the top token is greedy decoding, whatever the seed.
    assert gen.generate(prompts, max_new_tokens=6, temperature=1.0, top_p=1e-6, seed=7, stop_ids=()) == greedy


def test_sampling_follows_the_distribution():
    logits = torch.log(torch.tensor([[0.7, 0.2, 0.1, 0.0]]).expand(20000, 4).contiguous())
    g = torch.Generator().manual_seed(0)
    draws = FastGenerator._sample(logits, 1.0, 1.0, g)
    freq = torch.bincount(draws, minlength=4).float() / draws.numel()
    assert torch.allclose(freq, torch.tensor([0.7, 0.2, 0.1, 0.0]), atol=0.02)
    nucleus = FastGenerator._sample(logits, 1.0, 0.8, g)  # top-p 0.8 keeps {0.7, 0.2}
    freq = torch.bincount(nucleus, minlength=4).float() / nucleus.numel()
    assert torch.allclose(freq, torch.tensor([0.7 / 0.9, 0.2 / 0.9, 0.0, 0.0]), atol=0.02)


def test_bad_input_is_rejected_clearly(model):
    gen = FastGenerator(model, max_batch=1, max_seq_len=16)
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        gen.generate([[1, 2], []], max_new_tokens=2)
    with pytest.raises(ValueError, match="max_seq_len"):
        gen.generate([list(range(16))], max_new_tokens=2)
    with pytest.raises(ValueError, match="outside"):
        gen.generate([[1, 10**7]], max_new_tokens=2)


def test_fast_generation_not_offered_for_a_cpu_model(model):
    # The eval backend keeps transformers' generate() for models that do not live on a CUDA device.
    assert fast_generation_available(model) is False


def test_mxfp4_resident_experts_generate_like_their_decoded_dense_model():
    from gptoss_train.kernels.moe import attach_mxfp4_experts
    from gptoss_train.quant.mxfp4 import decode, encode

    dense, packed_model = _tiny_model(seed=4), _tiny_model(seed=4)
    with torch.no_grad():
        for dense_layer, packed_layer in zip(dense.model.layers, packed_model.model.layers):
            packed = {}
            for name in ("gate_up_proj", "down_proj"):
                weight = getattr(dense_layer.mlp.experts, name)  # [E, in, out]
                blocks, scales = encode(weight.detach().transpose(-1, -2).contiguous())  # HF layout [E, out, G, 16]
                weight.copy_(decode(blocks, scales, dtype=torch.float32, transpose=True))
                packed[name] = (blocks, scales)
            attach_mxfp4_experts(packed_layer.mlp.experts, *packed["gate_up_proj"], *packed["down_proj"])
    prompts = [PROMPTS[0], PROMPTS[2]]
    ours = FastGenerator(packed_model, max_batch=2, max_seq_len=64).generate(
        prompts, max_new_tokens=12, temperature=0, stop_ids=()
    )
    for prompt, completion in zip(prompts, ours):
        assert completion == _reference(dense, prompt, 12)
