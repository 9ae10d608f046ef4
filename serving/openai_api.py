"""The OpenAI-compatible request and response bodies, and the error shape.

Requests are validated here so that every bad field becomes a 400 naming the field, in the body
OpenAI's clients already parse: {"error": {"message", "type", "param", "code"}}. Unknown fields are
ignored (clients send optional fields the server does not use); fields rayft cannot honour with a
non-default value (n > 1, logprobs) are rejected with a message saying so.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    WithJsonSchema,
    field_validator,
    model_validator,
)

from rayft.serving.config import ADAPTER_NAME

ROLES = ("system", "developer", "user", "assistant", "tool")


class ApiError(Exception):
    """An error answered in OpenAI's shape with an HTTP status."""

    TYPES = {
        400: "invalid_request_error",
        401: "authentication_error",
        404: "not_found_error",
        408: "timeout_error",
        405: "invalid_request_error",
        413: "invalid_request_error",
        429: "rate_limit_error",
        503: "overloaded_error",
        504: "timeout_error",
    }

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = dict(headers or {})

    def __reduce__(self):  # raised in a model replica, re-raised in the ingress: keep every field
        return type(self), (self.status, self.message, self.param, self.code, self.headers)

    def body(self) -> dict:
        kind = self.TYPES.get(self.status, "server_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


def _json_number(v, integer: bool):
    """A field takes exactly the JSON values its OpenAPI type allows: no strings or booleans for numbers, and
    for an integer any number without a fraction (JSON Schema counts 1.0 as an integer)."""
    if isinstance(v, (str, bool)):
        raise ValueError(f"Input should be a valid {'integer' if integer else 'number'}")
    if integer and isinstance(v, float) and v.is_integer():
        return int(v)
    return v


def _no_logprobs(v):
    if v is not None and not isinstance(v, bool):
        raise ValueError("Input should be a valid boolean")
    if v:
        raise ValueError("logprobs are not supported by this server")
    return v


JSON_INT = BeforeValidator(lambda v: _json_number(v, True))
JSON_FLOAT = BeforeValidator(lambda v: _json_number(v, False))


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = Field(default=None, description="Served model id, or '<model>:<adapter>' / an adapter name.")
    max_tokens: Annotated[int, Field(ge=1), JSON_INT] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1), JSON_INT] | None = None
    temperature: Annotated[float, Field(ge=0.0, le=2.0), JSON_FLOAT] = 1.0
    top_p: Annotated[float, Field(gt=0.0, le=1.0), JSON_FLOAT] = 1.0
    n: Annotated[int, Field(ge=1, le=1), JSON_INT] = Field(default=1, description="Only n=1 is supported.")
    stop: (
        Annotated[str, Field(min_length=1)]
        | Annotated[list[Annotated[str, Field(min_length=1)]], Field(max_length=4)]
        | None
    ) = Field(default=None, validate_default=True)
    # within 2^53, where JSON validators that compare in floating point agree with Python's integers
    seed: Annotated[int, Field(ge=-(2**53) + 1, le=2**53 - 1), JSON_INT] | None = None
    stream: StrictBool = False
    stream_options: dict[str, Any] | None = None
    logprobs: Annotated[Literal[False], BeforeValidator(_no_logprobs)] | None = Field(
        default=None, description="Only false: this server returns no logprobs."
    )

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):  # its type already holds it to 4 non-empty strings
        if v is None:
            return []
        return [v] if isinstance(v, str) else v

    def wanted_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def token_limits(self) -> list[tuple[str, int]]:
        """Every token limit the request sets, by field."""
        fields = (("max_tokens", self.max_tokens), ("max_completion_tokens", self.max_completion_tokens))
        return [(f, v) for f, v in fields if v is not None]

    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: str


class FunctionCall(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: str
    arguments: str | dict[str, Any] = Field(default="{}", description="The arguments as a JSON object (a string).")


class ToolCall(BaseModel):
    model_config = ConfigDict(extra="ignore")
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    tool_calls: list[ToolCall] | None = Field(default=None, description="An assistant's calls (role assistant).")
    tool_call_id: str | None = Field(default=None, description="The call a tool result answers (role tool).")

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class FunctionDefinition(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = Field(default=None, description="The arguments' JSON schema.")
    strict: bool | None = Field(default=None, description="Accepted; a forced call is always held to its schema.")


class Tool(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["function"]
    function: FunctionDefinition


class ToolChoiceFunction(BaseModel):
    name: str


class NamedToolChoice(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["function"]
    function: ToolChoiceFunction


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)
    name: str = Field(..., min_length=1, max_length=64)
    description: str | None = None
    json_schema: dict[str, Any] = Field(default_factory=dict, alias="schema", description="The reply's JSON schema.")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("response_format of type json_schema needs json_schema: {name, schema}")
        return self


class ChatCompletionRequest(_Body):
    messages: list[ChatMessage] = Field(..., min_length=1)
    tools: list[Tool] | None = Field(default=None, description="Functions the model may call.")
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = Field(
        default=None,
        description="auto (the default with tools): the model decides; none: no calls (the tools are left out of "
        "the prompt); required, or a named function: a call is forced by constrained decoding.",
    )
    parallel_tool_calls: StrictBool = Field(default=True, description="false: at most one call per reply.")
    response_format: ResponseFormat | None = Field(
        default=None,
        description="json_object or json_schema: the reply is forced to such JSON by constrained decoding.",
    )


class CompletionRequest(_Body):
    prompt: str | Annotated[list[str], Field(min_length=1, max_length=1)]
    echo: StrictBool = Field(default=False, description="Return the prompt before the completion.")

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v):
        if isinstance(v, list):
            if len(v) != 1:
                raise ValueError("prompt: send one prompt per request (a string, or a list of one string)")
            v = v[0]
        return v  # an empty prompt is allowed (as OpenAI's): generation starts from the start-of-text token


class ErrorDetail(BaseModel):
    message: str = Field(..., description="What was wrong and what to do.")
    type: str = Field(..., description="invalid_request_error, authentication_error, not_found_error, ...")
    param: str | None = Field(default=None, description="The request field at fault, if one is.")
    code: str | None = Field(
        default=None, description="A stable machine-readable reason, e.g. context_length_exceeded."
    )


class ErrorResponse(BaseModel):
    """Every error response's body (OpenAI's shape)."""

    error: ErrorDetail


class AdapterRegistration(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(..., pattern=ADAPTER_NAME.pattern, description="Name clients select the adapter by.")
    path: str = Field(
        ..., min_length=1, description="A LoRA run dir, its final/ or an adapter dir, under serve.adapter_roots."
    )


class FileObject(BaseModel):
    """An uploaded file, as OpenAI's files API describes it."""

    id: str = Field(..., description="The file's id, file-<32 hex digits>.")
    object: Literal["file"] = "file"
    bytes: int = Field(..., description="Its size in bytes.")
    created_at: int = Field(..., description="When it was uploaded (Unix seconds).")
    filename: str = Field(..., description="The name it was uploaded with.")
    purpose: Literal["fine-tune"] = Field(..., description="What it is for; this server keeps fine-tune files.")
    status: Literal["processed"] = Field(default="processed", description="Always processed: stored and ready to use.")


class FileList(BaseModel):
    object: Literal["list"] = "list"
    data: list[FileObject] = Field(..., description="The files, newest first unless order is asc.")
    first_id: str | None = Field(default=None, description="The first file's id (null when data is empty).")
    last_id: str | None = Field(default=None, description="The last file's id: pass it as `after` for the next page.")
    has_more: bool = Field(..., description="Whether more files follow the last one.")


class ModelDeleted(BaseModel):
    id: str
    object: Literal["model"] = "model"
    deleted: Literal[True] = True


class FileDeleted(BaseModel):
    id: str
    object: Literal["file"] = "file"
    deleted: Literal[True] = True


def validation_error(exc) -> ApiError:
    """A pydantic/FastAPI validation error → one 400 that lists every problem with its field."""
    problems, first = [], None
    for e in exc.errors():
        if e.get("type") == "json_invalid":
            detail = (e.get("ctx") or {}).get("error", "")
            return ApiError(
                400, f"the request body is not valid JSON ({detail})".replace(" ()", ""), code="invalid_json"
            )
        loc = [str(p) for p in e.get("loc", ()) if p != "body"]
        where = ".".join(loc) or "body"
        first = first or where
        msg = e.get("msg", "invalid").removeprefix("Value error, ")
        problems.append(f"{where}: {msg}")
    return ApiError(400, "Invalid request: " + "; ".join(problems), param=first, code="invalid_request")


# ------------------------------------------------------------------------------------------ fine-tuning jobs

SUFFIX = r"^[A-Za-z0-9._-]{1,64}$"


class Hyperparameters(BaseModel):
    """A job's hyperparameters; "auto" takes the value of the server's job template (serve.finetune.job)."""

    n_epochs: Literal["auto"] | Annotated[int, Field(ge=1)] = Field(default="auto", description="Passes over the data.")
    batch_size: Literal["auto"] | Annotated[int, Field(ge=1)] = Field(
        default="auto", description="Training rows per optimizer step."
    )
    learning_rate_multiplier: Literal["auto"] | Annotated[float, Field(gt=0, le=100)] = Field(
        default="auto", description="Times the template's learning rate."
    )


class SupervisedMethod(BaseModel):
    hyperparameters: Hyperparameters = Field(default_factory=Hyperparameters)


class DpoHyperparameters(Hyperparameters):
    beta: Literal["auto"] | Annotated[float, Field(gt=0, le=10)] = Field(
        default="auto", description="How far the model may move from the reference (training.dpo.beta)."
    )


class DpoMethod(BaseModel):
    hyperparameters: DpoHyperparameters = Field(default_factory=DpoHyperparameters)


class ReinforcementHyperparameters(Hyperparameters):
    """A reinforcement job's hyperparameters (OpenAI's); batch_size counts prompts per optimizer step."""

    batch_size: Literal["auto"] | Annotated[int, Field(ge=1)] = Field(
        default="auto", description="Prompts per optimizer step (each sampled training.rl.samples_per_prompt times)."
    )
    eval_interval: Literal["auto"] | Annotated[int, Field(ge=1)] = Field(
        default="auto", description="Steps between evaluations of the held-out reward (training.eval_every_steps)."
    )
    eval_samples: Literal["auto"] | Annotated[int, Field(ge=1)] = Field(
        default="auto", description="Completions per held-out prompt at evaluation (training.rl.eval_samples)."
    )
    # OpenAI's types, so that any other value gets a 400 saying why; the document shows the one value taken
    compute_multiplier: Annotated[Literal["auto"] | float, WithJsonSchema({"type": "string", "enum": ["auto"]})] = (
        Field(default="auto", description="Only auto: the operator sets the sampling (serve.finetune.job.training.rl).")
    )
    reasoning_effort: Annotated[
        Literal["default", "low", "medium", "high"] | None,
        WithJsonSchema({"anyOf": [{"type": "string", "enum": ["default"]}, {"type": "null"}]}),
    ] = Field(default=None, description="Only default: the served model has no reasoning effort to set.")

    @field_validator("compute_multiplier")
    @classmethod
    def _auto_compute(cls, v):
        if v != "auto":
            raise ValueError(
                f"{v} cannot be honoured: this server has no compute multiplier (how much a job samples is "
                "training.rl.samples_per_prompt and max_new_tokens in the operator's serve.finetune.job); send auto "
                "or leave it out"
            )
        return v

    @field_validator("reasoning_effort")
    @classmethod
    def _default_effort(cls, v):
        if v not in (None, "default"):
            raise ValueError(
                f"{v!r} cannot be honoured: the model this server fine-tunes has no reasoning effort to set; send "
                "default or leave it out"
            )
        return v


class ReinforcementMethod(BaseModel):
    grader: dict[str, Any] = Field(
        ...,
        description="An OpenAI grader object (string_check, text_similarity, multi; python where "
        "serve.finetune.python_graders allows it) scoring each sampled answer 0..1 against its row.",
    )
    hyperparameters: ReinforcementHyperparameters = Field(default_factory=ReinforcementHyperparameters)


class Method(BaseModel):
    type: Literal["supervised", "dpo", "reinforcement"] = Field(
        ...,
        description="supervised: finetune on example conversations; dpo: on preference pairs; reinforcement: on "
        "prompts, with a grader scoring sampled answers (GRPO).",
    )
    supervised: SupervisedMethod | None = None
    dpo: DpoMethod | None = None
    reinforcement: ReinforcementMethod | None = None

    @model_validator(mode="after")
    def _reinforcement_has_a_grader(self) -> Method:
        if self.type == "reinforcement" and self.reinforcement is None:
            raise ValueError(
                "method.reinforcement is required with type reinforcement: {grader, hyperparameters} (the grader "
                "scores the answers sampled to each prompt)"
            )
        return self


class FineTuningJobCreate(BaseModel):
    """POST /v1/fine_tuning/jobs (OpenAI's fields; unknown ones are ignored)."""

    model: str = Field(..., min_length=1, description="The base model: the model this endpoint serves.")
    training_file: str = Field(..., min_length=1, description="A fine-tune file's id (POST /v1/files).")
    validation_file: str | None = Field(default=None, description="A fine-tune file of held-out rows for eval loss.")
    suffix: str | None = Field(
        default=None, pattern=SUFFIX, description="Up to 64 letters, digits, '.', '_' or '-', put in fine_tuned_model."
    )
    seed: int | None = Field(
        default=None, ge=0, le=2**31 - 1, description="Seed for shuffling, initialisation, dropout."
    )
    metadata: dict[str, Annotated[str, Field(max_length=512)]] | None = Field(
        default=None, max_length=16, description="Up to 16 string pairs kept with the job."
    )
    hyperparameters: Hyperparameters | None = Field(default=None, description="The older place for hyperparameters.")
    method: Method | None = Field(
        default=None,
        description="{type: supervised, supervised: {hyperparameters}}, {type: dpo, dpo: {hyperparameters}} or "
        "{type: reinforcement, reinforcement: {grader, hyperparameters}}.",
    )
    integrations: list[Any] | None = Field(
        default=None, description="Not supported: must be empty.", json_schema_extra={"maxItems": 0}
    )

    @field_validator("metadata")
    @classmethod
    def _keys(cls, v):
        if v and any(len(k) > 64 for k in v):
            raise ValueError("metadata keys are at most 64 characters")
        return v

    @field_validator("integrations")
    @classmethod
    def _no_integrations(cls, v):
        if v:
            raise ValueError("integrations (e.g. wandb) are not supported by this server; send none")
        return v

    def method_type(self) -> Literal["supervised", "dpo", "reinforcement"]:
        return self.method.type if self.method is not None else "supervised"

    def hyperparameters_given(self) -> Hyperparameters:
        if self.method is not None and self.method.type == "dpo":
            return self.method.dpo.hyperparameters if self.method.dpo else DpoHyperparameters()
        if self.method is not None and self.method.type == "reinforcement":
            assert self.method.reinforcement is not None  # Method's own check
            return self.method.reinforcement.hyperparameters
        if self.method is not None and self.method.supervised is not None:
            return self.method.supervised.hyperparameters
        return self.hyperparameters or Hyperparameters()

    def hyperparameters_field(self) -> str:
        """Where the request's hyperparameters are, for error messages."""
        if self.method is not None and self.method.type in ("dpo", "reinforcement"):
            return f"method.{self.method.type}.hyperparameters"
        return "method.supervised.hyperparameters" if self.method and self.method.supervised else "hyperparameters"


class JobError(BaseModel):
    code: str = Field(..., description="invalid_file, training_failed, job_lost, ...")
    message: str = Field(..., description="What went wrong; for a bad file its first bad lines as file:line.")
    param: str | None = Field(default=None, description="The request field at fault (training_file, ...), if one is.")


class ResolvedHyperparameters(BaseModel):
    n_epochs: int | float
    batch_size: int
    learning_rate_multiplier: float
    beta: float | None = Field(default=None, description="DPO jobs: training.dpo.beta.")


class FineTuningJob(BaseModel):
    """A fine-tuning job, as OpenAI's API describes it."""

    object: Literal["fine_tuning.job"] = "fine_tuning.job"
    id: str = Field(..., description="ftjob-<32 hex digits>.")
    model: str = Field(..., description="The base model.")
    created_at: int
    finished_at: int | None = None
    fine_tuned_model: str | None = Field(default=None, description="ft:<base>:<suffix>:<job id>, once it succeeded.")
    organization_id: str = Field(..., description="key-<the first 12 hex digits of the key's SHA-256>.")
    result_files: list[str] = Field(default_factory=list)
    status: Literal["validating_files", "queued", "running", "succeeded", "failed", "cancelled"]
    validation_file: str | None = None
    training_file: str
    hyperparameters: ResolvedHyperparameters
    method: dict[str, Any]
    trained_tokens: int | None = Field(default=None, description="Tokens trained on, once it succeeded.")
    error: JobError | None = None
    seed: int
    estimated_finish: int | None = None
    integrations: list[Any] = Field(default_factory=list)
    metadata: dict[str, str] | None = None
    user_provided_suffix: str | None = None


class FineTuningJobList(BaseModel):
    object: Literal["list"] = "list"
    data: list[FineTuningJob] = Field(..., description="Jobs, newest first.")
    has_more: bool


class JobEvent(BaseModel):
    object: Literal["fine_tuning.job.event"] = "fine_tuning.job.event"
    id: str
    created_at: int
    level: Literal["info", "warn", "error"]
    message: str
    data: dict[str, Any] = Field(default_factory=dict)
    type: Literal["message", "metrics"] = Field(..., description="metrics: a logged step (data holds its loss).")


class EventList(BaseModel):
    object: Literal["list"] = "list"
    data: list[JobEvent] = Field(..., description="Events, newest first.")
    has_more: bool


class JobCheckpoint(BaseModel):
    object: Literal["fine_tuning.job.checkpoint"] = "fine_tuning.job.checkpoint"
    id: str
    created_at: int
    fine_tuned_model_checkpoint: str
    fine_tuning_job_id: str
    metrics: dict[str, Any]
    step_number: int


class CheckpointList(BaseModel):
    object: Literal["list"] = "list"
    data: list[JobCheckpoint] = Field(..., description="Checkpoints, newest first.")
    has_more: bool
    first_id: str | None = None
    last_id: str | None = None


# ------------------------------------------------------------------------------------------ graders

GRADER_DESCRIPTION = (
    "An OpenAI grader object: string_check, text_similarity, multi, or python where serve.finetune.python_graders "
    "allows it (score_model and label_model graders are refused)."
)


class GraderRunRequest(BaseModel):
    """POST /v1/fine_tuning/alpha/graders/run."""

    grader: dict[str, Any] = Field(..., description=GRADER_DESCRIPTION)
    model_sample: str = Field(..., description="The model's answer: the grader's {{sample.output_text}} (and "
                              "{{sample.output_json}} when it is JSON).")  # fmt: skip
    item: Any = Field(default=None, description="The dataset row: the grader's {{item.*}}.")


class GraderValidateRequest(BaseModel):
    """POST /v1/fine_tuning/alpha/graders/validate."""

    grader: dict[str, Any] = Field(..., description=GRADER_DESCRIPTION)


class GraderValidateResponse(BaseModel):
    grader: dict[str, Any] = Field(..., description="The grader, as sent: it can be used in a reinforcement job.")


class GraderRunMetadata(BaseModel):
    name: str
    type: str
    errors: dict[str, bool | str | None] = Field(
        ..., description="OpenAI's error flags (formula_parse_error, python_grader_runtime_error, ...) and details."
    )
    execution_time: float = Field(..., description="Seconds the grading took.")
    scores: dict[str, Any] = Field(..., description="A multi grader's graders' scores by name.")
    token_usage: int | None = None
    sampled_model_name: str | None = None


class GraderRunResponse(BaseModel):
    """OpenAI's GraderRunResponse."""

    reward: float = Field(..., description="The score (0 when grading failed; see metadata.errors).")
    metadata: GraderRunMetadata
    sub_rewards: dict[str, Any] = Field(..., description="A multi grader's graders' scores by name.")
    model_grader_token_usage_per_model: dict[str, Any]
