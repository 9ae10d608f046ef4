"""The files part of OpenAI's fine-tuning API (/v1/files) on the real Serve app, over real HTTP with the official
openai client: an upload larger than serve.max_body_bytes streams to storage and reads back byte for byte; each
key sees only its own files and an admin key sees every key's; a wrong purpose, a file over
serve.finetune.max_file_bytes and a full quota are refused with nothing left in storage; a deleted file is gone;
the files outlive a redeploy. The store itself is also checked on S3 (moto's server) and without keys.

The same endpoint hosts what else of the API needs no training (a key of its own, so the files' tests are
unchanged): the graders routes (client.fine_tuning.alpha.graders.run / validate) and the creation of a
reinforcement job, echoed and then cancelled before it trains (its training is a cluster-tier story)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import requests

from helpers import serve_deploy, tiny_llama

pytestmark = pytest.mark.slow  # the shared endpoint takes a while to start

USER, OTHER, ADMIN = "sk-files-user", "sk-files-other", "sk-files-admin"
GRADING = "sk-files-grading"  # the graders routes' and the reinforcement job's tenant
MAX_FILE = 3_000_000
QUOTA = 4_000_000  # room for the big file and one more just under MAX_FILE
BIG = 1_500_000  # over serve.max_body_bytes (1 MB by default)


def sha(key: str) -> str:
    from rayft.serving.spec import hash_key

    return hash_key(key)


def client(base: str, key: str):
    from openai import OpenAI

    return OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0, timeout=120)


def write(path: Path, size: int, seed: int = 0) -> bytes:
    import random

    data = random.Random(seed).randbytes(size)
    path.write_bytes(data)
    return data


def upload(base: str, key: str, path: Path, purpose: str = "fine-tune"):
    with open(path, "rb") as f:
        return client(base, key).files.create(file=f, purpose=purpose)


def ids(base: str, key: str, **params) -> list[str]:
    return [f.id for f in client(base, key).files.list(**params)]


def leftovers(store: Path, key: str) -> list[str]:
    """Whatever lies in storage under a key's files (each file is a directory)."""
    root = store / "files" / sha(key)
    return sorted(os.listdir(root)) if root.is_dir() else []


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("files-store")


@pytest.fixture(scope="module")
def files_spec(smol_tokenizer, tmp_path_factory, store):
    from rayft.serving.config import ServeConfig
    from rayft.serving.spec import build_spec

    model = tiny_llama(tmp_path_factory.mktemp("files-model"), smol_tokenizer, sharp=True)
    admins = tmp_path_factory.mktemp("files-keys") / "admin-keys"
    admins.write_text(f"# admins\n{ADMIN}\n")
    cfg = ServeConfig(
        admin_keys_file=str(admins),
        max_tokens_limit=64,
        default_max_tokens=8,
        finetune={"storage_path": str(store), "max_file_bytes": MAX_FILE, "max_stored_bytes_per_key": QUOTA},
    )
    return build_spec(str(model), cfg, api_keys=[USER, OTHER, GRADING])


@pytest.fixture(scope="module")
def endpoint(ray_local, files_spec, serve_port):
    from ray import serve

    yield serve_deploy(files_spec, serve_port)
    serve.delete("rayft")


@pytest.fixture(scope="module")
def uploaded(endpoint, tmp_path_factory):
    """The user's file, larger than serve.max_body_bytes: (its file object, its bytes)."""
    path = tmp_path_factory.mktemp("files-data") / "train.jsonl"
    data = write(path, BIG)
    return upload(endpoint, USER, path), data


def test_a_file_over_the_body_limit_uploads_lists_and_reads_back_exactly(endpoint, uploaded, files_spec, store):
    f, data = uploaded
    assert BIG > files_spec.serve.max_body_bytes
    assert (f.object, f.bytes, f.filename, f.purpose, f.status) == (
        "file",
        BIG,
        "train.jsonl",
        "fine-tune",
        "processed",
    )
    assert re.fullmatch(r"file-[0-9a-f]{24,}", f.id)
    c = client(endpoint, USER)
    listed = list(c.files.list())
    assert [x.id for x in listed] == [f.id] and listed[0].bytes == BIG
    assert c.files.retrieve(f.id).model_dump() == f.model_dump()
    assert c.files.content(f.id).read() == data
    # stored under the key's SHA-256, metadata beside the bytes; the key itself is nowhere in storage
    assert leftovers(store, USER) == [f.id]
    assert (store / "files" / sha(USER) / f.id / "content").read_bytes() == data
    for root, _, names in os.walk(store):
        for name in names:
            assert USER.encode() not in (Path(root) / name).read_bytes()


def test_another_key_cannot_see_or_touch_a_file_and_an_admin_key_can(endpoint, uploaded):
    import openai

    f, data = uploaded
    other = client(endpoint, OTHER)
    for call in (other.files.retrieve, other.files.content, other.files.delete):
        with pytest.raises(openai.NotFoundError):
            call(f.id)
    assert f.id not in ids(endpoint, OTHER)
    admin = client(endpoint, ADMIN)
    assert f.id in ids(endpoint, ADMIN)
    assert admin.files.retrieve(f.id).bytes == BIG and admin.files.content(f.id).read() == data
    assert client(endpoint, USER).files.retrieve(f.id).id == f.id  # still there for its owner
    r = requests.get(f"{endpoint}/v1/files", timeout=30)
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"


def test_only_the_fine_tune_purpose_is_accepted(endpoint, store, tmp_path):
    import openai

    path = tmp_path / "batch.jsonl"
    write(path, 1000)
    with pytest.raises(openai.BadRequestError) as e:
        upload(endpoint, OTHER, path, purpose="batch")
    err = e.value.body
    assert err["param"] == "purpose" and "fine-tune" in err["message"] and err["type"] == "invalid_request_error"
    assert ids(endpoint, OTHER) == [] and leftovers(store, OTHER) == []


def test_a_file_over_max_file_bytes_is_413_and_nothing_is_stored(endpoint, store, tmp_path):
    import openai

    path = tmp_path / "huge.jsonl"
    write(path, MAX_FILE + 500_000)
    with pytest.raises(openai.APIStatusError) as e:
        upload(endpoint, OTHER, path)
    assert e.value.status_code == 413
    assert "serve.finetune.max_file_bytes" in e.value.body["message"] and str(MAX_FILE) in e.value.body["message"]
    assert ids(endpoint, OTHER) == [] and leftovers(store, OTHER) == []


def test_listing_is_newest_first_and_pages_with_limit_and_after(endpoint, tmp_path):
    c = client(endpoint, OTHER)
    made = []
    for i in range(3):
        path = tmp_path / f"part-{i}.jsonl"
        write(path, 100 + i, seed=i)
        made.append(upload(endpoint, OTHER, path).id)
    newest_first = made[::-1]
    page = c.files.list(limit=2)
    assert [f.id for f in page.data] == newest_first[:2] and page.has_more
    assert [f.id for f in c.files.list(limit=2, after=newest_first[1]).data] == newest_first[2:]
    assert [f.id for f in c.files.list(limit=2)] == newest_first  # the client follows `after` itself
    assert ids(endpoint, OTHER, order="asc") == made
    assert ids(endpoint, OTHER, purpose="fine-tune") == newest_first and ids(endpoint, OTHER, purpose="batch") == []
    for file_id in made:
        assert c.files.delete(file_id).deleted


def test_the_per_key_quota_is_a_429_that_names_the_limit(endpoint, uploaded, store, tmp_path):
    import openai

    stored = uploaded[0].bytes
    fits, over = tmp_path / "fits.jsonl", tmp_path / "over.jsonl"
    write(fits, QUOTA - stored - 1000)
    write(over, 2000)
    kept = upload(endpoint, USER, fits)
    with pytest.raises(openai.RateLimitError) as e:
        upload(endpoint, USER, over)
    err = e.value.body
    assert err["code"] == "quota_exceeded" and e.value.response.headers["x-should-retry"] == "false"
    assert str(QUOTA) in err["message"] and str(QUOTA - 1000) in err["message"]  # the limit and what is stored
    assert sorted(ids(endpoint, USER)) == sorted([uploaded[0].id, kept.id])
    other = upload(endpoint, OTHER, over)  # another key has a quota of its own
    assert other.bytes == 2000
    client(endpoint, OTHER).files.delete(other.id)
    client(endpoint, USER).files.delete(kept.id)
    assert len(leftovers(store, USER)) == 1


def test_a_deleted_file_is_gone_with_its_bytes(endpoint, store, tmp_path):
    import openai

    path = tmp_path / "short-lived.jsonl"
    write(path, 5000)
    c = client(endpoint, USER)
    f = upload(endpoint, USER, path)
    assert (store / "files" / sha(USER) / f.id / "content").is_file()
    gone = c.files.delete(f.id)
    assert (gone.id, gone.object, gone.deleted) == (f.id, "file", True)
    for call in (c.files.retrieve, c.files.content, c.files.delete):
        with pytest.raises(openai.NotFoundError):
            call(f.id)
    assert f.id not in ids(endpoint, USER)
    assert not (store / "files" / sha(USER) / f.id).exists()


def test_files_outlive_a_redeploy(endpoint, uploaded, files_spec, serve_port):
    from ray import serve

    f, data = uploaded
    serve.delete("rayft")  # every replica goes; a new app starts over the same storage_path
    base = serve_deploy(files_spec, serve_port)
    c = client(base, USER)
    assert f.id in [x.id for x in c.files.list()]
    assert c.files.retrieve(f.id).model_dump() == f.model_dump()
    assert c.files.content(f.id).read() == data


# ---------------------------------------------------------------------- graders and reinforcement jobs

EXACT = {"type": "string_check", "name": "exact", "input": "{{sample.output_text}}", "reference": "{{item.answer}}",
         "operation": "eq"}  # fmt: skip
CLOSE = {"type": "text_similarity", "name": "close", "input": "{{sample.output_text}}",
         "reference": "{{item.answer}}", "evaluation_metric": "fuzzy_match"}  # fmt: skip
BOTH = {"type": "multi", "name": "both", "calculate_output": "0.25 * exact + 0.75 * close",
        "graders": {"exact": EXACT, "close": CLOSE}}  # fmt: skip
PYTHON = {"type": "python", "name": "py", "source": "def grade(sample, item):\n    return 1.0\n"}


def test_graders_run_gives_openais_grader_run_response(endpoint):
    graders = client(endpoint, GRADING).fine_tuning.alpha.graders
    hit = graders.run(grader=EXACT, model_sample="Paris", item={"answer": "Paris"})
    assert hit.reward == 1.0 and (hit.metadata.name, hit.metadata.type) == ("exact", "string_check")
    assert not any(v for k, v in hit.metadata.errors.model_dump().items() if not k.endswith(("details", "type")))
    assert graders.run(grader=EXACT, model_sample="paris", item={"answer": "Paris"}).reward == 0.0  # eq: exact case
    like = graders.run(grader=EXACT | {"operation": "ilike"}, model_sample="It is PARIS.", item={"answer": "paris"})
    assert like.reward == 1.0
    # multi: 0.25 x exact (0) + 0.75 x fuzzy_match("Pariss", "Paris") = 0.75 x (1 - 1/11)
    both = graders.run(grader=BOTH, model_sample="Pariss", item={"answer": "Paris"})
    assert both.reward == pytest.approx(0.75 * 10 / 11) and both.metadata.type == "multi"
    assert both.sub_rewards == {"exact": 0.0, "close": pytest.approx(10 / 11)}
    # a variable the item lacks: scored 0 with its error flag, as OpenAI does
    missing = graders.run(grader=EXACT, model_sample="Paris", item={"city": "Paris"})
    assert missing.reward == 0.0 and missing.metadata.errors.invalid_variable_error


def test_graders_validate_returns_a_good_grader_and_400s_a_bad_one_naming_each_field(endpoint):
    import openai

    graders = client(endpoint, GRADING).fine_tuning.alpha.graders
    assert graders.validate(grader=BOTH).grader.model_dump(exclude_none=True) == BOTH
    bad = {
        "type": "multi",
        "name": "m",
        "calculate_output": "exact + nope",
        "graders": {"exact": EXACT | {"operation": "is"}},
    }
    with pytest.raises(openai.BadRequestError) as e:
        graders.validate(grader=bad)
    err = e.value.body
    assert (
        isinstance(err, dict) and err["code"] == "invalid_grader" and err["param"] == "grader.graders.exact.operation"
    )
    assert "grader.graders.exact.operation: 'is' is not one of eq, ne, like, ilike" in err["message"]
    assert "grader.calculate_output" in err["message"] and "nope" in err["message"]
    with pytest.raises(openai.BadRequestError) as e:
        graders.run(grader={"type": "cosine_please", "name": "x"}, model_sample="a")
    assert isinstance(e.value.body, dict) and e.value.body["param"] == "grader.type"


def test_a_python_grader_is_refused_naming_the_setting_while_python_graders_is_off(endpoint):
    import openai

    graders = client(endpoint, GRADING).fine_tuning.alpha.graders
    for call, grader, param in (
        (graders.run, PYTHON, "grader.type"),
        (graders.validate, PYTHON, "grader.type"),
        (graders.run, BOTH | {"graders": {"exact": EXACT, "py": PYTHON}, "calculate_output": "exact + py"},
         "grader.graders.py.type"),
    ):  # fmt: skip
        kw = {"model_sample": "a", "item": {"answer": "a"}} if call == graders.run else {}
        with pytest.raises(openai.BadRequestError) as e:
            call(grader=grader, **kw)
        body = e.value.body
        assert isinstance(body, dict) and body["param"] == param, body
        assert "serve.finetune.python_graders is false" in body["message"]


def test_a_reinforcement_job_is_created_on_prompt_rows_and_echoes_its_method(endpoint, tmp_path):
    import json

    import openai

    rows = [{"messages": [{"role": "user", "content": f"Capital of {c}?"}], "answer": a}
            for c, a in (("France", "Paris"), ("Italy", "Rome"))] * 4  # fmt: skip
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    f = upload(endpoint, GRADING, path)
    c = client(endpoint, GRADING)
    method = {"type": "reinforcement", "reinforcement": {"grader": BOTH, "hyperparameters": {"n_epochs": 2}}}
    created = c.fine_tuning.jobs.with_raw_response.create(
        model=files_model(endpoint), training_file=f.id, method=method
    )
    job = created.parse()
    try:
        assert job.status == "validating_files" and job.method is not None and job.method.type == "reinforcement"
        # the body as sent (the SDK's MultiGrader types `graders` as one grader, so its object misreads a multi's)
        shown = created.http_response.json()["method"]
        # n_epochs as asked, the rest the template's (here rayft's defaults): eval_interval 0 = after the last step
        resolved = {"n_epochs": 2, "batch_size": 8, "learning_rate_multiplier": 1.0, "eval_interval": 0,
                    "eval_samples": 1}  # fmt: skip
        assert shown == {"type": "reinforcement", "reinforcement": {"grader": BOTH, "hyperparameters": resolved}}
        assert (job.hyperparameters.n_epochs, job.hyperparameters.batch_size) == (2, 8)
        again = c.fine_tuning.jobs.with_raw_response.retrieve(job.id).http_response.json()
        assert again["method"] == shown
        assert job.id in [j.id for j in c.fine_tuning.jobs.list()]
    finally:
        assert c.fine_tuning.jobs.cancel(job.id).status == "cancelled"  # its training is the cluster tier's
    bad = [
        ({"compute_multiplier": 2}, "method.reinforcement.hyperparameters.compute_multiplier", "compute multiplier"),
        ({"eval_interval": 2}, "method.reinforcement.hyperparameters.eval_interval", "validation_file"),
        ({"reasoning_effort": "high"}, "method.reinforcement.hyperparameters.reasoning_effort", "reasoning effort"),
    ]
    for hp, param, words in bad:
        given = {"type": "reinforcement", "reinforcement": {"grader": EXACT, "hyperparameters": hp}}
        with pytest.raises(openai.BadRequestError) as e:
            c.fine_tuning.jobs.create(model=files_model(endpoint), training_file=f.id, method=given)
        body = e.value.body
        assert isinstance(body, dict) and body["param"] == param and words in body["message"], body
    python = {"type": "reinforcement", "reinforcement": {"grader": PYTHON}}
    with pytest.raises(openai.BadRequestError) as e:
        c.fine_tuning.jobs.create(model=files_model(endpoint), training_file=f.id, method=python)
    body = e.value.body
    assert isinstance(body, dict) and body["param"] == "method.reinforcement.grader.type"
    assert "serve.finetune.python_graders" in body["message"]


def test_the_openapi_document_has_the_graders_routes_and_the_reinforcement_method(endpoint):
    doc = requests.get(f"{endpoint}/openapi.json", headers={"Authorization": f"Bearer {GRADING}"}, timeout=30).json()
    for route in ("/v1/fine_tuning/alpha/graders/run", "/v1/fine_tuning/alpha/graders/validate"):
        assert set(doc["paths"][route]) == {"post"} and "400" in doc["paths"][route]["post"]["responses"]
    schemas = doc["components"]["schemas"]
    assert "reinforcement" in schemas["Method"]["properties"]["type"]["enum"]
    assert set(schemas["ReinforcementHyperparameters"]["properties"]) >= {"compute_multiplier", "eval_interval"}
    for route in ("/v1/fine_tuning/alpha/graders/run", "/v1/fine_tuning/alpha/graders/validate"):
        r = requests.post(f"{endpoint}{route}", json={"grader": EXACT, "model_sample": "x"}, timeout=30)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"


def files_model(base: str) -> str:
    """The id the endpoint serves its model as: the one model a job may fine-tune."""
    return client(base, GRADING).models.list().data[0].id


def test_the_store_on_s3_streams_checks_owners_and_leaves_nothing_behind(s3_bucket):
    from rayft.serving.config import FinetuneConfig
    from rayft.serving.files import EVERY_OWNER, FileStore, read_chunks
    from rayft.serving.openai_api import ApiError
    from rayft.training import storage

    store = FileStore(FinetuneConfig(storage_path=f"{s3_bucket}/svc", max_file_bytes=3 << 20))
    a, b = sha("a"), sha("b")
    up = store.begin(a)
    for i in range(3):
        up.write(bytes([i]) * (1 << 20))
    f = up.commit("train.jsonl", "fine-tune")
    assert f.bytes == 3 << 20 and store.path(f).startswith(f"{s3_bucket}/svc/files/{a}/")
    assert b"".join(read_chunks(store.open(store.get(a, f.id)))) == b"".join(bytes([i]) * (1 << 20) for i in range(3))
    assert [x.id for x in store.list(EVERY_OWNER)[0]] == [f.id]  # an admin's view
    with pytest.raises(ApiError):  # no owner is nobody's view, never everyone's
        store.list(None)
    with pytest.raises(ApiError) as e:
        store.get(b, f.id)
    assert e.value.status == 404
    up = store.begin(b)
    up.write(b"x" * (2 << 20))
    with pytest.raises(ApiError) as e:
        up.write(b"x" * (2 << 20))
    assert e.value.status == 413
    up.abort()
    assert store.list(b) == ([], False)
    store.delete(a, f.id)
    # nothing but the keys' usage records, which hold nothing any more
    left = storage.find_files(f"{s3_bucket}/svc")
    assert sorted(left) == sorted(f"{s3_bucket}/svc/usage/{o}.json" for o in (a, b))
    assert store.usage(a) == {} and store.usage(b) == {}


def test_without_keys_every_file_belongs_to_one_local_owner(tmp_path):
    """The ingress's FastAPI app in-process (no Serve), on a loopback endpoint with no keys."""
    from types import SimpleNamespace

    from fastapi.testclient import TestClient

    from rayft.serving.config import ServeConfig
    from rayft.serving.files import FileStore
    from rayft.serving.finetune import FinetuneService, ServedBase
    from rayft.serving.ingress import _build_api
    from rayft.serving.spec import KeyRing

    cfg = ServeConfig(finetune={"storage_path": str(tmp_path / "store"), "max_file_bytes": 10_000})
    keys = KeyRing(SimpleNamespace(serve=cfg, key_hashes=[]), environ={})
    files = FileStore(cfg.finetune)
    jobs = FinetuneService(cfg.finetune, files, ServedBase("m", "m", None, ("m",)), lambda *a: None)
    api = _build_api(SimpleNamespace(cfg=cfg, keys=keys, files=files, finetune=jobs))
    with TestClient(api) as http:
        r = http.post("/v1/files", files={"file": ("a.jsonl", b'{"x": 1}\n')}, data={"purpose": "fine-tune"})
        assert r.status_code == 200, r.text
        f = r.json()
        assert (tmp_path / "store" / "files" / "local" / f["id"] / "content").read_bytes() == b'{"x": 1}\n'
        listed = http.get("/v1/files", headers={"Authorization": "Bearer anything"}).json()
        assert [x["id"] for x in listed["data"]] == [f["id"]]
        r = http.post("/v1/files", files={"file": ("b.jsonl", b"y" * 20_000)}, data={"purpose": "fine-tune"})
        assert r.status_code == 413 and r.json()["error"]["code"] == "file_too_large"
        r = http.post("/v1/files", json={"purpose": "fine-tune"})
        assert r.status_code == 400 and "multipart/form-data" in r.json()["error"]["message"]
        r = http.put("/v1/files/file-0", content=b"x")  # a path with two routes names both methods
        assert r.status_code == 405 and r.headers["allow"] == "DELETE, GET"
        doc = http.get("/openapi.json").json()
    assert {"/v1/files", "/v1/files/{file_id}", "/v1/files/{file_id}/content"} <= set(doc["paths"])
    assert "/v1/fine_tuning/jobs/{fine_tuning_job_id}/cancel" in doc["paths"]
    body = doc["paths"]["/v1/files"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert body["properties"]["purpose"]["enum"] == ["fine-tune"]
    content = doc["paths"]["/v1/files/{file_id}/content"]["get"]["responses"]["200"]["content"]
    assert list(content) == ["application/octet-stream"]
    assert os.listdir(tmp_path / "store" / "files") == ["local"]
