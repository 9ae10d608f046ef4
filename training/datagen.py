"""`rayft generate`: a folder of documents → question/answer pairs in the `messages` training format.

Documents (.md, .markdown, .txt; the folder is searched recursively, in sorted order, skipping
hidden files and folders) are split by markdown headings and paragraphs into chunks of at most
`max_chunk_chars` characters; each chunk keeps its heading trail ("Warranty > Returns") as its
title. Then either

- an LLM reads each chunk through a prompt template and writes `pairs_per_chunk` pairs as
  `Q: ...` / `A: ...` lines. The LLM is a local model (the built-in alias, a run dir, any HF model
  dir) run by Ray Data batch inference (training/inference.py), or any OpenAI-compatible endpoint
  (POST {base}/chat/completions, plain urllib, a few requests at a time); or
- (`mode="faq"`, no LLM) the pairs are read from documents already in FAQ shape: `Q:`/`A:` lines,
  or a markdown heading that is a question followed by its answer.

Pairs are filtered (empty, overlong, duplicate question, answer not grounded in its chunk) and
written as JSONL rows `{"messages": [user, assistant], "source": "file.md#chunk-3"}` (FAQ rows:
`"file.md:12"`, the question's line). `generate_qa` returns counts that account for every pair.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from rayft.training.formats import words

DOC_SUFFIXES = (".md", ".markdown", ".txt")
DEFAULT_MODEL = "smollm2-135m-instruct"
DEFAULT_PAIRS_PER_CHUNK = 3
DEFAULT_MAX_CHUNK_CHARS = 1200
MIN_CHUNK_CHARS = 100
DEFAULT_MIN_OVERLAP = 0.5
DEFAULT_MAX_NEW_TOKENS = 256
MAX_QUESTION_CHARS = 300
MAX_ANSWER_CHARS = 1200
DROP_REASONS = ("empty", "overlong", "low_overlap", "duplicate")

TEMPLATE_FIELDS = ("chunk", "n", "title")
REQUIRED_TEMPLATE_FIELDS = ("chunk", "n")
DEFAULT_TEMPLATE = '''You write training data for a question-answering assistant.
Read the excerpt below, from the section "{title}", and write {n} questions a reader could ask
about it, each with its answer.

Rules:
- Each question must be answerable from the excerpt alone.
- Each answer must use the facts and wording of the excerpt; add nothing that is not in it.
- Write each pair as two lines: a line starting with Q: and the question, then a line starting with A:
  and the answer.
- Write nothing else.

Excerpt:
"""
{chunk}
"""'''

# the endpoint: retries for transient failures (connection errors, 429, 5xx), with doubling waits
ENDPOINT_RETRIES = 2
RETRY_BACKOFF_S = 0.5
RETRY_STATUS = (429, 500, 502, 503, 504)


class GenerateError(Exception):
    """Input `rayft generate` cannot work with (documents, template, options, endpoint); the message says what to do."""


# --------------------------------------------------------------------------- documents → chunks


@dataclass(frozen=True)
class Chunk:
    """A piece of a document: `title` is the heading trail (or the file name), `text` the body, at most
    max_chunk_chars long. `source` names it for people: "guides/care.md#chunk-3" (1-based per file)."""

    source: str
    title: str
    text: str


@dataclass(frozen=True)
class _Section:
    title: str
    heading: str  # the section's own heading text ("" before the first heading)
    line: int  # 1-based line of the body's first line in the file
    lines: list[str]


def find_documents(docs_dir: str | Path) -> list[Path]:
    """The .md/.markdown/.txt files under `docs_dir` (or `docs_dir` itself if it is one), sorted."""
    root = Path(docs_dir).expanduser()
    if root.is_file():
        if root.suffix.lower() not in DOC_SUFFIXES:
            raise GenerateError(f"{root} is not a .md or .txt file; point DOCS_DIR at a folder of documents")
        return [root]
    if not root.is_dir():
        raise GenerateError(f"documents folder not found: {root}")
    found, others = [], Counter()
    for p in root.rglob("*"):
        rel = p.relative_to(root)
        if not p.is_file() or any(part.startswith(".") for part in rel.parts):
            continue
        if p.suffix.lower() in DOC_SUFFIXES:
            found.append(p)
        else:
            others[p.suffix.lower() or "(no extension)"] += 1
    if not found:
        seen = ", ".join(f"{n} {ext}" for ext, n in others.most_common(5))
        raise GenerateError(
            f"{root} has no .md or .txt files (searched recursively{'; it has ' + seen if seen else ', it is empty'}); "
            "convert the documents to markdown or plain text first"
        )
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise GenerateError(f"{path} is not UTF-8 text (byte {e.start}); convert it to UTF-8 or move it out") from None


_HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)(?:\s+#+)?\s*$")
_FENCE = re.compile(r"^ {0,3}(```|~~~)")


def _sections(text: str, fallback_title: str, markdown: bool) -> list[_Section]:
    """Split a document at markdown headings (outside code fences); titles are heading trails."""
    lines = text.splitlines()
    start = 0
    if markdown and lines and lines[0].strip() == "---":  # YAML front matter
        end = next((i for i in range(1, len(lines)) if lines[i].strip() in ("---", "...")), None)
        if end is not None:
            start = end + 1
    trail: list[tuple[int, str]] = []
    sections: list[_Section] = []
    current: list[str] = []
    heading, body_line = "", start + 1
    in_fence = False

    def close() -> None:
        title = " > ".join(t for _, t in trail) or fallback_title
        sections.append(_Section(title, heading, body_line, current))

    for i in range(start, len(lines)):
        line = lines[i]
        if markdown and _FENCE.match(line):
            in_fence = not in_fence
        m = _HEADING.match(line) if markdown and not in_fence else None
        if m is None:
            current.append(line)
            continue
        close()
        level, heading = len(m.group(1)), _strip_md(m.group(2))
        trail = [(lv, t) for lv, t in trail if lv < level] + [(level, heading)]
        current, body_line = [], i + 2
    close()
    return sections


def _strip_md(text: str) -> str:
    return re.sub(r"[*_`]", "", text).strip()


def _paragraphs(lines: list[str]) -> list[str]:
    """Blank-line separated paragraphs; a fenced code block stays one paragraph."""
    paras, cur, in_fence = [], [], False
    for line in lines:
        if _FENCE.match(line):
            in_fence = not in_fence
        if not line.strip() and not in_fence:
            if cur:
                paras.append("\n".join(cur).strip("\n"))
                cur = []
            continue
        cur.append(line.rstrip())
    if cur:
        paras.append("\n".join(cur).strip("\n"))
    return [p for p in paras if p.strip()]


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def _split_long(text: str, limit: int) -> list[str]:
    """Pieces of at most `limit` chars: at sentence ends, else at spaces, else anywhere."""
    if len(text) <= limit:
        return [text]
    pieces: list[str] = []
    for sentence in _SENTENCE_END.split(text):
        while len(sentence) > limit:
            cut = sentence.rfind(" ", 0, limit + 1)
            cut = cut if cut > 0 else limit
            pieces.append(sentence[:cut].rstrip())
            sentence = sentence[cut:].lstrip()
        if sentence:
            pieces.append(sentence)
    return _pack(pieces, limit, " ")


def _pack(pieces: list[str], limit: int, sep: str) -> list[str]:
    out, cur = [], ""
    for p in pieces:
        if cur and len(cur) + len(sep) + len(p) > limit:
            out.append(cur)
            cur = ""
        cur = f"{cur}{sep}{p}" if cur else p
    if cur:
        out.append(cur)
    return out


def chunk_text(text: str, max_chars: int, title: str, markdown: bool = True) -> list[tuple[str, str]]:
    """(title, body) chunks of one document. Sections (by heading) never share a chunk; within one,
    paragraphs are packed up to `max_chars`, and a longer paragraph is split at sentence ends."""
    chunks = []
    for sec in _sections(text, title, markdown):
        paras: list[str] = []
        for p in _paragraphs(sec.lines):
            paras += _split_long(p, max_chars)
        chunks += [(sec.title, body) for body in _pack(paras, max_chars, "\n\n")]
    return chunks


def chunk_documents(docs_dir: str | Path, max_chunk_chars: int = DEFAULT_MAX_CHUNK_CHARS) -> list[Chunk]:
    """Every document under `docs_dir`, chunked; raises GenerateError if there is nothing to read."""
    root = Path(docs_dir).expanduser()
    chunks: list[Chunk] = []
    for path in find_documents(root):
        rel = _rel(path, root)
        parts = chunk_text(_read_text(path), max_chunk_chars, path.stem, markdown=path.suffix.lower() != ".txt")
        chunks += [Chunk(f"{rel}#chunk-{i}", t, body) for i, (t, body) in enumerate(parts, 1)]
    if not chunks:
        raise GenerateError(f"the documents under {root} are empty; there is nothing to write questions about")
    return chunks


def _rel(path: Path, root: Path) -> str:
    return path.name if root.is_file() else path.relative_to(root).as_posix()


# --------------------------------------------------------------------------- the prompt template


_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


def load_template(path: str | Path | None) -> str:
    """The default template, or the one in `path` after checking its placeholders."""
    if path is None:
        return DEFAULT_TEMPLATE
    p = Path(path).expanduser()
    if not p.is_file():
        raise GenerateError(f"template file not found: {p}")
    template = _read_text(p)
    check_template(template, str(p))
    return template


def check_template(template: str, where: str = "the template") -> None:
    """A template must hold {chunk} and {n}; {title} is optional; other {names} are typos."""
    used = set(_PLACEHOLDER.findall(template))
    problems = []
    missing = [f"{{{f}}}" for f in REQUIRED_TEMPLATE_FIELDS if f not in used]
    if missing:
        problems.append(f"missing placeholder{'s' if len(missing) > 1 else ''} {', '.join(missing)}")
    unknown = sorted(f"{{{u}}}" for u in used - set(TEMPLATE_FIELDS))
    if unknown:
        problems.append(f"unknown placeholder{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}")
    if problems:
        raise GenerateError(
            f"{where}: {'; '.join(problems)}. A template uses {{chunk}} (the document excerpt), {{n}} (pairs "
            "to write) and optionally {title} (its heading), and should ask for `Q: ...` / `A: ...` lines"
        )


def render_prompt(template: str, chunk: Chunk, n: int) -> str:
    """Fill the placeholders; other braces (a JSON example, say) are left alone."""
    values = {"chunk": chunk.text, "n": str(n), "title": chunk.title}
    return _PLACEHOLDER.sub(lambda m: values.get(m.group(1), m.group(0)), template)


# --------------------------------------------------------------------------- LLM output → pairs


@dataclass
class Pair:
    question: str
    answer: str
    line: int = 0  # 1-based line of the question in the parsed text (0: unknown)


# "Q:", "1. Q:", "- Question 2:", "**Q:**", "### Answer:" ... ; the label, then the text after it
_LABEL = re.compile(
    r"^\s*(?:#{1,6}\s*|[-*•>]\s*)?(?:\(?\d{1,3}[.)]\s*)?(?:[*_]{1,2})?"
    r"(q|question|a|answer)\s*\d{0,3}\s*(?:[*_]{1,2})?\s*[:：]\s*(?:[*_]{1,2})?\s*(.*)$",
    re.IGNORECASE,
)
_LIST_ITEM = re.compile(r"^\s*(?:[-*•+]|\d{1,3}[.)])\s+")
_INLINE_ANSWER = re.compile(r"^(.*?[?.!])\s+(?:\*\*)?(?:a|answer)(?:\*\*)?\s*:\s*(?:\*\*)?\s*(.+)$", re.IGNORECASE)


def parse_pairs(text: str) -> list[Pair]:
    """Question/answer pairs from `Q:`/`A:` lines (tolerant of numbering, bold, `Question:`/`Answer:`).

    Lines without a label continue the field above until a blank line or heading. Every question is a
    pair (one without an answer gets an empty one, for the filters to count); an answer with no
    question waiting for it is ignored.
    """
    pairs: list[Pair] = []
    field: str | None = None  # which side of pairs[-1] continuation lines extend
    for lineno, line in enumerate(text.splitlines(), 1):
        m = _LABEL.match(line)
        if m is None:
            if not line.strip() or _HEADING.match(line):
                field = None
            elif field is not None:
                p = pairs[-1]
                sep = "\n" if _LIST_ITEM.match(line) else " "  # a wrapped line joins with a space, a list item not
                setattr(p, field, f"{getattr(p, field)}{sep}{line.strip()}".strip())
            continue
        label, content = m.group(1).lower(), _clean(m.group(2))
        if label.startswith("q"):
            inline = _INLINE_ANSWER.match(content)
            if inline:
                pairs.append(Pair(_clean(inline.group(1)), _clean(inline.group(2)), lineno))
                field = "answer"
            else:
                pairs.append(Pair(content, "", lineno))
                field = "question"
        elif pairs and not pairs[-1].answer:
            pairs[-1].answer = content
            field = "answer"
        else:
            field = None
    for p in pairs:
        p.question, p.answer = _clean(p.question), _clean(p.answer)
    return pairs


def _unwrap(paragraph: str) -> str:
    """Join a paragraph's hard-wrapped lines with spaces; lists and code keep their lines."""
    lines = paragraph.splitlines()
    if _FENCE.match(lines[0]) or any(_LIST_ITEM.match(line) for line in lines):
        return paragraph
    return " ".join(line.strip() for line in lines)


def _clean(text: str) -> str:
    """Strip bold markers and quotes around the text (small models often open a quote they never close)."""
    text = text.strip().removesuffix("**").removesuffix("__").strip()
    for q in '"“”':
        if text.count(q) == 1 and (text.startswith(q) or text.endswith(q)):
            text = text.strip(q).strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'" and text.count(text[0]) == 2:
        text = text[1:-1].strip()
    return text


def faq_pairs(text: str, title: str, markdown: bool = True) -> list[Pair]:
    """Pairs from a document already in FAQ shape: each section's `Q:`/`A:` lines, or else a heading that
    ends in "?" with the section's text as its answer. Lines are 1-based lines of the file."""
    pairs: list[Pair] = []
    for sec in _sections(text, title, markdown):
        found = parse_pairs("\n".join(sec.lines))
        if found:
            pairs += [Pair(p.question, p.answer, sec.line + p.line - 1) for p in found]
        elif sec.heading.endswith("?"):
            pairs.append(Pair(sec.heading, "\n\n".join(_unwrap(p) for p in _paragraphs(sec.lines)), sec.line - 1))
    return pairs


# --------------------------------------------------------------------------- filters

# very common words: an answer does not count as grounded because it says "the" and "is"
_STOPWORDS = frozenset(
    "a an the is are was were be been it its this that these those of to in on at for by with from as and or "
    "but not no yes do does did can you your i we our they their he she his her them there here what which who "
    "how when where why will would should could may might has have had".split()
)


def overlap(answer: str, context: str) -> float:
    """Fraction of the answer's words, ignoring very common ones, found in the context; a plural matches
    its singular ("months" is found in "27-month"). An answer of only common words ("Yes, it is.")
    has nothing to check and scores 0."""
    content = [w for w in words(answer) if w not in _STOPWORDS]
    if not content:
        return 0.0
    known = {_singular(w) for w in words(context)}
    return sum(_singular(w) in known for w in content) / len(content)


def _singular(word: str) -> str:
    return word[:-1] if len(word) > 3 and word.endswith("s") and not word.endswith("ss") else word


def question_key(question: str) -> str:
    """Questions that differ only in case, spacing or punctuation are duplicates."""
    return " ".join(words(question))


def drop_reason(
    pair: Pair,
    context: str,
    seen: set[str],
    min_overlap: float,
    max_question_chars: int = MAX_QUESTION_CHARS,
    max_answer_chars: int = MAX_ANSWER_CHARS,
) -> str | None:
    """Why a pair is dropped (one of DROP_REASONS), or None to keep it (its question is added to `seen`).
    Duplicates are checked last, so a question is only taken once it has an answer worth keeping."""
    if not words(pair.question) or not words(pair.answer):  # nothing, or only punctuation
        return "empty"
    if len(pair.question) > max_question_chars or len(pair.answer) > max_answer_chars:
        return "overlong"
    if overlap(pair.answer, context) < min_overlap:
        return "low_overlap"
    key = question_key(pair.question)
    if key in seen:
        return "duplicate"
    seen.add(key)
    return None


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
    timeout_s: float = 300.0,
    start_ray: Callable[[int], None] | None = None,
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
            client = Endpoint(endpoint, endpoint_model, api_key, timeout_s)
            llm = f"{client.model} at {client.url}"
            replies = client.complete_all(prompts, max_new_tokens, concurrency, advance)
        else:
            inference = dict(replicas=replicas, batch_size=batch_size, use_gpu=use_gpu, start_ray=start_ray)
            llm, replies = _local_replies(prompts, model or DEFAULT_MODEL, max_new_tokens, advance, **inference)
        raw = [(c, parse_pairs(reply)) for c, reply in zip(chunks, replies, strict=True)]
    rows, dropped = [], Counter({r: 0 for r in DROP_REASONS})
    seen: set[str] = set()
    for chunk, pairs in raw:
        context = f"{chunk.title}\n{chunk.text}"
        for p in pairs:
            reason = drop_reason(p, context, seen, min_overlap, max_question_chars, max_answer_chars)
            if reason:
                dropped[reason] += 1
                continue
            source = f"{chunk.source}:{p.line}" if mode == "faq" else chunk.source  # FAQ: the question's line
            rows.append(_row(p, source, system))
    _write_jsonl(out, rows)
    return {
        "mode": mode,
        "llm": llm,
        "documents": len(docs),
        "chunks": len(chunks),
        "chunks_without_pairs": sum(not pairs for _, pairs in raw),
        "raw_pairs": sum(len(pairs) for _, pairs in raw),
        "kept": len(rows),
        "dropped": dict(dropped),
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
        text = _read_text(path)
        chunk = Chunk(_rel(path, root), path.stem, text)
        chunks.append(chunk)
        raw.append((chunk, faq_pairs(text, path.stem, markdown=path.suffix.lower() != ".txt")))
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
    start_ray: Callable[[int], None] | None,
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


def chat_completions_url(endpoint: str) -> str:
    """The chat completions URL for what users pass as --endpoint:
    http://host:8000/v1 (or .../v1/) → http://host:8000/v1/chat/completions;
    http://host:8000 (no path) → http://host:8000/v1/chat/completions;
    any other path is taken as the API base (…/openai → …/openai/chat/completions);
    a URL already ending in /chat/completions is used as is."""
    from urllib.parse import urlsplit

    url = endpoint.strip().rstrip("/")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise GenerateError(
            f"--endpoint {endpoint!r} is not an http(s) URL; give the API base, e.g. http://127.0.0.1:8000/v1"
        )
    if url.endswith("/chat/completions"):
        return url
    if not parts.path:
        url += "/v1"
    return url + "/chat/completions"


class Endpoint:
    """A client for one OpenAI-compatible chat completions endpoint (urllib, no extra dependencies)."""

    def __init__(self, endpoint: str, model: str | None, api_key: str | None, timeout_s: float = 300.0):
        self.url = chat_completions_url(endpoint)
        self.base = self.url.removesuffix("/chat/completions")
        self.api_key = api_key or None
        self.timeout_s = timeout_s
        self.model = model or self._only_model()

    def _only_model(self) -> str:
        """With no --endpoint-model, use the endpoint's model if it serves exactly one (GET {base}/models)."""
        url = f"{self.base}/models"
        try:
            data = self._request(url, None)
        except _HTTPFailure as e:
            if e.code in (401, 403):
                raise
            raise GenerateError(f"say which model the endpoint should use with --endpoint-model ({e})") from None
        ids = []
        if isinstance(data, dict) and isinstance(data.get("data"), list):
            ids = [m.get("id") for m in data["data"] if isinstance(m, dict) and isinstance(m.get("id"), str)]
        if len(ids) == 1:
            return ids[0]
        served = f"it serves {', '.join(ids[:10])}" if ids else f"{url} lists no models"
        raise GenerateError(f"say which model the endpoint should use with --endpoint-model ({served})")

    def complete(self, prompt: str, max_tokens: int) -> str:
        payload = {
            "model": self.model,
            "messages": [{"role": "user", "content": prompt}],
            "temperature": 0,
            "max_tokens": max_tokens,
        }
        data = self._request(self.url, payload)
        try:
            content = data["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            keys = ", ".join(map(str, data)) if isinstance(data, dict) else type(data).__name__
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
        with ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="rayft-generate") as pool:
            futures = {pool.submit(self.complete, p, max_tokens): i for i, p in enumerate(prompts[1:], 1)}
            for f in as_completed(futures):
                if f.exception() is not None:
                    for other in futures:
                        other.cancel()
                    raise f.exception()
                replies[futures[f]] = f.result()
                if advance:
                    advance(1)
        return replies

    def _request(self, url: str, payload: dict | None):
        """GET (payload None) or POST JSON; retries transient failures; every failure a GenerateError."""
        import http.client
        import urllib.error
        import urllib.request

        headers = {"Accept": "application/json", "User-Agent": "rayft-generate"}
        data = None
        if payload is not None:
            data = json.dumps(payload).encode()
            headers["Content-Type"] = "application/json"
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        for attempt in range(ENDPOINT_RETRIES + 1):
            last = attempt == ENDPOINT_RETRIES
            req = urllib.request.Request(url, data=data, headers=headers, method="POST" if data else "GET")
            try:
                with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                    body = resp.read()
            except urllib.error.HTTPError as e:
                if e.code in RETRY_STATUS and not last:
                    time.sleep(RETRY_BACKOFF_S * 2**attempt)
                    continue
                raise _HTTPFailure(_http_error(url, e.code, _error_detail(e)), e.code) from None
            except (OSError, http.client.HTTPException) as e:  # refused, reset, timed out, DNS, not HTTP
                if not last:
                    time.sleep(RETRY_BACKOFF_S * 2**attempt)
                    continue
                raise GenerateError(self._unreachable(url, e)) from None
            try:
                return json.loads(body)
            except ValueError:
                start = body[:80].decode("utf-8", errors="replace")
                raise GenerateError(
                    f"the endpoint {url} did not answer with JSON (it began {start!r}); is --endpoint an "
                    "OpenAI-compatible API base such as http://127.0.0.1:8000/v1?"
                ) from None
        raise AssertionError("unreachable")

    def _unreachable(self, url: str, e: BaseException) -> str:
        reason = getattr(e, "reason", e)
        if isinstance(reason, TimeoutError) or "timed out" in str(reason):
            return (
                f"the endpoint {url} did not answer within {self.timeout_s:.0f} s (tried {ENDPOINT_RETRIES + 1} "
                "times); is the server overloaded? try fewer --concurrency or --max-new-tokens"
            )
        text = getattr(reason, "strerror", None) or str(reason) or type(reason).__name__
        return f"cannot reach the endpoint {url}: {text}; is the server running? check --endpoint"


class _HTTPFailure(GenerateError):
    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


def _error_detail(e) -> str:
    try:
        body = e.read(2000).decode("utf-8", errors="replace")
    except Exception:
        return e.reason or ""
    try:
        err = json.loads(body).get("error")
        msg = err.get("message") if isinstance(err, dict) else err
        if isinstance(msg, str) and msg:
            return msg[:300]
    except (ValueError, AttributeError):
        pass
    return " ".join(body.split())[:300] or str(e.reason or "")


def _http_error(url: str, code: int, detail: str) -> str:
    said = f"HTTP {code}" + (f": {detail}" if detail else "")
    if code in (401, 403):
        return f"the endpoint {url} refused the request ({said}); check the API key (--api-key or OPENAI_API_KEY)"
    if code == 404:
        return (
            f"the endpoint {url} answered {said}; check --endpoint (rayft posts to BASE/chat/completions, "
            "e.g. BASE = http://127.0.0.1:8000/v1) and --endpoint-model"
        )
    if code in (400, 422):
        return f"the endpoint {url} rejected the request ({said}); check --endpoint-model and --max-new-tokens"
    return f"the endpoint {url} failed ({said})"
