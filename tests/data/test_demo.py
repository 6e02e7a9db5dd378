"""The bundled demo dataset: committed files match the generator, and the test split is really held out."""

import json

from gptoss_train.data import demo


def _call(row):
    call = row["messages"][2]["tool_calls"][0]["function"]
    return call["name"], json.loads(call["arguments"])


def test_committed_files_equal_a_fresh_generation():
    fresh = demo.generate_demo(demo.DEFAULT_SEED)
    for split in demo.SPLITS:
        assert demo.load_demo_split(split) == json.loads(json.dumps(fresh[split])), split


def test_generation_is_deterministic_and_seed_dependent():
    assert demo.generate_demo(3) == demo.generate_demo(3)
    assert demo.generate_demo(3)["train"] != demo.generate_demo(4)["train"]


def test_rows_are_well_formed_tool_use_conversations():
    tools = {tool["function"]["name"]: tool["function"]["parameters"] for tool in demo.TOOLS}
    values = {"city": demo.CITIES, "day": demo.DAYS, "cuisine": demo.CUISINES}
    for split in demo.SPLITS:
        for row in demo.load_demo_split(split):
            roles = [m["role"] for m in row["messages"]]
            assert roles == ["system", "user", "assistant", "tool", "assistant"]
            assert row["reasoning_effort"] in ("low", "medium", "high")
            name, args = _call(row)
            schema = tools[name]
            assert list(args) == schema["required"]  # schema order, the city last in every call
            assert list(args)[-1] == "city"
            for key, value in args.items():
                assert key in schema["properties"] and value in values[key]
                # The arguments are determined by the user's words.
                assert value.lower() in row["messages"][1]["content"].lower()
            assert row["messages"][2]["thinking"] and row["messages"][4]["content"]


def test_test_split_is_held_out():
    train = demo.load_demo_split("train")
    test = demo.load_demo_split("test")
    assert len(train) == demo.N_TRAIN and len(test) == demo.N_TEST
    train_users = {row["messages"][1]["content"] for row in train}
    train_calls = {(n, json.dumps(a, sort_keys=True)) for n, a in map(_call, train)}
    for row in test:
        assert row["messages"][1]["content"] not in train_users
    unseen_calls = [r for r in test if (lambda c: (c[0], json.dumps(c[1], sort_keys=True)))(_call(r)) not in train_calls]
    assert len(unseen_calls) >= len(test) // 2
