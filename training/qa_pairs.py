"""Question/answer pairs for `rayft generate`: the prompt, reading pairs out of text, and the filters.

- The prompt template asks an LLM for `n` pairs about one chunk, as `Q: ...` / `A: ...` lines; a
  user's template is checked for its placeholders before any generation.
- `parse_pairs` reads those lines back, tolerant of what models add (numbering, bold, `Question:`);
  `faq_pairs` reads documents already in FAQ shape (`Q:`/`A:` lines, or question headings).
- `drop_reason` is every filter in one place: empty, overlong, answer not grounded in its chunk
  (`overlap`), duplicate question; `keep_pairs` applies it and counts each drop by reason.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from rayft.training.chunking import (
    FENCE_LINE,
    HEADING_LINE,
    Chunk,
    GenerateError,
    read_text,
    split_paragraphs,
    split_sections,
)
from rayft.training.formats import words

DEFAULT_MIN_OVERLAP = 0.5
MAX_QUESTION_CHARS = 300
MAX_ANSWER_CHARS = 1200
DROP_REASONS = ("empty", "overlong", "low_overlap", "duplicate")

# --------------------------------------------------------------------------- the prompt template

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

_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


def load_template(path: str | Path | None) -> str:
    """The default template, or the one in `path` after checking its placeholders."""
    if path is None:
        return DEFAULT_TEMPLATE
    p = Path(path).expanduser()
    if not p.is_file():
        raise GenerateError(f"template file not found: {p}")
    template = read_text(p)
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


# --------------------------------------------------------------------------- text → pairs


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
            if not line.strip() or HEADING_LINE.match(line):
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
    if FENCE_LINE.match(lines[0]) or any(_LIST_ITEM.match(line) for line in lines):
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
    for sec in split_sections(text, title, markdown):
        found = parse_pairs("\n".join(sec.lines))
        if found:
            pairs += [Pair(p.question, p.answer, sec.line + p.line - 1) for p in found]
        elif sec.heading.endswith("?"):
            answer = "\n\n".join(_unwrap(p) for p in split_paragraphs(sec.lines))
            pairs.append(Pair(sec.heading, answer, sec.line - 1))
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


def keep_pairs(
    raw: list[tuple[Chunk, list[Pair]]],
    min_overlap: float,
    max_question_chars: int = MAX_QUESTION_CHARS,
    max_answer_chars: int = MAX_ANSWER_CHARS,
) -> tuple[list[tuple[Chunk, Pair]], dict[str, int]]:
    """The pairs that pass every filter, in order, with their chunks; and {reason: count} for the rest, with
    every reason present, so kept + sum(dropped) is the number of pairs in `raw`. An answer is grounded in
    its chunk's text and title; a question is a duplicate of any kept before it, in any chunk."""
    kept, dropped = [], Counter({r: 0 for r in DROP_REASONS})
    seen: set[str] = set()
    for chunk, pairs in raw:
        context = f"{chunk.title}\n{chunk.text}"
        for p in pairs:
            reason = drop_reason(p, context, seen, min_overlap, max_question_chars, max_answer_chars)
            if reason:
                dropped[reason] += 1
            else:
                kept.append((chunk, p))
    return kept, dict(dropped)
