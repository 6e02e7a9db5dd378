"""One tau-bench conversation: the agent (model under test) and a simulated user, tool calls run on a fresh DB.

Half-duplex like tau2's orchestrator: the agent greets, the user speaks, then the agent either calls tools (each
call executed at once, its result appended as a tool message) or answers in text, which hands the turn back to the
user. The conversation ends when the user stops, the agent says ``###STOP###``, or a limit is hit.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from gptoss_train.eval.core import Backend, GenerationRequest
from gptoss_train.eval.tau.data import TauTask, load_policy
from gptoss_train.eval.tau.environment import AirlineEnvironment, openai_tools

AGENT_GREETING = "Hi! How can I help you today?"
AGENT_STOP = "###STOP###"
TRANSFER_TOOL = "transfer_to_human_agents"

AGENT_INSTRUCTIONS = """You are an airline customer service agent. Help the user according to the policy below.
In each turn, either send one message to the user or make tool calls, not both. Follow the policy strictly; call
tools with valid JSON arguments.

<policy>
{policy}
</policy>"""


def agent_instructions() -> str:
    return AGENT_INSTRUCTIONS.format(policy=load_policy())


@dataclass
class EpisodeLimits:
    max_steps: int = 60  # agent generations in the whole conversation
    max_turns: int = 30  # user messages
    max_errors: int = 10  # tool calls that returned an error (tau2's max_errors)


@dataclass
class Episode:
    messages: list[dict]  # agent-side OpenAI chat transcript: greeting, user, assistant (text or tool calls), tool
    termination: str  # agent_stop | user_stop | max_steps | max_turns | too_many_errors | agent_error | user_error
    environment: AirlineEnvironment
    agent_failure: str | None = None  # FAILURE_KINDS value when the agent broke the conversation
    tool_errors: int = 0
    unknown_tools: list[str] = field(default_factory=list)
    steps: int = 0
    error: str | None = None


def run_episode(task: TauTask, agent: Backend, user, *, sample_id: str, limits: EpisodeLimits | None = None,
                reasoning_effort: str | None = "medium", temperature: float = 1.0, top_p: float = 1.0,
                max_tokens: int = 4096, seed: int | None = None, trial: int = 0) -> Episode:
    limits = limits or EpisodeLimits()
    environment = AirlineEnvironment()  # fresh DB for this trial
    tools = openai_tools()
    instructions = agent_instructions()
    messages: list[dict] = [{"role": "assistant", "content": AGENT_GREETING}]
    episode = Episode(messages, "agent_error", environment)
    turns = 0
    call_counter = 0
    while True:
        user_turn = user.respond(messages)
        if user_turn.error:
            episode.termination, episode.error = "user_error", user_turn.error
            return episode
        if user_turn.text is None:
            episode.termination = "user_stop"
            return episode
        turns += 1
        if turns > limits.max_turns:
            episode.termination = "max_turns"
            return episode
        messages.append({"role": "user", "content": user_turn.text})
        transferred = False
        while True:  # the agent's turn: tool calls until a text message
            if episode.steps >= limits.max_steps:
                episode.termination = "max_steps"
                return episode
            episode.steps += 1
            request = GenerationRequest(
                messages=[dict(m) for m in messages], tools=tools, developer_instructions=instructions,
                reasoning_effort=reasoning_effort, temperature=temperature, top_p=top_p, max_tokens=max_tokens,
                seed=None if seed is None else seed + episode.steps, suite="tau-bench", sample_id=sample_id,
                extra={"role": "agent", "trial": trial, "step": episode.steps},
            )
            result = agent.generate(request)
            if result.finish_reason == "error":  # the backend failed (after its retries); not the model's output
                episode.termination, episode.agent_failure = "agent_error", "backend_error"
                episode.error = result.error
                return episode
            if result.tool_calls:
                calls = []
                for call in result.tool_calls:
                    call_counter += 1
                    arguments = call.get("arguments")
                    if not isinstance(arguments, str):
                        arguments = json.dumps(arguments if arguments is not None else {})
                    calls.append({"id": f"call_{call_counter}", "type": "function",
                                  "function": {"name": call.get("name", ""), "arguments": arguments}})
                assistant = {"role": "assistant", "content": None, "tool_calls": calls}
                if result.analysis:
                    assistant["thinking"] = result.analysis  # gpt-oss keeps its CoT across tool calls in a turn
                messages.append(assistant)
                for call in calls:
                    name = call["function"]["name"]
                    outcome = environment.execute(name, call["function"]["arguments"])
                    if outcome.error:
                        episode.tool_errors += 1
                    if not outcome.known_tool:
                        episode.unknown_tools.append(name)
                    if name == TRANSFER_TOOL and not outcome.error:
                        transferred = True
                    messages.append({"role": "tool", "tool_call_id": call["id"], "name": name,
                                     "content": outcome.content})
                if episode.tool_errors >= limits.max_errors:
                    episode.termination = "too_many_errors"
                    return episode
                continue
            if result.final is None or not result.final.strip():
                episode.termination = "agent_error"
                if result.finish_reason == "truncated":
                    episode.agent_failure = "truncated"
                else:
                    episode.agent_failure = "parse_error" if result.error else "no_final"
                episode.error = result.error or (
                    f"agent turn ended without a message or a tool call ({result.finish_reason})")
                return episode
            messages.append({"role": "assistant", "content": result.final})
            if AGENT_STOP in result.final:
                episode.termination = "agent_stop"
                return episode
            if transferred:
                # Handed over to a human: the customer's side of this conversation is over (tau2's ###TRANSFER###).
                episode.termination = "user_stop"
                return episode
            break
