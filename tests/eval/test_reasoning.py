"""Reasoning suites on their bundled items: the oracle scores 1, wrong answers 0, and only the FINAL channel counts."""

import pytest

from gptoss_train.eval import run_suite
from gptoss_train.eval.backends.oracle import FunctionBackend, canned_turn
from gptoss_train.eval.core import get_suite
from gptoss_train.eval.harmony_io import encode_with_specials, result_from_tokens
from gptoss_train.eval.suites.reasoning import REASONING_SUITES, DataUnavailableError

WRONG_FINAL = "Answer: Z. \\boxed{-7}"


def _gold_text(request, samples):
    sample = samples[request.sample_id]
    return f"\\boxed{{{sample.data['answer']}}} Answer: {sample.data['answer']}"


@pytest.mark.parametrize("name", REASONING_SUITES)
def test_oracle_scores_one_and_wrong_backend_zero(name):
    results = run_suite(name, model="oracle", data="bundled", progress=False)
    assert results["metrics"]["medium"]["score"] == 1.0
    assert results["metrics"]["medium"]["n"] >= 5

    wrong = FunctionBackend(lambda request: canned_turn(analysis="hmm", final=WRONG_FINAL))
    results = run_suite(name, model=wrong, data="bundled", progress=False)
    metrics = results["metrics"]["medium"]
    assert metrics["score"] == 0.0
    assert metrics["failures"] == {"wrong_answer": metrics["n"]}


@pytest.mark.parametrize("name", REASONING_SUITES)
def test_answer_in_analysis_only_does_not_count(name):
    suite = get_suite(name)
    samples = {s.id: s for s in suite.samples(data="bundled")}
    # Right answer in the analysis, wrong one in the final message: wrong.
    analysis_right = FunctionBackend(lambda r: canned_turn(analysis=_gold_text(r, samples), final=WRONG_FINAL))
    metrics = run_suite(suite, model=analysis_right, data="bundled", progress=False)["metrics"]["medium"]
    assert metrics["score"] == 0.0
    # Right answer in the analysis and the turn cut before any final message: counted as truncated, not as correct.
    def cut(request):
        tokens = encode_with_specials(f"<|channel|>analysis<|message|>{_gold_text(request, samples)}")
        return result_from_tokens(tokens)

    metrics = run_suite(suite, model=FunctionBackend(cut), data="bundled", progress=False)["metrics"]["medium"]
    assert metrics["score"] == 0.0
    assert metrics["failures"] == {"truncated": metrics["n"]}


def test_turn_ending_without_final_is_no_final():
    suite = get_suite("gsm8k")
    samples = {s.id: s for s in suite.samples(data="bundled")}
    only_analysis = FunctionBackend(lambda r: result_from_tokens(encode_with_specials(
        f"<|channel|>analysis<|message|>{_gold_text(r, samples)}<|end|><|start|>assistant<|channel|>analysis"
        f"<|message|>still thinking<|return|>")))
    metrics = run_suite(suite, model=only_analysis, data="bundled", progress=False)["metrics"]["medium"]
    assert metrics["failures"] == {"no_final": metrics["n"]}


def test_gpqa_options_are_shuffled_with_the_seed():
    suite = get_suite("gpqa-diamond")
    first = [s.data for s in suite.samples(data="bundled", seed=0)]
    again = [s.data for s in suite.samples(data="bundled", seed=0)]
    other = [s.data for s in suite.samples(data="bundled", seed=1)]
    assert first == again
    assert first != other
    for data in first:  # the gold letter points at the correct option text
        assert sorted(data["choices"]) == sorted(set(data["choices"]))
    gold_letters = {d["answer"] for d in first}
    assert len(gold_letters) > 1, "the correct option should not always sit at the same letter"
    request = suite.build_request(suite.samples(data="bundled", seed=0)[0], reasoning_effort="low")
    assert "Answer: $LETTER" in request.messages[0]["content"] and "A) " in request.messages[0]["content"]
    assert request.reasoning_effort == "low"


def test_local_data_file_and_clear_errors(tmp_path):
    data = tmp_path / "mine.jsonl"
    data.write_text('{"question": "1+1?", "answer": "#### 2"}\n{"question": "2+2?", "answer": "#### 4"}\n')
    results = run_suite("gsm8k", model="oracle", data=str(data), progress=False)
    assert results["metrics"]["medium"]["n"] == 2 and results["metrics"]["medium"]["score"] == 1.0

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "1+1?", "answer": "#### 2"}\n{"question": oops}\n')
    with pytest.raises(DataUnavailableError, match="bad.jsonl:2"):
        list(get_suite("gsm8k").samples(data=str(bad)))
    wrong_schema = tmp_path / "schema.jsonl"
    wrong_schema.write_text('{"problem": "1+1?", "solution": "2"}\n')
    with pytest.raises(DataUnavailableError, match="missing field"):
        list(get_suite("gsm8k").samples(data=str(wrong_schema)))


def test_offline_hub_load_says_how_to_pass_a_file(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataUnavailableError, match="--data FILE.jsonl"):
        list(get_suite("math500").samples())


def test_small_budget_for_high_effort_warns():
    results = run_suite("aime25", model="oracle", data="bundled", effort="high", max_tokens=1024, progress=False)
    assert any("recommended" in w for w in results["warnings"])
    results = run_suite("aime25", model="oracle", data="bundled", effort="high", progress=False)
    assert results["warnings"] == []
    assert results["config"]["generation"]["high"]["max_tokens"] == 65536
