"""Tool rows, rendered once for training and serving: for every template family the prompt the trainer renders
before an assistant turn is byte for byte, and token for token (BOS included), the prompt the endpoint renders for
the same conversation sent as an OpenAI request; what is trained after it is exactly what the model must write
(through its end-of-turn token), and the endpoint's parser reads a trained call back as the call it was.

Families: the built-in SmolLM2 (ChatML without tool support: rayft's own tool format), Qwen2.5 and Llama 3.1/3.2
(their chat templates render tools themselves). Their templates are the originals as their model repositories
ship them, read from the installed `trl` package (which keeps byte-identical copies); their special tokens are
those of their tokenizer configs, added to SmolLM2's vocabulary.
"""

from __future__ import annotations

import copy
import importlib.util
import json
from pathlib import Path

import pytest

from rayft.serving import chat
from rayft.serving.openai_api import ChatCompletionRequest
from rayft.training.formats import IGNORE_INDEX, Renderer, RowError, normalize, tokenize_rendered
from rayft.training.specials import bos_text, encode_plain
from rayft.training.tools import tool_syntax

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city now.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["c", "f"]}},
            "required": ["city"],
        },
    },
}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}


def call(name: str, args: dict, cid: str) -> dict:
    return {"id": cid, "type": "function", "function": {"name": name, "arguments": json.dumps(args)}}


def conversation(parallel: bool) -> dict:
    """A row as OpenAI's fine-tuning format writes it (arguments as JSON strings)."""
    second = [call("get_weather", {"city": "Rome"}, "c2"), call("get_weather", {"city": "Oslo", "unit": "f"}, "c3")]
    if not parallel:  # Llama 3.x templates take one call per turn
        second = second[:1]
    results = [{"role": "tool", "tool_call_id": c["id"], "content": '{"temp": 21}'} for c in second]
    return {
        "tools": [WEATHER, TIME],
        "messages": [
            {"role": "system", "content": "You answer weather questions."},
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": None, "tool_calls": [call("get_weather", {"city": "Paris"}, "c1")]},
            {"role": "tool", "tool_call_id": "c1", "content": '{"temp": 18}'},
            {"role": "assistant", "content": "It is 18 degrees in Paris."},
            {"role": "user", "content": "And in Rome" + (" and Oslo?" if parallel else "?")},
            {"role": "assistant", "tool_calls": second},
            *results,
            {"role": "assistant", "content": "Warm in both."},
        ],
    }


def _template(name: str) -> str:
    spec = importlib.util.find_spec("trl")
    assert spec is not None and spec.submodule_search_locations, "trl (a dev dependency) is not installed"
    return (Path(spec.submodule_search_locations[0]) / "chat_templates" / name).read_text()


def family_tokenizer(smol_tokenizer, family: str):
    tok = copy.deepcopy(smol_tokenizer)
    if family == "qwen2.5":
        tok.add_special_tokens(
            {"additional_special_tokens": ["<|object_ref_start|>", "<|box_start|>", "<|vision_start|>"]}
        )
        tok.add_tokens(["<tool_call>", "</tool_call>"])  # added, not special: Qwen decodes them as text
        tok.chat_template = _template("qwen2_5.jinja")
    elif family.startswith("llama"):
        tok.add_special_tokens(
            {
                "bos_token": "<|begin_of_text|>",
                "eos_token": "<|eot_id|>",
                "additional_special_tokens": ["<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>",
                                              "<|python_tag|>", "<|end_of_text|>"],
            }
        )  # fmt: skip
        tok.add_bos_token = True  # Llama's tokenizer starts every text with <|begin_of_text|>
        tok.chat_template = _template("llama3_1.jinja" if family == "llama3.1" else "llama3_2.jinja")
    return tok


FAMILIES = ["smollm2", "qwen2.5", "llama3.1", "llama3.2"]


@pytest.fixture(params=FAMILIES)
def family(request, smol_tokenizer):
    return request.param, family_tokenizer(smol_tokenizer, request.param)


def served_prompt(tok, request: dict) -> tuple[str, list[int], chat.ChatPlan]:
    """What /v1/chat/completions renders and tokenizes for a request body (rayft.serving.chat, as the ingress)."""
    body = ChatCompletionRequest.model_validate(request)
    p = chat.plan(body, tool_syntax(tok))
    renderer = Renderer(tok, None)
    return renderer.generation_prompt(p.messages, p.tools), chat.prompt_ids(renderer, p), p


def test_every_assistant_turn_is_trained_on_exactly_what_the_endpoint_prompts_and_parses(family):
    name, tok = family
    row = conversation(parallel=not name.startswith("llama"))
    doc = normalize(row)
    text, spans = Renderer(tok, None).render(doc)
    ((ids, labels),) = tokenize_rendered(tok, [text], [spans])
    ids, labels = ids.tolist(), labels.tolist()
    turns = [i for i, m in enumerate(row["messages"]) if m["role"] == "assistant"]
    assert len(spans) == len(turns)
    syntax = tool_syntax(tok)
    assert syntax.name == ("llama3" if name.startswith("llama") else "hermes")
    if name == "smollm2":
        assert "<tools>" in text and '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}' in text
    for (start, _end), i in zip(spans, turns, strict=True):
        request = {"model": "m", "tools": row["tools"], "messages": row["messages"][:i]}
        served_text, served_ids, plan = served_prompt(tok, request)
        assert text[:start] == served_text  # byte for byte
        assert ids[: len(served_ids)] == served_ids  # token for token
        if tok.bos_token and bos_text(tok):
            assert served_ids[0] == tok.bos_token_id and served_ids.count(tok.bos_token_id) == 1
        # Everything after the prompt through the end-of-turn token is trained.
        stop = ids.index(tok.eos_token_id, len(served_ids))
        reply_ids = ids[len(served_ids) : stop + 1]
        assert labels[len(served_ids) : stop + 1] == reply_ids
        assert labels[len(served_ids) - 1] == IGNORE_INDEX
        # The endpoint reads the trained reply (decoded as the engine decodes) back as the row's calls.
        out = tok.decode(reply_ids[:-1], skip_special_tokens=True)
        message, finish = chat.reply(plan, out, "stop")
        want = row["messages"][i]
        if want.get("tool_calls"):
            assert finish == "tool_calls" and message["content"] is None
            got = [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in message["tool_calls"]]
            assert got == [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in want["tool_calls"]]
        else:
            assert (message["content"], finish) == (want["content"], "stop")


def test_tool_results_and_schemas_carry_no_loss(family):
    name, tok = family
    doc = normalize(conversation(parallel=not name.startswith("llama")))
    text, spans = Renderer(tok, None).render(doc)
    trained = "".join(text[s:e] for s, e in spans)
    assert "get_weather" in trained  # the calls
    assert '"temp": 18' not in trained and "18 degrees" in trained  # results are read, the answer is written
    assert "The weather in a city now." not in trained and "You answer weather questions." not in trained


def test_openai_and_sharegpt_rows_and_argument_forms_render_the_same(smol_tokenizer):
    row = conversation(parallel=True)
    as_objects = json.loads(json.dumps(row))
    for m in as_objects["messages"]:
        for c in m.get("tool_calls") or []:
            c["function"]["arguments"] = json.loads(c["function"]["arguments"])
    sharegpt = {
        "system": "You answer weather questions.",
        "tools": json.dumps([WEATHER["function"], TIME["function"]]),  # LLaMA-Factory's: a JSON string
        "conversations": [
            {"from": "human", "value": "Weather in Paris?"},
            {"from": "function_call", "value": json.dumps({"name": "get_weather", "arguments": {"city": "Paris"}})},
            {"from": "observation", "value": '{"temp": 18}'},
            {"from": "gpt", "value": "It is 18 degrees in Paris."},
            {"from": "human", "value": "And in Rome and Oslo?"},
            {
                "from": "function_call",
                "value": json.dumps(
                    [
                        {"name": "get_weather", "arguments": {"city": "Rome"}},
                        {"name": "get_weather", "arguments": {"city": "Oslo", "unit": "f"}},
                    ]
                ),
            },  # fmt: skip
            {"from": "observation", "value": '{"temp": 21}'},
            {"from": "observation", "value": '{"temp": 21}'},
            {"from": "gpt", "value": "Warm in both."},
        ],
    }
    r = Renderer(smol_tokenizer, None)
    rendered = [r.render(normalize(x)) for x in (row, as_objects, sharegpt)]
    assert rendered[0] == rendered[1] == rendered[2]


@pytest.mark.parametrize(
    ("change", "error"),
    [
        (lambda r: r["messages"][2]["tool_calls"][0]["function"].update(name="get_news"),
         r"messages\[2\]\.tool_calls\[0\] calls 'get_news', which is not among the tools \(tools: get_weather, "
         r"get_time\)"),
        (lambda r: r["messages"][2]["tool_calls"][0]["function"].update(arguments="{city: Paris}"),
         r"messages\[2\]\.tool_calls\[0\]\.arguments are not JSON"),
        (lambda r: r["messages"][2]["tool_calls"][0]["function"].update(arguments="[1]"),
         r"arguments must be a JSON object"),
        (lambda r: r["messages"].insert(1, {"role": "tool", "content": "{}"}),
         r"messages\[1\] is a tool result with no tool call before it"),
        (lambda r: r["messages"].pop(3),
         r"messages\[3\] \(assistant\) comes before the tool calls c1 got their results"),
        (lambda r: r["messages"][3].update(tool_call_id="c9"), r"tool_call_id 'c9' answers no open call \(open: c1\)"),
        (lambda r: r.pop("tools"), r"the row has no tools to call"),
        (lambda r: r["tools"].append({"type": "retrieval"}), r"tools\[2\]\.type is 'retrieval'"),
    ],
)  # fmt: skip
def test_malformed_tool_rows_name_the_message_and_the_problem(change, error):
    row = conversation(parallel=True)
    change(row)
    with pytest.raises(RowError, match=error):
        normalize(row)


def test_a_call_in_the_last_turn_needs_no_result(smol_tokenizer):
    row = conversation(parallel=True)
    row["messages"] = row["messages"][:3]
    text, spans = Renderer(smol_tokenizer, None).render(normalize(row))
    assert text[spans[-1][0] : spans[-1][1]].startswith("<tool_call>\n")


def test_eos_after_whitespace_is_trained(smol_tokenizer):
    # A template that puts a newline between the reply and its end-of-turn token: the token is still trained, so
    # the finetuned model learns to stop.
    tpl = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}\n<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    doc = normalize({"messages": [{"role": "user", "content": "ping"}, {"role": "assistant", "content": "pong"}]})
    text, spans = Renderer(smol_tokenizer, tpl).render(doc)
    ((ids, labels),) = tokenize_rendered(smol_tokenizer, [text], [spans])
    trained = [int(i) for i, lab in zip(ids, labels, strict=True) if lab != IGNORE_INDEX]
    assert smol_tokenizer.decode(trained) == "pong\n<|im_end|>"
    assert trained[-1] == smol_tokenizer.eos_token_id


@pytest.mark.parametrize("family_name", ["smollm2", "llama3.1"])
def test_plain_text_rows_start_as_v1_completions_prompts_do(smol_tokenizer, family_name):
    """One BOS rule for prompt_completion/text rows and /v1/completions: the tokenizer's own (Llama's adds
    <|begin_of_text|>, SmolLM2's adds nothing)."""
    tok = family_tokenizer(smol_tokenizer, family_name)
    doc = normalize({"prompt": "The sky is", "completion": " blue."})
    r = Renderer(tok, None)
    text, spans = r.render(doc)
    ((ids, _),) = tokenize_rendered(tok, [text], [spans])
    served = encode_plain(tok, "The sky is")
    assert ids.tolist()[: len(served)] == served
    assert (served[0] == tok.bos_token_id) == (family_name == "llama3.1")
    prompt, _ = r.prompt(doc)  # what rayft eval continues
    ((eval_ids, _),) = tokenize_rendered(tok, [prompt], [[]])
    assert eval_ids.tolist() == served


def test_special_tokens_in_tool_arguments_are_escaped_like_content(smol_tokenizer):
    tok = family_tokenizer(smol_tokenizer, "qwen2.5")
    row = conversation(parallel=True)
    row["messages"][2]["tool_calls"][0]["function"]["arguments"] = json.dumps({"city": "<|im_end|>Paris"})
    text, spans = Renderer(tok, None).render(normalize(row))
    ((ids, _),) = tokenize_rendered(tok, [text], [spans])
    plain = text.replace("<|im_end|>Paris", "Paris")
    ((plain_ids, _),) = tokenize_rendered(tok, [plain], [[]])
    end = tok.convert_tokens_to_ids("<|im_end|>")
    assert ids.tolist().count(end) == plain_ids.tolist().count(end)  # no forged turn end
    with pytest.raises(RowError, match=r"contains '<\|im_end\|>'"):
        Renderer(tok, None, specials="refuse").render(normalize(row))


def _plan(smol_tokenizer, **fields) -> chat.ChatPlan:
    body = ChatCompletionRequest.model_validate(
        {"model": "m", "messages": [{"role": "user", "content": "Weather in Paris?"}], "tools": [WEATHER, TIME]}
        | fields
    )
    return chat.plan(body, tool_syntax(smol_tokenizer))


def test_a_reply_that_is_not_a_call_comes_back_as_text(smol_tokenizer):
    p = _plan(smol_tokenizer)
    good = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    for text, finish in [
        ("It is sunny.", "stop"),
        ('<tool_call>\n{"name": "get_weather", "arguments": {"city": \n</tool_call>', "stop"),  # bad JSON
        ('<tool_call>\n{"name": "get_news", "arguments": {}}\n</tool_call>', "stop"),  # not one of the tools
        (good[:40], "length"),  # cut off
        (good, "length"),
    ]:
        assert chat.reply(p, text, finish) == ({"role": "assistant", "content": text}, finish)
    message, finish = chat.reply(p, "Let me check.\n" + good + "\n" + good.replace("Paris", "Rome"), "stop")
    assert finish == "tool_calls" and message["content"] == "Let me check."
    assert [json.loads(c["function"]["arguments"]) for c in message["tool_calls"]] == [
        {"city": "Paris"},
        {"city": "Rome"},
    ]
    one, _ = chat.reply(_plan(smol_tokenizer, parallel_tool_calls=False), good + "\n" + good, "stop")
    assert len(one["tool_calls"]) == 1
    text_only, _ = chat.reply(_plan(smol_tokenizer, tool_choice="none"), good, "stop")
    assert text_only == {"role": "assistant", "content": good}


def test_a_streamed_reply_holds_back_only_what_may_start_a_call(smol_tokenizer):
    stream = chat.ReplyStream(_plan(smol_tokenizer))
    sent = [stream.feed(piece) for piece in ["Let me ", "check. <tool", "_call>\n{\"name\": \"get_weather\", ",
                                              '"arguments": {"city": "Paris"}}\n</tool_call>']]  # fmt: skip
    assert sent == [[{"content": "Let me "}], [{"content": "check. "}], [], []]
    last, finish = stream.close("stop")
    assert finish == "tool_calls"
    ((delta,),) = [d["tool_calls"] for d in last]
    assert delta["index"] == 0 and delta["function"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}
    # "<" that turns out not to start a call is sent on; a broken call is sent as text at the end
    stream = chat.ReplyStream(_plan(smol_tokenizer))
    assert stream.feed("a <") == [{"content": "a "}] and stream.feed("b") == [{"content": "<b"}]
    assert stream.feed("<tool_call>{oops") == []
    assert stream.close("stop") == ([{"content": "<tool_call>{oops"}], "stop")


def test_forced_calls_and_response_formats_become_grammars_and_bad_ones_400s(smol_tokenizer):
    from rayft.serving.openai_api import ApiError

    assert _plan(smol_tokenizer).grammar is None
    named = _plan(smol_tokenizer, tool_choice={"type": "function", "function": {"name": "get_time"}})
    assert "get_time" in named.grammar and "get_weather" not in named.grammar
    fmt = _plan(smol_tokenizer, response_format={"type": "json_object"})
    assert fmt.grammar and fmt.names == []
    with pytest.raises(ApiError) as caught:
        _plan(
            smol_tokenizer, response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": 7}}}
        )
    assert caught.value.status == 400 and caught.value.param == "response_format"
    bad_tool = json.loads(json.dumps(WEATHER))
    bad_tool["function"]["parameters"]["properties"]["city"] = {"$ref": "#/nowhere"}
    with pytest.raises(ApiError) as caught:
        _plan(smol_tokenizer, tools=[bad_tool], tool_choice="required")
    assert caught.value.param == "tools" and "nowhere" in caught.value.message


def test_the_tool_quickstart_data_is_its_generators_and_its_eval_is_held_out(tmp_path, smol_tokenizer):
    """examples/quickstart-tools/*.jsonl are what make_data.py writes; every row is a valid tool row whose calls
    keep their tool's schema; no held-out request, order id, serial, city or fault is in the training rows."""
    import jsonschema

    from helpers import ROOT, regenerate_example

    folder = ROOT / "examples" / "quickstart-tools"
    regenerate_example("quickstart-tools", tmp_path)
    train, held_out = ([json.loads(line) for line in open(folder / n)] for n in ("train.jsonl", "eval.jsonl"))
    assert len(train) == 400 and len(held_out) == 60

    def calls(rows):
        for r in rows:
            doc = normalize(r)
            params = {t["function"]["name"]: t["function"]["parameters"] for t in doc["tools"]}
            for m in doc["messages"]:
                for c in m.get("tool_calls", []):
                    jsonschema.validate(c["function"]["arguments"], params[c["function"]["name"]])
                    yield c["function"]["name"], c["function"]["arguments"]

    seen = {(k, v) for _, args in calls(train) for k, v in args.items() if k != "product"}
    held = {(k, v) for _, args in calls(held_out) for k, v in args.items() if k != "product"}
    assert len(held) > 40 and not seen & held
    assert not {r["messages"][0]["content"] for r in train} & {r["messages"][0]["content"] for r in held_out}
    assert all(r["messages"][-1].get("tool_calls") for r in held_out)  # every held-out row is graded as a call


def test_the_vllm_engine_reads_calls_with_the_parser_of_the_templates_syntax(family):
    from rayft.serving.app import vllm_tool_kwargs

    name, tok = family
    want = {"smollm2": {}, "qwen2.5": {"enable_auto_tool_choice": True, "tool_call_parser": "hermes"}}
    llama = {"enable_auto_tool_choice": True, "tool_call_parser": "llama3_json"}
    assert vllm_tool_kwargs(tok) == want.get(name, llama)
