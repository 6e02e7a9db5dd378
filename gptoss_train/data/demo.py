"""The bundled demo dataset: short tool-use conversations with reasoning over a small closed domain.

Why this task: the quickstart fine-tunes a *randomly initialised* tiny gpt-oss on a 2-core CPU in a few minutes and
must show honest learning on held-out conversations. So every slot value comes from a small closed set, the tool and
its arguments are fully determined by the user's words, sequences are short, and the final answer is a fixed pattern
filled from the tool result. The city is the last argument of every tool, and each tool has several train phrasings,
so what the model must learn is the same for every call: pick the tool from the topic words, copy the slot values. The held-out test split uses phrasings the train split never shows and slot
combinations (tool, city, day / cuisine) the train split never contains, so a model that only memorised the train
conversations scores low.

Each row is OpenAI chat JSONL (what ``gptoss_train.data`` reads):

    {"id", "reasoning_effort", "tools": [OpenAI function tools],
     "messages": [system, user, assistant(thinking + tool_calls), tool, assistant(thinking + content)]}

Regenerate the committed files with ``python -m gptoss_train.data.demo`` (deterministic for a given seed; a test
checks the committed files equal a fresh generation).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
from importlib import resources
from pathlib import Path

SPLITS = ("train", "test")
DEFAULT_SEED = 0
N_TRAIN = 480
N_TEST = 64

SYSTEM_PROMPT = "You are a travel assistant. Use the tools to answer."
# Every value is one token both after a space (in the user's words) and after a quote (in the call's JSON), so the
# model copies a value with one token rather than spelling it out in pieces (" Oslo" vs "Os" "lo").
CITIES = ["Paris", "London", "Tokyo", "Berlin", "Madrid", "Rome", "Boston", "Sydney"]
DAYS = ["today", "tomorrow"]
CUISINES = ["Italian", "Thai", "Indian", "Greek"]
CONDITIONS = ["sunny", "cloudy", "rainy", "windy"]

# No `enum` lists in the schemas: they would put every city into the prompt, and a tiny model must then pick the
# user's city out of nine instead of finding the only one there.
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather forecast for a city.",
            "parameters": {
                "type": "object",
                "properties": {
                    "day": {"type": "string", "description": "today or tomorrow"},
                    "city": {"type": "string"},
                },
                "required": ["day", "city"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "get_time",
            "description": "Local time in a city.",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "find_restaurant",
            "description": "Recommend a restaurant.",
            "parameters": {
                "type": "object",
                "properties": {
                    "cuisine": {"type": "string"},
                    "city": {"type": "string"},
                },
                "required": ["cuisine", "city"],
            },
        },
    },
]

# User phrasings per tool. The last entries of each list are held out: only the test split uses them.
PHRASINGS = {
    "get_weather": {
        "train": [
            "What is the weather in {city} {day}?",
            "Weather for {city} {day}, please.",
            "How is the weather {day} in {city}?",
            "Tell me the weather in {city} {day}.",
            "Is it nice in {city} {day}? Check the weather.",
            "What will the weather be like {day} in {city}?",
            "Show me the {day} weather for {city}.",
            "Give me the weather forecast for {city} {day}.",
        ],
        "test": [
            "Can you check the weather {day} for {city}?",
            "I need the {city} weather for {day}.",
        ],
    },
    "get_time": {
        "train": [
            "What time is it in {city}?",
            "Tell me the time in {city}.",
            "Current time in {city}, please.",
            "What is the local time in {city}?",
            "What's the time in {city} now?",
            "Show me the current time in {city}.",
            "I need the local time for {city}.",
            "Give me the time in {city}.",
        ],
        "test": [
            "Do you know the time in {city} right now?",
            "In {city}, what time is it?",
        ],
    },
    "find_restaurant": {
        "train": [
            "Find a {cuisine} restaurant in {city}.",
            "Where can I eat {cuisine} food in {city}?",
            "Recommend a {cuisine} restaurant in {city}.",
            "I want {cuisine} food in {city}.",
            "Looking for {cuisine} food in {city}.",
            "Where should I go for {cuisine} in {city}?",
            "Pick a {cuisine} restaurant for me in {city}.",
            "We want to eat {cuisine} tonight in {city}.",
        ],
        "test": [
            "Any good {cuisine} places to eat in {city}?",
            "In {city}, suggest a {cuisine} restaurant.",
        ],
    },
}

_RESTAURANT_NAMES = ["Luna", "Verde", "Golden Fork", "Blue Door", "Casa", "Lotus"]


def _slot_space(tool: str) -> list[dict]:
    # The city is the last argument of every tool: whether the JSON closes after it (`"}`) is then the same
    # decision for every call, rather than one the model must relearn per tool and city (before this, a tiny
    # model closed get_time's JSON right for the cities it had seen with get_time and wrong for the held-out ones).
    if tool == "get_weather":
        return [{"day": d, "city": c} for c in CITIES for d in DAYS]
    if tool == "get_time":
        return [{"city": c} for c in CITIES]
    return [{"cuisine": k, "city": c} for c in CITIES for k in CUISINES]


def _held_out_combinations(rng: random.Random) -> dict[str, set[str]]:
    """About a quarter of each tool's slot combinations appear only in the test split."""
    held = {}
    for tool in PHRASINGS:
        space = [json.dumps(args, sort_keys=True) for args in _slot_space(tool)]
        rng.shuffle(space)
        held[tool] = set(space[: max(2, len(space) // 4)])
    return held


def _tool_result(tool: str, args: dict) -> dict:
    # Deterministic in the arguments alone, so the same call always gets the same answer in every split.
    key = random.Random(json.dumps([tool, args], sort_keys=True))
    if tool == "get_weather":
        return {"condition": key.choice(CONDITIONS), "high_c": key.randint(5, 30)}
    if tool == "get_time":
        return {"time": f"{key.randint(0, 23):02d}:{key.choice([0, 15, 30, 45]):02d}"}
    return {"name": key.choice(_RESTAURANT_NAMES)}


def _reasoning_for_call(tool: str, args: dict) -> str:
    # Short, and the slots in the same order as the call's JSON: a tiny random model copies a value most easily from
    # a few tokens back (its sliding-window layers see only the user turn and this note, not the long system prompt).
    # The city always follows " in", for every tool: the copy learned on one tool then serves the others (with
    # "Call get_time for <city>" the model wrote cities it had seen with get_time instead of held-out ones).
    # The slots come first and the tool last: the tool is then chosen right after the copied day / cuisine (or its
    # absence), a cue a few tokens back, instead of before anything is copied (with "Call <tool> for Thai in Rome",
    # the model wrote the right slots under the wrong tool for user wordings it had not seen).
    others = [value for key, value in args.items() if key != "city"]
    return (f"For {', '.join(others)} in {args['city']}" if others else f"In {args['city']}") + f": call {tool}."


def _final_answer(tool: str, args: dict, result: dict) -> str:
    if tool == "get_weather":
        return f"{args['city']} {args['day']}: {result['condition']}, {result['high_c']} C."
    if tool == "get_time":
        return f"It is {result['time']} in {args['city']}."
    return f"Try {result['name']} in {args['city']}."


def make_conversation(tool: str, args: dict, phrasing: str, *, reasoning_effort: str, sample_id: str) -> dict:
    """One demo row: user asks -> reasoning + tool call -> tool result -> reasoning + final answer."""
    user = phrasing.format(**args)
    result = _tool_result(tool, args)
    call_id = "call_0"
    messages = [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": user},
        {
            "role": "assistant",
            "thinking": _reasoning_for_call(tool, args),
            "content": "",
            "tool_calls": [
                {
                    "id": call_id,
                    "type": "function",
                    "function": {"name": tool, "arguments": json.dumps(args)},
                }
            ],
        },
        {"role": "tool", "tool_call_id": call_id, "name": tool, "content": json.dumps(result)},
        {
            "role": "assistant",
            "thinking": "Answer from the tool result.",
            "content": _final_answer(tool, args, result),
        },
    ]
    return {"id": sample_id, "reasoning_effort": reasoning_effort, "tools": TOOLS, "messages": messages}


def generate_demo(seed: int = DEFAULT_SEED, n_train: int = N_TRAIN, n_test: int = N_TEST) -> dict[str, list[dict]]:
    """Both splits, deterministic in ``seed``. Test rows use a held-out phrasing or a held-out slot combination."""
    rng = random.Random(seed)
    held = _held_out_combinations(rng)
    tools = list(PHRASINGS)
    splits: dict[str, list[dict]] = {"train": [], "test": []}
    for split, count in (("train", n_train), ("test", n_test)):
        for index in range(count):
            tool = tools[index % len(tools)]
            space = _slot_space(tool)
            if split == "train":
                candidates = [a for a in space if json.dumps(a, sort_keys=True) not in held[tool]]
                phrasing = rng.choice(PHRASINGS[tool]["train"])
            else:
                # Alternate the two kinds of novelty: unseen wording of any combination, or an unseen combination
                # in any wording. Half of the first kind also lands on an unseen combination by chance.
                if index % 2 == 0:
                    candidates = space
                    phrasing = rng.choice(PHRASINGS[tool]["test"])
                else:
                    candidates = [a for a in space if json.dumps(a, sort_keys=True) in held[tool]]
                    phrasing = rng.choice(PHRASINGS[tool]["train"] + PHRASINGS[tool]["test"])
            args = dict(rng.choice(candidates))
            effort = rng.choice(["low", "medium", "high"])
            splits[split].append(
                make_conversation(tool, args, phrasing, reasoning_effort=effort, sample_id=f"demo-{split}-{index:04d}")
            )
    return splits


def demo_dir() -> Path:
    return Path(str(resources.files("gptoss_train.data") / "demo"))


def demo_path(split: str) -> Path:
    if split not in SPLITS:
        raise ValueError(f"unknown demo split {split!r}; choose one of {', '.join(SPLITS)}")
    return demo_dir() / f"{split}.jsonl"


def load_demo_split(split: str) -> list[dict]:
    """The committed demo split as a list of OpenAI-chat rows (``train``: 480 rows, ``test``: 64 rows)."""
    with open(demo_path(split), encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def write_demo(out_dir: str | os.PathLike | None = None, seed: int = DEFAULT_SEED) -> list[Path]:
    """Write ``train.jsonl`` and ``test.jsonl`` atomically (temp file + rename)."""
    out = Path(out_dir) if out_dir is not None else demo_dir()
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for split, rows in generate_demo(seed).items():
        target = out / f"{split}.jsonl"
        fd, tmp = tempfile.mkstemp(dir=out, prefix=f".{split}.", suffix=".tmp")
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            for row in rows:
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")
        os.replace(tmp, target)
        written.append(target)
    return written


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Regenerate the bundled demo dataset (deterministic).")
    parser.add_argument("--out-dir", default=None, help="where to write train.jsonl/test.jsonl (default: the package)")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    args = parser.parse_args(argv)
    for path in write_demo(args.out_dir, args.seed):
        print(path)


if __name__ == "__main__":
    main()
