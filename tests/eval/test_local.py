"""The local transformers backend on the tiny checkpoint."""

import torch

from gptoss_train.eval import run_suite
from gptoss_train.eval.core import GenerationRequest
from gptoss_train.eval.harmony_io import prompt_tokens
from gptoss_train.harmony.encoding import ASSISTANT_STOP_TOKENS, ENDOFTEXT


def _request(text, **kwargs):
    return GenerationRequest(messages=[{"role": "user", "content": text}], reasoning_effort="low", max_tokens=12,
                             temperature=0.0, **kwargs)


def test_greedy_matches_transformers_generate(tiny_local_backend):
    backend = tiny_local_backend
    assert backend.generation_path == "hf" and backend.describe()["model_fingerprint"]
    request = _request("What is 2+2?")
    ids = prompt_tokens(request)
    assert ids[-2:] == [200006, 173781]  # <|start|>assistant
    result = backend.generate(request)
    with torch.no_grad():
        reference = backend.model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                           max_new_tokens=12, do_sample=False, eos_token_id=list(ASSISTANT_STOP_TOKENS),
                                           pad_token_id=ENDOFTEXT)[0, len(ids):].tolist()
    while reference and reference[-1] == ENDOFTEXT:
        reference.pop()
    assert result.tokens == reference
    assert result.usage["completion_tokens"] == len(reference) and result.usage["prompt_tokens"] == len(ids)
    # a random model rarely stops: the turn is truncated, and counted as such
    if reference[-1] not in ASSISTANT_STOP_TOKENS:
        assert result.finish_reason == "truncated"


def test_batch_with_padding_matches_single_rows(tiny_local_backend):
    requests = [_request("Hi"), _request("Tell me a much longer story about a cat and a dog, please.")]
    batched = tiny_local_backend.generate_batch(requests)
    singles = [tiny_local_backend.generate(r) for r in requests]
    # left padding with an attention mask: same greedy tokens as one row at a time (float32, tiny model)
    assert [r.tokens for r in batched] == [r.tokens for r in singles]


def test_demo_suite_runs_on_the_tiny_model(tiny_local_backend, tmp_path):
    results = run_suite("demo", model=tiny_local_backend, limit=2, max_tokens=8, out_dir=tmp_path, progress=False)
    metrics = results["metrics"]["medium"]
    assert metrics["n"] == 2 and 0.0 <= metrics["score"] <= 1.0
    assert sum(metrics["failures"].values()) + metrics["pass_rate"] * 2 == 2
    assert (tmp_path / "report.html").is_file()
