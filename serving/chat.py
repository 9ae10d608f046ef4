"""What a chat request asks beyond text, and its reply read back: tools, tool_choice and response_format.

`plan` turns a request into training's normalized messages and tools (rayft.training.tools: the forms the chat
renderer takes, so the prompt is rendered exactly as the training rows were) and, where the request forces
something (tool_choice required or named, response_format json_object or json_schema), the llguidance grammar the
batching engine holds every generated token to. `reply` reads a finished reply into OpenAI's message, its calls in
`tool_calls` with finish_reason "tool_calls"; `ReplyStream` does the same for a streamed reply, holding back only
what may be the start of a call. A reply that does not parse as a call is returned as text.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from rayft.serving.openai_api import ApiError, ChatCompletionRequest
from rayft.training.tools import (
    ToolError,
    ToolSyntax,
    call_arguments_json,
    call_grammar,
    grammar_error,
    json_grammar,
    normalize_tools,
    tool_names,
)


@dataclass
class ChatPlan:
    messages: list[dict]  # normalized, as training's documents hold them
    tools: list[dict] | None  # rendered into the prompt
    syntax: ToolSyntax
    names: list[str] = field(default_factory=list)  # tools a reply may call (read back); [] = text only
    grammar: str | None = None  # forced by constrained decoding
    parallel: bool = True


def _error(message: str, param: str) -> ApiError:
    return ApiError(400, message, param=param, code="invalid_request")


def _compile_error(grammar: str) -> str:
    """llguidance's reason, its first line without the position prefix."""
    msg = grammar_error(grammar)
    return re.sub(r"^at \d+\(\d+\): ", "", msg.strip().splitlines()[0]) if msg else ""


def plan(body: ChatCompletionRequest, syntax: ToolSyntax) -> ChatPlan:
    """The request's messages, tools and grammar; ApiError 400 naming the field for anything that cannot be served."""
    from rayft.training.formats import RowError, _message_list
    from rayft.training.tools import check_sequence

    try:
        tools = normalize_tools([t.model_dump(exclude_none=True) for t in body.tools or []], "tools")
    except ToolError as e:
        raise _error(str(e), "tools") from None
    raw = []
    for m in body.messages:
        msg: dict = {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
        if m.tool_calls:
            msg["tool_calls"] = [c.model_dump(exclude_none=True) for c in m.tool_calls]
        if m.tool_call_id is not None:
            msg["tool_call_id"] = m.tool_call_id
        raw.append(msg)
    try:
        messages = _message_list(raw, "messages", tools, empty_replies=True)
        check_sequence(messages, "messages")
    except (RowError, ToolError) as e:
        raise _error(str(e), "messages") from None

    choice = body.tool_choice
    if choice is not None and not tools:
        raise _error("tool_choice needs tools: send the functions the model may call in `tools`", "tool_choice")
    out = ChatPlan(messages, tools or None, syntax, parallel=body.parallel_tool_calls)
    if choice == "none":
        out.tools = None  # the model is not told of tools it may not call
    elif tools:
        out.names = tool_names(tools)
    forced = choice == "required" or not isinstance(choice, str | None)
    fmt = body.response_format
    if forced and fmt is not None and fmt.type != "text":
        raise _error(
            "response_format and a forced tool call (tool_choice required or named) cannot both hold; send one",
            "response_format",
        )
    if forced:
        only = None if choice == "required" else choice.function.name  # type: ignore[union-attr]
        if only is not None and only not in out.names:
            raise _error(f"tool_choice names {only!r}, which is not among the tools ({', '.join(out.names)})",
                         "tool_choice")  # fmt: skip
        try:
            out.grammar = call_grammar(syntax, tools, only, parallel=body.parallel_tool_calls and only is None)
        except ToolError as e:
            raise _error(str(e), "tool_choice") from None
        if why := _compile_error(out.grammar):
            raise _error(f"tools: a tool's parameters schema cannot be enforced: {why}", "tools")
    elif fmt is not None and fmt.type != "text":
        schema = {"type": "object"} if fmt.type == "json_object" else fmt.json_schema.json_schema  # type: ignore[union-attr]
        out.grammar = json_grammar(schema)
        if why := _compile_error(out.grammar):
            raise _error(f"response_format.json_schema.schema cannot be enforced: {why}", "response_format")
        out.names = []  # the reply is the JSON asked for, never a call
    return out


def prompt_ids(renderer, p: ChatPlan) -> list[int]:
    """The prompt's token ids, rendered by training's chat renderer (tools and calls included; special-token text in
    content escaped, refused or allowed as configured), so it is the tokens the model was trained on. ApiError 400
    for a conversation the template or the special-token rule refuses."""
    from rayft.training.formats import RowError
    from rayft.training.specials import SpecialTokenInContent, encode

    try:
        ((ids,), _) = encode(renderer.tok, [renderer.generation_prompt(p.messages, p.tools)])
    except RowError as e:
        if isinstance(e.__cause__, SpecialTokenInContent):
            raise ApiError(
                400, f"{e.__cause__}; remove it from the message", param="messages", code="special_token_in_content"
            ) from None
        raise ApiError(400, f"messages: {e}", param="messages") from None
    except Exception as e:  # noqa: BLE001 - a template that rejects this conversation
        raise ApiError(400, f"messages: the model's chat template rejected them: {e}", param="messages") from None
    return list(ids)


def _calls_out(calls: list[dict]) -> list[dict]:
    return [
        {"id": c["id"], "type": "function",
         "function": {"name": c["function"]["name"], "arguments": call_arguments_json(c)}}
        for c in calls
    ]  # fmt: skip


def _read(p: ChatPlan, text: str, finish: str) -> tuple[str, list[dict]] | None:
    if not p.names or finish != "stop":
        return None
    parsed = p.syntax.parse(text, p.names)
    if parsed is None:
        return None
    content, calls = parsed
    return content, calls if p.parallel else calls[:1]


def reply(p: ChatPlan, text: str, finish: str) -> tuple[dict, str]:
    """(message, finish_reason) of a finished reply."""
    parsed = _read(p, text, finish)
    if parsed is None:
        return {"role": "assistant", "content": text}, finish
    content, calls = parsed
    return {"role": "assistant", "content": content or None, "tool_calls": _calls_out(calls)}, "tool_calls"


class ReplyStream:
    """A streamed reply's deltas: text as it comes, except from where a call may begin, which is held until the
    reply ends and then sent as `tool_calls` deltas (or as text, if it was not a call after all)."""

    def __init__(self, p: ChatPlan):
        self.plan = p
        self.held = ""  # text from where a call may begin
        self.calling = False

    def feed(self, text: str) -> list[dict]:
        if not self.plan.names:
            return [{"content": text}] if text else []
        if self.calling:
            self.held += text
            return []
        self.held += text
        at = self.plan.syntax.start(self.held)
        if at is None:
            out, self.held = self.held, ""
            return [{"content": out}] if out else []
        out, self.held = self.held[:at], self.held[at:]
        marker = "<tool_call>" if self.plan.syntax.name == "hermes" else ""
        self.calling = bool(self.held.strip()) and self.held.startswith(marker)
        return [{"content": out}] if out else []

    def close(self, finish: str) -> tuple[list[dict], str]:
        """The last deltas and the finish reason."""
        parsed = _read(self.plan, self.held, finish) if self.held else None
        if parsed is None:
            return ([{"content": self.held}] if self.held else []), finish
        content, calls = parsed
        out: list[dict] = [{"content": content}] if content else []
        for k, c in enumerate(_calls_out(calls)):
            out.append({"tool_calls": [{"index": k} | c]})
        return out, "tool_calls"
