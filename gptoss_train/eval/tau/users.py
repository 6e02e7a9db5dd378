"""Simulated customers: a model-backed user (tau2's LLM user simulator) and a scripted user for CI.

Both see the conversation from the customer's side and answer one utterance at a time; ``None`` means the customer
ends the conversation (tau2's ``###STOP###`` / ``###TRANSFER###`` / ``###OUT-OF-SCOPE###`` tokens).
"""

from __future__ import annotations

from dataclasses import dataclass

from gptoss_train.eval.core import Backend, GenerationRequest
from gptoss_train.eval.tau.data import TauTask

STOP_TOKENS = ("###STOP###", "###TRANSFER###", "###OUT-OF-SCOPE###")

USER_GUIDELINES = """You are playing a customer who contacts an airline's customer service agent.
Follow the scenario below: it says who you are, why you are calling and what you know.
Rules:
- Write only what the customer says, one short message at a time, in plain natural language.
- Reveal information only when the agent needs it; never invent facts that the scenario does not give you.
- Do not make up reservation ids, user ids, payment methods or other details you were not given.
- Stay in character; you are not an assistant and you do not know the airline's policy.
- When your goal is met, or it clearly cannot be met, end the conversation by writing ###STOP### alone.
- If you are transferred to a human agent, write ###TRANSFER### alone.
- If the scenario gives you nothing to say about what the agent asks, write ###OUT-OF-SCOPE### alone."""


def scenario_text(task: TauTask) -> str:
    parts = []
    if task.persona:
        parts.append(f"Persona:\n{task.persona}")
    if task.reason_for_call:
        parts.append(f"Reason for the call:\n{task.reason_for_call}")
    if task.known_info:
        parts.append(f"What you know:\n{task.known_info}")
    if task.unknown_info:
        parts.append(f"What you do not know:\n{task.unknown_info}")
    if task.task_instructions:
        parts.append(f"Instructions:\n{task.task_instructions}")
    return "\n\n".join(parts)


@dataclass
class UserTurn:
    text: str | None  # None: the user stopped
    error: str | None = None


class ScriptedUser:
    """Deterministic customer: opens with the reason for the call and what they know, answers the agent's next
    message with the task's instructions, then stops. Lets CI run the whole loop with no model on the user side."""

    def __init__(self, task: TauTask):
        opening = "\n".join(part.strip() for part in (task.reason_for_call, task.known_info) if part.strip())
        self.utterances = [opening or "Hi, I need help with my reservation."]
        if task.task_instructions.strip():
            self.utterances.append(task.task_instructions.strip())
        self.position = 0

    def respond(self, conversation: list[dict]) -> UserTurn:
        if self.position >= len(self.utterances):
            return UserTurn(None)
        self.position += 1
        return UserTurn(self.utterances[self.position - 1])


class ModelUser:
    """tau2's LLM user simulator on one of our backends. The conversation is mirrored: the agent's messages are the
    user's input, the customer's own earlier lines are its assistant turns."""

    def __init__(self, task: TauTask, backend: Backend, *, sample_id: str, seed: int | None = None,
                 reasoning_effort: str | None = "low", temperature: float = 1.0, max_tokens: int = 2048):
        self.task = task
        self.backend = backend
        self.sample_id = sample_id
        self.seed = seed
        self.reasoning_effort = reasoning_effort
        self.temperature = temperature
        self.max_tokens = max_tokens

    def respond(self, conversation: list[dict]) -> UserTurn:
        mirrored = []
        for message in conversation:
            if message.get("role") == "assistant" and message.get("content") and not message.get("tool_calls"):
                mirrored.append({"role": "user", "content": message["content"]})
            elif message.get("role") == "user":
                mirrored.append({"role": "assistant", "content": message["content"]})
        request = GenerationRequest(
            messages=mirrored,
            developer_instructions=f"{USER_GUIDELINES}\n\n{scenario_text(self.task)}",
            reasoning_effort=self.reasoning_effort,
            temperature=self.temperature,
            max_tokens=self.max_tokens,
            seed=self.seed,
            suite="tau-bench",
            sample_id=self.sample_id,
            extra={"role": "user"},
        )
        result = self.backend.generate(request)
        if result.finish_reason == "error" or not (result.final or "").strip():
            reason = result.error or f"user simulator gave no final message ({result.finish_reason})"
            return UserTurn(None, error=reason)
        text = result.final.strip()
        if any(token in text for token in STOP_TOKENS):
            return UserTurn(None)
        return UserTurn(text)
