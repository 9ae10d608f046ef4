"""`rayft serve`: put a finetuned model behind an OpenAI-compatible HTTP endpoint on Ray Serve."""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from rayft.cluster.cli_common import AddressOpt, SetOpt, _load, _user_errors, err, out
from rayft.serving.config import API_KEY_ENV
from rayft.serving.deploy import APP_NAME
from rayft.serving.spec import ServeSpec


def serve(
    target: Annotated[
        str | None,
        typer.Argument(help="Job file (serves its run), run dir, model dir or built-in alias.", show_default=False),
    ] = None,
    host: Annotated[str | None, typer.Option("--host", help="Bind address (default 127.0.0.1).")] = None,
    port: Annotated[int | None, typer.Option("--port", help="HTTP port (default 8000).")] = None,
    api_key: Annotated[
        list[str] | None,
        typer.Option(
            "--api-key",
            help="Require this bearer key on every route but the page and the probes "
            f"(repeatable; also {API_KEY_ENV}).",
        ),
    ] = None,
    adapter: Annotated[
        list[str] | None,
        typer.Option("--adapter", help="Serve a LoRA adapter too: NAME=RUN_DIR (repeatable).", show_default=False),
    ] = None,
    set_: SetOpt = None,
    address: AddressOpt = None,
    detach: Annotated[bool, typer.Option("--detach", help="Leave the app running on the cluster and return.")] = False,
    emit_config: Annotated[
        Path | None,
        typer.Option("--emit-config", help="Write a Ray Serve config file (for `serve deploy`) and exit."),
    ] = None,
    add_adapter: Annotated[
        tuple[str, str] | None,
        typer.Option(
            "--add-adapter", help="Register NAME RUN_DIR with a running endpoint (see --url).", show_default=False
        ),
    ] = None,
    url: Annotated[
        str | None, typer.Option("--url", help="Endpoint for --add-adapter (default http://127.0.0.1:8000).")
    ] = None,
) -> None:
    """Serve a model with Ray Serve: OpenAI-compatible chat/completions, streaming, batching, LoRA adapters."""
    if add_adapter:
        _add_adapter(url or "http://127.0.0.1:8000", add_adapter[0], add_adapter[1], api_key)
        return
    if not target:
        err.print("[bold red]usage error[/] give a TARGET: a job file, a run dir, a model dir or a built-in alias")
        raise typer.Exit(2)
    with _user_errors():
        spec = _spec(target, set_, host, port, api_key, adapter, elsewhere=emit_config is not None)
    if emit_config:
        from rayft.serving.spec import is_loopback

        emit_config.write_text(serve_config_yaml(spec))
        out.print(
            f"wrote {emit_config}: deploy it with `serve deploy {emit_config}` or paste its application "
            "into a RayService's serveConfigV2"
        )
        s = spec.serve
        if not spec.key_hashes and not s.allow_unauthenticated and not is_loopback(s.host):
            out.print(
                f"  it binds {s.host} with no API key in it: set ${s.api_key_env} (or mount serve.api_keys_file) "
                "where the replicas run, e.g. from a Kubernetes Secret; without a key they refuse to start",
                highlight=False,
            )
        return
    run_app(spec, address, detach)


def _spec(target, overrides, host, port, api_keys, adapters, elsewhere: bool = False) -> ServeSpec:
    from rayft.serving.config import ServeConfig
    from rayft.serving.spec import ServeError, build_spec

    overrides = list(overrides or [])
    if host:
        overrides.append(f"serve.host={host}")
    if port:
        overrides.append(f"serve.port={port}")
    run_dir = storage = None
    p = Path(target)
    if p.suffix in (".yaml", ".yml") and p.is_file():
        job = _load(p, overrides)
        cfg, run_dir, storage = job.serve, job.run_dir, job.run.storage_path
    else:
        from rayft.cluster.config import load_serve_config

        cfg = load_serve_config(overrides)
    if adapters:
        extra = dict(cfg.adapters)
        for a in adapters:
            name, sep, path = a.partition("=")
            if not sep or not name or not path:
                err.print(f"[bold red]usage error[/] --adapter {escape(a)}: write it as NAME=RUN_DIR")
                raise typer.Exit(2)
            extra[name] = path
        cfg = ServeConfig.model_validate(cfg.model_dump() | {"adapters": extra})
    try:
        return build_spec(target, cfg, run_dir=run_dir, storage_path=storage, api_keys=api_keys, elsewhere=elsewhere)
    except ServeError as e:
        err.print(f"[bold red]serve error[/] {escape(str(e))}", highlight=False)
        raise typer.Exit(1) from None


def serve_config_yaml(spec: ServeSpec) -> str:
    """A Ray Serve config file (`serve deploy`, KubeRay RayService serveConfigV2) for this spec: the spec goes in
    as the application's args, which rayft.serving.app:app_builder validates back into a ServeSpec."""
    import yaml

    app = {
        "name": APP_NAME,
        "route_prefix": spec.serve.route_prefix,
        "import_path": "rayft.serving.app:app_builder",
        "args": spec.model_dump(mode="json"),
    }
    doc = {"http_options": {"host": spec.serve.host, "port": spec.serve.port}, "applications": [app]}
    head = (
        "# Ray Serve config written by `rayft serve --emit-config`. Deploy: serve deploy THIS_FILE\n"
        "# API keys appear only as SHA-256 hashes (key_hashes).\n"
    )
    return head + yaml.safe_dump(doc, sort_keys=False)


def run_app(spec: ServeSpec, address: str | None, detach: bool) -> None:
    try:
        base = start_app(spec, address, detach)
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM while the model loads: nothing is left behind
        if not detach:
            with contextlib.suppress(Exception):  # Serve may not have started yet
                stop_app()
        raise
    if detach:
        print_usage(base, spec)
        out.print(f"left running on the cluster; stop it with `serve shutdown -y` or `serve delete {APP_NAME}`")
        return
    try:
        print_usage(base, spec)
        serve_until_interrupted()
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM before the wait began: the same clean stop
        stop_app()


def start_app(spec: ServeSpec, address: str | None, detach: bool = False) -> str:
    """Join or start Ray, deploy the app (rayft.serving.deploy) and wait until it answers; returns its URL."""
    import os

    from rayft.cluster.runtime import connect
    from rayft.serving.deploy import cpus_needed, deploy, takes_jobs

    if detach:
        address = address or os.environ.get("RAY_ADDRESS") or "auto"
    try:
        with err.status("starting Ray", spinner="dots"):
            connect(address, need_cpus=cpus_needed(spec), dashboard=takes_jobs(spec))
    except ConnectionError as e:
        if detach:
            err.print(
                "[bold red]serve error[/] --detach needs a running Ray cluster that outlives this command: "
                "start one with `ray start --head` (or pass --address)",
                highlight=False,
            )
            raise typer.Exit(1) from None
        raise typer.Exit(1) from e
    if not detach:
        stop_on_sigterm()  # after connect: ray.init installs a SIGTERM handler that exits without cleaning up
    with err.status(f"starting the endpoint ({spec.model_name}); loading the model", spinner="dots"):
        return deploy(spec)


def stop_on_sigterm() -> None:
    """SIGTERM (`kill`, `docker stop`, a service manager) stops the endpoint as Ctrl-C does: cleanly, its
    replicas and a local Ray with it."""
    import signal

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)


def serve_until_interrupted() -> None:
    """Serve until Ctrl-C or SIGTERM, then stop the endpoint (in-flight requests finish first, up to
    serve.drain_timeout_s); a stop asked for this way exits 0."""
    stop_on_sigterm()
    out.print("serving; Ctrl-C stops the endpoint")
    try:
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    finally:
        stop_app()


def stop_app() -> None:
    from rayft.serving.deploy import undeploy

    with err.status("stopping the endpoint", spinner="dots"):
        undeploy()
    out.print("endpoint stopped")


def ask(base: str, model: str, messages: list[dict], max_tokens: int, api_key: str | None = None) -> str:
    """One chat completion over HTTP (greedy); the reply's text."""
    import urllib.request

    body = json.dumps({"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0}).encode()
    req = urllib.request.Request(f"{base}/v1/chat/completions", data=body, headers={"Content-Type": "application/json"})
    if api_key:
        req.add_header("Authorization", f"Bearer {api_key}")
    with urllib.request.urlopen(req, timeout=300) as r:
        return json.loads(r.read())["choices"][0]["message"]["content"]


def print_usage(base: str, spec: ServeSpec) -> None:
    variable = spec.serve.api_key_env  # where the client keeps its key too, in these examples
    key = f' -H "Authorization: Bearer ${variable}"' if spec.key_hashes else ""
    name = spec.model_name
    body = json.dumps({"model": name, "messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 32})
    out.print(f"[bold green]serving[/] {escape(name)} at {base}/v1  (models: {base}/v1/models, docs: {base}/docs)")
    out.print("  curl:", highlight=False)
    curl = f"curl -s {base}/v1/chat/completions -H 'Content-Type: application/json'{key} -d '{body}'"
    out.print("    " + curl, highlight=False, soft_wrap=True, markup=False)
    out.print("  python (pip install openai):", highlight=False)
    key_expr = f'os.environ["{variable}"]' if spec.key_hashes else "'unused'"
    lines = [
        "from openai import OpenAI" + ("; import os" if spec.key_hashes else ""),
        f"client = OpenAI(base_url='{base}/v1', api_key={key_expr})",
        f"reply = client.chat.completions.create(model='{name}', messages=[{{'role': 'user', 'content': 'Hello!'}}])",
        "print(reply.choices[0].message.content)",
    ]
    for line in lines:
        out.print("    " + line, highlight=False, soft_wrap=True, markup=False)


def _add_adapter(url: str, name: str, path: str, api_keys: list[str] | None) -> None:
    import urllib.error
    import urllib.request

    from rayft.serving.spec import env_api_key

    key = (api_keys or [None])[0] or env_api_key()
    body = json.dumps({"name": name, "path": str(Path(path).expanduser().resolve())}).encode()
    req = urllib.request.Request(
        f"{url.rstrip('/')}/admin/adapters", data=body, method="POST", headers={"Content-Type": "application/json"}
    )
    if key:
        req.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            reply = json.loads(r.read())
    except urllib.error.HTTPError as e:
        detail = e.read().decode(errors="replace")
        try:
            detail = json.loads(detail)["error"]["message"]
        except (ValueError, KeyError, TypeError):
            pass
        err.print(f"[bold red]serve error[/] {url} refused the adapter (HTTP {e.code}): {escape(detail)}")
        raise typer.Exit(1) from None
    except (urllib.error.URLError, OSError) as e:
        err.print(f"[bold red]serve error[/] cannot reach {url}: {escape(str(e))}; is `rayft serve` running there?")
        raise typer.Exit(1) from None
    out.print(f"registered adapter {reply['name']}: send model={reply['model']!r}")
