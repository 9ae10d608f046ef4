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
