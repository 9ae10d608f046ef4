"""The playground: one web page the endpoint serves at / and /playground, to chat with any served model or
adapter, two side by side on the same message, and to see a served run's eval report and loss curve.

The page is plain HTML, CSS and JavaScript in this module (no build step, nothing fetched from elsewhere). It
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


PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>rayft playground</title>
<style>
  :root { --fg: #1d2330; --muted: #667085; --line: #d9dee7; --accent: #2f6fed; --bad: #b42318; --bg: #f6f7f9; }
  * { box-sizing: border-box; }
  body { margin: 0; font: 15px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; color: var(--fg);
         background: var(--bg); }
  header { display: flex; gap: 12px; align-items: center; padding: 10px 18px; background: #fff;
           border-bottom: 1px solid var(--line); flex-wrap: wrap; }
  header h1 { font-size: 17px; margin: 0 12px 0 0; }
  label { color: var(--muted); font-size: 13px; display: flex; gap: 6px; align-items: center; }
  input, select, textarea, button { font: inherit; color: inherit; }
  input, select { padding: 4px 6px; border: 1px solid var(--line); border-radius: 6px; background: #fff; }
  input[type=number] { width: 80px; }
  button { padding: 6px 14px; border: 0; border-radius: 6px; background: var(--accent); color: #fff;
           cursor: pointer; }
  button.secondary { background: #e8ecf3; color: var(--fg); }
  button:disabled { opacity: .5; cursor: default; }
  main { padding: 14px 18px; display: grid; gap: 14px; }
  #status { min-height: 20px; font-size: 14px; }
  #status.error { color: var(--bad); font-weight: 600; }
  .panes { display: grid; grid-template-columns: minmax(0, 1fr) minmax(0, 1fr); gap: 14px; }
  .pane { background: #fff; border: 1px solid var(--line); border-radius: 10px; display: flex;
          flex-direction: column; min-height: 360px; }
  .pane .top { display: flex; gap: 8px; align-items: center; padding: 8px 10px;
               border-bottom: 1px solid var(--line); }
  .pane .top select { flex: 1; min-width: 0; }
  .pane .log { padding: 10px 12px; overflow-y: auto; flex: 1; max-height: 55vh; }
  .msg { margin: 0 0 10px; white-space: pre-wrap; overflow-wrap: anywhere; }
  .msg .who { display: block; font-size: 12px; color: var(--muted); }
  .msg.user .text { background: #eef3ff; }
  .msg .text { display: inline-block; padding: 6px 9px; border-radius: 8px; background: #f3f4f6;
               max-width: 100%; }
  .msg.error .text { background: #fee4e2; color: var(--bad); }
  .stats { font-size: 12px; color: var(--muted); }
  form.ask { display: flex; gap: 10px; }
  form.ask textarea { flex: 1; resize: vertical; min-height: 52px; padding: 8px; border-radius: 8px;
                      border: 1px solid var(--line); }
  section.run { background: #fff; border: 1px solid var(--line); border-radius: 10px; padding: 10px 14px; }
  section.run h2 { font-size: 15px; margin: 0 0 8px; }
  section.run table { border-collapse: collapse; font-size: 13px; margin: 6px 0 10px; }
  section.run th, section.run td { border-bottom: 1px solid var(--line); padding: 3px 10px; text-align: right; }
  section.run th:first-child, section.run td:first-child { text-align: left; }
  section.run img { max-width: 560px; width: 100%; border: 1px solid var(--line); border-radius: 6px; }
  @media (max-width: 800px) { .panes { grid-template-columns: minmax(0, 1fr); } }
.buttons { display: flex; flex-direction: column; gap: 6px; }
</style>
</head>
<body>
<header>
  <h1>rayft playground</h1>
  <label>API key <input id="key" type="password" autocomplete="off" placeholder="only if the endpoint asks"
         size="22"></label>
  <button id="connect" class="secondary" type="button">Load models</button>
  <label>temperature <input id="temperature" type="number" min="0" max="2" step="0.1" value="0.7"></label>
  <label>max tokens <input id="max_tokens" type="number" min="1" step="1" value="128"></label>
  <label>system <input id="system" size="36" placeholder="optional system message for both"></label>
</header>
<main>
  <div id="status" role="status"></div>
  <div class="panes">
    <div class="pane" data-pane="0">
      <div class="top"><select aria-label="model for the left pane"></select>
        <span class="stats"></span></div>
      <div class="log" aria-live="polite"></div>
    </div>
    <div class="pane" data-pane="1">
      <div class="top"><select aria-label="model for the right pane"></select>
        <span class="stats"></span></div>
      <div class="log" aria-live="polite"></div>
    </div>
  </div>
  <form class="ask" id="ask">
    <textarea id="message" placeholder="A message for both models (Enter sends, Shift+Enter adds a line)"></textarea>
    <div class="buttons">
      <button id="send" type="submit">Send</button>
      <button id="stop" class="secondary" type="button" disabled>Stop</button>
      <button id="clear" class="secondary" type="button">Clear</button>
    </div>
  </form>
  <section class="run" id="runs" hidden>
    <h2>Runs</h2>
    <label>run <select id="run"></select></label>
    <div id="report"></div>
    <img id="loss" alt="training loss curve" hidden>
  </section>
</main>
<script>
"use strict";
const $ = (s, el = document) => el.querySelector(s);
const panes = [...document.querySelectorAll(".pane")].map(el => ({
  el, select: $("select", el), log: $(".log", el), stats: $(".stats", el), history: [] }));
let key = "";            // kept in this page's memory only
// The app's own path (its serve.route_prefix): the page is at PREFIX/ or PREFIX/playground.
const BASE = location.pathname.replace(/\\/(playground)?$/, "");
let running = [];

function headers(json) {
  const h = json ? {"Content-Type": "application/json"} : {};
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

function status(text, error) {
  const el = $("#status");
  el.textContent = text || "";
  el.className = error ? "error" : "";
}

async function errorText(resp) {
  try {
    const body = await resp.json();
    if (body && body.error && body.error.message) return body.error.message;
  } catch (e) { /* not JSON */ }
  return resp.status + " " + resp.statusText;
}

async function api(path) {
  const resp = await fetch(BASE + path, {headers: headers(false)});
  if (!resp.ok) {
    const text = await errorText(resp);
    throw new Error(resp.status === 401 ? "401 Unauthorized: " + text + " (check the API key)" : text);
  }
  return resp;
}

async function loadModels() {
  key = $("#key").value.trim();
  status("loading models...");
  try {
    const models = (await (await api("/v1/models")).json()).data.map(m => m.id);
    panes.forEach((p, i) => {
      const keep = p.select.value;
      p.select.replaceChildren(...models.map(id => new Option(id, id)));
      p.select.value = models.includes(keep) ? keep : models[Math.min(i, models.length - 1)];
    });
    status(models.length + " model(s): pick one per pane");
    loadRuns();
  } catch (e) {
    status(e.message, true);
  }
}

function addMessage(pane, who, text, cls) {
  const div = document.createElement("div");
  div.className = "msg " + (cls || who);
  const label = document.createElement("span");
  label.className = "who";
  label.textContent = who;
  const body = document.createElement("span");
  body.className = "text";
  body.textContent = text;
  div.append(label, body);
  pane.log.append(div);
  pane.log.scrollTop = pane.log.scrollHeight;
  return body;
}

async function stream(pane, controller) {
  const model = pane.select.value;
  const out = addMessage(pane, "assistant (" + model + ")", "");
  const started = performance.now();
  let tokens = 0, first = null, answer = "";
  const system = $("#system").value.trim();
  const body = {
    model, stream: true, messages: system ? [{role: "system", content: system}, ...pane.history] : pane.history,
    temperature: Number($("#temperature").value), max_tokens: Number($("#max_tokens").value),
    stream_options: {include_usage: true},
  };
  try {
    const resp = await fetch(BASE + "/v1/chat/completions", {
      method: "POST", headers: headers(true), body: JSON.stringify(body), signal: controller.signal});
    if (!resp.ok) {
      const text = await errorText(resp);
      throw new Error(resp.status === 401 ? "401 Unauthorized: " + text + " (check the API key)" : text);
    }
    const reader = resp.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const {value, done} = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, {stream: true});
      let cut;
      while ((cut = buffer.indexOf("\\n\\n")) >= 0) {
        const event = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        for (const line of event.split("\\n")) {
          if (!line.startsWith("data: ")) continue;
          const data = line.slice(6);
          if (data === "[DONE]") continue;
          const chunk = JSON.parse(data);
          if (chunk.error) throw new Error(chunk.error.message || "generation failed");
          if (chunk.usage) tokens = chunk.usage.completion_tokens;
          const delta = chunk.choices && chunk.choices[0] && chunk.choices[0].delta;
          if (delta && delta.content) {
            if (first === null) first = performance.now();
            answer += delta.content;
            out.textContent = answer;
            pane.log.scrollTop = pane.log.scrollHeight;
          }
        }
      }
    }
    pane.history.push({role: "assistant", content: answer});
    const s = (performance.now() - started) / 1000;
    const ttft = first === null ? "-" : ((first - started) / 1000).toFixed(2) + " s";
    pane.stats.textContent = tokens + " tokens, " + s.toFixed(1) + " s, first token " + ttft;
  } catch (e) {
    pane.history.pop();  // the unanswered message: sending again retries it
    if (e.name === "AbortError") { out.textContent = answer + " [stopped]"; return; }
    out.parentElement.className = "msg error";
    out.textContent = e.message;
    if (e.message.startsWith("401")) status(e.message, true);
  }
}

async function send(event) {
  event.preventDefault();
  const text = $("#message").value.trim();
  if (!text || running.length) return;
  if (!panes[0].select.value) { status("load the models first", true); return; }
  key = $("#key").value.trim();
  status("");
  $("#message").value = "";
  $("#send").disabled = true;
  $("#stop").disabled = false;
  running = panes.map(() => new AbortController());
  await Promise.all(panes.map((p, i) => {
    p.history.push({role: "user", content: text});
    addMessage(p, "you", text, "user");
    return stream(p, running[i]);
  }));
  running = [];
  $("#send").disabled = false;
  $("#stop").disabled = true;
}

async function loadRuns() {
  try {
    const runs = (await (await api("/v1/playground/runs")).json()).data;
    $("#runs").hidden = !runs.length;
    $("#run").replaceChildren(...runs.map(r => new Option(r.run + " (" + r.model + ")", r.model)));
    if (runs.length) showRun();
  } catch (e) { $("#runs").hidden = true; }
}

async function showRun() {
  const model = $("#run").value;
  const report = $("#report"), img = $("#loss");
  report.replaceChildren();
  img.hidden = true;
  try {
    const r = await (await api("/v1/playground/runs/report?model=" + encodeURIComponent(model))).json();
    for (const [split, byModel] of Object.entries(r.splits)) {
      const labels = Object.keys(byModel);
      const metrics = [...new Set(labels.flatMap(l => Object.keys(byModel[l])))]
        .filter(m => labels.some(l => typeof byModel[l][m] === "number"));
      const table = document.createElement("table");
      const head = table.insertRow();
      for (const h of [split, ...labels]) { const th = document.createElement("th"); th.textContent = h;
        head.append(th); }
      for (const m of metrics) {
        const row = table.insertRow();
        row.insertCell().textContent = m;
        for (const l of labels) {
          const v = byModel[l][m];
          const count = m === "rows" || m === "pairs";
          row.insertCell().textContent = typeof v !== "number" ? "-" : count ? String(v)
            : (Math.abs(v) <= 1 && !m.includes("perplexity") ? (100 * v).toFixed(1) + "%" : v.toFixed(2));
        }
      }
      report.append(table);
    }
  } catch (e) {
    const p = document.createElement("p");
    p.className = "stats";
    p.textContent = "no eval report for this run (rayft eval writes one)";
    report.append(p);
  }
  try {
    const blob = await (await api("/v1/playground/runs/loss.png?model=" + encodeURIComponent(model))).blob();
    img.src = URL.createObjectURL(blob);
    img.hidden = false;
  } catch (e) { /* no loss curve */ }
}

$("#connect").addEventListener("click", loadModels);
$("#key").addEventListener("keydown", e => { if (e.key === "Enter") loadModels(); });
$("#ask").addEventListener("submit", send);
$("#message").addEventListener("keydown", e => {
  if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); $("#ask").requestSubmit(); } });
$("#stop").addEventListener("click", () => running.forEach(c => c.abort()));
$("#clear").addEventListener("click", () => panes.forEach(p => {
  p.history = []; p.log.replaceChildren(); p.stats.textContent = ""; }));
$("#run").addEventListener("change", showRun);
loadModels();
</script>
</body>
</html>
"""


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
