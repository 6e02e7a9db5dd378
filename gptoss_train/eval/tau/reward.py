"""tau2-bench's reward for one finished conversation, and pass^k over trials.

Follows tau2's evaluator (``src/tau2/evaluator/evaluator.py`` and friends, read not copied):

* a conversation that did not end by the agent or the user stopping (max steps, too many tool errors, a backend
  failure) scores 0, whatever the DB looks like;
* ``DB``: the agent's database after the conversation must hash equal to a fresh database on which the task's gold
  actions were replayed; a gold *write* action that itself fails makes the DB check "not evaluated" (a match
  against an incomplete gold state certifies nothing), a mismatch still scores 0;
* ``COMMUNICATE``: every ``communicate_info`` string must appear, lower-cased, in some agent text message with its
  commas removed (tau2's exact substring rule for English runs);
* ``ACTION`` (in no airline task's basis): every gold action must appear among the agent's tool calls (same name,
  equal arguments on ``compare_args``, else on the arguments the call passed); all-or-nothing, where newer tau2
  commits average per action;
* ``NL_ASSERTION``: needs a judge model; without one the task is reported as "needs judge", never as a failure;
* the reward is the product of the components in the task's reward basis.
"""

from __future__ import annotations

import functools
import json
import math
import re
from dataclasses import dataclass, field

from gptoss_train.eval.tau.data import ACTION, COMMUNICATE, DB, ENV_ASSERTION, NL_ASSERTION, TauTask, load_tasks
from gptoss_train.eval.tau.environment import AirlineEnvironment, tool_specs

# Termination reasons after which tau2 grades the conversation at all.
GRADED_TERMINATIONS = ("agent_stop", "user_stop")


@dataclass
class GoldState:
    db_hash: str
    failed_writes: list[dict]


@functools.lru_cache(maxsize=None)
def gold_state(task_id: str) -> GoldState:
    """Replay the task's gold actions on a fresh DB once per process (the tools are deterministic)."""
    task = next(task for task in load_tasks() if task.id == task_id)
    environment = AirlineEnvironment()
    failed: list[dict] = []
    specs = tool_specs()
    for action in task.actions:
        outcome = environment.execute(action.name, action.arguments)
        if outcome.error and action.name in specs and specs[action.name].mutates_state:
            failed.append({"action_id": action.action_id, "tool": action.name, "error": outcome.content})
    return GoldState(environment.hash(), failed)


def agent_texts(messages: list[dict]) -> list[str]:
    return [m["content"] for m in messages if m.get("role") == "assistant" and isinstance(m.get("content"), str)
            and m["content"]]


def communicate_checks(messages: list[dict], infos: list[str]) -> list[dict]:
    texts = [text.lower().replace(",", "") for text in agent_texts(messages)]
    return [{"info": info, "met": any(info.lower() in text for text in texts)} for info in infos]


def _agent_tool_calls(messages: list[dict]) -> list[tuple[str, dict]]:
    calls = []
    for message in messages:
        if message.get("role") != "assistant":
            continue
        for call in message.get("tool_calls") or []:
            function = call.get("function", {})
            try:
                arguments = json.loads(function.get("arguments") or "{}")
            except json.JSONDecodeError:
                arguments = None
            calls.append((function.get("name", ""), arguments))
    return calls


def action_checks(messages: list[dict], task: TauTask) -> list[dict]:
    calls = _agent_tool_calls(messages)
    checks = []
    for action in task.actions:
        met = False
        for name, arguments in calls:
            if name != action.name or not isinstance(arguments, dict):
                continue
            # tau2's Action.compare_with_tool_call: the compare_args, else every argument the call passed
            keys = set(action.compare_args) if action.compare_args is not None else set(arguments)
            if {k: v for k, v in arguments.items() if k in keys} == {
                    k: v for k, v in action.arguments.items() if k in keys}:
                met = True
                break
        checks.append({"action_id": action.action_id, "name": action.name, "met": met})
    return checks


JUDGE_INSTRUCTIONS = """You grade a customer-service conversation between an airline agent and a customer.
For each numbered assertion about the agent's behaviour, decide whether the conversation satisfies it.
Answer with JSON only: {"results": [{"assertion": <number>, "met": true|false, "reasoning": "<one sentence>"}]}."""


def judge_nl_assertions(judge, messages: list[dict], assertions: list[str], *, seed: int | None = None) -> list[dict]:
    """Ask a judge backend whether each NL assertion holds. Unparseable verdicts count as not met, with the reason."""
    from gptoss_train.eval.core import GenerationRequest

    transcript = "\n".join(
        f"{m['role']}: {m['content']}" for m in messages if m.get("role") in ("user", "assistant") and m.get("content")
    )
    numbered = "\n".join(f"{i + 1}. {text}" for i, text in enumerate(assertions))
    request = GenerationRequest(
        messages=[{"role": "user", "content": f"Conversation:\n{transcript}\n\nAssertions:\n{numbered}"}],
        developer_instructions=JUDGE_INSTRUCTIONS,
        reasoning_effort="low",
        temperature=0.0,
        seed=seed,
        suite="tau-bench",
        extra={"role": "judge"},
    )
    result = judge.generate(request)
    verdicts: dict[int, dict] = {}
    error = None
    match = re.search(r"\{.*\}", result.final or "", re.DOTALL)
    try:
        for item in json.loads(match.group(0))["results"] if match else []:
            verdicts[int(item["assertion"])] = item
    except (ValueError, KeyError, TypeError) as exc:
        error = f"judge answer not parseable: {exc}"
    if not match:
        error = result.error or "judge gave no JSON verdict"
    return [
        {"assertion": text, "met": bool(verdicts.get(i + 1, {}).get("met", False)),
         "reasoning": verdicts.get(i + 1, {}).get("reasoning") or error}
        for i, text in enumerate(assertions)
    ]


@dataclass
class Reward:
    reward: float | None  # None: not gradable here (needs a judge)
    status: str  # "graded" | "needs_judge" | "premature_stop"
    breakdown: dict = field(default_factory=dict)
    checks: dict = field(default_factory=dict)
    note: str | None = None

    @property
    def success(self) -> bool:
        return self.reward is not None and abs(self.reward - 1.0) <= 1e-6


def compute_reward(task: TauTask, messages: list[dict], environment: AirlineEnvironment, termination: str, *,
                   reward_basis: list[str] | None = None, judge=None, seed: int | None = None) -> Reward:
    basis = list(reward_basis or task.reward_basis)
    if termination not in GRADED_TERMINATIONS:
        return Reward(0.0, "premature_stop", note=f"conversation ended prematurely: {termination}")
    breakdown: dict[str, float] = {}
    checks: dict = {}
    notes = []
    if DB in basis:
        gold = gold_state(task.id)
        predicted = environment.hash()
        match = predicted == gold.db_hash
        checks["db"] = {"match": match, "gold_hash": gold.db_hash, "agent_hash": predicted}
        if gold.failed_writes:
            checks["db"]["gold_replay_failed_writes"] = gold.failed_writes
        if match and gold.failed_writes:
            notes.append("gold replay incomplete: DB not evaluated")
        else:
            breakdown[DB] = 1.0 if match else 0.0
    if ENV_ASSERTION in basis:
        # The airline tasks have no env assertions; refuse rather than silently skip a criterion.
        raise ValueError(f"task {task.id}: ENV_ASSERTION reward basis is not supported for the airline domain")
    if COMMUNICATE in basis:
        results = communicate_checks(messages, task.communicate_info)
        checks["communicate"] = results
        breakdown[COMMUNICATE] = 1.0 if all(r["met"] for r in results) else 0.0
    if ACTION in basis:
        results = action_checks(messages, task)
        checks["actions"] = results
        breakdown[ACTION] = 1.0 if all(r["met"] for r in results) else 0.0
    status = "graded"
    if NL_ASSERTION in basis and task.nl_assertions:
        if judge is None:
            status = "needs_judge"
        else:
            results = judge_nl_assertions(judge, messages, task.nl_assertions, seed=seed)
            checks["nl_assertions"] = results
            breakdown[NL_ASSERTION] = 1.0 if all(r["met"] for r in results) else 0.0
    if status == "needs_judge":
        return Reward(None, status, breakdown, checks, "NL assertions in the reward basis and no judge configured")
    reward = math.prod(breakdown.values()) if breakdown else 1.0
    return Reward(reward, status, breakdown, checks, "; ".join(notes) or None)


def pass_hat_k(successes: int, trials: int, k: int) -> float:
    """tau-bench's pass^k for one task: the chance that k trials drawn from the n run all succeed, C(c,k)/C(n,k)."""
    if k > trials:
        raise ValueError(f"pass^{k} needs at least {k} trials, got {trials}")
    return math.comb(successes, k) / math.comb(trials, k)
