"""`rayft generate`: chunking (training/chunking.py); the prompt template, parsing LLM output and the filters
(training/qa_pairs.py); FAQ mode, an OpenAI-compatible endpoint through the openai client (a stub server this
file starts on 127.0.0.1, spoken to over real HTTP), a local tiny model on Ray Data, and the written file
passing the project's own data validation (training/datagen.py)."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from helpers import ROOT
from rayft.cluster.generate_cmd import generate
from rayft.training.chunking import Chunk, GenerateError, chunk_documents
from rayft.training.datagen import api_base_url, generate_qa
from rayft.training.formats import normalize
from rayft.training.qa_pairs import (
    DEFAULT_TEMPLATE,
    Pair,
    check_template,
    drop_reason,
    load_template,
    overlap,
    parse_pairs,
    render_prompt,
)

DOCS = ROOT / "examples" / "docs"


def cli() -> typer.Typer:
    app = typer.Typer()
    app.command("generate")(generate)

    @app.callback()
    def main() -> None:  # a callback keeps `generate` a subcommand, as under `rayft`
        pass

    return app


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def assert_training_rows(rows: list[dict]) -> None:
    for r in rows:
        doc = normalize(r)  # the same check `rayft data inspect` runs on every row
        assert [m["role"] for m in doc["messages"]][-2:] == ["user", "assistant"]
        assert r["source"]


# --------------------------------------------------------------------------- chunking


def test_chunks_keep_their_heading_trail_and_respect_the_size_limit(tmp_path):
    long_para = " ".join(f"Sentence number {i} explains one more detail of the kettle." for i in range(40))
    (tmp_path / "b-guide.md").write_text(
        "---\ntitle: ignored front matter\n---\n"
        "Intro before any heading.\n\n"
        "# Guide\n\n## Setup\n\nFirst paragraph of setup.\n\nSecond paragraph of setup.\n\n"
        f"### Descaling\n\n{long_para}\n\n"
        "## Code\n\n```sh\n# not a heading\n\necho still code\n```\n"
    )
    (tmp_path / "a-notes.txt").write_text("# plain text has no headings\n\nJust notes.\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.markdown").write_text("## Deep\n\nNested file.\n")
    (tmp_path / ".hidden").mkdir()
    (tmp_path / ".hidden" / "skip.md").write_text("# Hidden\n\nNever read.\n")
    (tmp_path / "image.png").write_bytes(b"\x89PNG")

    chunks = chunk_documents(tmp_path, max_chunk_chars=200)

    assert all(len(c.text) <= 200 for c in chunks)
    by_title: dict[str, list[Chunk]] = {}
    for c in chunks:
        by_title.setdefault(c.title, []).append(c)
    assert list(by_title) == [
        "a-notes",  # .txt: the file name is the title, a '#' line is text
        "b-guide",  # text before the first heading
        "Guide > Setup",
        "Guide > Setup > Descaling",
        "Guide > Code",
        "Deep",
    ]
    assert by_title["a-notes"][0].text.startswith("# plain text")
    assert by_title["b-guide"][0].text == "Intro before any heading."
    assert by_title["Guide > Setup"][0].text == "First paragraph of setup.\n\nSecond paragraph of setup."
    descaling = by_title["Guide > Setup > Descaling"]
    assert len(descaling) > 1 and " ".join(c.text for c in descaling) == long_para  # split at sentence ends
    assert by_title["Guide > Code"][0].text == "```sh\n# not a heading\n\necho still code\n```"
    assert [c.source for c in chunks][:3] == ["a-notes.txt#chunk-1", "b-guide.md#chunk-1", "b-guide.md#chunk-2"]
    assert chunks[-1].source == "sub/c.markdown#chunk-1"
    assert not any("Hidden" in c.text or "Never read" in c.text for c in chunks)


def test_folders_without_documents_are_reported(tmp_path):
    with pytest.raises(GenerateError, match="documents folder not found"):
        chunk_documents(tmp_path / "missing")
    (tmp_path / "manual.pdf").write_bytes(b"%PDF")
    (tmp_path / "spec.pdf").write_bytes(b"%PDF")
    with pytest.raises(GenerateError, match=r"has no \.md or \.txt files .*it has 2 \.pdf"):
        chunk_documents(tmp_path)


# --------------------------------------------------------------------------- template and parsing


def test_templates_are_checked_for_their_placeholders(tmp_path):
    check_template(DEFAULT_TEMPLATE)
    with pytest.raises(GenerateError, match=r"missing placeholder \{n\}"):
        check_template("Write questions about {chunk} from {title}.")
    with pytest.raises(GenerateError, match=r"missing placeholders \{chunk\}, \{n\}; unknown placeholder \{text\}"):
        check_template("Write questions about {text}.")
    with pytest.raises(GenerateError, match="template file not found"):
        load_template(tmp_path / "nope.txt")
    bad = tmp_path / "bad.txt"
    bad.write_text("About {chunks}: write {n} pairs.")
    with pytest.raises(GenerateError, match=r"bad.txt: missing placeholder \{chunk\}; unknown placeholder \{chunks\}"):
        load_template(bad)

    good = tmp_path / "good.txt"
    good.write_text('Section {title}. Write {n} pairs like {"q": "..."} from:\n{chunk}')
    prompt = render_prompt(load_template(good), Chunk("x.md#chunk-1", "Care > Kettle", "Descale monthly."), 2)
    assert prompt == 'Section Care > Kettle. Write 2 pairs like {"q": "..."} from:\nDescale monthly.'


def test_llm_output_is_parsed_into_pairs_whatever_the_numbering():
    text = (
        "Sure! Here are the pairs:\n\n"
        "1. Q: How long is the warranty?\n"
        "   A: 27 months.\n"
        "**Question 2:** What does the\nwarranty cover?\n"
        "**Answer:** Defects in materials:\n- the dimmer\n- the battery\n\n"
        "I hope this helps!\n"
        "Q3: When does it start? A: On delivery.\n"
        "question: an unanswered question\n"
        "Q: 'Quoted question?'\n"
        'A: "Quoted answer."\n'
        "A: an answer on its own\n"
    )
    pairs = [(p.question, p.answer) for p in parse_pairs(text)]
    assert pairs == [
        ("How long is the warranty?", "27 months."),
        ("What does the warranty cover?", "Defects in materials:\n- the dimmer\n- the battery"),
        ("When does it start?", "On delivery."),
        ("an unanswered question", ""),
        ("Quoted question?", "Quoted answer."),  # and the answer with no question after it is ignored
    ]
    assert [(p.question, p.answer) for p in parse_pairs('Q: "Why a quote?\nA: "Small models open quotes.')] == [
        ("Why a quote?", "Small models open quotes.")
    ]
    assert parse_pairs("no pairs here, just prose") == []


# --------------------------------------------------------------------------- filters


def test_each_filter_drops_what_it_should():
    chunk = "Every Quillfeather Labs product comes with a 27-month warranty that starts on delivery."
    seen: set[str] = set()

    def reason(q: str, a: str, **kw) -> str | None:
        return drop_reason(Pair(q, a), chunk, seen, 0.5, **kw)

    assert reason("How long is the warranty?", "") == "empty"
    assert reason("  ?? ", "27 months") == "empty"
    assert reason("How long is the warranty?", "27 months. " * 200) == "overlong"
    assert reason("Q" * 400 + "?", "27 months") == "overlong"
    assert reason("How long is the warranty?", "27-month", max_answer_chars=5) == "overlong"
    assert reason("Who makes it?", "Penguins from Mars make it in secret factories.") == "low_overlap"
    assert reason("How long is the warranty?", "The warranty lasts 27 months from delivery.") is None
    assert reason("how long is the WARRANTY", "It is a 27-month warranty.") == "duplicate"
    # a question first seen with an ungrounded answer is still taken when it comes back grounded
    assert reason("When does it start?", "Tuesdays at noon.") == "low_overlap"
    assert reason("When does it start?", "It starts on delivery.") is None

    assert overlap("The warranty lasts 27 months.", chunk) == pytest.approx(3 / 4)  # lasts is not in the chunk
    assert overlap("Yes, it is.", "yes it is") == 0.0  # only common words: nothing to check, not grounded
    assert overlap("", chunk) == 0.0


# --------------------------------------------------------------------------- FAQ mode


def test_faq_mode_reads_qa_lines_and_question_headings_from_the_example_docs(tmp_path):
    out = tmp_path / "faq.jsonl"
    stats = generate_qa(DOCS, out, mode="faq", system="You answer questions about Quillfeather Labs.")

    rows = read_rows(out)
    assert stats["documents"] == 4 and stats["raw_pairs"] == 11 and stats["kept"] == 11 == len(rows)
    assert stats["chunks_without_pairs"] == 2  # the two prose pages are not in FAQ shape
    by_q = {r["messages"][1]["content"]: r for r in rows}
    support = by_q["When is Quillfeather Labs support open?"]
    assert support["messages"][0] == {"role": "system", "content": "You answer questions about Quillfeather Labs."}
    assert support["messages"][2]["content"] == "Support is open every day from 7 a.m. to 9 p.m. Atlantic Time."
    assert support["source"] == "support-faq.md:5"
    pip = by_q["Can I get help outside support hours?"]["messages"][2]["content"]
    assert pip.startswith("Yes. Pip,") and pip.endswith("when support opens.") and "\n" not in pip  # unwrapped
    heading = by_q["How do I turn off auto-dimming on the Lumen Desk Lamp?"]
    assert heading["messages"][2]["content"].startswith("Hold the touch dimmer for five seconds")
    assert heading["source"] == "getting-started.md:19"
    assert_training_rows(rows)

    with pytest.raises(GenerateError, match="no FAQ pairs in .*drop --faq"):
        generate_qa(DOCS / "product-care.md", tmp_path / "none.jsonl", mode="faq")


# --------------------------------------------------------------------------- an OpenAI-compatible endpoint

_SENTENCE = re.compile(r"(?<=[.!?])\s+")
_EXCERPT = re.compile(r'Excerpt:\n"""\n(.*)\n"""', re.S)
BAD_PAIR = "Q: What is the capital of Mars?\nA: Olympus City, founded by penguins in 2199."
REPEATED_PAIR = "Q: Is this documented here?\nA: {first}"


def stub_sentences(excerpt: str) -> list[str]:
    flat = " ".join(re.sub(r"(?m)^\s*[QA]:\s*", "", excerpt).split())
    return [s for s in _SENTENCE.split(flat) if len(s.split()) >= 3]  # not a bare "Yes."


def stub_reply(prompt: str, n: int) -> str:
    """Canned pairs for the default template's excerpt: n answers quoted from it, one repeated in every
    chunk (a duplicate after the first) and one answer that is not in it (low overlap)."""
    sentences = stub_sentences(_EXCERPT.search(prompt).group(1))
    pairs = [f"{i}. Q: Which part says: {s.rstrip('.?!')}?\n   A: {s}" for i, s in enumerate(sentences[:n], 1)]
    return "\n".join([*pairs, REPEATED_PAIR.format(first=sentences[0]), BAD_PAIR])


class StubServer:
    """An OpenAI-compatible chat completions server on 127.0.0.1, serving the model ids in `models`.
    `statuses` are answered (in order) before normal replies, each with a Retry-After-Ms header as OpenAI
    sends, so the client's retries wait milliseconds; `key` is the only bearer key accepted when set; `raw`
    replaces every reply body (sent as `content_type`); `delay` seconds pass before each chat reply."""

    def __init__(
        self,
        key: str | None = None,
        statuses: list[int] | None = None,
        raw: bytes | None = None,
        content_type: str = "application/json",
        delay: float = 0.0,
        models: tuple[str, ...] = ("stub-model",),
    ):
        self.requests: list[dict] = []
        self.key, self.statuses, self.raw = key, list(statuses or []), raw
        self.content_type, self.delay, self.models = content_type, delay, models
        self.lock = threading.Lock()
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep pytest output clean
                pass

            def do_GET(self):
                stub.requests.append({"path": self.path, "auth": self.headers.get("Authorization")})
                if self.path == "/v1/models":
                    self.reply(200, {"object": "list", "data": [{"id": m, "object": "model"} for m in stub.models]})
                else:
                    self.reply(404, {"error": {"message": "not found"}})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with stub.lock:
                    stub.requests.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
                    status = stub.statuses.pop(0) if stub.statuses else 200
                if self.path != "/v1/chat/completions":
                    return self.reply(404, {"error": {"message": f"no route {self.path}"}})
                if stub.key and self.headers.get("Authorization") != f"Bearer {stub.key}":
                    return self.reply(401, {"error": {"message": "Invalid API key"}})
                if status != 200:
                    return self.reply(status, {"error": {"message": "busy, try again"}}, {"Retry-After-Ms": "10"})
                if body["model"] not in stub.models:
                    error = {"message": f"The model `{body['model']}` does not exist", "code": "model_not_found"}
                    return self.reply(404, {"error": error})
                time.sleep(stub.delay)
                if stub.raw is not None:
                    return self.send_body(200, stub.raw, stub.content_type)
                prompt = body["messages"][-1]["content"]
                n = int(re.search(r"write (\d+) questions", prompt).group(1))
                message = {"role": "assistant", "content": stub_reply(prompt, n)}
                choice = {"index": 0, "message": message, "finish_reason": "stop"}
                self.reply(200, {"id": "x", "object": "chat.completion", "model": body["model"], "choices": [choice]})

            def reply(self, status: int, obj: dict, headers: dict[str, str] | None = None):
                self.send_body(status, json.dumps(obj).encode(), "application/json", headers)

            def send_body(self, status: int, data: bytes, content_type: str, headers: dict[str, str] | None = None):
                try:
                    self.send_response(status)
                    for name, value in {"Content-Type": content_type, **(headers or {})}.items():
                        self.send_header(name, value)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):  # a client that timed out has hung up
                    pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()

    def chat_requests(self) -> list[dict]:
        return [r for r in self.requests if r["path"] == "/v1/chat/completions"]


def test_cli_generates_from_an_endpoint_and_the_file_passes_data_validation(ray_local, tmp_path):
    from rayft.training.config import DataConfig
    from rayft.training.data import check_rows

    out = tmp_path / "gen" / "qa.jsonl"
    with StubServer(key="sk-test") as stub:
        args = ["--endpoint", stub.base + "/", "--endpoint-model", "stub-model", "--pairs-per-chunk", "2"]
        args += ["--max-chunk-chars", "400", "--max-new-tokens", "300"]
        result = CliRunner().invoke(
            cli(), ["generate", str(DOCS), "--out", str(out), *args], env={"OPENAI_API_KEY": "sk-test"}
        )
    assert result.exit_code == 0, result.output + result.stderr

    chunks = chunk_documents(DOCS, 400)
    sent = stub.chat_requests()
    assert len(sent) == len(chunks) == 24
    assert all(r["auth"] == "Bearer sk-test" for r in sent)  # the key came from OPENAI_API_KEY
    body = sent[0]["body"]
    assert body["model"] == "stub-model" and body["temperature"] == 0 and body["max_tokens"] == 300
    assert sorted(_EXCERPT.search(r["body"]["messages"][0]["content"]).group(1) for r in sent) == sorted(
        c.text for c in chunks
    )

    quoted = sum(min(2, len(stub_sentences(c.text))) for c in chunks)
    raw = quoted + 2 * len(chunks)
    kept = quoted + 1  # the repeated pair is kept once
    rows = read_rows(out)
    assert len(rows) == kept
    assert f"wrote {kept} pairs to {out} (24 chunks, {raw} raw pairs; dropped: 23 duplicate, 24 low overlap)" in (
        result.stdout
    )
    assert not any("Mars" in r["messages"][0]["content"] for r in rows)
    first = rows[0]
    assert first["source"] == "getting-started.md#chunk-1"
    assert first["messages"][1]["content"] == "Put both earbuds in the charging case, keep the lid open, and hold " + (
        "the button on the back of the case for three seconds until the light blinks white."
    )
    assert_training_rows(rows)

    checks = check_rows(DataConfig(train=str(out)), splits=("train",))  # what `rayft data inspect` runs first
    assert checks["train"].rows == kept and checks["train"].bad == 0


def test_endpoint_retries_busy_answers_and_finds_its_only_model(tmp_path, monkeypatch):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "lamp.md").write_text("# Lamp\n\nThe Lumen Desk Lamp has a touch dimmer. It uses LEDs.\n")
    with StubServer(statuses=[503]) as stub:
        stats = generate_qa(tmp_path / "docs", tmp_path / "qa.jsonl", endpoint=stub.base, pairs_per_chunk=2)
    assert stub.requests[0]["path"] == "/v1/models"
    assert [r["body"]["model"] for r in stub.chat_requests()] == ["stub-model", "stub-model"]  # 503, then again
    assert stub.chat_requests()[0]["auth"] is None  # no key given, none sent
    assert stats["llm"] == f"stub-model at {stub.base}/chat/completions"
    assert stats["raw_pairs"] == 4 and stats["kept"] == 3 and stats["dropped"]["low_overlap"] == 1

    # a server still busy after the last retry: ENDPOINT_MAX_RETRIES bounds the tries, and the error counts them
    monkeypatch.setattr("rayft.training.datagen.ENDPOINT_MAX_RETRIES", 1)
    with StubServer(statuses=[503, 503, 503]) as stub:
        with pytest.raises(GenerateError, match=r"/v1/chat/completions failed \(HTTP 503: busy, try again; tried 2 t"):
            generate_qa(tmp_path / "docs", tmp_path / "qa.jsonl", endpoint=stub.base, endpoint_model="stub-model")
    assert len(stub.chat_requests()) == 2


def test_endpoint_errors_say_what_is_wrong(tmp_path, monkeypatch):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "lamp.md").write_text("# Lamp\n\nThe Lumen Desk Lamp has a touch dimmer.\n")

    def run(endpoint: str, model: str | None = "stub-model", **kw) -> None:
        generate_qa(docs, tmp_path / "a.jsonl", endpoint=endpoint, endpoint_model=model, **kw)

    with StubServer(key="sk-right") as stub:
        with pytest.raises(
            GenerateError, match=r"refused the request \(HTTP 401: Invalid API key\); check the API key"
        ):
            run(stub.base, api_key="sk-wrong")
    assert len(stub.chat_requests()) == 1  # a wrong key is not retried
    with StubServer(raw=b"<html>proxy error</html>") as stub:
        with pytest.raises(GenerateError, match=r"did not answer with JSON \(it began '<html>proxy error"):
            run(stub.base)
    with StubServer(raw=b"<html>proxy error</html>", content_type="text/html") as stub:
        with pytest.raises(GenerateError, match=r"did not answer with JSON \(it began '<html>proxy error"):
            run(stub.base)
    with StubServer(raw=b'{"result": "hi"}') as stub:
        with pytest.raises(GenerateError, match=r"without choices\[0\]\.message\.content \(got: result\)"):
            run(stub.base)
    with StubServer(models=("stub-model", "other-model")) as stub:
        with pytest.raises(
            GenerateError, match=r"serves no model 'gpt-4o' \(it serves stub-model, other-model\); check --endpoint-m"
        ):
            run(stub.base, model="gpt-4o")
        with pytest.raises(GenerateError, match=r"say which model .*--endpoint-model \(it serves stub-model, other"):
            run(stub.base, model=None)
    with StubServer() as stub:
        with pytest.raises(GenerateError, match="HTTP 404: no route /v1/api/chat/completions; check --endpoint"):
            run(stub.base + "/api")
    with pytest.raises(GenerateError, match="is not an http"):
        run("localhost:8000")

    # a server slower than the timeout: each try is cut off after timeout_s, and retried
    monkeypatch.setattr("rayft.training.datagen.ENDPOINT_MAX_RETRIES", 1)
    with StubServer(delay=2.0) as stub:
        with pytest.raises(GenerateError, match=r"did not answer within 0.2 s \(tried 2 times\); is the server overl"):
            run(stub.base, timeout_s=0.2)
    assert len(stub.chat_requests()) == 2
    assert not (tmp_path / "a.jsonl").exists()  # nothing half-written

    assert api_base_url("http://h:8000/v1/") == "http://h:8000/v1"
    assert api_base_url("http://h:8000") == "http://h:8000/v1"  # a bare host gets /v1
    assert api_base_url("https://h/openai") == "https://h/openai"
    assert api_base_url("https://h/v1/chat/completions") == "https://h/v1"
    with StubServer() as stub:  # each form reaches the same chat completions URL
        for endpoint in (stub.base + "/", stub.base.removesuffix("/v1"), stub.base + "/chat/completions"):
            run(endpoint)
    assert {r["path"] for r in stub.requests} == {"/v1/chat/completions"}


def test_an_unreachable_endpoint_is_a_clear_cli_error(tmp_path, monkeypatch):
    monkeypatch.setattr("rayft.training.datagen.ENDPOINT_MAX_RETRIES", 1)  # one retry: the client waits ~0.5 s
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = CliRunner().invoke(
        cli(), ["generate", str(DOCS), "--out", str(tmp_path / "qa.jsonl"), "--endpoint", f"http://127.0.0.1:{port}"]
    )
    assert result.exit_code == 1
    assert (
        f"cannot reach the endpoint http://127.0.0.1:{port}/v1/models: Connection refused; is the server running? "
        "check --endpoint"
    ) in result.stderr
    assert "Traceback" not in result.output + result.stderr

    # a port that never completes a connection, as behind a firewall that drops packets: a listening socket
    # whose queue (of one, with listen(0)) is already full, so the client's connect waits and times out
    monkeypatch.setattr("rayft.training.datagen.ENDPOINT_CONNECT_TIMEOUT_S", 0.2)
    monkeypatch.setattr("rayft.training.datagen.ENDPOINT_MAX_RETRIES", 0)
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(0)
        port = server.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port)):  # fills the queue; it is never accepted
            with pytest.raises(
                GenerateError,
                match=rf"cannot reach the endpoint http://127.0.0.1:{port}/v1/models: no connection "
                r"within 0.2 s \(tried once\); is the host right and its port open\? check --endpoint",
            ):
                generate_qa(DOCS, tmp_path / "qa.jsonl", endpoint=f"http://127.0.0.1:{port}")

    both = CliRunner().invoke(cli(), ["generate", str(DOCS), "--out", "x.jsonl", "--faq", "--endpoint", "http://h"])
    assert both.exit_code == 2 and "--faq reads pairs from the documents" in both.stderr


# --------------------------------------------------------------------------- a local model on Ray Data


def test_local_model_pipeline_runs_end_to_end_and_accounts_for_every_pair(ray_local, tmp_path, tiny_model_dir):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "care.md").write_text(
        "# Care\n\n## Kettle\n\nDescale the kettle every four weeks.\n\n## Lamp\n\nWipe the lamp with a dry cloth.\n"
    )
    (docs / "hours.txt").write_text("Support is open from 7 a.m. to 9 p.m. Atlantic Time.\n")
    out = tmp_path / "qa.jsonl"
    seen = []

    def progress(total):
        seen.append(total)
        return lambda n: seen.append(n)

    # random weights write gibberish: this checks the plumbing and the accounting, not the answers
    stats = generate_qa(docs, out, model=str(tiny_model_dir), max_new_tokens=12, pairs_per_chunk=1, progress=progress)

    assert stats["chunks"] == 3 and stats["llm"] == str(tiny_model_dir)
    assert seen[0] == 3 and sum(seen[1:]) == 3  # progress saw every chunk
    assert stats["raw_pairs"] >= 3  # each reply is primed with "Q:", so each chunk yields at least one pair
    assert stats["kept"] + sum(stats["dropped"].values()) == stats["raw_pairs"]
    rows = read_rows(out)
    assert len(rows) == stats["kept"]
    assert_training_rows(rows)


def test_the_command_module_imports_no_heavy_libraries():
    code = (
        "import sys, rayft.cluster.generate_cmd, rayft.training.datagen; "
        "print(sorted(m for m in ('torch', 'ray', 'transformers', 'openai') if m in sys.modules))"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"
