"""The endpoint against its own OpenAPI document, by a schema-driven fuzzer (schemathesis) over real HTTP:
hundreds of generated requests, valid and invalid, on every route. It fails on any 5xx, on a status, header
or body the document does not declare, on a request the document allows that is refused, and on one it
forbids that is accepted."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from helpers import make_adapters, serve_deploy, tiny_llama

KEY = "sk-fuzz-admin"  # an admin key (serve.admin_keys_file): /admin routes take one, the others take it too
# A schema-valid registration may still name a directory outside serve.adapter_roots (403) or one that holds no
# adapter (404), which no schema can rule out beforehand; never a 400.
CONFIG = """
[[operations]]
include-name = "POST /admin/adapters"
checks.positive_data_acceptance.expected-statuses = ["2xx", "403", "404"]

# A well-formed job is still a 400 (as OpenAI's) when its model is not the served one or its file is not the key's.
[[operations]]
include-name = "POST /v1/fine_tuning/jobs"
checks.positive_data_acceptance.expected-statuses = ["2xx", "400", "401", "429"]

# A grader is any object to the schema; what makes one usable (its type's fields, templates, formula) is checked by
# rayft.training.graders, so a schema-valid one may still be a 400 naming its fields.
[[operations]]
include-name = "POST /v1/fine_tuning/alpha/graders/run"
checks.positive_data_acceptance.expected-statuses = ["2xx", "400", "429"]

# A well-formed chat request may still be a 400, as OpenAI's: a tool result answering no call, a tool_choice naming a
# function not among the tools, a JSON schema or a tool's parameters that constrained decoding cannot enforce.
[[operations]]
include-name = "POST /v1/chat/completions"
checks.positive_data_acceptance.expected-statuses = ["2xx", "400", "401", "404", "429"]

[[operations]]
include-name = "POST /v1/fine_tuning/alpha/graders/validate"
checks.positive_data_acceptance.expected-statuses = ["2xx", "400"]
"""


@pytest.fixture(scope="module")
def fuzz_endpoint(ray_local, smol_tokenizer, serve_port, tmp_path_factory):
    from ray import serve

    from rayft.serving.config import ServeConfig
    from rayft.serving.spec import build_spec

    model = tiny_llama(tmp_path_factory.mktemp("fuzz-model"), smol_tokenizer, sharp=True)
    root = tmp_path_factory.mktemp("fuzz-adapters")
    make_adapters(model, root, ["a1"])
    admins = tmp_path_factory.mktemp("fuzz-keys") / "admin-keys"
    admins.write_text(f"{KEY}\n")
    cfg = ServeConfig(
        admin_keys_file=str(admins),
        adapters={"a1": str(root / "a1")},
        adapter_roots=[str(root)],
        max_tokens_limit=64,  # generated requests stay short
        default_max_tokens=16,
        request_timeout_s=30,
        # generated uploads land in the test's own directory, small
        finetune={"storage_path": str(tmp_path_factory.mktemp("fuzz-files")), "max_file_bytes": 1_000_000},
    )
    yield serve_deploy(build_spec(str(model), cfg), serve_port)
    serve.delete("rayft")


@pytest.mark.slow
def test_a_schema_driven_fuzzer_finds_no_mismatch_with_the_openapi_document(fuzz_endpoint, tmp_path):
    config = tmp_path / "schemathesis.toml"
    config.write_text(CONFIG)
    import requests

    st = Path(sys.executable).parent / "st"
    schema = tmp_path / "openapi.json"  # the document, like every route but the probes, takes a key
    got = requests.get(f"{fuzz_endpoint}/openapi.json", headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
    schema.write_bytes(got.content)
    cmd = [str(st), "--config-file", str(config), "run", str(schema), "--url", fuzz_endpoint]
    cmd += ["-H", f"Authorization: Bearer {KEY}", "--checks", "all", "--max-examples", "50", "--seed", "7"]
    cmd += ["--request-timeout", "60", "--no-color"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=tmp_path)  # its cache stays there
    summary = r.stdout[r.stdout.rfind("SUMMARY") :]
    assert r.returncode == 0, r.stdout[-8000:] + r.stderr[-2000:]
    assert "passed" in summary and "failed" not in summary, summary
