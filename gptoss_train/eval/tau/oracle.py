"""Self-test agents: the gold-action oracle, and agents that are always wrong, for checking the harness itself."""

from __future__ import annotations

import json
import re

from gptoss_train.eval.core import Backend, GenerationRequest, GenerationResult
from gptoss_train.eval.tau.data import TauTask


def _agent_calls_so_far(request: GenerationRequest) -> int:
    return sum(len(m.get("tool_calls") or []) for m in request.messages if m.get("role") == "assistant")


def _tool_call(name: str, arguments: dict) -> GenerationResult:
    text = json.dumps(arguments)
    return GenerationResult(text=text, final=None, analysis=None, finish_reason="call",
                            tool_calls=[{"name": name, "arguments": text, "parsed_arguments": arguments}])


def _final(text: str) -> GenerationResult:
    return GenerationResult(text=text, final=text, analysis=None, tool_calls=[], finish_reason="return")


class GoldActionsBackend(Backend):
    """Replays the task's gold actions, one tool call per agent turn, through the normal execution path, then
    answers with a message carrying the information the task wants communicated.

    Stateless: the next action is the number of tool calls already in the conversation, so one instance serves
    every trial. It prefers the scripted user (see ``TauBenchSuite.run_sample``): it cannot play the customer.
    """

    name = "oracle"
    prefers_scripted_user = True

    def __init__(self, task: TauTask):
        self.task = task

    def generate(self, request: GenerationRequest) -> GenerationResult:
        if request.extra.get("role") not in (None, "agent"):
            raise ValueError("the tau-bench oracle only plays the agent; use the scripted user or a model user")
        done = _agent_calls_so_far(request)
        if done < len(self.task.actions):
            action = self.task.actions[done]
            return _tool_call(action.name, action.arguments)
        if self.task.communicate_info:
            # "; " not ", ": tau2 strips commas from the agent's text before matching.
            return _final("Here is what you asked for: " + "; ".join(self.task.communicate_info) + ".")
        return _final("Your request has been handled. Is there anything else I can help with?")

    def describe(self) -> dict:
        return {"backend": "oracle", "suite": "tau-bench", "task": self.task.id}


def task_user_id(task: TauTask) -> str | None:
    ids = {a.arguments["user_id"] for a in task.actions if "user_id" in a.arguments}
    text = " ".join((task.known_info, task.reason_for_call, task.task_instructions))
    ids |= set(re.findall(r"\b([a-z]+_[a-z]+_\d+)\b", text))
    return next(iter(ids)) if len(ids) == 1 else None


class WrongActionsBackend(Backend):
    """Always wrong: grants the customer an unauthorised $1 travel certificate (a write no gold trajectory makes,
    so the final DB never matches), then refuses to help and communicates nothing. Must score 0 on every task."""

    name = "always-wrong"
    prefers_scripted_user = True

    def __init__(self, task: TauTask):
        self.task = task
        self.user_id = task_user_id(task)
        if self.user_id is None:
            raise ValueError(f"task {task.id}: cannot tell which customer it is about")

    def generate(self, request: GenerationRequest) -> GenerationResult:
        if _agent_calls_so_far(request) == 0:
            return _tool_call("send_certificate", {"user_id": self.user_id, "amount": 1})
        return _final("I cannot help with that.")


class RefusingBackend(Backend):
    """Never calls a tool and never helps. Not "always wrong" in tau2's terms: on tasks where the right outcome is
    to change nothing and say nothing specific (refusing a cancellation the policy forbids), refusing scores 1."""

    name = "refuse"
    prefers_scripted_user = True

    def generate(self, request: GenerationRequest) -> GenerationResult:
        return _final("I cannot help with that.")
