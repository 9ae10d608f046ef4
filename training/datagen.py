"""`rayft generate`: a folder of documents → question/answer pairs in the `messages` training format.

`generate_qa` runs the steps, each in its own module:

1. the documents are chunked (training/chunking.py);
2. an LLM reads each chunk through a prompt template and writes `pairs_per_chunk` pairs as `Q: ...` /
   `A: ...` lines, which are parsed back into pairs (training/qa_pairs.py). The LLM is a local model (the
   built-in alias, a run dir, any HF model dir) run by Ray Data batch inference (training/inference.py),
   or any OpenAI-compatible endpoint, through the `openai` client (this module). Or, with `mode="faq"`
   and no LLM, the pairs are read from documents already in FAQ shape;
3. the pairs are filtered (training/qa_pairs.py) and written as JSONL rows
   `{"messages": [user, assistant], "source": "file.md#chunk-3"}` (FAQ rows: `"file.md:12"`, the
   question's line). `generate_qa` returns counts that account for every pair.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

# the CLI (cluster/generate_cmd.py) takes its defaults from here: DEFAULT_MAX_CHUNK_CHARS, MIN_CHUNK_CHARS, ...
from rayft.training.chunking import (
    DEFAULT_MAX_CHUNK_CHARS,
    MIN_CHUNK_CHARS,
    Chunk,
    GenerateError,
    chunk_documents,
    find_documents,
    is_markdown,
    read_text,
    source_name,
)
from rayft.training.qa_pairs import (
    DEFAULT_MIN_OVERLAP,
    MAX_ANSWER_CHARS,
    MAX_QUESTION_CHARS,
    Pair,
    faq_pairs,
    keep_pairs,
    load_template,
    parse_pairs,
    render_prompt,
)

if TYPE_CHECKING:
    import openai

DEFAULT_MODEL = "smollm2-135m-instruct"
DEFAULT_PAIRS_PER_CHUNK = 3
DEFAULT_MAX_NEW_TOKENS = 256
DEFAULT_TIMEOUT_S = 300.0

# The endpoint: the openai client retries what may pass (connection errors, timeouts, 408, 409, 429, 5xx)
# this many times, waiting about 0.5 s, then 1 s, ... or as long as the server's Retry-After says. Read
# when an Endpoint is made, so a test can lower it.
ENDPOINT_MAX_RETRIES = 2
# A server that is up accepts a connection at once: waiting all of timeout_s (meant for a slow reply) for
# one would only delay the error for a host whose firewall drops the packets.
ENDPOINT_CONNECT_TIMEOUT_S = 10.0


# --------------------------------------------------------------------------- the entry point


def generate_qa(
    docs_dir: str | Path,
    out: str | Path,
    *,
    mode: Literal["llm", "faq"] = "llm",
    model: str | None = None,
    endpoint: str | None = None,
    endpoint_model: str | None = None,
    api_key: str | None = None,
    pairs_per_chunk: int = DEFAULT_PAIRS_PER_CHUNK,
    max_chunk_chars: int = DEFAULT_MAX_CHUNK_CHARS,
    template: str | Path | None = None,
    min_overlap: float = DEFAULT_MIN_OVERLAP,
    system: str | None = None,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    max_question_chars: int = MAX_QUESTION_CHARS,
    max_answer_chars: int = MAX_ANSWER_CHARS,
    replicas: int = 1,
    batch_size: int = 8,
    use_gpu: bool = False,
    concurrency: int = 4,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    start_ray: Callable[[int], object] | None = None,
    progress: Callable[[int], Callable[[int], None]] | None = None,
) -> dict:
    """Turn the documents under `docs_dir` into a JSONL training file `out`; return the counts.

    mode "llm": `endpoint` (an OpenAI-compatible base URL) if given, else the local `model` (default the
    built-in alias) on Ray: `start_ray(cpus)` joins or starts it (default: a local Ray of that many logical
    CPUs unless this process is connected already). mode "faq": no LLM, pairs read from the documents
    (their answers are the documents' own text, so the overlap filter does not apply).
    `progress(total)` is called once with the number of chunks and returns `advance(n)`.
    Returns {"mode", "llm", "documents", "chunks", "chunks_without_pairs", "raw_pairs", "kept", "dropped":
    {reason: count}, "out", "seconds"}; kept + sum(dropped) == raw_pairs. Raises GenerateError (and
    training.models.ModelError for a local model that cannot be found).
    """
    t0 = time.perf_counter()
    _check_options(
        mode=mode,
        model=model,
        endpoint=endpoint,
        template=template,
        pairs_per_chunk=pairs_per_chunk,
        max_chunk_chars=max_chunk_chars,
        min_overlap=min_overlap,
        max_new_tokens=max_new_tokens,
        concurrency=concurrency,
    )
    out = Path(out).expanduser()
    if out.is_dir():  # before any generation, not after it
        raise GenerateError(f"--out {out} is a folder; give a file name such as {out / 'qa.jsonl'}")
    root = Path(docs_dir).expanduser()
    docs = find_documents(root)
    if mode == "faq":
        llm, min_overlap = None, 0.0  # the answers are the documents' own words
        chunks, raw = _faq(root, docs)
        if not any(pairs for _, pairs in raw):
            raise GenerateError(
                f"no FAQ pairs in {root}: --faq reads `Q:`/`A:` lines or markdown headings that end in '?' with "
                "the answer below them; for other documents drop --faq to have an LLM write the pairs"
            )
    else:
        prompt_template = load_template(template)
        chunks = chunk_documents(root, max_chunk_chars)
        prompts = [render_prompt(prompt_template, c, pairs_per_chunk) for c in chunks]
        advance = progress(len(prompts)) if progress else None
        if endpoint:
            with Endpoint(endpoint, endpoint_model, api_key, timeout_s) as client:
                llm = f"{client.model} at {client.url}"
                replies = client.complete_all(prompts, max_new_tokens, concurrency, advance)
        else:
            llm, replies = _local_replies(
                prompts,
                model or DEFAULT_MODEL,
                max_new_tokens,
                advance,
                replicas=replicas,
                batch_size=batch_size,
                use_gpu=use_gpu,
                start_ray=start_ray,
            )
        raw = [(c, parse_pairs(reply)) for c, reply in zip(chunks, replies, strict=True)]
    kept, dropped = keep_pairs(raw, min_overlap, max_question_chars, max_answer_chars)
    # an FAQ row points at its question's line; an LLM row at the chunk it was written from
    rows = [_row(p, f"{c.source}:{p.line}" if mode == "faq" else c.source, system) for c, p in kept]
    _write_jsonl(out, rows)
    return {
        "mode": mode,
        "llm": llm,
        "documents": len(docs),
        "chunks": len(chunks),
        "chunks_without_pairs": sum(not pairs for _, pairs in raw),
        "raw_pairs": sum(len(pairs) for _, pairs in raw),
        "kept": len(rows),
        "dropped": dropped,
        "out": str(out),
        "seconds": round(time.perf_counter() - t0, 2),
    }


def _check_options(
    *, mode, model, endpoint, template, pairs_per_chunk, max_chunk_chars, min_overlap, max_new_tokens, concurrency
) -> None:
    """Every problem with the options at once, named as the CLI flags."""
    problems = []
    if mode not in ("llm", "faq"):
        problems.append(f"mode must be 'llm' or 'faq' (got {mode!r})")
    if mode == "faq" and (model or endpoint or template):
        problems.append(
            "FAQ mode (--faq) reads pairs from the documents with no LLM; drop --model/--endpoint/--template"
        )
    if model and endpoint:
        problems.append("give a local model (--model) or an endpoint (--endpoint), not both")
    if pairs_per_chunk < 1:
        problems.append(f"--pairs-per-chunk must be at least 1 (got {pairs_per_chunk})")
    if max_chunk_chars < MIN_CHUNK_CHARS:
        problems.append(f"--max-chunk-chars must be at least {MIN_CHUNK_CHARS} (got {max_chunk_chars})")
    if not 0.0 <= min_overlap <= 1.0:
        problems.append(f"--min-overlap is a fraction from 0 to 1 (got {min_overlap})")
    if max_new_tokens < 1:
        problems.append(f"--max-new-tokens must be at least 1 (got {max_new_tokens})")
    if concurrency < 1:
        problems.append(f"--concurrency must be at least 1 (got {concurrency})")
    if problems:
        raise GenerateError("; ".join(problems))


def _faq(root: Path, docs: list[Path]) -> tuple[list[Chunk], list[tuple[Chunk, list[Pair]]]]:
    """FAQ mode: one 'chunk' per document, its source the file's relative path."""
    chunks, raw = [], []
    for path in docs:
        text = read_text(path)
        chunk = Chunk(source_name(path, root), path.stem, text)
        chunks.append(chunk)
        raw.append((chunk, faq_pairs(text, path.stem, markdown=is_markdown(path))))
    return chunks, raw


def _row(pair: Pair, source: str, system: str | None) -> dict:
    messages = [{"role": "user", "content": pair.question}, {"role": "assistant", "content": pair.answer}]
    if system:
        messages.insert(0, {"role": "system", "content": system})
    return {"messages": messages, "source": source}


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    """Write whole or not at all: a crash never leaves half a training file behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


# --------------------------------------------------------------------------- a local model, on Ray Data


def _local_replies(
    prompts: list[str],
    model_name: str,
    max_new_tokens: int,
    advance: Callable[[int], None] | None,
    *,
    replicas: int,
    batch_size: int,
    use_gpu: bool,
    start_ray: Callable[[int], object] | None,
) -> tuple[str, list[str]]:
    """Generate with a local model through the same Ray Data batch inference as `rayft eval`.

    The reply is primed with "Q:" so even a small model starts in the layout the parser reads."""

    from transformers import AutoTokenizer

    from rayft.training.inference import InferenceConfig, resolve_inference_model, run_inference

    model = resolve_inference_model(model_name)  # a missing model fails here, before Ray starts
    tok = AutoTokenizer.from_pretrained(model.adapter or model.path)
    if not getattr(tok, "chat_template", None):
        raise GenerateError(
            f"model {model_name} has no chat template, so it cannot be asked for pairs; use an instruction-tuned "
            f"model (the built-in {DEFAULT_MODEL}, a run finetuned from one) or an --endpoint"
        )
    rendered = [
        tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False) + "Q:"
        for p in prompts
    ]
    if start_ray:
        start_ray(replicas)
    else:
        import ray

        from rayft.training.resources import local_ray_cpus

        if not ray.is_initialized():
            ray.init(num_cpus=local_ray_cpus(replicas))
    cfg = InferenceConfig(max_new_tokens=max_new_tokens, batch_size=batch_size, replicas=replicas, use_gpu=use_gpu)
    rows = run_inference([{"prompt": r} for r in rendered], model, cfg, on_rows=advance)
    return model.describe(), ["Q: " + str(r["prediction"]) for r in rows]


# --------------------------------------------------------------------------- an OpenAI-compatible endpoint


def api_base_url(endpoint: str) -> str:
    """The API base (the openai client's base_url) for what users pass as --endpoint:
    http://host:8000/v1 (or .../v1/) → http://host:8000/v1;
    http://host:8000 (no path) → http://host:8000/v1;
    any other path is taken as the API base (…/openai → …/openai);
    a chat completions URL (…/v1/chat/completions) → the base it is under (…/v1)."""
    from urllib.parse import urlsplit

    url = endpoint.strip().rstrip("/")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise GenerateError(
            f"--endpoint {endpoint!r} is not an http(s) URL; give the API base, e.g. http://127.0.0.1:8000/v1"
        )
    if url.endswith("/chat/completions"):
        return url.removesuffix("/chat/completions")
    return url if parts.path else url + "/v1"


class Endpoint:
    """One OpenAI-compatible chat completions endpoint, through the `openai` client: the client retries
    what may pass (ENDPOINT_MAX_RETRIES) and times out each request after `timeout_s`; this class turns
    whatever still fails into a GenerateError that says what to do."""

    def __init__(self, endpoint: str, model: str | None, api_key: str | None, timeout_s: float = DEFAULT_TIMEOUT_S):
        import openai  # slow to import: only when an endpoint is used

        self.base = api_base_url(endpoint)
        self.url = f"{self.base}/chat/completions"  # what people see in messages: the URL that is posted to
        self.timeout_s = timeout_s
        self.connect_timeout_s = min(timeout_s, ENDPOINT_CONNECT_TIMEOUT_S)
        self.max_retries = ENDPOINT_MAX_RETRIES
        # The client will not start without a key, but a local server needs none: with no key, give it a
        # placeholder and omit the Authorization header from every request, so no made-up key is sent.
        self._headers = {} if api_key else {"Authorization": openai.omit}
        self._client = openai.OpenAI(
            base_url=self.base,
            api_key=api_key or "unused",
            timeout=openai.Timeout(timeout_s, connect=self.connect_timeout_s),
            max_retries=self.max_retries,
        )
        try:
            self.model = model or self._only_model()
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> Endpoint:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Close the client's open connections."""
        self._client.close()

    def _only_model(self) -> str:
        """With no --endpoint-model, use the endpoint's model if it serves exactly one (GET {base}/models)."""
        import openai

        url = f"{self.base}/models"
        try:
            ids = self.served_models()
        except (openai.AuthenticationError, openai.PermissionDeniedError) as e:
            raise GenerateError(self._status_message(url, e)) from None
        except openai.APIStatusError as e:
            message = self._status_message(url, e)
            raise GenerateError(f"say which model the endpoint should use with --endpoint-model ({message})") from None
        if len(ids) == 1:
            return ids[0]
        served = f"it serves {', '.join(ids[:10])}" if ids else f"{url} lists no models"
        raise GenerateError(f"say which model the endpoint should use with --endpoint-model ({served})")

    def served_models(self) -> list[str]:
        """The model ids GET {base}/models lists. An HTTP error status is left as openai.APIStatusError, for
        the caller to explain in its own terms; other failures are GenerateErrors."""
        page = self._send(f"{self.base}/models", lambda: self._client.models.with_raw_response.list(**self._options))
        data = getattr(page, "data", None)
        return [m.id for m in data or [] if isinstance(getattr(m, "id", None), str)]

    def complete(self, prompt: str, max_tokens: int) -> str:
        import openai

        def post():
            return self._client.chat.completions.with_raw_response.create(
                model=self.model,
                messages=[{"role": "user", "content": prompt}],
                temperature=0,
                max_tokens=max_tokens,
                **self._options,
            )

        try:
            completion = self._send(self.url, post)
        except openai.NotFoundError as e:
            raise GenerateError(self._not_found(e)) from None
        except openai.APIStatusError as e:
            raise GenerateError(self._status_message(self.url, e)) from None
        try:
            content = completion.choices[0].message.content
        except (AttributeError, IndexError, TypeError):  # a loosely parsed reply: fields may be missing or None
            got = completion.to_dict() if hasattr(completion, "to_dict") else completion
            keys = ", ".join(map(str, got)) if isinstance(got, dict) else type(got).__name__
            raise GenerateError(
                f"the endpoint {self.url} answered without choices[0].message.content (got: {keys[:200]}); "
                "is --endpoint an OpenAI-compatible chat completions API?"
            ) from None
        if content is not None and not isinstance(content, str):
            raise GenerateError(f"the endpoint {self.url} answered a non-text message content ({type(content)})")
        return content or ""

    def complete_all(
        self, prompts: list[str], max_tokens: int, concurrency: int, advance: Callable[[int], None] | None
    ) -> list[str]:
        """Replies in prompt order. The first prompt goes alone, so a wrong URL, key or model fails
        once and fast; the rest go `concurrency` at a time. The first error stops the rest."""
        from concurrent.futures import ThreadPoolExecutor, as_completed

        if not prompts:
            return []
        replies = [self.complete(prompts[0], max_tokens)] + [""] * (len(prompts) - 1)
        if advance:
            advance(1)
        # one client for every thread: it is thread-safe and keeps its connections open between requests
        with ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="rayft-generate") as pool:
            futures = {pool.submit(self.complete, p, max_tokens): i for i, p in enumerate(prompts[1:], 1)}
            for f in as_completed(futures):
                error = f.exception()
                if error is not None:
                    for other in futures:
                        other.cancel()
                    raise error
                replies[futures[f]] = f.result()
                if advance:
                    advance(1)
        return replies

    @property
    def _options(self) -> dict:
        return {"extra_headers": self._headers}

    def _send(self, url: str, request: Callable[[], Any]):
        """Run `request` (a with_raw_response call, which the client retries) and parse its JSON. Connection
        failures, timeouts and answers that are not JSON become GenerateErrors; an HTTP error status stays
        openai.APIStatusError, since what it means depends on the request."""
        import openai

        try:
            raw = request()
        except openai.APITimeoutError as e:  # before APIConnectionError, its base class
            if _connect_timed_out(e):
                raise GenerateError(
                    f"cannot reach the endpoint {url}: no connection within {self.connect_timeout_s:g} s "
                    f"({self._tries}); is the host right and its port open? check --endpoint"
                ) from None
            raise GenerateError(
                f"the endpoint {url} did not answer within {self.timeout_s:g} s ({self._tries}); is the server "
                "overloaded? try fewer --concurrency or --max-new-tokens"
            ) from None
        except openai.APIConnectionError as e:
            raise GenerateError(
                f"cannot reach the endpoint {url}: {_cause(e)}; is the server running? check --endpoint"
            ) from None
        try:
            parsed = raw.parse()
        except ValueError:  # a JSON content type with a body that is not JSON
            parsed = None
        if parsed is None or isinstance(parsed, str):  # the client hands back any other content type as text
            start = raw.http_response.text[:80]
            raise GenerateError(
                f"the endpoint {url} did not answer with JSON (it began {start!r}); is --endpoint an "
                "OpenAI-compatible API base such as http://127.0.0.1:8000/v1?"
            )
        return parsed

    def _not_found(self, e: openai.NotFoundError) -> str:
        """A 404 from chat completions is a model the endpoint does not serve, or a wrong URL: the model list
        tells them apart when the endpoint has one."""
        import openai

        try:
            served = self.served_models()
        except (GenerateError, openai.APIError):  # no model list either: most likely the URL is wrong
            served = []
        if served and self.model not in served:
            return (
                f"the endpoint {self.base} serves no model {self.model!r} (it serves {', '.join(served[:10])}); "
                "check --endpoint-model"
            )
        return self._status_message(self.url, e)

    def _status_message(self, url: str, e: openai.APIStatusError) -> str:
        """What an HTTP error status from `url` means, after the client's retries, and what to do about it."""
        import openai

        detail = _detail(e)
        said = f"HTTP {e.status_code}" + (f": {detail}" if detail else "")
        if isinstance(e, (openai.AuthenticationError, openai.PermissionDeniedError)):
            return f"the endpoint {url} refused the request ({said}); check the API key (--api-key or OPENAI_API_KEY)"
        if isinstance(e, openai.NotFoundError):
            return (
                f"the endpoint {url} answered {said}; check --endpoint (rayft posts to BASE/chat/completions, "
                "e.g. BASE = http://127.0.0.1:8000/v1) and --endpoint-model"
            )
        if isinstance(e, (openai.BadRequestError, openai.UnprocessableEntityError)):
            return f"the endpoint {url} rejected the request ({said}); check --endpoint-model and --max-new-tokens"
        if isinstance(e, openai.RateLimitError):
            return f"the endpoint {url} is rate limiting rayft ({said}; {self._tries}); try a lower --concurrency"
        if e.status_code >= 500:
            return f"the endpoint {url} failed ({said}; {self._tries}); see the server's log"
        return f"the endpoint {url} failed ({said})"

    @property
    def _tries(self) -> str:
        n = self.max_retries + 1
        return "tried once" if n == 1 else f"tried {n} times"


def _detail(e: openai.APIStatusError) -> str:
    """The server's own words: the client has already unwrapped {"error": {"message": ...}} into `body`;
    some servers (FastAPI's defaults) say {"detail": ...} instead."""
    body = e.body
    message = (body.get("message") or body.get("detail")) if isinstance(body, dict) else body
    return " ".join(message.split())[:300] if isinstance(message, str) else ""


def _causes(e: BaseException | None):
    """An error and the errors it was raised from, innermost last."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__


def _connect_timed_out(e: BaseException) -> bool:
    # by name: the client's HTTP library (httpx, or httpx2 in newer openai releases) raises a ConnectTimeout
    return any(type(c).__name__ == "ConnectTimeout" for c in _causes(e))


def _cause(e: BaseException) -> str:
    """The innermost reason a connection failed ("Connection refused"), not the client's "Connection error."."""
    reason = str(e)
    for c in _causes(e):
        if isinstance(c, OSError) and c.strerror:
            return c.strerror
        reason = str(c) or reason
    return reason
