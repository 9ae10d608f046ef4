"""OpenAI's grader objects, for scoring sampled completions in reinforcement finetuning (GRPO).

A grader is the JSON object of OpenAI's fine-tuning API (``openai.types.graders``): ``string_check``,
``text_similarity``, ``python``, ``score_model`` or ``multi``. :func:`parse_grader` validates one, reporting every
problem at once with its field path (:class:`GraderError`), and returns a :class:`Grader`; ``grade(sample, item)``
scores one sample, :func:`grade_batch` many, :func:`run_grader` returns the body of OpenAI's
``POST /v1/fine_tuning/alpha/graders/run``.

Semantics follow OpenAI's graders guide:

- Templates ``{{ item.a.b }}``, ``{{ sample.output_text }}``, ``{{ sample.output_json.x }}``,
  ``{{ sample.output_tools[0].function.name }}``: the namespaces are ``item`` (the dataset row) and ``sample``
  (:func:`make_sample`). A string renders as itself, anything else as JSON. A missing variable is an
  ``invalid_variable_error`` (score 0), a path into ``output_json`` when the output is not JSON a
  ``sample_parse_error``.
- string_check: ``eq``/``ne`` compare case-sensitively, ``like`` is "input contains reference", ``ilike`` the same
  ignoring case; 1.0 or 0.0.
- text_similarity, a score in 0..1 from (library, and why):

  - ``fuzzy_match``: rapidfuzz ``fuzz.ratio(input, reference) / 100``, the normalized Indel similarity
    ``1 - (insertions + deletions) / (len(input) + len(reference))``. The guide says "fuzzy string match, using
    rapidfuzz" without naming the scorer; ``ratio`` is its plain one (symmetric, case-sensitive, no
    preprocessing, none of the partial/token heuristics of ``WRatio``).
  - ``bleu``: sacrebleu's sentence BLEU (13a tokenizer, exponential smoothing, effective order) / 100: the
    reference implementation of BLEU.
  - ``gleu``: NLTK's ``sentence_gleu`` (Google BLEU, 1- to 4-grams) over NLTK's word tokenizer
    (``NLTKWordTokenizer``, which needs no data download).
  - ``meteor``: NLTK's ``meteor_score`` over the same tokens. It needs NLTK's WordNet data; rayft never downloads
    it, so without it a meteor grader is refused at validation.
  - ``rouge_1`` .. ``rouge_5``, ``rouge_l``: Google's ``rouge-score`` (the F-measure of ``rougeN``/``rougeL``, no
    stemming), with a tokenizer that keeps Unicode letters: the package's default drops every non-ASCII
    character (a Russian answer identical to its reference would score 0); on ASCII text the two agree.
  - ``cosine`` is refused: it needs an embedding model (OpenAI's uses text-embedding-3-large, for evals only).

- python: ``grade(sample, item) -> float`` runs in a sandboxed process (:mod:`rayft.training.grader_sandbox`);
  an exception, a non-finite result or a limit is a ``python_grader_runtime_error`` (score 0). ``image_tag`` is
  accepted and ignored: the grader runs on the node's own Python, with the packages installed there.
- score_model: the ``input`` messages, rendered, go to a model through a client (:data:`ScoreModelClient`); the
  reply's number (OpenAI's ``{"result": x, "steps": [...]}`` JSON, a bare number, or the one number in the text)
  is clamped to ``range`` (default [0, 1]). No number is a ``model_grader_parse_error`` (score 0).
- multi: ``graders`` (name -> grader) and ``calculate_output``, a formula over those names with ``+ - * / ^``,
  parentheses, numbers and ``min max abs floor ceil exp sqrt log``, evaluated over its syntax tree (never
  ``eval``). A multi grader cannot hold another multi grader.
- label_model graders are refused: OpenAI does not support them for fine-tuning either.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import math
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from rayft.training import grader_sandbox

# The flags of OpenAI's GraderRunResponse.metadata.errors, and their detail strings.
ERROR_FLAGS = (
    "formula_parse_error",
    "invalid_variable_error",
    "model_grader_parse_error",
    "model_grader_refusal_error",
    "model_grader_server_error",
    "other_error",
    "python_grader_runtime_error",
    "python_grader_server_error",
    "sample_parse_error",
    "truncated_observation_error",
    "unresponsive_reward_error",
)
ERROR_DETAILS = (
    "model_grader_server_error_details",
    "python_grader_runtime_error_details",
    "python_grader_server_error_type",
)

GRADER_TYPES = ("string_check", "text_similarity", "python", "score_model", "multi")
STRING_CHECK_OPERATIONS = ("eq", "ne", "like", "ilike")
TEXT_SIMILARITY_METRICS = (
    "cosine",
    "fuzzy_match",
    "bleu",
    "gleu",
    "meteor",
    "rouge_1",
    "rouge_2",
    "rouge_3",
    "rouge_4",
    "rouge_5",
    "rouge_l",
)
FORMULA_FUNCTIONS = ("min", "max", "abs", "floor", "ceil", "exp", "sqrt", "log")
SAMPLE_VARIABLES = ("output_text", "output_json", "output_tools")
REASONING_EFFORTS = ("none", "minimal", "low", "medium", "high", "xhigh", "max")
DEFAULT_MODEL_TIMEOUT_S = 60.0


class GraderError(ValueError):
    """A grader spec that cannot be used; ``problems`` holds each one as ``field.path: what is wrong``."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = list(problems)
        if len(self.problems) == 1:
            message = self.problems[0]
        else:
            message = f"{len(self.problems)} problems with the grader:\n" + "\n".join(f"- {p}" for p in self.problems)
        super().__init__(message)


@dataclass
class GradeResult:
    """The score of one sample, and what went wrong.

    errors holds the flags of OpenAI's MetadataErrors that are set (``{"invalid_variable_error": True}``) and
    their ``*_details`` strings; empty when grading went well. sub_scores: a multi grader's graders by name.
    token_usage: a model grader's tokens per model. messages: what went wrong, for people."""

    score: float
    sub_scores: dict[str, float] = field(default_factory=dict)
    errors: dict[str, bool | str] = field(default_factory=dict)
    execution_time: float = 0.0
    token_usage: dict[str, dict[str, int]] = field(default_factory=dict)
    messages: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not any(self.errors.get(flag) is True for flag in ERROR_FLAGS)


def _failure(flag: str, message: str, **details: str) -> GradeResult:
    return GradeResult(0.0, errors={flag: True, **details}, messages=[message])


# ---------------------------------------------------------------------------------------------------------------
# The sample namespace and templates.


def make_sample(output_text: str, *, output_tools: list | None = None) -> dict:
    """The ``sample`` namespace of a model output: ``output_text``; ``output_json``, the parsed output when it is
    valid JSON (else None); ``output_tools``, the tool calls (``[]`` unless given)."""
    try:
        output_json = json.loads(output_text)
    except (ValueError, TypeError):
        output_json = None
    return {"output_text": output_text, "output_json": output_json, "output_tools": list(output_tools or [])}


class _VariableError(Exception):
    def __init__(self, flag: str, message: str) -> None:
        super().__init__(message)
        self.flag = flag


_TEMPLATE = re.compile(r"\{\{(.*?)\}\}", re.S)
_NAMESPACE = re.compile(r"\s*([A-Za-z_]\w*)")
_SEGMENT = re.compile(r"""\s*(?:\.\s*([^.\[\]\s]+)|\[\s*(-?\d+)\s*\]|\[\s*"([^"]*)"\s*\]|\[\s*'([^']*)'\s*\])""")


class _Template:
    """A string with ``{{ namespace.path }}`` variables, parsed once."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.parts: list[str | tuple[str, str, list[str | int]]] = []
        self.problems: list[str] = []
        pos = 0
        for m in _TEMPLATE.finditer(text):
            self.parts.append(text[pos : m.start()])
            pos = m.end()
            expr = m.group(1).strip()
            parsed = self._parse(expr)
            if parsed is not None:
                self.parts.append((expr, *parsed))
        self.parts.append(text[pos:])

    def _parse(self, expr: str) -> tuple[str, list[str | int]] | None:
        m = _NAMESPACE.match(expr)
        if not m:
            self.problems.append(
                f"{{{{ {expr} }}}} is not a variable; write {{{{ item.field }}}} or {{{{ sample.output_text }}}}"
            )
            return None
        namespace, keys, pos = m.group(1), [], m.end()
        while pos < len(expr):
            seg = _SEGMENT.match(expr, pos)
            if not seg:
                self.problems.append(f"{{{{ {expr} }}}}: cannot read the path after {expr[:pos]!r}")
                return None
            dotted, index, dq, sq = seg.groups()
            keys.append(int(index) if index is not None else next(k for k in (dotted, dq, sq) if k is not None))
            pos = seg.end()
        if namespace not in ("item", "sample"):
            self.problems.append(f"{{{{ {expr} }}}}: the namespace must be item or sample, not {namespace!r}")
            return None
        if namespace == "sample" and keys and keys[0] not in SAMPLE_VARIABLES:
            self.problems.append(f"{{{{ {expr} }}}}: sample has {', '.join(SAMPLE_VARIABLES)}, not {keys[0]!r}")
            return None
        return namespace, keys

    def render(self, context: dict) -> str:
        out = []
        for part in self.parts:
            if isinstance(part, str):
                out.append(part)
                continue
            expr, namespace, keys = part
            value = _lookup(context, expr, namespace, keys)
            out.append(value if isinstance(value, str) else json.dumps(value, ensure_ascii=False))
        return "".join(out)


def _lookup(context: dict, expr: str, namespace: str, keys: list[str | int]) -> Any:
    value = context[namespace]
    walked = namespace
    for key in keys:
        if walked == "sample.output_json" and value is None:
            raise _VariableError(
                "sample_parse_error",
                f"{{{{ {expr} }}}}: the model's output is not valid JSON, so sample.output_json is empty",
            )
        if isinstance(value, dict):
            if key not in value and str(key) not in value:
                known = ", ".join(map(str, list(value)[:20])) or "none"
                raise _VariableError(
                    "invalid_variable_error", f"{{{{ {expr} }}}}: {walked} has no key {key!r} (its keys: {known})"
                )
            value = value[key] if key in value else value[str(key)]
        elif isinstance(value, list) and (isinstance(key, int) or str(key).lstrip("-").isdigit()):
            index = int(key)
            if not -len(value) <= index < len(value):
                raise _VariableError(
                    "invalid_variable_error",
                    f"{{{{ {expr} }}}}: {walked} has {len(value)} items, so there is no item [{index}]",
                )
            value = value[index]
        else:
            raise _VariableError(
                "invalid_variable_error",
                f"{{{{ {expr} }}}}: {walked} is {_kind(value)}, so it has no {key!r}",
            )
        walked = f"{walked}[{key}]" if isinstance(key, int) else f"{walked}.{key}"
    if walked == "sample.output_json" and value is None:
        raise _VariableError("sample_parse_error", f"{{{{ {expr} }}}}: the model's output is not valid JSON")
    return value


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean"}.get(type(value), "a number")


# ---------------------------------------------------------------------------------------------------------------
# calculate_output: a small formula language evaluated over its syntax tree.


def _parse_formula(text: str, names: Sequence[str]) -> tuple[ast.Expression | None, list[str]]:
    """The formula's tree, or the problems with it. ``^`` is power, as in the guide's formulas."""
    try:
        tree = ast.parse(text.replace("^", "**").strip(), mode="eval")
    except SyntaxError as e:
        return None, [f"{text!r} does not parse: {e.msg}"]
    functions = ", ".join(FORMULA_FUNCTIONS)
    allowed = f"the formula may use + - * / ^, parentheses, numbers, the graders' names and {functions}"
    operators = ast.Add | ast.Sub | ast.Mult | ast.Div | ast.Pow | ast.USub | ast.UAdd
    problems: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Expression | ast.Load):
            pass
        elif isinstance(node, ast.operator | ast.unaryop):
            if not isinstance(node, operators):
                problems.append(f"{text!r}: the operator {type(node).__name__} is not supported; {allowed}")
        elif isinstance(node, ast.BinOp | ast.UnaryOp):
            pass
        elif isinstance(node, ast.Constant):
            if isinstance(node.value, bool) or not isinstance(node.value, int | float):
                problems.append(f"{text!r}: {node.value!r} is not a number; {allowed}")
        elif isinstance(node, ast.Name):
            if node.id not in names and not _is_called(tree, node):
                known = ", ".join(names) or "none"
                problems.append(f"{text!r} names {node.id!r}, which is not one of the graders ({known})")
        elif isinstance(node, ast.Call):
            fn = node.func.id if isinstance(node.func, ast.Name) else None
            if fn not in FORMULA_FUNCTIONS:
                problems.append(f"{text!r}: {ast.unparse(node.func)}() is not a function of the formula; {allowed}")
            elif node.keywords or any(isinstance(a, ast.Starred) for a in node.args):
                problems.append(f"{text!r}: {fn}() takes plain arguments")
            elif fn in ("min", "max") and not node.args:
                problems.append(f"{text!r}: {fn}() needs at least one argument")
            elif fn not in ("min", "max") and len(node.args) != 1:
                problems.append(f"{text!r}: {fn}() takes one argument, not {len(node.args)}")
        else:
            problems.append(f"{text!r}: {ast.unparse(node)!r} is not supported; {allowed}")
    return (None if problems else tree), problems


def _is_called(tree: ast.Expression, name: ast.Name) -> bool:
    return any(isinstance(n, ast.Call) and n.func is name for n in ast.walk(tree))


_FUNCTIONS: dict[str, Callable[..., Any]] = {
    "min": min,
    "max": max,
    "abs": abs,
    "floor": math.floor,
    "ceil": math.ceil,
    "exp": math.exp,
    "sqrt": math.sqrt,
    "log": math.log,
}


def _evaluate(node: ast.AST, scores: dict[str, float]) -> float:
    if isinstance(node, ast.Expression):
        return _evaluate(node.body, scores)
    if isinstance(node, ast.Constant) and isinstance(node.value, int | float):
        return float(node.value)
    if isinstance(node, ast.Name):
        return float(scores[node.id])
    if isinstance(node, ast.UnaryOp):
        value = _evaluate(node.operand, scores)
        return -value if isinstance(node.op, ast.USub) else value
    if isinstance(node, ast.BinOp):
        a, b = _evaluate(node.left, scores), _evaluate(node.right, scores)
        if isinstance(node.op, ast.Add):
            return a + b
        if isinstance(node.op, ast.Sub):
            return a - b
        if isinstance(node.op, ast.Mult):
            return a * b
        if isinstance(node.op, ast.Div):
            return a / b
        return math.pow(a, b)  # floats only: an overflow raises instead of building a huge integer
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _FUNCTIONS:
        return float(_FUNCTIONS[node.func.id](*(_evaluate(a, scores) for a in node.args)))
    raise _FormulaError(f"{ast.unparse(node)!r} is not part of the formula language")


class _FormulaError(Exception):
    """A formula that validation should have refused (only reachable by building a MultiGrader by hand)."""


# ---------------------------------------------------------------------------------------------------------------
# Model clients for score_model graders.


@dataclass
class ModelReply:
    """A model's reply to a score_model grader: its text, and what the server said about it."""

    text: str
    usage: dict[str, int] | None = None
    model: str | None = None
    refusal: str | None = None


# generate(messages, sampling) -> the reply. messages are chat-completions messages (role, content: a string or
# a list of parts); sampling holds ``model`` (the grader's model) and the grader's sampling_params that are set
# (temperature, top_p, seed, max_completions_tokens, reasoning_effort).
ScoreModelClient = Callable[[list[dict[str, Any]], dict[str, Any]], "str | ModelReply"]

_SCORE_MODEL_CLIENTS: dict[str | None, ScoreModelClient] = {}


def register_score_model_client(client: ScoreModelClient | None, *, model: str | None = None) -> None:
    """Makes ``client`` the one score_model graders use for ``model`` (every model when None) unless they were
    given one; ``client=None`` removes the registration."""
    if client is None:
        _SCORE_MODEL_CLIENTS.pop(model, None)
    else:
        _SCORE_MODEL_CLIENTS[model] = client


_SCORE_SCHEMA = {
    "type": "object",
    "properties": {
        "steps": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {"description": {"type": "string"}, "conclusion": {"type": "string"}},
                "required": ["description", "conclusion"],
                "additionalProperties": False,
            },
        },
        "result": {"type": "number"},
    },
    "required": ["steps", "result"],
    "additionalProperties": False,
}


def openai_compatible_client(
    base_url: str,
    api_key: str = "EMPTY",
    *,
    timeout_s: float = DEFAULT_MODEL_TIMEOUT_S,
    structured_output: bool = True,
    max_retries: int = 2,
) -> ScoreModelClient:
    """A score_model client for any OpenAI-compatible chat-completions server (OpenAI, vLLM, rayft serve, ...).

    It asks for OpenAI's score format (``{"steps": [...], "result": x}`` as a JSON schema) unless
    structured_output is False, sends ``developer`` messages as ``system`` (open models' chat templates know
    only the latter) and max_completions_tokens as ``max_completion_tokens``."""
    from openai import OpenAI

    client = OpenAI(base_url=base_url, api_key=api_key, timeout=timeout_s, max_retries=max_retries)

    def generate(messages: list[dict[str, Any]], sampling: dict[str, Any]) -> ModelReply:
        kwargs: dict[str, Any] = {}
        for key in ("temperature", "top_p", "seed", "reasoning_effort"):
            if sampling.get(key) is not None:
                kwargs[key] = sampling[key]
        if sampling.get("max_completions_tokens") is not None:
            kwargs["max_completion_tokens"] = sampling["max_completions_tokens"]
        if structured_output:
            kwargs["response_format"] = {
                "type": "json_schema",
                "json_schema": {"name": "grader_score", "strict": True, "schema": _SCORE_SCHEMA},
            }
        chat = [{**m, "role": "system" if m["role"] == "developer" else m["role"]} for m in messages]
        response = client.chat.completions.create(model=sampling["model"], messages=chat, **kwargs)  # type: ignore[arg-type]
        message = response.choices[0].message
        usage = None
        if response.usage is not None:
            details = response.usage.prompt_tokens_details
            usage = {
                "prompt_tokens": response.usage.prompt_tokens,
                "completion_tokens": response.usage.completion_tokens,
                "total_tokens": response.usage.total_tokens,
                "cached_tokens": (details.cached_tokens or 0) if details is not None else 0,
            }
        return ModelReply(text=message.content or "", usage=usage, model=response.model, refusal=message.refusal)

    return generate


_NUMBER = re.compile(r"[-+]?(?:\d+(?:\.\d+)?|\.\d+)(?:[eE][-+]?\d+)?")


def parse_model_score(text: str) -> float | None:
    """The score in a model grader's reply: OpenAI's ``{"result": x, ...}`` JSON (also inside a ```json fence),
    a bare number, or the only number in the text. None when there is none, or several and no JSON result."""
    body = text.strip()
    fence = re.fullmatch(r"```(?:json)?\s*(.*?)\s*```", body, re.S)
    if fence:
        body = fence.group(1)
    try:
        parsed = json.loads(body)
    except ValueError:
        parsed = None
    if isinstance(parsed, dict):
        parsed = parsed.get("result")
    if isinstance(parsed, int | float) and not isinstance(parsed, bool):
        return float(parsed) if math.isfinite(parsed) else None
    numbers = _NUMBER.findall(body)
    if len(numbers) == 1:
        value = float(numbers[0])
        return value if math.isfinite(value) else None
    return None


# ---------------------------------------------------------------------------------------------------------------
# Graders.


class Grader:
    """A validated grader: ``name``, ``type``, ``spec`` (the normalised JSON object) and grade()."""

    type = ""

    def __init__(self, name: str, spec: dict) -> None:
        self.name = name
        self.spec = spec
        self.default_timeout_s = DEFAULT_MODEL_TIMEOUT_S

    def grade(self, sample: dict | str, item: Any = None, *, timeout_s: float | None = None) -> GradeResult:
        """Scores one sample (a :func:`make_sample` dict, or the output text) against its dataset item.

        An error (a missing variable, a python grader that raised, a model without a number, ...) scores 0 and
        sets its flag in ``errors``, as OpenAI does; it does not raise."""
        sample_dict = make_sample(sample) if isinstance(sample, str) else sample
        item = {} if item is None else item
        return self._grade_many([sample_dict], [item], timeout_s or self.default_timeout_s)[0]

    def _grade_many(self, samples: list[dict], items: list[Any], timeout_s: float) -> list[GradeResult]:
        results = []
        for sample, item in zip(samples, items, strict=True):
            t0 = time.perf_counter()
            try:
                result = self._grade_one({"sample": sample, "item": item})
            except _VariableError as e:
                result = _failure(e.flag, f"{self.type} grader {self.name!r}: {e}")
            except Exception as e:  # a metric library failing on odd input: this sample's error, not the batch's
                result = _failure("other_error", f"{self.type} grader {self.name!r}: {type(e).__name__}: {e}")
            result.execution_time = time.perf_counter() - t0
            results.append(result)
        return results

    def _grade_one(self, context: dict) -> GradeResult:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}>"


class StringCheckGrader(Grader):
    type = "string_check"

    def __init__(self, name: str, spec: dict, input: _Template, reference: _Template, operation: str) -> None:
        super().__init__(name, spec)
        self.input, self.reference, self.operation = input, reference, operation

    def _grade_one(self, context: dict) -> GradeResult:
        text, reference = self.input.render(context), self.reference.render(context)
        if self.operation == "eq":
            passed = text == reference
        elif self.operation == "ne":
            passed = text != reference
        elif self.operation == "like":
            passed = reference in text
        else:
            passed = reference.casefold() in text.casefold()
        return GradeResult(1.0 if passed else 0.0)


class _UnicodeRougeTokenizer:
    """rouge-score's tokenization (lowercase, split on anything but letters and digits), keeping non-ASCII
    letters, which the package's default tokenizer deletes."""

    _split = re.compile(r"[\W_]+")

    def tokenize(self, text: str) -> list[str]:
        return [t for t in self._split.split(text.lower()) if t]


class TextSimilarityGrader(Grader):
    type = "text_similarity"

    def __init__(self, name: str, spec: dict, input: _Template, reference: _Template, metric: str) -> None:
        super().__init__(name, spec)
        self.input, self.reference, self.metric = input, reference, metric
        self._scorer: Any = None

    def _grade_one(self, context: dict) -> GradeResult:
        score = self.similarity(self.input.render(context), self.reference.render(context))
        return GradeResult(min(1.0, max(0.0, score)))

    def similarity(self, text: str, reference: str) -> float:
        """The metric of ``text`` against ``reference``, unclamped."""
        metric = self.metric
        if metric == "fuzzy_match":
            from rapidfuzz import fuzz

            return fuzz.ratio(text, reference) / 100.0
        if metric == "bleu":
            if self._scorer is None:
                from sacrebleu.metrics.bleu import BLEU

                self._scorer = BLEU(effective_order=True)
            return self._scorer.sentence_score(text, [reference]).score / 100.0
        if metric in ("gleu", "meteor"):
            from nltk.tokenize import NLTKWordTokenizer

            tokenize = NLTKWordTokenizer().tokenize
            hypothesis, references = tokenize(text), [tokenize(reference)]
            if metric == "gleu":
                from nltk.translate.gleu_score import sentence_gleu

                return float(sentence_gleu(references, hypothesis))
            from nltk.translate.meteor_score import meteor_score

            return float(meteor_score(references, hypothesis))
        key = "rougeL" if metric == "rouge_l" else f"rouge{metric[-1]}"
        if self._scorer is None:
            from rouge_score.rouge_scorer import RougeScorer

            self._scorer = RougeScorer([key], use_stemmer=False, tokenizer=_UnicodeRougeTokenizer())
        return float(self._scorer.score(reference, text)[key].fmeasure)


class PythonGrader(Grader):
    type = "python"

    def __init__(self, name: str, spec: dict, source: str, limits: grader_sandbox.SandboxLimits) -> None:
        super().__init__(name, spec)
        self.source, self.limits = source, limits
        self.default_timeout_s = limits.timeout_s
        self.isolation: list[str] = []  # the sandbox layers the last run applied

    def _grade_many(self, samples: list[dict], items: list[Any], timeout_s: float) -> list[GradeResult]:
        outcomes, self.isolation = grader_sandbox.run_in_sandbox(
            self.source, list(zip(samples, items, strict=True)), self.limits.with_timeout(timeout_s)
        )
        results = []
        for outcome in outcomes:
            where = f"python grader {self.name!r}"
            if outcome.error is None and outcome.score is not None:
                result = GradeResult(outcome.score)
            elif outcome.error == "server":
                result = _failure(
                    "python_grader_server_error",
                    f"{where}: the sandbox failed: {outcome.details}",
                    python_grader_server_error_type=f"sandbox: {outcome.details}"[:500],
                )
            else:
                details = outcome.details or "grade() failed"
                result = _failure(
                    "python_grader_runtime_error", f"{where}: {details}", python_grader_runtime_error_details=details
                )
                if outcome.error == "timeout":
                    result.errors["unresponsive_reward_error"] = True
            result.execution_time = outcome.seconds
            results.append(result)
        return results


class ScoreModelGrader(Grader):
    type = "score_model"

    def __init__(
        self,
        name: str,
        spec: dict,
        messages: list[tuple[str, Any]],
        model: str,
        score_range: tuple[float, float],
        sampling: dict[str, Any],
        client: ScoreModelClient | None,
        max_concurrency: int = 8,
    ) -> None:
        super().__init__(name, spec)
        self.messages, self.model, self.range, self.sampling = messages, model, score_range, sampling
        self.client, self.max_concurrency = client, max_concurrency

    def _resolve_client(self) -> ScoreModelClient | None:
        return self.client or _SCORE_MODEL_CLIENTS.get(self.model) or _SCORE_MODEL_CLIENTS.get(None)

    def render(self, context: dict) -> list[dict[str, Any]]:
        """The chat messages sent to the model for one sample."""
        return [{"role": role, "content": _render_content(content, context)} for role, content in self.messages]

    def _grade_many(self, samples: list[dict], items: list[Any], timeout_s: float) -> list[GradeResult]:
        from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait

        where = f"score_model grader {self.name!r}"
        client = self._resolve_client()
        if client is None:
            message = (
                f"{where}: no client reaches the model {self.model!r}; give parse_grader(score_model_client=...) "
                "or call register_score_model_client() (openai_compatible_client(base_url) reaches any "
                "OpenAI-compatible server)"
            )
            return [
                _failure("model_grader_server_error", message, model_grader_server_error_details=message)
                for _ in samples
            ]
        results: list[GradeResult | None] = [None] * len(samples)
        started: dict[int, float] = {}

        def one(i: int) -> GradeResult:
            started[i] = time.monotonic()
            t0 = time.perf_counter()
            result = self._grade_with(client, {"sample": samples[i], "item": items[i]})
            result.execution_time = time.perf_counter() - t0
            return result

        pool = ThreadPoolExecutor(max_workers=max(1, min(self.max_concurrency, len(samples))))
        try:
            futures: dict[Future, int] = {pool.submit(one, i): i for i in range(len(samples))}
            pending = set(futures)
            while pending:
                done, pending = wait(pending, timeout=0.05, return_when=FIRST_COMPLETED)
                for future in done:
                    results[futures[future]] = future.result()
                now = time.monotonic()
                for future in list(pending):
                    i = futures[future]
                    if i in started and now - started[i] > timeout_s:
                        pending.discard(future)
                        message = f"{where}: the model did not answer within {timeout_s:g} s"
                        result = _failure(
                            "model_grader_server_error", message, model_grader_server_error_details=message
                        )
                        result.errors["unresponsive_reward_error"] = True
                        result.execution_time = now - started[i]
                        results[i] = result
        finally:
            pool.shutdown(wait=False, cancel_futures=True)  # a stuck request ends with its client's own timeout
        return [r if r is not None else _failure("other_error", f"{where}: not graded") for r in results]

    def _grade_with(self, client: ScoreModelClient, context: dict) -> GradeResult:
        where = f"score_model grader {self.name!r}"
        try:
            messages = self.render(context)
        except _VariableError as e:
            return _failure(e.flag, f"{where}: {e}")
        try:
            reply = client(messages, {"model": self.model, **self.sampling})
        except Exception as e:
            details = f"{type(e).__name__}: {e}"[:1000]
            return _failure(
                "model_grader_server_error", f"{where}: {details}", model_grader_server_error_details=details
            )
        if isinstance(reply, str):
            reply = ModelReply(reply)
        usage = {reply.model or self.model: dict(reply.usage)} if reply.usage else {}
        if reply.refusal:
            result = _failure("model_grader_refusal_error", f"{where}: the model refused: {reply.refusal[:300]}")
        else:
            score = parse_model_score(reply.text)
            if score is None:
                result = _failure(
                    "model_grader_parse_error",
                    f"{where}: no score in the model's reply ({reply.text[:200]!r}); it should be OpenAI's "
                    '{"result": <number>, "steps": [...]} JSON or a single number',
                )
            else:
                low, high = self.range
                result = GradeResult(min(high, max(low, score)))
        result.token_usage = usage
        return result


def _render_content(content: Any, context: dict) -> Any:
    """A message's content, rendered, in chat-completions form (a string, or a list of parts)."""
    if isinstance(content, _Template):
        return content.render(context)
    if isinstance(content, list):
        return [_render_part(part, context) for part in content]
    rendered = _render_part(content, context)
    return rendered["text"] if rendered.get("type") == "text" else [rendered]


def _render_part(part: Any, context: dict) -> dict[str, Any]:
    if isinstance(part, _Template):
        return {"type": "text", "text": part.render(context)}
    kind, value = part
    if kind == "text":
        return {"type": "text", "text": value.render(context)}
    if kind == "image":
        url, detail = value
        image = {"url": url.render(context)}
        if detail is not None:
            image["detail"] = detail
        return {"type": "image_url", "image_url": image}
    return {"type": "input_audio", "input_audio": value}


class MultiGrader(Grader):
    type = "multi"

    def __init__(self, name: str, spec: dict, graders: dict[str, Grader], formula: ast.Expression, text: str) -> None:
        super().__init__(name, spec)
        self.graders, self.formula, self.formula_text = graders, formula, text
        self.default_timeout_s = max((g.default_timeout_s for g in graders.values()), default=DEFAULT_MODEL_TIMEOUT_S)

    def _grade_many(self, samples: list[dict], items: list[Any], timeout_s: float) -> list[GradeResult]:
        by_grader = {key: g._grade_many(samples, items, timeout_s) for key, g in self.graders.items()}
        results = []
        for i in range(len(samples)):
            parts = {key: rs[i] for key, rs in by_grader.items()}
            result = GradeResult(0.0, sub_scores={key: r.score for key, r in parts.items()})
            for r in parts.values():
                for flag, value in r.errors.items():
                    if value is True or flag not in result.errors:
                        result.errors[flag] = value
                for model, usage in r.token_usage.items():
                    total = result.token_usage.setdefault(model, {})
                    for k, v in usage.items():
                        total[k] = total.get(k, 0) + v
                result.messages += r.messages
            t0 = time.perf_counter()
            try:
                value = _evaluate(self.formula, result.sub_scores)
                if not math.isfinite(value):
                    raise OverflowError(f"the result is {value}")
                result.score = value
            except _FormulaError as e:
                result.errors["formula_parse_error"] = True
                result.messages.append(f"multi grader {self.name!r}: calculate_output: {e}")
            except KeyError as e:
                result.errors["invalid_variable_error"] = True
                result.messages.append(f"multi grader {self.name!r}: calculate_output names unknown {e}")
            except (ArithmeticError, ValueError) as e:
                result.errors["other_error"] = True
                result.messages.append(f"multi grader {self.name!r}: {self.formula_text!r} failed: {e}")
            result.execution_time = sum(r.execution_time for r in parts.values()) + time.perf_counter() - t0
            results.append(result)
        return results


# ---------------------------------------------------------------------------------------------------------------
# Validation.


class _Parser:
    def __init__(
        self,
        allow_python: bool,
        score_model_client: ScoreModelClient | None,
        sandbox_limits: grader_sandbox.SandboxLimits | None,
        python_setting: str | None = None,
    ) -> None:
        self.allow_python, self.python_setting = allow_python, python_setting
        self.client = score_model_client
        self.limits = sandbox_limits or grader_sandbox.SandboxLimits()
        self.problems: list[str] = []

    def problem(self, where: str, message: str) -> None:
        self.problems.append(f"{where}: {message}")

    def parse(self, spec: Any, where: str, in_multi: bool = False) -> Grader | None:
        if not isinstance(spec, dict):
            self.problem(where, f"must be a grader object (a JSON object with a type), not {_kind(spec)}")
            return None
        kind = spec.get("type")
        if kind == "label_model":
            self.problem(
                f"{where}.type",
                "label_model graders are for evals; OpenAI does not support them for fine-tuning, nor does "
                "rayft: use a score_model grader",
            )
            return None
        if kind not in GRADER_TYPES:
            got = "missing" if kind is None else repr(kind)
            self.problem(f"{where}.type", f"{got} is not one of {', '.join(GRADER_TYPES)}")
            return None
        if kind == "multi" and in_multi:
            self.problem(where, "a multi grader cannot contain another multi grader (OpenAI's rule too)")
            return None
        if kind == "python" and not self.allow_python:
            setting = f" ({self.python_setting} is false)" if self.python_setting else ""
            self.problem(
                f"{where}.type",
                f"python graders are not enabled on this server{setting}; the operator can enable them "
                "(they run the grader's code in a sandboxed process)",
            )
            return None
        allowed = {
            "string_check": ("type", "name", "input", "reference", "operation"),
            "text_similarity": ("type", "name", "input", "reference", "evaluation_metric"),
            "python": ("type", "name", "source", "image_tag"),
            "score_model": ("type", "name", "input", "model", "range", "sampling_params"),
            "multi": ("type", "name", "graders", "calculate_output"),
        }[kind]
        for key in spec:
            if key not in allowed:
                self.problem(f"{where}.{key}", f"is not a field of a {kind} grader (its fields: {', '.join(allowed)})")
        name = self.string(spec, "name", where, nonempty=True)
        before = len(self.problems)
        grader = getattr(self, f"_{kind}")(spec, where, name or "")
        if len(self.problems) > before or name is None:
            return None
        return grader

    def string(self, spec: dict, key: str, where: str, *, nonempty: bool = False, required: bool = True) -> str | None:
        if key not in spec or spec[key] is None:
            if required:
                self.problem(f"{where}.{key}", "is required")
            return None
        value = spec[key]
        if not isinstance(value, str):
            self.problem(f"{where}.{key}", f"must be a string, not {_kind(value)}")
            return None
        if nonempty and not value.strip():
            self.problem(f"{where}.{key}", "must not be empty")
            return None
        return value

    def template(self, text: str | None, where: str) -> _Template:
        template = _Template(text or "")
        for p in template.problems:
            self.problem(where, p)
        return template

    def choice(self, spec: dict, key: str, where: str, choices: Sequence[str]) -> str | None:
        value = self.string(spec, key, where)
        if value is not None and value not in choices:
            self.problem(f"{where}.{key}", f"{value!r} is not one of {', '.join(choices)}")
            return None
        return value

    def _string_check(self, spec: dict, where: str, name: str) -> Grader:
        text = self.template(self.string(spec, "input", where), f"{where}.input")
        reference = self.template(self.string(spec, "reference", where), f"{where}.reference")
        operation = self.choice(spec, "operation", where, STRING_CHECK_OPERATIONS)
        return StringCheckGrader(name, dict(spec), text, reference, operation or "eq")

    def _text_similarity(self, spec: dict, where: str, name: str) -> Grader:
        text = self.template(self.string(spec, "input", where), f"{where}.input")
        reference = self.template(self.string(spec, "reference", where), f"{where}.reference")
        metric = self.choice(spec, "evaluation_metric", where, TEXT_SIMILARITY_METRICS)
        if metric == "cosine":
            self.problem(
                f"{where}.evaluation_metric",
                "'cosine' needs an embedding model (OpenAI's uses text-embedding-3-large, and offers it for evals "
                "only); rayft has none, and will not approximate it. Use fuzzy_match, bleu, gleu, meteor, "
                "rouge_1..rouge_5 or rouge_l, or a score_model grader",
            )
        elif metric == "meteor":
            missing = _wordnet_missing()
            if missing:
                self.problem(f"{where}.evaluation_metric", missing)
        return TextSimilarityGrader(name, dict(spec), text, reference, metric or "fuzzy_match")

    def _python(self, spec: dict, where: str, name: str) -> Grader:
        source = self.string(spec, "source", where, nonempty=True)
        if source is not None:
            for p in grader_sandbox.check_grader_source(source):
                self.problem(f"{where}.source", p)
        self.string(spec, "image_tag", where, required=False)  # OpenAI's image; rayft runs its own Python
        return PythonGrader(name, dict(spec), source or "", self.limits)

    def _score_model(self, spec: dict, where: str, name: str) -> Grader:
        model = self.string(spec, "model", where, nonempty=True)
        messages = self.messages(spec.get("input"), f"{where}.input")
        score_range = (0.0, 1.0)
        if spec.get("range") is not None:
            value = spec["range"]
            if (
                not isinstance(value, list | tuple)
                or len(value) != 2
                or not all(isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in value)
            ):
                self.problem(f"{where}.range", f"must be two numbers [low, high], not {value!r}")
            elif not value[0] < value[1]:
                self.problem(f"{where}.range", f"the low end must be below the high end, not {list(value)}")
            else:
                score_range = (float(value[0]), float(value[1]))
        sampling = self.sampling_params(spec.get("sampling_params"), f"{where}.sampling_params")
        normalised = dict(spec)
        normalised["range"] = list(score_range)
        return ScoreModelGrader(name, normalised, messages, model or "", score_range, sampling, self.client)

    def messages(self, value: Any, where: str) -> list[tuple[str, Any]]:
        if value is None:
            self.problem(where, "is required: a list of messages {role, content}")
            return []
        if not isinstance(value, list) or not value:
            self.problem(where, "must be a non-empty list of messages {role, content}")
            return []
        messages = []
        roles = ("user", "assistant", "system", "developer")
        for i, message in enumerate(value):
            at = f"{where}[{i}]"
            if not isinstance(message, dict):
                self.problem(at, f"must be a message object {{role, content}}, not {_kind(message)}")
                continue
            for key in message:
                if key not in ("role", "content", "type"):
                    self.problem(f"{at}.{key}", "is not a field of a message (its fields: role, content, type)")
            if message.get("type") not in (None, "message"):
                self.problem(f"{at}.type", f"must be 'message', not {message.get('type')!r}")
            role = message.get("role")
            if role not in roles:
                self.problem(f"{at}.role", f"{role!r} is not one of {', '.join(roles)}")
            if "content" not in message:
                self.problem(f"{at}.content", "is required")
                continue
            messages.append((role, self.content(message["content"], f"{at}.content")))
        return messages

    def content(self, value: Any, where: str) -> Any:
        if isinstance(value, str):
            return self.template(value, where)
        if isinstance(value, list):
            return [self.part(p, f"{where}[{j}]") for j, p in enumerate(value)]
        return self.part(value, where)

    def part(self, value: Any, where: str) -> Any:
        if isinstance(value, str):
            return self.template(value, where)
        if not isinstance(value, dict):
            self.problem(where, f"must be text or a content part object, not {_kind(value)}")
            return None
        kind = value.get("type")
        if kind in ("input_text", "output_text"):
            return ("text", self.template(self.string(value, "text", where), f"{where}.text"))
        if kind == "input_image":
            url = self.template(self.string(value, "image_url", where), f"{where}.image_url")
            detail = self.string(value, "detail", where, required=False)
            return ("image", (url, detail))
        if kind == "input_audio":
            audio = value.get("input_audio")
            formats = ("mp3", "wav")
            if (
                not isinstance(audio, dict)
                or not isinstance(audio.get("data"), str)
                or audio.get("format") not in formats
            ):
                self.problem(f"{where}.input_audio", "must be {data: base64 string, format: mp3 or wav}")
            return ("audio", audio)
        self.problem(f"{where}.type", f"{kind!r} is not one of input_text, output_text, input_image, input_audio")
        return None

    def sampling_params(self, value: Any, where: str) -> dict[str, Any]:
        if value is None:
            return {}
        if not isinstance(value, dict):
            self.problem(where, f"must be an object, not {_kind(value)}")
            return {}
        sampling: dict[str, Any] = {}
        checks: dict[str, tuple[Callable[[Any], bool], str]] = {
            "temperature": (lambda v: _is_number(v) and 0 <= v <= 2, "a number from 0 to 2"),
            "top_p": (lambda v: _is_number(v) and 0 < v <= 1, "a number above 0, at most 1"),
            "seed": (lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer"),
            "max_completions_tokens": (
                lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1,
                "a positive integer",
            ),
            "reasoning_effort": (lambda v: v in REASONING_EFFORTS, "one of " + ", ".join(REASONING_EFFORTS)),
        }
        for key, v in value.items():
            if key not in checks:
                self.problem(f"{where}.{key}", f"is not a sampling parameter (they are: {', '.join(checks)})")
            elif v is not None:
                ok, expected = checks[key]
                if ok(v):
                    sampling[key] = v
                else:
                    self.problem(f"{where}.{key}", f"must be {expected}, not {v!r}")
        return sampling

    def _multi(self, spec: dict, where: str, name: str) -> Grader:
        graders_spec = spec.get("graders")
        children: dict[str, Grader] = {}
        keys: list[str] = []
        if graders_spec is None:
            self.problem(f"{where}.graders", "is required: an object of name -> grader")
        elif not isinstance(graders_spec, dict) or not graders_spec:
            self.problem(f"{where}.graders", "must be a non-empty object of name -> grader")
        else:
            if isinstance(graders_spec.get("type"), str):  # the SDK's form: one grader object, named by its name
                entries = [(graders_spec.get("name"), graders_spec, f"{where}.graders")]
            else:
                entries = [(key, child, f"{where}.graders.{key}") for key, child in graders_spec.items()]
            for key, child_spec, at in entries:
                if not isinstance(key, str) or not key.isidentifier():
                    self.problem(
                        at, f"the name {key!r} cannot be used in calculate_output (letters, digits and _ only)"
                    )
                    continue
                keys.append(key)
                child = self.parse(child_spec, at, in_multi=True)
                if child is not None:
                    children[key] = child
        formula_text = self.string(spec, "calculate_output", where, nonempty=True)
        formula = None
        if formula_text is not None:
            formula, problems = _parse_formula(formula_text, keys)
            for p in problems:
                self.problem(f"{where}.calculate_output", p)
        if formula is None:
            formula = ast.Expression(body=ast.Constant(0.0))
        normalised = {**spec, "graders": {key: child.spec for key, child in children.items()}}
        return MultiGrader(name, normalised, children, formula, formula_text or "")


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _wordnet_missing() -> str | None:
    """Why meteor cannot run here, or None when NLTK and its WordNet data are installed."""
    try:
        import nltk
    except ImportError:
        return "'meteor' needs the nltk package, which is not installed: pip install nltk"
    try:
        nltk.data.find("corpora/wordnet")  # finds corpora/wordnet.zip as well
    except LookupError:
        return (
            "'meteor' needs NLTK's WordNet data, which is not installed here, and rayft does not download it "
            "(nor approximate meteor without it). Install it on every node that grades "
            "(python -m nltk.downloader wordnet, or put corpora/wordnet under a directory named by NLTK_DATA), "
            "or choose fuzzy_match, bleu, gleu or a rouge metric"
        )
    return None


# ---------------------------------------------------------------------------------------------------------------
# The public entry points.


def parse_grader(
    spec: dict,
    *,
    allow_python: bool = True,
    where: str = "grader",
    score_model_client: ScoreModelClient | None = None,
    sandbox_limits: grader_sandbox.SandboxLimits | None = None,
    python_setting: str | None = None,
) -> Grader:
    """Validates a grader object (OpenAI's JSON) and returns the grader; GraderError lists every problem.

    allow_python=False refuses python graders anywhere in the tree, naming `python_setting` (the setting that
    would allow them, e.g. serve.finetune.python_graders) when given. score_model_client reaches the model of
    score_model graders (else register_score_model_client's). sandbox_limits: python graders' limits."""
    parser = _Parser(allow_python, score_model_client, sandbox_limits, python_setting)
    grader = parser.parse(spec, where)
    if parser.problems or grader is None:
        raise GraderError(parser.problems or [f"{where}: is not a usable grader"])
    return grader


def run_grader(spec: dict, model_sample: str, item: Any = None, **opts: Any) -> dict:
    """Grades one model sample as ``POST /v1/fine_tuning/alpha/graders/run`` does: the JSON body of OpenAI's
    GraderRunResponse. opts go to parse_grader (allow_python, python_setting, score_model_client,
    sandbox_limits); an invalid spec raises GraderError."""
    grader = parse_grader(spec, **opts)
    result = grader.grade(make_sample(model_sample), {} if item is None else item)
    return run_response(grader, result)


def run_response(grader: Grader, result: GradeResult) -> dict:
    """A GradeResult as the body of OpenAI's GraderRunResponse."""
    errors: dict[str, bool | str | None] = {flag: result.errors.get(flag) is True for flag in ERROR_FLAGS}
    for key in ERROR_DETAILS:
        value = result.errors.get(key)
        errors[key] = value if isinstance(value, str) else None
    total_tokens = sum(u.get("total_tokens", 0) for u in result.token_usage.values()) if result.token_usage else None
    return {
        "reward": result.score,
        "metadata": {
            "name": grader.name,
            "type": grader.type,
            "errors": errors,
            "execution_time": result.execution_time,
            "scores": dict(result.sub_scores),
            "token_usage": total_tokens,
            "sampled_model_name": None,
        },
        "sub_rewards": dict(result.sub_scores),
        "model_grader_token_usage_per_model": {m: dict(u) for m, u in result.token_usage.items()},
    }


def grade_batch(
    grader: Grader, samples: list[str], items: list[Any], *, timeout_s: float, failure_score: float
) -> list[GradeResult]:
    """Scores many samples (model output texts, or make_sample dicts), each against its item.

    A sample whose grading failed (the grader raised, returned no number, missed timeout_s, named a missing
    variable, ...) scores failure_score and keeps its error flags (count them with count_errors). A python
    grader grades the batch in one sandboxed process; a stuck sample is stopped and the rest still graded. Never
    raises for what a grader does; only mismatched lengths (a caller's bug) raise ValueError."""
    if len(samples) != len(items):
        raise ValueError(f"grade_batch: {len(samples)} samples but {len(items)} items; give one item per sample")
    sample_dicts = [make_sample(s) if isinstance(s, str) else s for s in samples]
    item_list = [{} if it is None else it for it in items]
    try:
        results = grader._grade_many(sample_dicts, item_list, timeout_s)
    except Exception as e:  # a bug of ours: every sample fails, the caller's loop goes on
        message = f"{grader.type} grader {grader.name!r} failed on the whole batch: {type(e).__name__}: {e}"
        results = [_failure("other_error", message) for _ in samples]
    out = []
    for r in results:
        out.append(r if r.ok else dataclasses.replace(r, score=float(failure_score)))
    return out


def count_errors(results: Sequence[GradeResult]) -> dict[str, int]:
    """How many results carry each error flag, and ``samples_with_errors``."""
    counts = {flag: sum(1 for r in results if r.errors.get(flag) is True) for flag in ERROR_FLAGS}
    counts = {flag: n for flag, n in counts.items() if n}
    counts["samples_with_errors"] = sum(1 for r in results if not r.ok)
    return counts
