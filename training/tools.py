"""Tool calls: the rows that teach them, the rendering that training and the endpoint share, the parser that reads
them back out of a reply, and the grammar that forces one.

The normalized forms (what `normalize_tools` and `normalize_call` return, what the chat renderer and the endpoint
take):

    a tool:     {"type": "function", "function": {"name": str, "description": str?, "parameters": {schema}?}}
    a call:     {"id": str, "type": "function", "function": {"name": str, "arguments": {object}}}
    assistant:  {"role": "assistant", "content": str, "tool_calls": [call, ...]}   (content may be "")
    a result:   {"role": "tool", "content": str, "tool_call_id": str, "name": str}

Two renderings (`template_input`), chosen by the chat template:

- **native**: the template reads `tools` (Qwen2.5/3, Llama 3.x, Mistral, SmolLM3, ...). Messages and tools go to
  it as transformers' templates expect them (arguments as objects), and the template decides the text.
- **rayft**: the template knows nothing of tools (the built-in SmolLM2). rayft writes the tools and calls as plain
  message text, and the template renders those messages as usual:
    - the system turn: the row's system message, a blank line, then `TOOLS_PREAMBLE` and the tools' JSON, one per
      line, between `<tools>` and `</tools>` (a system turn of its own when the row has none);
    - an assistant call: `<tool_call>`, newline, `{"name": ..., "arguments": {...}}`, newline, `</tool_call>`;
      several calls one per line; text before them, if any, then a newline;
    - results: the results that follow one call turn become one user turn, each result as `<tool_response>`,
      newline, its content, newline, `</tool_response>`, one per line.

Replies are read back (`ToolSyntax.parse`) in the syntax the rendering taught: `<tool_call>` blocks (rayft's format,
Qwen and other Hermes-style templates), a bare JSON object (Llama 3.x), or a `[TOOL_CALLS]` list (Mistral).
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

TOOLS_PREAMBLE = (
    "You can call the tools below. To call one, reply with <tool_call>, then a JSON object with its name and "
    "arguments, then </tool_call>; for several calls, one such block per line."
)
TOOL_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


class ToolError(ValueError):
    """A tool, call or result that cannot be used; the message names the field."""


# --------------------------------------------------------------------------- rows and requests


def normalize_tools(value: Any, field: str = "tools") -> list[dict]:
    """A row's or request's tools in OpenAI's form. Takes OpenAI's list ({"type": "function", "function": {...}}),
    bare function objects ({"name", "description", "parameters"}, as LLaMA-Factory writes them) and either as a
    JSON string."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise ToolError(f"{field} is a string but not JSON ({e.msg} at column {e.colno})") from None
    if value is None or value == []:
        return []
    if not isinstance(value, list):
        raise ToolError(f"{field} must be a list of function tools (got {type(value).__name__})")
    out, seen = [], set()
    for i, t in enumerate(value):
        where = f"{field}[{i}]"
        if not isinstance(t, dict):
            raise ToolError(f"{where} must be an object (got {type(t).__name__})")
        if "function" in t or "type" in t:
            if t.get("type", "function") != "function":
                raise ToolError(f"{where}.type is {t.get('type')!r}; only function tools are supported")
            fn, where = t.get("function"), where + ".function"
        else:
            fn = t
        if not isinstance(fn, dict):
            raise ToolError(f"{where} must be an object with name, description and parameters")
        name = fn.get("name")
        if not isinstance(name, str) or not TOOL_NAME.match(name):
            raise ToolError(f"{where}.name must be 1-64 letters, digits, '_', '.' or '-' (got {name!r})")
        if name in seen:
            raise ToolError(f"{where}.name {name!r} is defined twice")
        seen.add(name)
        clean: dict[str, Any] = {"name": name}
        if fn.get("description") is not None:
            if not isinstance(fn["description"], str):
                raise ToolError(f"{where}.description must be a string")
            clean["description"] = fn["description"]
        if fn.get("parameters") is not None:
            if not isinstance(fn["parameters"], dict):
                raise ToolError(f"{where}.parameters must be a JSON schema object")
            clean["parameters"] = fn["parameters"]
        out.append({"type": "function", "function": clean})
    return out


def tool_names(tools: list[dict]) -> list[str]:
    return [t["function"]["name"] for t in tools]


def normalize_call(call: Any, names: list[str], where: str, index: int = 0) -> dict:
    """One tool call in rayft's form, its arguments an object. Takes OpenAI's ({"id", "type", "function": {"name",
    "arguments"}}) and bare ({"name", "arguments" | "parameters"}) calls; arguments as an object or a JSON string."""
    if not isinstance(call, dict):
        raise ToolError(f"{where} must be an object with a function name and arguments")
    fn = call.get("function", call)
    if not isinstance(fn, dict):
        raise ToolError(f"{where}.function must be an object with name and arguments")
    name = fn.get("name")
    if not isinstance(name, str) or not name:
        raise ToolError(f"{where} has no function name")
    if name not in names:
        known = ", ".join(names) or "none"
        raise ToolError(f"{where} calls {name!r}, which is not among the tools (tools: {known})")
    args = fn.get("arguments", fn.get("parameters", {}))
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except json.JSONDecodeError as e:
            raise ToolError(f"{where}.arguments are not JSON: {e.msg} at column {e.colno} of {args[:80]!r}") from None
    if not isinstance(args, dict):
        raise ToolError(f"{where}.arguments must be a JSON object (got {type(args).__name__})")
    call_id = call.get("id")
    if call_id is not None and not isinstance(call_id, str):
        raise ToolError(f"{where}.id must be a string")
    return {"id": call_id or f"call_{index + 1}", "type": "function", "function": {"name": name, "arguments": args}}


def check_sequence(messages: list[dict], field: str = "messages") -> None:
    """Every result answers a call made before it and not answered yet (by `tool_call_id`, or in order), and every
    call is answered before the conversation goes on (a call in the last turn may stay unanswered: the model learns
    to make it). Fills in each result's `tool_call_id` and `name`."""
    pending: list[dict] = []
    for i, m in enumerate(messages):
        role = m["role"]
        if role == "tool":
            if not pending:
                raise ToolError(f"{field}[{i}] is a tool result with no tool call before it to answer")
            want = m.get("tool_call_id")
            hit = next((c for c in pending if c["id"] == want), None) if want else pending[0]
            if hit is None:
                ids = ", ".join(c["id"] for c in pending)
                raise ToolError(f"{field}[{i}].tool_call_id {want!r} answers no open call (open: {ids})")
            pending.remove(hit)
            m["tool_call_id"], m["name"] = hit["id"], hit["function"]["name"]
            continue
        if pending:
            ids = ", ".join(c["id"] for c in pending)
            raise ToolError(
                f"{field}[{i}] ({role}) comes before the tool calls {ids} got their results; add a tool message "
                "for each call right after the assistant turn that makes it"
            )
        if role == "assistant" and m.get("tool_calls"):
            pending = list(m["tool_calls"])
            ids = [c["id"] for c in pending]
            if len(set(ids)) != len(ids):
                raise ToolError(f"{field}[{i}].tool_calls repeat an id ({', '.join(ids)})")


SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system", "function_call": "assistant",
                  "observation": "tool"}  # fmt: skip


def sharegpt_messages(row: dict) -> list[dict]:
    """A ShareGPT row (`conversations` of {"from", "value"}, with optional `system` and `tools`) as OpenAI messages:
    human, gpt and system turns; `function_call` (a JSON call, or a list of calls) as an assistant's tool_calls;
    `observation` as a tool result."""
    conv = row.get("conversations")
    if not isinstance(conv, list) or not conv:
        raise ToolError("field 'conversations' must be a non-empty list of {from, value} objects")
    out: list[dict] = []
    if isinstance(row.get("system"), str) and row["system"].strip():
        out.append({"role": "system", "content": row["system"]})
    for i, turn in enumerate(conv):
        where = f"conversations[{i}]"
        if not isinstance(turn, dict):
            raise ToolError(f"{where} must be an object with from and value")
        who, value = turn.get("from"), turn.get("value")
        if who not in SHAREGPT_ROLES:
            raise ToolError(f"{where}.from is {who!r}; expected one of {', '.join(SHAREGPT_ROLES)}")
        if not isinstance(value, str):
            raise ToolError(f"{where}.value must be a string (got {type(value).__name__})")
        if who == "function_call":
            try:
                calls = json.loads(value)
            except json.JSONDecodeError as e:
                raise ToolError(f"{where}.value is not a JSON tool call: {e.msg} at column {e.colno}") from None
            calls = calls if isinstance(calls, list) else [calls]
            out.append({"role": "assistant", "content": "", "tool_calls": calls, "_where": where})
        else:
            out.append({"role": SHAREGPT_ROLES[who], "content": value, "_where": where})
    return out


# --------------------------------------------------------------------------- rendering


def template_source(tokenizer, chat_template: str | None = None) -> str:
    src = chat_template if chat_template is not None else getattr(tokenizer, "chat_template", None)
    if isinstance(src, dict):  # named templates: transformers picks "tool_use" when tools are passed
        src = src.get("tool_use") or src.get("default") or ""
    return src or ""


def native_tools(tokenizer, chat_template: str | None = None) -> bool:
    """Whether the chat template renders tools itself (it reads a `tools` variable)."""
    if chat_template is None and isinstance(getattr(tokenizer, "chat_template", None), dict):
        return "tool_use" in tokenizer.chat_template or bool(re.search(r"\btools\b", template_source(tokenizer)))
    return bool(re.search(r"\btools\b", template_source(tokenizer, chat_template)))


def _call_json(call: dict) -> str:
    return json.dumps({"name": call["function"]["name"], "arguments": call["function"]["arguments"]},
                      ensure_ascii=False)  # fmt: skip


def rayft_call_text(content: str, calls: list[dict]) -> str:
    """An assistant turn with calls, as rayft's format writes it (its content first)."""
    blocks = "\n".join(f"<tool_call>\n{_call_json(c)}\n</tool_call>" for c in calls)
    return f"{content}\n{blocks}" if content else blocks


def rayft_tools_text(tools: list[dict]) -> str:
    lines = "\n".join(json.dumps(t["function"], ensure_ascii=False) for t in tools)
    return f"{TOOLS_PREAMBLE}\n<tools>\n{lines}\n</tools>"


def template_input(
    tokenizer, messages: list[dict], tools: list[dict] | None, chat_template: str | None = None
) -> tuple[list[dict], list[dict] | None]:
    """(messages, tools) to hand the chat template: as they are for a template that renders tools itself, else
    rayft's format written into plain messages (and no tools)."""
    if not tools and not any(m.get("tool_calls") or m["role"] == "tool" for m in messages):
        return [{"role": m["role"], "content": m["content"]} for m in messages], None
    if native_tools(tokenizer, chat_template):
        out = []
        for m in messages:
            msg: dict[str, Any] = {"role": m["role"], "content": m["content"]}
            if m.get("tool_calls"):
                msg["tool_calls"] = [
                    {"id": c["id"], "type": "function", "function": dict(c["function"])} for c in m["tool_calls"]
                ]
            if m["role"] == "tool":
                msg["tool_call_id"], msg["name"] = m.get("tool_call_id"), m.get("name")
            out.append(msg)
        return out, (tools or None)
    out = []
    for m in messages:
        if m["role"] == "tool":
            block = f"<tool_response>\n{m['content']}\n</tool_response>"
            if out and out[-1].get("_results"):
                out[-1]["content"] += "\n" + block
            else:
                out.append({"role": "user", "content": block, "_results": True})
        elif m.get("tool_calls"):
            out.append({"role": "assistant", "content": rayft_call_text(m["content"], m["tool_calls"])})
        else:
            out.append({"role": m["role"], "content": m["content"]})
    if tools:
        text = rayft_tools_text(tools)
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": f"{out[0]['content']}\n\n{text}" if out[0]["content"] else text}
        else:
            out.insert(0, {"role": "system", "content": text})
    return [{"role": m["role"], "content": m["content"]} for m in out], None


# --------------------------------------------------------------------------- reading replies


@dataclass(frozen=True)
class ToolSyntax:
    """How a model writes its calls: `hermes` (<tool_call> blocks: rayft's format, Qwen), `llama3` (a bare JSON
    object with name and parameters), `mistral` ([TOOL_CALLS] and a JSON list)."""

    name: str

    def start(self, text: str) -> int | None:
        """Where a call may begin in a reply so far (None: not here, and no prefix of a marker at its end)."""
        if self.name == "hermes":
            at = text.find("<tool_call>")
            if at >= 0:
                return at
            for k in range(min(len("<tool_call>") - 1, len(text)), 0, -1):
                if text.endswith("<tool_call>"[:k]):
                    return len(text) - k
            return None
        body = text.lstrip()
        if not body:
            return 0 if text else None
        opener = "{" if self.name == "llama3" else "["
        if body.startswith(opener) or body.startswith("[TOOL_CALLS]"[: len(body)]) or body.startswith("<|python"):
            return len(text) - len(body)
        return None

    def parse(self, text: str, names: list[str]) -> tuple[str, list[dict]] | None:
        """(content, calls) when the reply holds well-formed calls of known tools; None: it is plain text."""
        raw: list[Any] = []
        content = ""
        if self.name == "hermes":
            blocks = list(re.finditer(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", text, re.DOTALL))
            if not blocks:
                return None
            for b in blocks:
                try:
                    raw.append(json.loads(b.group(1)))
                except json.JSONDecodeError:
                    return None
            content = re.sub(r"<tool_call>.*?(?:</tool_call>|$)", "", text, flags=re.DOTALL).strip()
        else:
            body = text.strip().removeprefix("<|python_tag|>").removeprefix("[TOOL_CALLS]").strip()
            try:
                value = json.loads(body)
            except json.JSONDecodeError:
                if self.name != "llama3" or ";" not in body:
                    return None
                try:  # Llama 3.x writes parallel calls separated by semicolons
                    value = [json.loads(p) for p in body.split(";") if p.strip()]
                except json.JSONDecodeError:
                    return None
            raw = value if isinstance(value, list) else [value]
        calls = []
        for i, c in enumerate(raw):
            try:
                call = normalize_call(c, names, "call", i)
            except ToolError:
                return None
            call["id"] = "call_" + uuid.uuid4().hex[:24]
            calls.append(call)
        return (content, calls) if calls else None


def tool_syntax(tokenizer, chat_template: str | None = None) -> ToolSyntax:
    """The syntax replies use for calls, from the chat template (rayft's format: hermes)."""
    if not native_tools(tokenizer, chat_template):
        return ToolSyntax("hermes")
    src = template_source(tokenizer, chat_template)
    if "<tool_call>" in src:
        return ToolSyntax("hermes")
    if "[TOOL_CALLS]" in src:
        return ToolSyntax("mistral")
    if '"parameters"' in src:
        return ToolSyntax("llama3")
    return ToolSyntax("hermes")


def call_arguments_json(call: dict) -> str:
    """A call's arguments as the JSON string OpenAI's API returns."""
    return json.dumps(call["function"]["arguments"], ensure_ascii=False)


# --------------------------------------------------------------------------- forcing a call

JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}  # json.dumps' own


def _call_schema(tool: dict, args_key: str) -> dict:
    fn = tool["function"]
    params = fn.get("parameters") or {"type": "object"}
    return {
        "type": "object",
        "properties": {"name": {"const": fn["name"]}, args_key: params},
        "required": ["name", args_key],
        "additionalProperties": False,
    }


def call_grammar(syntax: ToolSyntax, tools: list[dict], only: str | None = None, parallel: bool = True) -> str:
    """An llguidance Lark grammar whose every sentence is one call (or several, `parallel`) of the tools (or of the
    tool named `only`), written in `syntax`, the arguments valid against the tool's parameters schema. Raises
    ToolError for a syntax it cannot force (mistral's calls start with a special token)."""
    chosen = [t for t in tools if only is None or t["function"]["name"] == only]
    args_key = "parameters" if syntax.name == "llama3" else "arguments"
    schemas = [_call_schema(t, args_key) for t in chosen]
    one = schemas[0] if len(schemas) == 1 else {"anyOf": schemas}
    call = "%json " + json.dumps(one | {"x-guidance": JSON_STYLE})
    if syntax.name == "hermes":
        more = ' ("\\n" call)*' if parallel else ""
        return f'start: call{more}\ncall: "<tool_call>\\n" {call} "\\n</tool_call>"\n'
    if syntax.name == "llama3":
        return f"start: {call}\n"
    raise ToolError(f"forcing a tool call is not supported for the {syntax.name} tool syntax; use tool_choice auto")


def json_grammar(schema: dict) -> str:
    """An llguidance grammar for JSON valid against `schema` (response_format), in json.dumps' spacing."""
    return "start: %json " + json.dumps({**schema, "x-guidance": JSON_STYLE}) + "\n"


def grammar_error(grammar: str) -> str:
    """Why llguidance cannot compile a grammar ("" when it can)."""
    from llguidance import LLMatcher

    return LLMatcher.validate_grammar(grammar, None)
