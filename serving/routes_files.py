"""OpenAI's files API (the first part of its fine-tuning API) over the store in rayft.serving.files: each key sees
only the files it uploaded; an admin key (serve.admin_keys_file) sees every key's. POST /v1/files parses its
multipart body as it arrives and writes the file to storage in pieces, so no upload is held in memory (the guard,
rayft.serving.http, leaves this body to the route)."""

import asyncio
from typing import TYPE_CHECKING, Literal

from fastapi import FastAPI, Query, Request
from fastapi.responses import StreamingResponse
from python_multipart.multipart import parse_options_header

from rayft.serving.files import PURPOSES, FileStore, read_chunks, too_large
from rayft.serving.http import errors, viewer
from rayft.serving.openai_api import ApiError, FileDeleted, FileList, FileObject

if TYPE_CHECKING:
    from python_multipart.multipart import MultipartCallbacks

# How much of a refused upload (over a limit, a bad purpose) is still read and thrown away, so that a client
# still sending reads the error instead of a reset connection; a body longer than the limit plus this is cut off.
DRAIN_BYTES = 64 << 20
FLUSH_BYTES = 1 << 20  # file bytes gathered before each write to storage (in a thread)
FIELD_BYTES = 4096  # the most a kept form field (purpose) may hold
UPLOAD_BODY = {
    "required": True,
    "content": {
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "required": ["file", "purpose"],
                "properties": {
                    "file": {"type": "string", "format": "binary", "description": "The file (for fine-tune: JSONL)."},
                    "purpose": {"type": "string", "enum": list(PURPOSES), "description": "What the file is for."},
                },
            }
        }
    },
}


class _UploadForm:
    """python-multipart's callbacks for one POST /v1/files body. The `file` part's bytes are queued as they are
    parsed (the caller stores them and empties the queue); `purpose` is kept; other fields are skipped."""

    KEPT = frozenset({"purpose"})

    def __init__(self):
        self.fields: dict[str, str] = {}
        self.filename = "file"
        self.files = 0
        self.queued: list[bytes] = []
        self.queued_bytes = 0
        self.ended = False
        self._header, self._value, self._disposition = b"", b"", b""
        self._name, self._data = "", bytearray()

    def callbacks(self) -> "MultipartCallbacks":
        return {
            "on_part_begin": self._part_begin,
            "on_header_field": self._header_field,
            "on_header_value": self._header_value,
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished,
            "on_part_data": self._part_data,
            "on_part_end": self._part_end,
            "on_end": self._end,
        }

    def take(self) -> bytes:
        data = b"".join(self.queued)
        self.queued.clear()
        self.queued_bytes = 0
        return data

    def _part_begin(self) -> None:
        self._disposition, self._name, self._data = b"", "", bytearray()

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self._header += data[start:end]

    def _header_value(self, data: bytes, start: int, end: int) -> None:
        self._value += data[start:end]

    def _header_end(self) -> None:
        if self._header.lower() == b"content-disposition":
            self._disposition = self._value
        self._header, self._value = b"", b""

    def _headers_finished(self) -> None:
        _, options = parse_options_header(self._disposition)
        if b"name" not in options:
            raise ApiError(400, "a part of the multipart body has no name (Content-Disposition: form-data; name=...)")
        self._name = options[b"name"].decode("utf-8", "replace")
        if self._name == "file":
            self.files += 1
            if self.files > 1:
                raise ApiError(400, "send one file per request", param="file")
            self.filename = options.get(b"filename", b"").decode("utf-8", "replace") or "file"

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if self._name == "file":
            self.queued.append(data[start:end])
            self.queued_bytes += end - start
        elif self._name in self.KEPT:
            self._data += data[start:end]
            if len(self._data) > FIELD_BYTES:
                raise ApiError(400, f"{self._name} is over {FIELD_BYTES} bytes", param=self._name)

    def _part_end(self) -> None:
        if self._name in self.KEPT:
            self.fields[self._name] = self._data.decode("utf-8", "replace")

    def _end(self) -> None:
        self.ended = True

    def problem(self) -> ApiError | None:
        """What is wrong with the form so far (a purpose that will never do), or, once `done`, what is missing."""
        purpose = self.fields.get("purpose")
        if purpose is not None and purpose not in PURPOSES:
            return ApiError(
                400,
                f"purpose {purpose[:100]!r} is not supported: this server keeps files for fine-tuning only "
                "(purpose=fine-tune)",
                param="purpose",
            )
        return None

    def missing(self) -> ApiError | None:
        """What a complete request still lacks, once the body has ended."""
        if not self.ended:
            return ApiError(400, "the multipart body ended before its closing boundary; send the file again")
        if not self.files:
            return ApiError(400, "the request has no `file` field: send the file's bytes as `file`", param="file")
        if "purpose" not in self.fields:
            return ApiError(400, "the request has no `purpose` field: send purpose=fine-tune", param="purpose")
        return None


async def _receive_upload(request: Request, store: FileStore, owner: str) -> dict:
    """POST /v1/files: the multipart body parsed as it arrives and the file's bytes written to storage in
    FLUSH_BYTES pieces, so no upload is held in memory; a limit broken halfway leaves nothing stored."""
    from python_multipart.exceptions import FormParserError
    from python_multipart.multipart import MultipartParser
    from starlette.requests import ClientDisconnect

    kind, params = parse_options_header(request.headers.get("content-type"))
    if kind != b"multipart/form-data" or not params.get(b"boundary"):
        raise ApiError(400, "send the file as multipart/form-data with the fields `file` and `purpose` (fine-tune)")
    cap = store.cfg.max_file_bytes + DRAIN_BYTES
    size = request.headers.get("content-length", "")
    if size.isdigit() and int(size) > cap:
        raise too_large(store.cfg)
    form = _UploadForm()
    parser = MultipartParser(params[b"boundary"], form.callbacks())
    upload, error, received = None, None, 0
    try:
        try:
            upload = await asyncio.to_thread(store.begin, owner)
        except ApiError as e:  # its quota is already full
            error = e
        async for chunk in request.stream():
            received += len(chunk)
            if error is not None:  # refused: read on (up to the cap) so the client gets the answer; store nothing
                if received > cap:
                    break
                continue
            assert upload is not None  # error stays None only once store.begin has given one
            try:
                parser.write(chunk)
                error = form.problem()
                if error is None and form.queued_bytes >= FLUSH_BYTES:
                    await asyncio.to_thread(upload.write, form.take())
            except ApiError as e:
                error = e
            except FormParserError as e:
                error = ApiError(400, f"the multipart body is malformed: {e}")
            if error is not None:
                await asyncio.to_thread(upload.abort)
        error = error or form.missing()
        if error is not None:
            raise error
        assert upload is not None
        await asyncio.to_thread(upload.write, form.take())
        stored = await asyncio.to_thread(upload.commit, form.filename, form.fields["purpose"])
        return stored.object()
    except ClientDisconnect:
        raise ApiError(400, "the client left before the upload ended; nothing was stored") from None
    finally:
        if upload is not None:
            upload.abort()  # nothing, after a commit


def file_routes(api: FastAPI, files: FileStore) -> None:
    """OpenAI's files API (the first part of its fine-tuning API): each key sees only the files it uploaded; an
    admin key (serve.admin_keys_file) sees every key's. The store's blocking calls run in threads (sync routes)."""
    say = {
        400: "Invalid request: the message names the field.",
        404: "No such file for this API key.",
        413: "The file is over serve.finetune.max_file_bytes.",
        429: "The key's files would exceed serve.finetune.max_stored_bytes_per_key (code quota_exceeded).",
        500: "The file storage (serve.finetune.storage_path) failed.",
        503: "serve.finetune.storage_path is a local directory other nodes do not see (code storage_not_shared).",
    }

    @api.post(
        "/v1/files",
        response_model=FileObject,
        responses=errors(400, 401, 413, 429, 500, 503, say=say),
        openapi_extra={"requestBody": UPLOAD_BODY},
    )
    async def create_file(request: Request):
        """Upload a file (multipart/form-data: `file` and `purpose`=fine-tune), streamed to storage."""
        return await _receive_upload(request, files, request.state.owner)

    @api.get("/v1/files", response_model=FileList, responses=errors(400, 401, 500, say=say))
    def list_files(
        request: Request,
        purpose: str | None = Query(None, description="Only files with this purpose."),
        limit: int = Query(10000, ge=1, le=10000, description="The most files to return."),
        after: str | None = Query(None, description="A file id: return the files after it in this order."),
        order: Literal["asc", "desc"] = Query("desc", description="desc: newest first; asc: oldest first."),
    ):
        found, more = files.list(viewer(request), purpose, after, limit, order)
        data = [f.object() for f in found]
        first, last = (data[0]["id"], data[-1]["id"]) if data else (None, None)
        return {"object": "list", "data": data, "first_id": first, "last_id": last, "has_more": more}

    @api.get("/v1/files/{file_id}", response_model=FileObject, responses=errors(401, 404, 500, say=say))
    def retrieve_file(file_id: str, request: Request):
        return files.get(viewer(request), file_id).object()

    binary = {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}
    content = {"description": "The file's bytes, as uploaded.", "content": binary}

    @api.get(
        "/v1/files/{file_id}/content",
        response_class=StreamingResponse,
        responses={200: content} | errors(401, 404, 500, say=say),
    )
    def file_content(file_id: str, request: Request):
        f = files.get(viewer(request), file_id)
        src = files.open(f)  # opened before the response starts: a failure is still a status
        headers = {"content-length": str(f.bytes)}
        return StreamingResponse(read_chunks(src), media_type="application/octet-stream", headers=headers)

    @api.delete("/v1/files/{file_id}", response_model=FileDeleted, responses=errors(401, 404, 500, say=say))
    def delete_file(file_id: str, request: Request):
        return {"id": files.delete(viewer(request), file_id).id, "object": "file", "deleted": True}
