"""The playground as a person uses it: headless Chromium (Debian's, driven by Playwright) opens the page served by
the real Serve app with a tiny model and an adapter, enters the API key, types one message, and sees tokens
stream into both panes (base vs adapter, each answer the endpoint's own greedy answer); the served run's eval
table and loss curve show; a wrong key shows the 401 on the page. A screenshot is saved as a test artifact
(tests/artifacts/playground.png; the picture in docs/tracking-and-playground.md)."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

from helpers import ARTIFACTS, make_adapters, post_json, tiny_llama

KEY = "sk-playground-test"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# What a sandboxed CI machine needs: no GPU, no sandbox (root), and none of Chromium's calls home.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture(scope="module")
def served_run(ray_local, smol_tokenizer, tmp_path_factory, serve_port):
    """What the page is tried on, behind an API key: by default a run dir as rayft leaves it (final/ model,
    metrics.jsonl, loss.png, eval/report.json) around the tiny model, served with a random LoRA adapter beside
    it; with RAYFT_PLAYGROUND_RUN=<a LoRA run dir> (e.g. runs/quickstart, after rayft train and rayft eval), the
    built-in model with that run's adapter, for a picture of real answers."""
    from ray import serve

    from rayft.serving.config import ServeConfig
    from rayft.serving.deploy import deploy
    from rayft.serving.spec import build_spec
    from rayft.training.evaluate import build_report
    from rayft.training.trainer import plot_losses

    real = os.environ.get("RAYFT_PLAYGROUND_RUN")
    if real:
        run = Path(real).resolve()
        cfg = ServeConfig(adapters={run.name: str(run / "final" / "adapter")}, max_tokens_limit=512)
        spec = build_spec("smollm2-135m-instruct", cfg, api_keys=[KEY])
        tuned = f"{spec.model_name}:{run.name}"
        system, message = QUICKSTART_SYSTEM, QUICKSTART_MESSAGE
    else:
        run = tmp_path_factory.mktemp("runs") / "support-bot"
        tiny_llama(run / "final", smol_tokenizer, sharp=True)
        records = [{"time": 1.0 + s, "step": s, "loss": 2.0 / s, "lr": 1e-4} for s in range(1, 21)]
        records.append({"time": 30.0, "step": 20, "eval_loss": 0.4, "final": True})
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        assert plot_losses(str(run))
        row = {"split": "eval", "reference": "Paris.", "answer": "Paris", "ref_nll": 2.0, "ref_tokens": 2}
        rows = [row | {"source": f"eval.jsonl:{i}", "prediction": p} for i, p in enumerate(("Paris.", "Lyon."), 1)]
        tuned_rows = [dict(rows[0]), dict(rows[0], ref_nll=0.5)]
        build_report(str(run / "eval"), {"base": rows, "finetuned": tuned_rows}, {"base": "base", "finetuned": "t"})
        adapters = tmp_path_factory.mktemp("adapters")
        make_adapters(run / "final", adapters, ["polite"])
        cfg = ServeConfig(adapters={"polite": str(adapters / "polite")}, max_tokens_limit=256)
        spec = build_spec(str(run / "final"), cfg, api_keys=[KEY])
        tuned = f"{spec.model_name}:polite"
        system, message = "", "Where is the hardware lab?"
    # under a route prefix, as a second app on a shared Serve instance has it: the page calls the API below it
    base = deploy(spec.with_serve(port=serve_port, route_prefix="/playground-app"))
    assert base.endswith("/playground-app")
    # the run the page shows: the served model's own (tiny), or the adapter's (a real run)
    shown = tuned if real else spec.model_name
    yield Served(base, spec.model_name, tuned, run.name, shown, system, message, tiny=not real)
    serve.delete("rayft")


@dataclass
class Served:
    base: str
    name: str  # the served model's id
    tuned: str  # the adapter's id
    run: str  # the run dir's name
    run_model: str  # the model id the run is listed under
    system: str
    message: str
    tiny: bool


QUICKSTART_SYSTEM = (
    'Convert the customer message into a support ticket. Reply with JSON only: {"product", "severity", "intent", '
    '"order_id", "summary"}.'
)
QUICKSTART_MESSAGE = (
    "Hi, my Lumen Desk Lamp started flickering two days after it arrived and now it won't turn on at all. "
    "Order A-30417. Please help soon!"
)


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    assert Path(CHROMIUM).exists(), "the playground test needs Debian's Chromium: apt-get install chromium"
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


def greedy(s: Served, model: str, max_tokens: int) -> str:
    messages = ([{"role": "system", "content": s.system}] if s.system else []) + [
        {"role": "user", "content": s.message}
    ]
    body = {"model": model, "messages": messages, "temperature": 0, "max_tokens": max_tokens}
    r = post_json(s.base, "/v1/chat/completions", body, key=KEY)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]["content"]


@pytest.mark.slow
def test_two_panes_stream_the_same_message_from_two_models(served_run, browser):
    s = served_run
    max_tokens = 24 if s.tiny else 96
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.goto(f"{s.base}/playground")
    assert page.title() == "rayft playground"
    page.fill("#key", KEY)
    page.click("#connect")
    page.wait_for_function("() => document.querySelectorAll('.pane select option').length >= 4")
    options = page.eval_on_selector_all(".pane:first-child select option", "os => os.map(o => o.value)")
    assert options == [s.name, s.tuned]
    page.select_option(".pane[data-pane='0'] select", s.name)
    page.select_option(".pane[data-pane='1'] select", s.tuned)
    page.fill("#temperature", "0")
    page.fill("#max_tokens", str(max_tokens))
    page.fill("#system", s.system)
    # Count how often each pane's answer grows: a streamed answer arrives in pieces.
    page.evaluate(
        """() => { window.updates = [0, 0];
        document.querySelectorAll('.pane .log').forEach((log, i) => new MutationObserver(() => window.updates[i]++)
          .observe(log, {childList: true, subtree: true, characterData: true})); }"""
    )
    page.fill("#message", s.message)
    page.keyboard.press("Enter")
    page.wait_for_function(
        "() => [...document.querySelectorAll('.pane .stats')].every(s => s.textContent.includes('tokens'))",
        timeout=300_000,
    )
    answers = page.eval_on_selector_all(".pane .msg.assistant .text", "els => els.map(e => e.textContent)")
    assert answers == [greedy(s, s.name, max_tokens), greedy(s, s.tuned, max_tokens)]
    assert answers[0] != answers[1]  # two models, two answers
    updates = page.evaluate("window.updates")
    assert all(u >= 4 for u in updates), updates  # tokens streamed in, not one final write
    stats = page.eval_on_selector_all(".pane .stats", "els => els.map(e => e.textContent)")
    assert all(" tokens, " in t and "first token" in t for t in stats), stats

    # The served run: its eval table and loss curve.
    page.wait_for_selector("#runs:not([hidden]) table")
    table = page.inner_text("#report")
    assert "exact_match" in table and "base" in table and "finetuned" in table
    if s.tiny:
        assert "24 tokens" in stats[0] and "24 tokens" in stats[1]
        assert "100.0%" in table and "50.0%" in table  # finetuned matched both rows, base one of two
    page.wait_for_function("() => document.querySelector('#loss').naturalWidth > 100")
    assert page.eval_on_selector("#run", "s => s.options[0].textContent") == f"{s.run} ({s.run_model})"
    page.evaluate("() => document.querySelectorAll('.pane .log').forEach(l => { l.scrollTop = 0; })")
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "playground.png"), full_page=True)
    page.close()


@pytest.mark.slow
def test_a_wrong_key_shows_the_401_on_the_page(served_run, browser):
    base = served_run.base
    page = browser.new_page()
    page.goto(f"{base}/")
    page.fill("#key", "sk-wrong")
    page.click("#connect")
    page.wait_for_function("() => document.querySelector('#status').classList.contains('error')")
    text = page.inner_text("#status")
    assert text.startswith("401 Unauthorized") and "invalid API key" in text, text
    assert "sk-wrong" not in page.content().replace('value="sk-wrong"', "")  # the key is never echoed back
    page.close()


def test_the_page_needs_no_key_but_everything_it_shows_does(served_run):
    import requests

    base, name, shown, tuned = served_run.base, served_run.name, served_run.run_model, served_run.tuned
    r = requests.get(f"{base}/", timeout=30)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    csp = r.headers["content-security-policy"]
    assert "frame-ancestors 'none'" in csp and "unsafe-inline" not in csp  # its own script and style, by hash
    assert r.headers["cache-control"] == "no-store"
    for path in ("/v1/playground/runs", f"/v1/playground/runs/report?model={shown}"):
        assert requests.get(base + path, timeout=30).status_code == 401
    auth = {"Authorization": f"Bearer {KEY}"}
    runs = requests.get(f"{base}/v1/playground/runs", headers=auth, timeout=30).json()["data"]
    assert runs == [{"model": shown, "run": served_run.run, "report": True, "loss_curve": True}]
    image = requests.get(f"{base}/v1/playground/runs/loss.png", params={"model": shown}, headers=auth, timeout=30)
    assert image.status_code == 200 and image.content[:8] == b"\x89PNG\r\n\x1a\n"
    unrun = tuned if shown == name else name  # the served model that came from no run
    missing = requests.get(f"{base}/v1/playground/runs/report", params={"model": unrun}, headers=auth, timeout=30)
    assert missing.status_code == 404 and "not trained by a rayft run" in missing.json()["error"]["message"]
    unknown = requests.get(f"{base}/v1/playground/runs/report", params={"model": "nope"}, headers=auth, timeout=30)
    assert unknown.status_code == 404
