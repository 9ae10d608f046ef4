"""Row formats, templates, loss masks and packing: the pure (Ray-free) half of the data pipeline.

A raw row becomes a *document*: either a conversation (`messages`, `alpaca`) rendered by a
chat template, or plain segments (`prompt_completion`, `text`). Rendering yields the text and
the character spans that carry loss; tokenizing with offsets turns spans into labels, so the
tokens are exactly those the model sees at inference.
"""

from __future__ import annotations

import json
import re
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from rayft.training.specials import SpecialsMode

IGNORE_INDEX = -100
FORMATS = ("messages", "sharegpt", "alpaca", "prompt_completion", "text")
ROLES = ("system", "user", "assistant", "tool")


class RowError(ValueError):
    """A row that cannot be used; the message names the field and the problem."""


class TemplateError(ValueError):
    """The configured template cannot render the data at all (not a single bad row)."""


# --------------------------------------------------------------------------- validation


def detect_format(row: dict) -> str:
    if ("chosen" in row and "rejected" in row) or ("preferred_output" in row or "non_preferred_output" in row):
        return "preference"
    if "messages" in row:
        return "messages"
    if "conversations" in row:
        return "sharegpt"
    if "instruction" in row and "output" in row:
        return "alpaca"
    if "prompt" in row and "completion" in row:
        return "prompt_completion"
    if "text" in row:
        return "text"
    keys = ", ".join(sorted(row)) or "none"
    raise RowError(
        f"cannot tell the format from its keys ({keys}); expected messages, conversations (sharegpt), "
        "instruction+output (alpaca), "
        "prompt+completion, text, or a preference pair (prompt+chosen+rejected, or input+preferred_output+"
        "non_preferred_output)"
    )


def _need_str(row: dict, key: str, *, allow_empty: bool = False, where: str = "") -> str:
    if key not in row:
        raise RowError(f"missing field {where}{key!r}")
    value = row[key]
    if not isinstance(value, str):
        raise RowError(f"field {where}{key!r} must be a string (got {type(value).__name__})")
    if not allow_empty and not value.strip():
        raise RowError(f"field {where}{key!r} is empty")
    return value


def normalize(row: Any, fmt: str = "auto") -> dict:
    """Validate one raw row and return its document: {"kind": "chat", "messages": [...]} or
    {"kind": "segments", "segments": [[text, trained], ...]}. Raises RowError."""
    if not isinstance(row, dict):
        raise RowError(f"a row must be a JSON object (got {type(row).__name__})")
    if fmt == "auto":
        fmt = detect_format(row)
    if fmt in ("messages", "sharegpt"):
        return _chat(row, fmt)
    if fmt == "alpaca":
        instruction = _need_str(row, "instruction")
        extra = row.get("input") or ""
        if not isinstance(extra, str):
            raise RowError(f"field 'input' must be a string (got {type(extra).__name__})")
        output = _need_str(row, "output")
        user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
        if isinstance(row.get("system"), str) and row["system"].strip():
            messages.insert(0, {"role": "system", "content": row["system"]})
        return {"kind": "chat", "messages": messages}
    if fmt == "prompt_completion":
        prompt = _need_str(row, "prompt", allow_empty=True)
        completion = _need_str(row, "completion")
        return {"kind": "segments", "segments": [[prompt, False], [completion, True]], "eos": True}
    if fmt == "text":
        return {"kind": "segments", "segments": [[_need_str(row, "text"), True]], "eos": True}
    if fmt == "preference":
        return _pair(row)
    if fmt == "prompt":
        return _rl_prompt(row)
    raise RowError(f"unknown format {fmt!r}")


PROMPT_KEYS = ("messages", "prompt")  # what a prompt row's prompt is; every other field is for its graders


def _rl_prompt(row: dict) -> dict:
    """A prompt to sample answers to (training.objective grpo): `messages` ending in a user turn (OpenAI's
    reinforcement format), or `prompt` (plain text, or a message list). The whole row is the graders' `item`
    (its fields by name for reward functions). Its document: {"kind": "prompt", "messages" | "text", "item"}."""
    if "messages" in row:
        messages, field = row["messages"], "messages"
    elif "prompt" in row:
        if isinstance(row["prompt"], str):
            return {"kind": "prompt", "text": _need_str(row, "prompt"), "item": row}
        messages, field = row["prompt"], "prompt"
    else:
        keys = ", ".join(sorted(row)) or "none"
        raise RowError(
            f"a prompt row needs 'messages' (ending in a user turn) or 'prompt' (got keys: {keys}); the other fields "
            "are for the graders (e.g. reference_answer)"
        )
    out = _message_list(
        [m | {"role": "system"} if isinstance(m, dict) and m.get("role") == "developer" else m for m in messages]
        if isinstance(messages, list)
        else messages,
        field,
    )
    if out[-1]["role"] != "user":
        raise RowError(
            f"{field}[{len(out) - 1}] is a {out[-1]['role']!r} message; a prompt row ends with the user turn the model "
            "answers (put a reference answer in a field of its own, e.g. reference_answer, for the grader)"
        )
    return {
        "kind": "prompt",
        "messages": [m | {"weight": 0} if m["role"] == "assistant" else m for m in out],
        "item": row,
    }


def _pair(row: dict) -> dict:
    """A preference pair: one prompt and two answers, the first better. TRL's {prompt, chosen, rejected} (strings:
    plain text; message lists: chat) or OpenAI's {input: {messages}, preferred_output, non_preferred_output}.
    Its document holds the two conversations, each the shared prompt plus one answer: only the answers carry
    loss (assistant turns inside the prompt get weight 0)."""
    if "preferred_output" in row or "non_preferred_output" in row:
        inp = row.get("input")
        if not isinstance(inp, dict) or "messages" not in inp:
            raise RowError("field 'input' must be an object with 'messages' (OpenAI's preference format)")
        prompt, keys = _prompt_messages(inp["messages"], "input.messages"), ("preferred_output", "non_preferred_output")
    else:
        keys = ("chosen", "rejected")
        if "prompt" not in row:
            raise RowError("missing field 'prompt': a preference pair needs the prompt both answers reply to")
        if isinstance(row["prompt"], str):
            prompt_text = _need_str(row, "prompt", allow_empty=True)
            chosen, rejected = (_need_str(row, k) for k in keys)
            if chosen == rejected:
                raise RowError("chosen and rejected are the same answer; a pair needs two different answers")
            docs = [
                {"kind": "segments", "segments": [[prompt_text, False], [a, True]], "eos": True}
                for a in (chosen, rejected)
            ]
            return {"kind": "pair", "chosen": docs[0], "rejected": docs[1]}
        prompt = _prompt_messages(row["prompt"], "prompt")
    answers = [_answer_messages(row.get(k), k) for k in keys]
    if answers[0] == answers[1]:
        raise RowError(f"{keys[0]} and {keys[1]} are the same answer; a pair needs two different answers")
    chosen, rejected = ({"kind": "chat", "messages": prompt + a} for a in answers)
    return {"kind": "pair", "chosen": chosen, "rejected": rejected}


def _prompt_messages(messages: Any, field: str) -> list[dict]:
    out = _message_list(messages, field)
    if not any(m["role"] == "user" for m in out):
        raise RowError(f"field {field!r} has no user message to answer")
    return [m | {"weight": 0} if m["role"] == "assistant" else m for m in out]


def _answer_messages(answer: Any, field: str) -> list[dict]:
    if answer is None:
        raise RowError(f"missing field {field!r}")
    if isinstance(answer, str):
        if not answer.strip():
            raise RowError(f"field {field!r} is empty")
        return [{"role": "assistant", "content": answer}]
    out = _message_list(answer, field)
    bad = [i for i, m in enumerate(out) if m["role"] != "assistant"]
    if bad:
        raise RowError(f"{field}[{bad[0]}].role is {out[bad[0]]['role']!r}; an answer holds assistant messages only")
    return [{"role": "assistant", "content": m["content"]} for m in out]


def _chat(row: dict, fmt: str) -> dict:
    """A conversation row (OpenAI's messages, or ShareGPT's conversations), with its tools and tool calls."""
    from rayft.training.tools import ToolError, check_sequence, normalize_tools, sharegpt_messages

    try:
        tools = normalize_tools(row.get("tools"))
        if fmt == "sharegpt":
            raw, field = sharegpt_messages(row), "conversations"
        else:
            raw, field = row["messages"], "messages"
        out = _message_list(raw, field, tools)
        check_sequence(out, field)
    except ToolError as e:
        raise RowError(str(e)) from None
    if not any(m["role"] == "assistant" for m in out):
        raise RowError("the conversation has no assistant message, so there is nothing to learn from")
    if not any(m["role"] == "assistant" and m.get("weight", 1) for m in out):
        raise RowError("every assistant message has weight 0, so there is nothing to learn from")
    return {"kind": "chat", "messages": out, "tools": tools} if tools else {"kind": "chat", "messages": out}


def _message_list(
    messages: Any, field: str, tools: list[dict] | None = None, empty_replies: bool = False
) -> list[dict]:
    """Checked messages: role and content, an assistant's `weight` and `tool_calls` (arguments as objects, each
    naming one of `tools`), a tool result's `tool_call_id`. `empty_replies`: an assistant turn may be empty (a
    request's history; a training row's reply may not)."""
    from rayft.training.tools import ToolError, normalize_call, tool_names

    if not isinstance(messages, list) or not messages:
        raise RowError(f"field {field!r} must be a non-empty list of {{role, content}} objects")
    names = tool_names(tools or [])
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise RowError(f"{field}[{i}] must be an object with role and content (got {type(m).__name__})")
        where = f"{m['_where']}." if "_where" in m else f"{field}[{i}]."
        role = m.get("role")
        if role not in ROLES:
            raise RowError(f"{where}role is {role!r}; expected one of {', '.join(ROLES)}")
        calls = m.get("tool_calls") if role == "assistant" else None
        if m.get("tool_calls") and role != "assistant":
            raise RowError(f"{where}tool_calls are only allowed on assistant messages")
        if calls is not None and (not isinstance(calls, list) or not calls):
            raise RowError(f"{where}tool_calls must be a non-empty list of calls")
        if calls:
            if not names:
                raise RowError(f"{where}tool_calls: the row has no tools to call; add the row's `tools` (schemas)")
            try:
                calls = [normalize_call(c, names, f"{where}tool_calls[{k}]", k) for k, c in enumerate(calls)]
            except ToolError as e:
                raise RowError(str(e)) from None
            content = m.get("content") or ""
            if not isinstance(content, str):
                raise RowError(f"{where}content must be a string or null (got {type(content).__name__})")
        else:
            content = _need_str(m, "content", allow_empty=(role != "assistant" or empty_replies), where=where)
        msg: dict[str, Any] = {"role": role, "content": content}
        if calls:
            msg["tool_calls"] = calls
        if role == "tool" and m.get("tool_call_id") is not None:
            if not isinstance(m["tool_call_id"], str):
                raise RowError(f"{where}tool_call_id must be a string")
            msg["tool_call_id"] = m["tool_call_id"]
        if "weight" in m:
            if role != "assistant":
                raise RowError(f"{where}weight is only allowed on assistant messages")
            if m["weight"] not in (0, 1) or isinstance(m["weight"], bool):
                raise RowError(f"{where}weight must be 0 or 1 (got {m['weight']!r})")
            msg["weight"] = int(m["weight"])
        out.append(msg)
    return out


# --------------------------------------------------------------------------- rendering


def _extend(text: str, suffix: str) -> str:
    """`text + suffix`, keeping a specials.Rendered's escaped ranges."""
    from rayft.training.specials import Rendered

    return Rendered(text + suffix, text.literal, text.cuts) if isinstance(text, Rendered) else text + suffix


ALPACA_PREAMBLE = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
)


class Renderer:
    """Turns documents into (text, trained character spans) for one tokenizer and template. `specials` is what
    special-token text in message content becomes (data.special_tokens_in_content; None: its default; see
    training/specials.py). Escaped texts come back as specials.Rendered, which tokenize_rendered reads right."""

    def __init__(
        self,
        tokenizer,
        template: str | None,
        train_on_inputs: bool = False,
        specials: SpecialsMode | None = None,
    ):
        from rayft.training.config import DataConfig
        from rayft.training.specials import bos_text, special_tokens

        self.tok = tokenizer
        self.train_on_inputs = train_on_inputs
        self.specials_mode: SpecialsMode = specials or DataConfig.model_fields["special_tokens_in_content"].default
        self.content_specials = special_tokens(tokenizer)
        self.eos = tokenizer.eos_token or ""
        self.bos = bos_text(tokenizer)  # plain text (segments) starts as the tokenizer starts it: /v1/completions too
        # Longest first, so "<|im_end|>" wins over any shorter special token it starts with.
        self.specials = sorted({t for t in tokenizer.all_special_tokens if t}, key=len, reverse=True)
        if template == "alpaca":
            self.mode, self.jinja = "alpaca", None
        elif template:
            self.mode, self.jinja = "jinja", template
        else:
            self.mode, self.jinja = "jinja", None

    def render(self, doc: dict) -> tuple[str, list[tuple[int, int]]]:
        if doc["kind"] == "prompt":
            return self.rollout_prompt(doc), []
        if doc["kind"] == "segments":
            return self._render_segments(doc)
        if self.mode == "alpaca":
            if doc.get("tools") or any(m.get("tool_calls") for m in doc["messages"]):
                raise RowError("data.template alpaca cannot render tools; use the model's chat template")
            return self._render_alpaca(doc["messages"])
        return self._render_chat(doc["messages"], doc.get("tools"))

    def prompt(self, doc: dict) -> tuple[str, str]:
        """(prompt, reference) for inference: the text a model continues to answer a document's last
        reply, and that reply. Raises RowError for documents without a prompt/answer split (`text`)."""
        if doc["kind"] == "segments":
            segments = doc["segments"]
            if len(segments) < 2 or not segments[-1][1]:
                raise RowError(
                    "plain `text` rows have no prompt and answer; evaluate messages, alpaca or prompt_completion"
                )
            return self.bos + "".join(s for s, _ in segments[:-1]), segments[-1][0]
        messages = doc["messages"]
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        context = messages[:last]
        if not any(m["role"] in ("user", "tool") for m in context):
            raise RowError("the last assistant reply has no user message before it to answer")
        if self.mode == "alpaca":
            text, _ = self._render_alpaca(context)
            return _extend(text, "### Response:\n"), messages[last]["content"]
        tools = doc.get("tools")
        if messages[last].get("tool_calls"):  # the reply as the model should write it: its calls in the tool syntax
            return self._apply(context, True, tools), self.reply_text(messages[: last + 1], tools)
        return self._apply(context, True, tools), messages[last]["content"]

    def generation_prompt(self, messages: list[dict], tools: list[dict] | None = None) -> str:
        """The text a model continues to answer `messages` (what the endpoint serves; normalized messages and
        tools, as training's documents hold them)."""
        turns: list[tuple[int, int]] = []
        if any(m["role"] == "assistant" for m in messages):
            try:  # the earlier replies' tokens as training split them
                turns, _ = self._turns(messages, tools)
            except RowError:  # a template that rewrites earlier turns: served as rendered
                turns = []
        return self._with_cuts(self._apply(messages, True, tools), turns)

    @staticmethod
    def _with_cuts(text: str, turns: list[tuple[int, int]]) -> str:
        from rayft.training.specials import Rendered

        if not turns:
            return text
        return Rendered(text, getattr(text, "literal", ()), [s for s, _ in turns])

    def reply_text(self, messages: list[dict], tools: list[dict] | None = None) -> str:
        """The last message of `messages` (an assistant turn) as the template writes it after the generation
        prompt, without its end-of-turn marker: what a model that learned it replies."""
        prefix = self._apply(messages[:-1], True, tools)
        upto = self._apply(messages, False, tools)
        if not upto.startswith(prefix):
            raise RowError("the chat template renders the earlier turns differently once this reply follows them")
        turn = upto[len(prefix) :]
        end = self._turn_end(turn)
        cut = turn[:end]
        for s in self.specials:  # the end-of-turn marker the turn ends with
            if cut.rstrip().endswith(s):
                cut = cut.rstrip()[: -len(s)]
                break
        return cut.strip()

    def rollout_prompt(self, doc: dict) -> str:
        """The text a model continues to answer a prompt row (training.objective grpo)."""
        if "text" in doc:
            return self.bos + doc["text"]
        if self.mode == "alpaca":
            text, _ = self._render_alpaca(doc["messages"])
            return _extend(text, "### Response:\n")
        return self._apply(doc["messages"], add_generation_prompt=True)

    def reference(self, doc: dict) -> tuple[str, list[tuple[int, int]]]:
        """The document rendered with only its last reply carrying loss (for reference perplexity)."""
        if doc["kind"] == "segments":
            return self._render_segments(doc)
        messages = [dict(m) for m in doc["messages"]]
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        for i, m in enumerate(messages):
            if m["role"] == "assistant":
                m["weight"] = 1 if i == last else 0
        return self.render({**doc, "messages": messages[: last + 1]})

    def _render_segments(self, doc: dict) -> tuple[str, list[tuple[int, int]]]:
        text, spans = self.bos, []
        segments = [list(s) for s in doc["segments"]]
        if doc.get("eos") and self.eos:
            segments[-1][0] += self.eos
        for piece, trained in segments:
            if trained or self.train_on_inputs:
                spans.append((len(text), len(text) + len(piece)))
            text += piece
        return text, spans

    def _render_alpaca(self, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
        from rayft.training.specials import Rendered, find_special, literal_ranges

        if self.specials_mode == "refuse" and (found := find_special(messages, self.content_specials)):
            raise RowError(self._refusal(found))
        escape = self.specials_mode == "escape"
        literal: list[tuple[int, int]] = []

        def content(text: str, c: str) -> str:  # content `c` appended to `text`, its specials marked when escaping
            if escape:
                literal.extend(literal_ranges(c, self.content_specials, at=len(text)))
            return text + c

        system = " ".join(m["content"] for m in messages if m["role"] == "system")
        text = content("", system) if system else ALPACA_PREAMBLE
        text, spans = text + "\n\n", []
        for m in messages:
            if m["role"] in ("user", "tool"):
                text = content(text + "### Instruction:\n", m["content"]) + "\n\n"
            elif m["role"] == "assistant":
                text += "### Response:\n"
                start = len(text)
                text = content(text, m["content"]) + self.eos
                if m.get("weight", 1):
                    spans.append((start, len(text)))
                text += "\n\n"
        if self.train_on_inputs:
            spans = [(0, len(text))]
        return (Rendered(text, literal) if literal else text), spans

    def _apply(self, messages: list[dict], add_generation_prompt: bool, tools: list[dict] | None = None) -> str:
        if self.jinja is None and not getattr(self.tok, "chat_template", None):
            raise TemplateError(
                "the model's tokenizer has no chat template, so chat rows (messages/alpaca) cannot be rendered; "
                "set data.template to 'alpaca' or to a Jinja chat template string"
            )
        from rayft.training.specials import SpecialTokenInContent, render_chat
        from rayft.training.tools import template_input

        plain, template_tools = template_input(self.tok, messages, tools, self.jinja)
        try:
            return render_chat(
                self.tok,
                plain,
                self.specials_mode,
                chat_template=self.jinja,
                add_generation_prompt=add_generation_prompt,
                tools=template_tools,
            )
        except SpecialTokenInContent as e:
            raise RowError(self._refusal(e)) from e  # the endpoint words its own 400 from the cause
        except (RowError, TemplateError):
            raise
        except Exception as e:  # noqa: BLE001 - the template's own refusal (raise_exception), or a Jinja error
            raise RowError(f"the chat template cannot render this conversation: {e}") from None

    @staticmethod
    def _refusal(e) -> str:
        return (
            f"{e}; remove it, or set data.special_tokens_in_content to escape (train on it as plain text) or "
            "allow (keep it a special token)"
        )

    def _render_chat(self, messages: list[dict], tools: list[dict] | None = None) -> tuple[str, list[tuple[int, int]]]:
        turns, full = self._turns(messages, tools)
        full = self._with_cuts(full, turns)
        if self.train_on_inputs:
            return full, [(0, len(full))]
        weighted = [m.get("weight", 1) for m in messages if m["role"] == "assistant"]
        return full, [t for t, w in zip(turns, weighted, strict=True) if w]

    def _turns(self, messages: list[dict], tools: list[dict] | None = None) -> tuple[list[tuple[int, int]], str]:
        """Where each assistant turn's trained text starts and ends in the rendered conversation, and that text.
        The assistant turn is what the template adds between "the conversation so far + the generation prompt"
        and "the conversation up to this reply": all of it is what the model must write, through the end-of-turn
        marker (whitespace the template puts before that marker included, so the model learns to stop).
        Templates whose earlier turns change as the conversation grows break this prefix property; then the
        reply's text is searched for (a tool call cannot be)."""
        full = self._apply(messages, False, tools)
        turns, cursor = [], 0
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            prefix = self._apply(messages[:i], True, tools) if i else ""
            upto = self._apply(messages[: i + 1], False, tools)
            if i and full.startswith(upto) and upto.startswith(prefix) and len(prefix) >= cursor:
                start = len(prefix)
                end = start + self._turn_end(upto[start:])
            elif m.get("tool_calls"):
                raise RowError(
                    f"messages[{i}]: the chat template renders earlier turns differently as the conversation grows, "
                    "so the tokens of this tool call cannot be marked"
                )
            else:
                start = full.find(m["content"].strip(), cursor)
                if start < 0:
                    raise RowError(
                        f"messages[{i}]: the chat template altered the assistant text; cannot mark its tokens"
                    )
                end = start + len(m["content"].strip())
                end += self._turn_end(full[end:], within_reply=False)
            cursor = end
            turns.append((start, end))
        return turns, full

    def _turn_end(self, turn: str, within_reply: bool = True) -> int:
        """Where the model's part of a rendered assistant turn ends: right after its end-of-turn special token
        (the first special that only whitespace follows up to the next turn), or, without one, at the end of its
        text. `within_reply=False`: `turn` starts right after the reply's text, so only whitespace and then a
        special token may be taken."""
        n = len(turn)
        for at in range(n):
            for s in self.specials:
                if turn.startswith(s, at):
                    if not within_reply and turn[:at].strip():
                        return 0
                    if within_reply and not self._ends_turn(turn, at + len(s)):
                        break
                    return at + len(s)
            else:
                if not within_reply and not turn[at].isspace():
                    return 0
        return len(turn.rstrip()) if within_reply else 0

    def _ends_turn(self, turn: str, pos: int) -> bool:
        """Whether nothing but whitespace follows `pos` up to the end of the turn text (or the next special)."""
        rest = turn[pos:]
        cut = min((rest.find(s) for s in self.specials if s in rest), default=len(rest))
        return not rest[:cut].strip()


# --------------------------------------------------------------------------- tokenizing


def tokenize_rendered(
    tokenizer, texts: list[str], spans: list[list[tuple[int, int]]]
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Token ids and labels for rendered texts; tokens overlapping a trained span carry loss. The special-token
    text that a Renderer escaped (specials.Rendered) is tokenized as plain text."""
    from rayft.training.specials import encode

    all_ids, all_offsets = encode(tokenizer, texts)
    out = []
    for ids, offsets, text_spans, text in zip(all_ids, all_offsets, spans, texts, strict=True):
        trained = np.zeros(len(text) + 1, dtype=np.int32)
        for s, e in text_spans:
            trained[s:e] = 1
        # A token is trained when it overlaps a trained span: BPE tokens such as " pong" begin
        # with the separator just before the reply, and the model must still learn to emit them.
        cum = np.concatenate([[0], np.cumsum(trained)])
        off = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
        starts, ends = off[:, 0], np.maximum(off[:, 1], off[:, 0] + 1)
        hit = (cum[np.minimum(ends, len(text) + 1)] - cum[starts]) > 0
        ids_arr = np.asarray(ids, dtype=np.int32)
        labels = np.where(hit, ids_arr, IGNORE_INDEX).astype(np.int32)
        if len(labels):
            # The first token is never predicted; masking it keeps packed rows from learning across examples.
            labels[0] = IGNORE_INDEX
        out.append((ids_arr, labels))
    return out


# --------------------------------------------------------------------------- packing and batching


def pack_examples(
    examples: list[tuple[np.ndarray, np.ndarray]], max_seq_len: int, seed: int | list[int] | None = None
) -> list[dict]:
    """First-fit-decreasing packing into rows of at most max_seq_len tokens.

    position_ids restart at 0 for each example; transformers turns that into a block-diagonal
    causal mask (sdpa/eager with attention_mask=None, flash-attention varlen on GPU).

    First-fit-decreasing opens its rows longest example first, so in its own order the rows run from
    long-example rows to short-example-only rows: batches cut from that order each hold one kind of example.
    With a seed the rows come out in spread_order instead, which mixes them evenly at every scale.
    """
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i][0]))
    bins: list[list[int]] = []
    room: list[int] = []
    for i in order:
        n = len(examples[i][0])
        for b, free in enumerate(room):
            if n <= free:
                bins[b].append(i)
                room[b] -= n
                break
        else:
            bins.append([i])
            room.append(max_seq_len - n)
    rows = []
    for members in bins:
        members.sort()  # keep the original order inside a row
        ids = np.concatenate([examples[i][0] for i in members])
        labels = np.concatenate([examples[i][1] for i in members])
        pos = np.concatenate([np.arange(len(examples[i][0]), dtype=np.int32) for i in members])
        rows.append(
            {"input_ids": ids, "labels": labels, "position_ids": pos, "num_examples": len(members), "members": members}
        )
    if seed is None:
        return rows
    return [rows[i] for i in spread_order(len(rows), np.random.default_rng(seed))]


def spread_order(n: int, rng: np.random.Generator) -> list[int]:
    """A random order of range(n) that spreads every stretch of the original order evenly over the result.

    The range is halved recursively; each half is ordered the same way, and the two are merged by
    alternating in proportion to their sizes, the half that leads chosen at random. So any k consecutive
    places of the result take about k/2 from each half, k/4 from each quarter, and so on down to single
    items: a batch cut anywhere from the result is a stratified sample of the original order. (A uniform
    shuffle is fair only on average: a batch of 8 rows from a window of 200 can still be all one kind.)
    """

    def spread(lo: int, hi: int) -> list[int]:
        if hi - lo <= 1:
            return list(range(lo, hi))
        mid = (lo + hi) // 2
        a, b = spread(lo, mid), spread(mid, hi)
        if rng.random() < 0.5:
            a, b = b, a
        out, i, j = [], 0, 0
        while i < len(a) or j < len(b):
            # take from a while it is not ahead of b in the share of itself already placed
            if j == len(b) or (i < len(a) and (2 * i + 1) * len(b) <= (2 * j + 1) * len(a)):
                out.append(a[i])
                i += 1
            else:
                out.append(b[j])
                j += 1
        return out

    return spread(0, n)


def padded_length(n: int, multiple: int = 8) -> int:
    return -(-n // multiple) * multiple


def collate(rows: list[dict] | dict, pad_id: int, multiple: int = 8) -> dict:
    """Right-pad a micro-batch to its longest row (rounded up to `multiple`) as torch tensors.

    Packed rows (with position_ids) get no attention_mask so the model builds the per-example
    block mask from position_ids; the pad tail restarts its positions and carries no loss.
    """
    import torch

    if isinstance(rows, dict):  # a columnar batch from Ray Data
        keys = list(rows)
        rows = [dict(zip(keys, vals, strict=True)) for vals in zip(*(rows[k] for k in keys), strict=True)]
    packed = "position_ids" in rows[0]
    width = padded_length(max(len(r["input_ids"]) for r in rows), multiple)
    n = len(rows)
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)
    labels = torch.full((n, width), IGNORE_INDEX, dtype=torch.long)
    out = {"input_ids": input_ids, "labels": labels}
    if packed:
        position_ids = torch.zeros((n, width), dtype=torch.long)
        out["position_ids"] = position_ids
    else:
        attention_mask = torch.zeros((n, width), dtype=torch.long)
        out["attention_mask"] = attention_mask
    for i, r in enumerate(rows):
        k = len(r["input_ids"])
        input_ids[i, :k] = torch.from_numpy(np.array(r["input_ids"], dtype=np.int64))
        labels[i, :k] = torch.from_numpy(np.array(r["labels"], dtype=np.int64))
        if packed:
            position_ids[i, :k] = torch.from_numpy(np.array(r["position_ids"], dtype=np.int64))
            position_ids[i, k:] = torch.arange(width - k)
        else:
            attention_mask[i, :k] = 1
    return out


_WORD = re.compile(r"[0-9a-z]+")


def words(text: str) -> list[str]:
    """Lower-cased alphanumeric words; punctuation separates words and is otherwise ignored."""
    return _WORD.findall(str(text).lower())


def parse_json_line(line: str) -> Any:
    try:
        return json.loads(line)
    except json.JSONDecodeError as e:
        raise RowError(f"invalid JSON: {e.msg} at column {e.colno}") from None
