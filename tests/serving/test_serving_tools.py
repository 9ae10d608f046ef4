"""Tools and structured output over real HTTP with the official openai client: a tiny model trained in-test on tool
rows (rayft train, 2 workers) answers `tools=` with `tool_calls`, whole and streamed; `tool_choice="none"` gets
text; a forced call (`required`, or a named function) and `response_format` hold for it and for the untrained base
model, because constrained decoding, not training, guarantees them; what cannot be enforced is a 400.

The tiny model is finetuned in full: with LoRA its tied 49k-token embeddings stay random, so it gets the call's
tokens right but never confident enough to stop after them."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import jsonschema
import pytest

from helpers import serve_deploy, tiny_llama, write_jsonl

KEY = "sk-tools"
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 20}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}
TICKET = {
    "type": "function",
    "function": {
        "name": "open_ticket",
        "parameters": {
            "type": "object",
            "properties": {"product": {"enum": ["lamp", "kettle"]}, "urgent": {"type": "boolean"}},
            "required": ["product", "urgent"],
            "additionalProperties": False,
        },
    },
}
CITIES = ["Paris", "Rome", "Oslo", "Lima", "Quito", "Kyoto", "Perth", "Accra"]
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "unit": {"enum": ["c", "f"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 3},
    },
    "required": ["name", "age", "unit", "tags"],
    "additionalProperties": False,
}


def ask(city: str) -> list[dict]:
    return [{"role": "user", "content": f"What is the weather in {city}?"}]


@pytest.fixture(scope="module")
def tool_run(ray_local, smol_tokenizer, tmp_path_factory):
    """The tiny model, and the same model finetuned on 8 tool rows (one call of get_weather per city)."""
    from rayft.cluster.config import load_config
    from rayft.training.trainer import run_training

    tmp = tmp_path_factory.mktemp("tool-run")
    model = tiny_llama(tmp / "model", smol_tokenizer)
    rows = []
    for i, city in enumerate(CITIES):
        args = json.dumps({"city": city})
        call = {"id": f"c{i}", "type": "function", "function": {"name": "get_weather", "arguments": args}}
        rows.append({"tools": [WEATHER], "messages": ask(city) + [{"role": "assistant", "tool_calls": [call]}]})
    write_jsonl(tmp / "train.jsonl", rows)
    (tmp / "job.yaml").write_text(
        f"model: {{name: {model}}}\n"
        "data: {train: train.jsonl, max_seq_len: 256}\n"
        "training: {method: full, lr: 0.003, epochs: 100, micro_batch_size: 2, global_batch_size: 8, "
        "warmup_ratio: 0.0, eval_at_end: false}\n"
        "scaling: {num_workers: 2}\n"
        f"run: {{name: tools, storage_path: {tmp / 'runs'}}}\n"
    )
    result = run_training(load_config(tmp / "job.yaml"))
    return {"base": model, "trained": Path(result.final_dir)}


@pytest.fixture(scope="module")
def endpoint(tool_run, serve_port):
    """endpoint("trained" | "base") -> (URL, model id): that model served, deployed when another one is (the tests
    run in file order, trained first, so the module deploys twice)."""
    from ray import serve

    from rayft.serving.config import ServeConfig
    from rayft.serving.spec import build_spec

    current: dict = {}

    def use(which: str) -> tuple[str, str]:
        if current.get("which") != which:
            cfg = ServeConfig(max_batch_size=8, cpus_per_replica=1.0)
            spec = build_spec(str(tool_run[which]), cfg, api_keys=[KEY])
            current.update(which=which, url=serve_deploy(spec, serve_port), name=spec.model_name)
        return current["url"], current["name"]

    yield use
    serve.delete("rayft")


def client(base: str):
    from openai import OpenAI

    return OpenAI(base_url=f"{base}/v1", api_key=KEY, max_retries=0, timeout=120)


def test_the_trained_model_calls_the_tool_whole_and_streamed(endpoint):
    base, name = endpoint("trained")
    c = client(base)
    for city in ("Paris", "Oslo"):
        r = c.chat.completions.create(model=name, messages=ask(city), tools=[WEATHER], temperature=0)
        choice = r.choices[0]
        assert choice.finish_reason == "tool_calls", choice.message.content
        (call,) = choice.message.tool_calls
        assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("call_")
        args = json.loads(call.function.arguments)  # valid JSON of the tool's schema (a model this small does not
        jsonschema.validate(args, WEATHER["function"]["parameters"])  # learn to copy the city, only the form)

        stream = c.chat.completions.create(model=name, messages=ask(city), tools=[WEATHER], temperature=0, stream=True)
        calls: dict[int, dict] = {}
        finish = None
        for chunk in stream:
            for d in chunk.choices[0].delta.tool_calls or []:
                got = calls.setdefault(d.index, {"name": "", "arguments": ""})
                got["name"] += d.function.name or ""
                got["arguments"] += d.function.arguments or ""
            finish = chunk.choices[0].finish_reason or finish
        assert finish == "tool_calls"
        assert [(v["name"], json.loads(v["arguments"])) for v in calls.values()] == [("get_weather", args)]

    # The conversation goes on with the call and its result, as a client sends them back.
    follow = ask("Paris") + [
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": '{"temp": 18}'},
    ]
    r = c.chat.completions.create(model=name, messages=follow, tools=[WEATHER], max_tokens=8)
    assert r.choices[0].message.role == "assistant"


def test_tool_choice_none_gets_text(endpoint):
    base, name = endpoint("trained")
    r = client(base).chat.completions.create(
        model=name, messages=ask("Paris"), tools=[WEATHER], tool_choice="none", temperature=0, max_tokens=24
    )
    choice = r.choices[0]
    assert choice.message.tool_calls is None and isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length")


@pytest.mark.parametrize("which", ["trained", "base"])
def test_response_format_json_schema_holds_for_20_sampled_replies(endpoint, which):
    base, name = endpoint(which)
    c = client(base)

    def one(seed: int) -> str:
        r = c.chat.completions.create(
            model=name,
            messages=[{"role": "user", "content": "Describe a person."}],
            response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}},
            temperature=1.0,
            seed=seed,
            max_tokens=200,
        )
        assert r.choices[0].finish_reason == "stop"
        return r.choices[0].message.content

    with ThreadPoolExecutor(8) as pool:  # constrained requests share batches with each other
        replies = list(pool.map(one, range(20)))
    for text in replies:
        jsonschema.validate(json.loads(text), PERSON)
    assert len(set(replies)) > 1  # sampled, not one fixed answer
    # json_object bounds only the form, not the length: a random model's object may run past max_tokens, so what is
    # checked is that the reply is held to JSON from its first token.
    r = c.chat.completions.create(
        model=name,
        messages=[{"role": "user", "content": "Any JSON."}],
        response_format={"type": "json_object"},
        temperature=1.0,
        seed=1,
        max_tokens=16,
    )
    assert r.choices[0].message.content.startswith('{"')


def test_a_forced_call_holds_for_the_untrained_base_model(endpoint):
    base, name = endpoint("base")
    c = client(base)
    for choice_arg, tool in (("required", None), ({"type": "function", "function": {"name": "open_ticket"}}, TICKET)):
        for seed in range(3):
            r = c.chat.completions.create(
                model=name,
                messages=[{"role": "user", "content": "My lamp broke."}],
                tools=[WEATHER, TICKET],
                tool_choice=choice_arg,
                temperature=1.0,
                seed=seed,
                max_tokens=120,
            )
            assert r.choices[0].finish_reason == "tool_calls"
            for call in r.choices[0].message.tool_calls:
                want = tool or next(t for t in (WEATHER, TICKET) if t["function"]["name"] == call.function.name)
                assert call.function.name == want["function"]["name"]
                jsonschema.validate(json.loads(call.function.arguments), want["function"]["parameters"])


def test_what_cannot_be_enforced_is_a_400_naming_it(endpoint):
    import openai

    base, name = endpoint("base")
    c = client(base)
    cases = [
        (dict(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strin"}}}),
         "response_format", "strin"),
        (dict(tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "get_time"}}),
         "tool_choice", "get_time"),
        (dict(tool_choice="required"), "tool_choice", "needs tools"),
        (dict(tools=[WEATHER], tool_choice="required", response_format={"type": "json_object"}),
         "response_format", "cannot both hold"),
        (dict(messages=[{"role": "tool", "tool_call_id": "x", "content": "{}"}]), "messages", "no tool call before"),
    ]  # fmt: skip
    for extra, param, words in cases:
        kwargs = {"model": name, "messages": ask("Paris"), "max_tokens": 4} | extra
        with pytest.raises(openai.BadRequestError) as caught:
            c.chat.completions.create(**kwargs)
        assert caught.value.body["param"] == param and words in caught.value.body["message"], caught.value.body
