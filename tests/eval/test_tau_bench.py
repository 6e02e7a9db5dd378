"""tau-bench airline on the real tau2 data: oracle = 1.0, always-wrong = 0, reward rules, DB isolation, pass^k."""

from __future__ import annotations

import json

import pytest

from gptoss_train.eval.core import Backend, GenerationRequest, GenerationResult, SampleResult
from gptoss_train.eval.suites.tau_bench import TauBenchSuite
from gptoss_train.eval.tau.data import ACTION, COMMUNICATE, DB, load_tasks
from gptoss_train.eval.tau.environment import TOOL_NAMES, AirlineEnvironment, _pristine_db, db_hash, openai_tools
from gptoss_train.eval.tau.oracle import GoldActionsBackend, RefusingBackend, WrongActionsBackend
from gptoss_train.eval.tau.reward import communicate_checks, gold_state, pass_hat_k


def _final(text):
    return GenerationResult(text=text, final=text, analysis=None, tool_calls=[], finish_reason="return")


def _call(name, arguments):
    return GenerationResult(text="", final=None, analysis=None, finish_reason="call",
                            tool_calls=[{"name": name, "arguments": json.dumps(arguments),
                                         "parsed_arguments": arguments}])


def _full_dump(environment) -> str:
    """The whole DB as key-sorted JSON: the slow, obviously-right comparison the fast hash must agree with."""
    return json.dumps(environment.db.model_dump(mode="json"), sort_keys=True)


@pytest.fixture(scope="module")
def suite():
    return TauBenchSuite()


@pytest.fixture(scope="module")
def samples(suite):
    return suite.samples()


def test_real_data_is_loaded():
    tasks = load_tasks()
    assert len(tasks) == 50
    assert {t.split for t in tasks} == {"train", "test"}
    tools = openai_tools()
    assert [t["function"]["name"] for t in tools] == list(TOOL_NAMES) and len(tools) == 14
    assert "$ref" not in json.dumps(tools)  # Harmony renders schemas inline
    book = next(t for t in tools if t["function"]["name"] == "book_reservation")["function"]["parameters"]
    assert book["properties"]["flights"]["items"]["required"] == ["flight_number", "date"]
    assert book["properties"]["cabin"]["enum"] == ["business", "economy", "basic_economy"]


def test_oracle_scores_one_on_every_db_task(suite, samples):
    db_tasks = [s for s in samples if set(suite._task(s).reward_basis) <= {DB, COMMUNICATE, ACTION}]
    assert len(db_tasks) == 50  # every airline task is graded on DB + COMMUNICATE
    results = [suite.run_sample(s, suite.oracle(s)) for s in db_tasks]
    failed = [(r.id, r.details["trials"][0]["checks"]) for r in results if not r.passed]
    assert not failed
    metrics = suite.aggregate(results)
    assert metrics["score"] == 1.0 and metrics["pass^1"] == 1.0 and metrics["terminations"] == {"user_stop": 50}
    # the oracle went through real tool execution: 26 of the 50 tasks end with a changed DB
    pristine = db_hash(_pristine_db())
    changed = [r for r in results if r.details["trials"][0]["checks"]["db"]["agent_hash"] != pristine]
    assert len(changed) == sum(gold_state(t.id).db_hash != pristine for t in load_tasks()) > 20


def test_always_wrong_agent_scores_zero(suite, samples):
    results = [suite.run_sample(s, WrongActionsBackend(suite._task(s))) for s in samples]
    assert suite.aggregate(results)["score"] == 0.0
    assert all(r.failure == "wrong_answer" and r.details["trials"][0]["reward_breakdown"][DB] == 0.0 for r in results)


def test_refusing_agent_passes_exactly_the_do_nothing_tasks(suite, samples):
    """tau2 semantics, not a bug: refusing is right when the gold leaves the DB as is and nothing must be said."""
    pristine = db_hash(_pristine_db())
    results = {r.id: r for r in (suite.run_sample(s, RefusingBackend()) for s in samples)}
    for sample in samples:
        task = suite._task(sample)
        do_nothing = gold_state(task.id).db_hash == pristine and not task.communicate_info
        assert results[sample.id].passed == do_nothing, task.id


def test_fast_db_hash_agrees_with_full_dump(suite):
    """Copy-on-access tables + a delta hash must decide exactly like comparing the full DB JSON."""
    write_tasks = [t for t in load_tasks() if any(a.name in ("book_reservation", "cancel_reservation",
                                                              "update_reservation_flights") for a in t.actions)]
    for task in write_tasks[:2]:
        gold, same, agent = AirlineEnvironment(), AirlineEnvironment(), AirlineEnvironment()
        for action in task.actions:
            gold.execute(action.name, action.arguments)
            same.execute(action.name, action.arguments)
        for action in reversed(task.actions):  # another order: may or may not end in the same state
            agent.execute(action.name, action.arguments)
        wrong = AirlineEnvironment()
        wrong.execute("send_certificate", {"user_id": "mia_li_3668", "amount": 5})
        for other in (same, agent, wrong, AirlineEnvironment()):
            assert (gold.hash() == other.hash()) == (_full_dump(gold) == _full_dump(other))
        assert gold.hash() == same.hash() != wrong.hash()


def test_each_trial_gets_a_fresh_db(suite, samples):
    sample = samples[0]
    result = suite.run_sample(sample, WrongActionsBackend(suite._task(sample)), trials=3)
    hashes = {t["checks"]["db"]["agent_hash"] for t in result.details["trials"]}
    assert len(hashes) == 1  # a leaked DB would hold 2, then 3 certificates
    reservation_id = next(iter(_pristine_db().reservations))
    first = AirlineEnvironment()
    assert not first.execute("cancel_reservation", {"reservation_id": reservation_id}).error
    assert first.db.reservations[reservation_id].status == "cancelled"
    second = AirlineEnvironment()
    assert second.db.reservations[reservation_id].status != "cancelled"
    assert _pristine_db().reservations[reservation_id].status != "cancelled"
    assert second.hash() == db_hash(_pristine_db()) != first.hash()


def test_tool_errors_go_back_to_the_agent():
    env = AirlineEnvironment()
    assert env.execute("no_such_tool", {}).known_tool is False
    assert env.execute("get_user_details", "{not json").content.startswith("Error: arguments are not valid JSON")
    assert "invalid arguments" in env.execute("get_user_details", {}).content
    assert env.execute("get_user_details", {"user_id": "nobody_0"}).content == "Error: User nobody_0 not found"
    ok = env.execute("calculate", {"expression": "2 * (3 + 4)"})
    assert not ok.error and ok.content == "14.0"


def test_communicate_info_matching_follows_tau2():
    messages = [{"role": "user", "content": "refund 1,628?"},
                {"role": "assistant", "content": None, "tool_calls": []},
                {"role": "assistant", "content": "Your refund is $1,628 in total."}]
    assert communicate_checks(messages, ["1628"]) == [{"info": "1628", "met": True}]
    assert communicate_checks(messages, ["TOTAL"])[0]["met"]  # case-insensitive
    assert not communicate_checks(messages, ["refund 1628?x"])[0]["met"]
    assert not communicate_checks(messages[:1], ["1628"])[0]["met"]  # only the agent's words count


def test_communicate_info_is_part_of_the_reward(suite):
    task = next(t for t in load_tasks() if t.communicate_info)
    sample = next(s for s in suite.samples() if s.data["task_id"] == task.id)

    class Silent(GoldActionsBackend):
        def generate(self, request):
            result = super().generate(request)
            return _final("Done.") if result.final is not None else result

    result = suite.run_sample(sample, Silent(task))
    breakdown = result.details["trials"][0]["reward_breakdown"]
    assert breakdown == {DB: 1.0, COMMUNICATE: 0.0} and not result.passed


def test_premature_stop_scores_zero(suite, samples):
    """Task 0's right outcome is "change nothing"; an agent that never stops still gets 0 (tau2's rule)."""
    sample = samples[0]
    looping = type("Looping", (Backend,), {"generate": lambda self, r: _call("list_all_airports", {}),
                                           "prefers_scripted_user": True})()
    result = suite.run_sample(sample, looping, max_steps=5)
    trial = result.details["trials"][0]
    assert trial["termination"] == "max_steps" and result.score == 0.0 and result.failure == "no_final"


def test_nl_assertions_need_a_judge(suite, samples):
    subset = samples[:3]
    no_judge = [suite.run_sample(s, suite.oracle(s), reward_basis="DB,COMMUNICATE,NL_ASSERTION") for s in subset]
    metrics = suite.aggregate(no_judge)
    assert metrics["needs_judge"] == 3 and metrics["n"] == 0 and not any(r.failure for r in no_judge)

    class Judge(Backend):
        def __init__(self, met):
            self.met, self.requests = met, []

        def generate(self, request):
            self.requests.append(request)
            n = request.messages[0]["content"].count("\n", request.messages[0]["content"].index("Assertions:"))
            return _final(json.dumps({"results": [{"assertion": i + 1, "met": self.met} for i in range(n)]}))

    yes, no = Judge(True), Judge(False)
    sample = subset[0]
    passed = suite.run_sample(sample, suite.oracle(sample), reward_basis="DB,COMMUNICATE,NL_ASSERTION", judge=yes)
    failed = suite.run_sample(sample, suite.oracle(sample), reward_basis="DB,COMMUNICATE,NL_ASSERTION", judge=no)
    assert passed.passed and not failed.passed
    assert suite._task(sample).nl_assertions[0] in yes.requests[0].messages[0]["content"]


def test_model_user_sees_the_mirrored_conversation(suite, samples):
    sample = samples[1]
    task = suite._task(sample)

    class User(Backend):
        def __init__(self):
            self.requests = []

        def generate(self, request):
            self.requests.append(request)
            return _final("Hi, I need help." if len(self.requests) == 1 else "###STOP###")

    user = User()
    result = suite.run_sample(sample, RefusingBackend(), user_model=user)
    assert result.details["user"] == "model" and len(user.requests) == 2
    first, second = user.requests
    assert task.reason_for_call.strip()[:40] in first.developer_instructions
    assert first.messages == [{"role": "user", "content": "Hi! How can I help you today?"}]
    assert second.messages[1] == {"role": "assistant", "content": "Hi, I need help."}
    assert second.messages[2]["role"] == "user" and "cannot help" in second.messages[2]["content"]
    assert result.details["trials"][0]["termination"] == "user_stop"


def test_agent_request_carries_policy_tools_and_trajectory(suite, samples):
    seen: list[GenerationRequest] = []
    sample = next(s for s in samples if suite._task(s).actions)
    oracle = suite.oracle(sample)

    class Spy(Backend):
        prefers_scripted_user = True

        def generate(self, request):
            seen.append(request)
            return oracle.generate(request)

    result = suite.run_sample(sample, Spy())
    assert "<policy>" in seen[0].developer_instructions and len(seen[0].tools) == 14
    messages = result.details["trials"][0]["messages"]
    assert messages[2]["tool_calls"][0]["function"]["name"] == suite._task(sample).actions[0].name
    assert messages[3]["role"] == "tool" and messages[3]["tool_call_id"] == messages[2]["tool_calls"][0]["id"]


def test_pass_hat_k():
    assert pass_hat_k(4, 4, 4) == 1.0 and pass_hat_k(3, 4, 4) == 0.0
    assert pass_hat_k(2, 4, 1) == 0.5 and pass_hat_k(2, 4, 2) == pytest.approx(1 / 6)
    with pytest.raises(ValueError):
        pass_hat_k(1, 2, 3)
    suite = TauBenchSuite()
    results = [SampleResult("a", 1.0, True, None, {"successes": 2, "n_trials": 2, "trials": []}),
               SampleResult("b", 0.5, False, "wrong_answer", {"successes": 1, "n_trials": 2, "trials": []})]
    metrics = suite.aggregate(results)
    assert metrics["pass^1"] == pytest.approx(0.75) and metrics["pass^2"] == pytest.approx(0.5)


def test_runs_through_the_eval_runner_with_model_oracle(tmp_path):
    """``gptoss-eval --suite tau-bench --model oracle``: the runner's oracle wrapper gets the scripted customer."""
    from gptoss_train.eval import run_suite

    results = run_suite("tau-bench", model="oracle", limit=3, out_dir=tmp_path, progress=False, report=False)
    metrics = results["metrics"]["medium"]
    assert metrics["n"] == 3 and metrics["score"] == 1.0 and metrics["pass^1"] == 1.0
    again = run_suite("tau-bench", model="oracle", limit=3, out_dir=tmp_path, progress=False, report=False)
    assert again["metrics"]["medium"]["score"] == 1.0


def test_agent_turns_render_as_harmony(suite, samples, harmony_encoding):
    """Every agent request of a real conversation goes through the project's Harmony renderer (as backends do)."""
    from gptoss_train.eval.harmony_io import decode, prompt_tokens

    sample = next(s for s in samples if suite._task(s).id == "7")
    oracle = suite.oracle(sample)
    requests = []

    class Spy(Backend):
        prefers_scripted_user = True

        def generate(self, request):
            requests.append(request)
            return oracle.generate(request)

    suite.run_sample(sample, Spy())
    text = decode(prompt_tokens(requests[-1]))
    assert "namespace functions" in text and "type book_reservation" in text
    assert "Hi! How can I help you today?" in text and "<policy>" in text
    assert "<|start|>assistant to=functions.update_reservation_flights" in text
    assert text.endswith("<|start|>assistant")


def test_action_basis_matches_gold_calls(suite):
    task = next(t for t in load_tasks() if any(a.name == "update_reservation_flights" for a in t.actions))
    sample = next(s for s in suite.samples() if s.data["task_id"] == task.id)
    assert suite.run_sample(sample, suite.oracle(sample), reward_basis="DB,ACTION").passed
    wrong = suite.run_sample(sample, WrongActionsBackend(task), reward_basis="ACTION")
    assert wrong.details["trials"][0]["reward_breakdown"] == {ACTION: 0.0}


def test_a_real_local_model_runs_the_loop(suite, samples, tiny_local_backend):
    """The tiny random gpt-oss as the agent (scripted customer): the loop runs end to end and grades what it did."""
    sample = samples[0]
    result = suite.run_sample(sample, tiny_local_backend, user="scripted", max_tokens=8, max_steps=2,
                              temperature=0.0, reasoning_effort="low")
    trial = result.details["trials"][0]
    assert trial["steps"] >= 1 and trial["messages"][1]["role"] == "user"
    if trial["termination"] not in ("agent_stop", "user_stop"):  # random weights rarely finish a message
        assert result.score == 0.0 and result.failure in ("truncated", "no_final", "parse_error", "wrong_arguments")
