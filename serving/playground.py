"""The playground: one web page the endpoint serves at / and /playground, to chat with any served model or
adapter, two side by side on the same message, and to see a served run's eval report and loss curve.

The page is plain HTML, CSS and JavaScript in playground.html beside this module, shipped as package data (no
build step, nothing fetched from elsewhere); its Content-Security-Policy hashes are taken from that file. It
calls the endpoint's own API: /v1/models, /v1/chat/completions (streamed), and the two routes below, with the
API key the user types in, which stays in the page's memory (not in storage, cookies or URLs). The page itself
needs no key; everything it shows does.

    GET /v1/playground/runs                     the served models that come from a run dir: {model, run, ...}
    GET /v1/playground/runs/report?model=ID     that run's eval/report.json (rayft eval), 404 if none
    GET /v1/playground/runs/loss.png?model=ID   that run's loss.png
"""

from __future__ import annotations

import json

from rayft.training import storage
from rayft.training.run_dir import RunDir


def run_of(path: str | None) -> str | None:
    """The run dir a served model or adapter directory comes from (<run>/final or <run>/final/adapter), when it
    holds the run's metrics; else None."""
    run = RunDir.of_model(path)
    try:
        return run.path if run and run.has_metrics() else None
    except storage.StorageError:
        return None


def run_card(model_id: str, run: str) -> dict:
    def has(path: str) -> bool:
        try:
            return storage.exists(path)
        except storage.StorageError:
            return False

    r = RunDir(run)
    return {"model": model_id, "run": r.name, "report": has(r.eval_report), "loss_curve": has(r.loss_plot)}


def read_report(run: str) -> dict | None:
    """The parts of a run's eval report the page shows: each split's metrics per model, and the models."""
    try:
        report = json.loads(storage.read_text(RunDir(run).eval_report))
    except (FileNotFoundError, ValueError, storage.StorageError):
        return None
    return {"run": storage.basename(run), "models": report.get("models", {}), "splits": report.get("splits", {})}


def read_loss_curve(run: str) -> bytes | None:
    try:
        return storage.read_bytes(RunDir(run).loss_plot)
    except (FileNotFoundError, storage.StorageError):
        return None


def _page() -> str:
    """The page: playground.html beside this module, shipped as package data."""
    from importlib.resources import files

    return files("rayft.serving").joinpath("playground.html").read_text(encoding="utf-8")


PAGE = _page()


def _csp_hash(tag: str) -> str:
    """The CSP source of the page's one inline <tag> block: its SHA-256, so that no other script or style, not
    even one injected into the page, runs."""
    import base64
    import hashlib

    body = PAGE.split(f"<{tag}>", 1)[1].split(f"</{tag}>", 1)[0]
    return "'sha256-" + base64.b64encode(hashlib.sha256(body.encode()).digest()).decode() + "'"


# The page's own headers: only its own script and style run (by hash, no 'unsafe-inline'), nothing but this origin
# may embed it, and no page it links to learns its URL.
HEADERS = {
    "Cache-Control": "no-store",
    "Content-Security-Policy": (
        f"default-src 'none'; script-src {_csp_hash('script')}; style-src {_csp_hash('style')}; connect-src 'self'; "
        "img-src 'self' blob:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
}
