"""Documents → chunks for `rayft generate`.

Documents are .md, .markdown and .txt files; a folder is searched recursively, in sorted order, skipping
hidden files and folders. Markdown is split at its headings (outside code fences) into sections, each
titled by its heading trail ("Warranty > Returns"); a section's paragraphs are packed into chunks of at
most `max_chunk_chars` characters, and a longer paragraph is cut at sentence ends. A .txt file has no
headings: its one section is titled by the file name.

`GenerateError` lives here, at the bottom of the generate modules, so the prompt and pair code
(training/qa_pairs.py) and the orchestration (training/datagen.py) raise the same error.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

DOC_SUFFIXES = (".md", ".markdown", ".txt")
DEFAULT_MAX_CHUNK_CHARS = 1200
MIN_CHUNK_CHARS = 100

HEADING_LINE = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)(?:\s+#+)?\s*$")
FENCE_LINE = re.compile(r"^ {0,3}(```|~~~)")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


class GenerateError(Exception):
    """Input `rayft generate` cannot work with (documents, template, options, endpoint); the message says what to do."""


@dataclass(frozen=True)
class Chunk:
    """A piece of a document: `title` is the heading trail (or the file name), `text` the body, at most
    max_chunk_chars long. `source` names it for people: "guides/care.md#chunk-3" (1-based per file)."""

    source: str
    title: str
    text: str


@dataclass(frozen=True)
class Section:
    """The text under one heading (or before the first one)."""

    title: str  # the heading trail, or the fallback title before the first heading
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


def read_text(path: Path) -> str:
    """A document or template as text; a file that is not UTF-8 is a GenerateError naming the byte."""
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise GenerateError(f"{path} is not UTF-8 text (byte {e.start}); convert it to UTF-8 or move it out") from None


def is_markdown(path: Path) -> bool:
    """Only .txt files are plain text: in them a '#' line is text, not a heading."""
    return path.suffix.lower() != ".txt"


def source_name(path: Path, root: Path) -> str:
    """How rows name their document: the path under the documents folder (the file name if one file was given)."""
    return path.name if root.is_file() else path.relative_to(root).as_posix()


def split_sections(text: str, fallback_title: str, markdown: bool) -> list[Section]:
    """Split a document at markdown headings (outside code fences); titles are heading trails."""
    lines = text.splitlines()
    start = 0
    if markdown and lines and lines[0].strip() == "---":  # YAML front matter
        end = next((i for i in range(1, len(lines)) if lines[i].strip() in ("---", "...")), None)
        if end is not None:
            start = end + 1
    trail: list[tuple[int, str]] = []
    sections: list[Section] = []
    current: list[str] = []
    heading, body_line = "", start + 1
    in_fence = False

    def close() -> None:
        title = " > ".join(t for _, t in trail) or fallback_title
        sections.append(Section(title, heading, body_line, current))

    for i in range(start, len(lines)):
        line = lines[i]
        if markdown and FENCE_LINE.match(line):
            in_fence = not in_fence
        m = HEADING_LINE.match(line) if markdown and not in_fence else None
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


def split_paragraphs(lines: list[str]) -> list[str]:
    """Blank-line separated paragraphs; a fenced code block stays one paragraph."""
    paras, cur, in_fence = [], [], False
    for line in lines:
        if FENCE_LINE.match(line):
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
    for sec in split_sections(text, title, markdown):
        paras: list[str] = []
        for p in split_paragraphs(sec.lines):
            paras += _split_long(p, max_chars)
        chunks += [(sec.title, body) for body in _pack(paras, max_chars, "\n\n")]
    return chunks


def chunk_documents(docs_dir: str | Path, max_chunk_chars: int = DEFAULT_MAX_CHUNK_CHARS) -> list[Chunk]:
    """Every document under `docs_dir`, chunked; raises GenerateError if there is nothing to read."""
    root = Path(docs_dir).expanduser()
    chunks: list[Chunk] = []
    for path in find_documents(root):
        rel = source_name(path, root)
        parts = chunk_text(read_text(path), max_chunk_chars, path.stem, markdown=is_markdown(path))
        chunks += [Chunk(f"{rel}#chunk-{i}", t, body) for i, (t, body) in enumerate(parts, 1)]
    if not chunks:
        raise GenerateError(f"the documents under {root} are empty; there is nothing to write questions about")
    return chunks
