"""`rayft generate DOCS_DIR --out FILE`: documents → question/answer pairs in the `messages` training format.

Registered in cluster/cli.py's COMMANDS.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from rayft.cluster.cli_common import AddressOpt

# light (standard library only): the defaults live in one place
from rayft.training.datagen import (
    DEFAULT_MAX_CHUNK_CHARS,
    DEFAULT_MAX_NEW_TOKENS,
    DEFAULT_MIN_OVERLAP,
    DEFAULT_MODEL,
    DEFAULT_PAIRS_PER_CHUNK,
    MIN_CHUNK_CHARS,
)


def generate(
    docs_dir: Annotated[
        Path,
        typer.Argument(help="Folder of .md/.txt documents (searched recursively), or one file.", show_default=False),
    ],
    out_file: Annotated[Path, typer.Option("--out", help="JSONL file to write (messages rows).", show_default=False)],
    model: Annotated[
        str | None,
        typer.Option(
            "--model",
            help="Local model that writes the pairs: built-in alias, run dir or HF model dir "
            f"(default: {DEFAULT_MODEL}).",
            show_default=False,
        ),
    ] = None,
    endpoint: Annotated[
        str | None,
        typer.Option(
            "--endpoint",
            help="OpenAI-compatible API base instead of a local model, e.g. http://127.0.0.1:8000/v1 "
            "(a bare host gets /v1; rayft posts to BASE/chat/completions).",
            show_default=False,
        ),
    ] = None,
    endpoint_model: Annotated[
        str | None,
        typer.Option(
            "--endpoint-model",
            help="Model name to ask the endpoint for (default: its only model, from BASE/models).",
            show_default=False,
        ),
    ] = None,
    api_key: Annotated[
        str | None,
        typer.Option("--api-key", envvar="OPENAI_API_KEY", help="Bearer key for --endpoint.", show_default=False),
    ] = None,
    faq: Annotated[
        bool,
        typer.Option(
            "--faq",
            help="No LLM: read pairs from documents in FAQ shape (Q:/A: lines, or question headings + text).",
        ),
    ] = False,
    pairs_per_chunk: Annotated[
        int, typer.Option("--pairs-per-chunk", min=1, help="Pairs to ask for per chunk.")
    ] = DEFAULT_PAIRS_PER_CHUNK,
    max_chunk_chars: Annotated[
        int, typer.Option("--max-chunk-chars", min=MIN_CHUNK_CHARS, help="Longest chunk of a document, in characters.")
    ] = DEFAULT_MAX_CHUNK_CHARS,
    template: Annotated[
        Path | None,
        typer.Option(
            "--template",
            help="Prompt template file with {chunk} and {n} (and optionally {title}) placeholders.",
            show_default=False,
        ),
    ] = None,
    min_overlap: Annotated[
        float,
        typer.Option(
            "--min-overlap",
            min=0.0,
            max=1.0,
            help="Drop answers with a smaller fraction of their words found in their chunk (0 = keep all).",
        ),
    ] = DEFAULT_MIN_OVERLAP,
    system: Annotated[
        str | None, typer.Option("--system", help="System prompt to put in every row.", show_default=False)
    ] = None,
    max_new_tokens: Annotated[
        int, typer.Option("--max-new-tokens", min=1, help="Longest reply per chunk, in tokens.")
    ] = DEFAULT_MAX_NEW_TOKENS,
    replicas: Annotated[int, typer.Option("--replicas", min=1, help="Local model copies generating in parallel.")] = 1,
    gpu: Annotated[bool, typer.Option("--gpu", help="Run the local model on a GPU (one per replica).")] = False,
    concurrency: Annotated[
        int, typer.Option("--concurrency", min=1, help="Requests in flight at once to --endpoint.")
    ] = 4,
    address: AddressOpt = None,
) -> None:
    """Turn a folder of documents into question/answer training data, written by an LLM or read from FAQs."""
    from rich.markup import escape
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from rayft.cluster.cli_common import err, out
    from rayft.cluster.runtime import connect
    from rayft.training.datagen import GenerateError, generate_qa
    from rayft.training.models import ModelError

    if faq and (model or endpoint or template):
        err.print("[bold red]usage error[/] --faq reads pairs from the documents; drop --model/--endpoint/--template")
        raise typer.Exit(2)
    if model and endpoint:
        err.print("[bold red]usage error[/] give --model (a local model) or --endpoint (a server), not both")
        raise typer.Exit(2)
    progress = Progress(
        TextColumn("[bold]generate[/]"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("chunks"),
        TimeRemainingColumn(),
        console=err,
    )
    try:
        with progress:
            stats = generate_qa(
                docs_dir,
                out_file,
                mode="faq" if faq else "llm",
                model=model,
                endpoint=endpoint,
                endpoint_model=endpoint_model,
                api_key=api_key,
                pairs_per_chunk=pairs_per_chunk,
                max_chunk_chars=max_chunk_chars,
                template=template,
                min_overlap=min_overlap,
                system=system,
                max_new_tokens=max_new_tokens,
                replicas=replicas,
                use_gpu=gpu,
                concurrency=concurrency,
                start_ray=lambda cpus: connect(address, need_cpus=cpus),
                progress=lambda total: _bar(progress, total),
            )
    except (GenerateError, ModelError) as e:
        kind = "model error" if isinstance(e, ModelError) else "generate error"
        err.print(f"[bold red]{kind}[/] {escape(str(e))}", highlight=False)
        raise typer.Exit(1) from None
    out.print(summary(stats), highlight=False, soft_wrap=True)  # one line, whole, for scripts to grep
    if stats["kept"] == 0:
        err.print(f"[bold red]generate error[/] {escape(_why_empty(stats))}", highlight=False)
        raise typer.Exit(1)
    out.print(
        f"[dim]next: put `data: {{train: {escape(str(out_file))}}}` in a job file and run "
        "`rayft data inspect JOB.yaml`[/]",
        highlight=False,
        soft_wrap=True,
    )


def _bar(progress, total: int):
    task = progress.add_task("", total=total)
    return lambda n: progress.advance(task, n)


def summary(stats: dict) -> str:
    """`wrote 37 pairs to out.jsonl (12 chunks, 44 raw pairs; dropped: 3 duplicate, 2 low overlap, 2 empty)`."""
    d = stats["dropped"]
    parts = [f"{d[k]} {k.replace('_', ' ')}" for k in ("duplicate", "low_overlap", "empty", "overlong") if d.get(k)]
    dropped = ", ".join(parts) or "none"
    if stats["mode"] == "faq":
        found = f"{stats['documents']} documents, {stats['raw_pairs']} pairs found"
    else:
        found = f"{stats['chunks']} chunks, {stats['raw_pairs']} raw pairs"
    line = f"wrote {stats['kept']} pairs to {stats['out']} ({found}; dropped: {dropped})"
    if stats["mode"] == "llm" and stats.get("chunks_without_pairs"):
        line += f"; {stats['chunks_without_pairs']} chunks got no Q:/A: lines back"
    return line


def _why_empty(stats: dict) -> str:
    if stats["raw_pairs"] == 0:
        return (
            "the model wrote no `Q:`/`A:` lines; try a larger model (--model or --endpoint), a template that asks "
            "for that layout (--template), or more --max-new-tokens"
        )
    return (
        "every pair was filtered out; answers not grounded in their chunk are dropped by --min-overlap "
        "(lower it, or try a larger model)"
    )
