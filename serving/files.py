"""The files of the OpenAI fine-tuning API: what POST /v1/files stores, in serve.finetune.storage_path.

    <storage_path>/files/<owner>/<file id>/content     the bytes, as uploaded
    <storage_path>/files/<owner>/<file id>/meta.json   the file object, written last: a directory without it (an
                                                       upload under way, or one cut off) is no file

The owner is the SHA-256 of the API key that uploaded the file (rayft.serving.spec.hash_key; the key itself is
never stored), or "local" when the endpoint takes no keys. A key sees only its own files; an admin key asks with
owner EVERY_OWNER and sees every key's; no owner (None) is refused, never widened to everyone's view.
Everything lives in storage, nothing in a replica's memory, so files outlive a
restart and every ingress replica sees the same ones. Plain blocking calls on a local disk or an object store
(rayft.training.storage), without FastAPI: the ingress runs them in threads, and fine-tuning jobs can use them.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass

from rayft.serving.config import FinetuneConfig
from rayft.serving.openai_api import ApiError
from rayft.training import storage

LOCAL_OWNER = "local"  # every file's owner when the endpoint takes no API keys
EVERY_OWNER = "*"  # the explicit view of an admin key: every owner's files and jobs (never a real owner's name)
PURPOSES = ("fine-tune",)
FILE_ID = re.compile(r"^file-[0-9a-f]{32}$")
OWNER = re.compile(r"^(local|[0-9a-f]{64})$")
NO_RETRY = {"x-should-retry": "false"}  # OpenAI's clients retry a 429 unless told this: a full quota stays full


def new_file_id(time_ns: int) -> str:
    """file-<the upload's time in ns, 16 hex digits><16 random hex digits>: ids sort by upload time, so the
    listing's order and its `after` cursor need no metadata (and a deleted cursor still works)."""
    return f"file-{time_ns:016x}{secrets.token_hex(8)}"


def storage_root(path: str) -> str:
    """serve.finetune.storage_path as this machine reaches it: ~ expanded and made absolute (a URI as it is)."""
    return path if storage.is_remote(path) else os.path.abspath(os.path.expanduser(path))


def namespace_root(root: str, namespace: str) -> str:
    """Where serve.finetune.namespace's jobs and runs live under the storage root (the default one's where they
    always did)."""
    return root if namespace == "default" else storage.join(root, "namespaces", namespace)


def unshared_nodes(root: str, timeout_s: float = 60.0) -> list[str]:
    """The alive nodes of the connected Ray cluster that do not see the local directory `root` as this node does
    (a pod's own disk rather than a shared volume): a marker written here, looked for by a zero-CPU task pinned to
    each other node. [] for cloud storage, a one-node cluster, or a volume every node mounts."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    if storage.is_remote(root) or not ray.is_initialized():
        return []
    here = ray.get_runtime_context().get_node_id()
    others = [n["NodeID"] for n in ray.nodes() if n.get("Alive") and n["NodeID"] != here]
    if not others:
        return []
    marker = os.path.join(root, f".node-check-{secrets.token_hex(8)}")
    os.makedirs(root, exist_ok=True)
    with open(marker, "w") as f:
        f.write(here)

    @ray.remote(num_cpus=0)
    def sees(path: str, text: str) -> bool:
        try:
            with open(path) as f:
                return f.read() == text
        except OSError:
            return False

    try:
        refs = {n: sees.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n, soft=False)).remote(marker, here)
                for n in others}  # fmt: skip
        ready, _ = ray.wait(list(refs.values()), num_returns=len(refs), timeout=timeout_s)
        seen = {n for n, ref in refs.items() if ref in ready and ray.get(ref)}
        return [n for n in others if n not in seen]
    finally:
        os.remove(marker)


def owners_seen(owner: str | None, listdir) -> list[str]:
    """The owners whose files or jobs `owner` may see: itself, or every owner for EVERY_OWNER (`listdir()` lists
    them). No owner, or a malformed one, is refused (401): a missing key never means "everyone's"."""
    if owner == EVERY_OWNER:
        return [o for o in listdir() if OWNER.match(o)]
    if owner is None or not OWNER.match(owner):
        raise ApiError(401, "this request carries no API key's identity: send 'Authorization: Bearer <key>'",
                       code="invalid_api_key")  # fmt: skip
    return [owner]


def not_found(file_id: str) -> ApiError:
    """The same answer for a file that never existed, was deleted or belongs to another key: ids reveal nothing."""
    return ApiError(
        404,
        f"no file {file_id!r}: it does not exist, was deleted, or was uploaded with another API key",
        param="file_id",
        code="file_not_found",
    )


def too_large(cfg: FinetuneConfig) -> ApiError:
    return ApiError(
        413,
        f"the file is over serve.finetune.max_file_bytes ({cfg.max_file_bytes} bytes); split it, or ask the "
        "operator to raise the limit",
        param="file",
        code="file_too_large",
    )


def read_chunks(src, chunk_bytes: int = 1 << 20) -> Iterator[bytes]:
    """An open file's bytes, piece by piece; closes it at the end (or when the reader stops early)."""
    with src:
        while chunk := src.read(chunk_bytes):
            yield chunk


@dataclass(frozen=True)
class StoredFile:
    id: str
    owner: str
    bytes: int
    created_at: int
    filename: str
    purpose: str

    def object(self) -> dict:
        """The file as OpenAI's API shows it (without its owner)."""
        return {
            "id": self.id,
            "object": "file",
            "bytes": self.bytes,
            "created_at": self.created_at,
            "filename": self.filename,
            "purpose": self.purpose,
            "status": "processed",
        }


class FileStore:
    """The files under serve.finetune.storage_path, with its limits. `owner` EVERY_OWNER: every owner's (admin)."""

    def __init__(self, cfg: FinetuneConfig):
        self.cfg = cfg
        self.root = storage.join(storage_root(cfg.storage_path), "files")
        self._lock = threading.Lock()
        self._uploading: dict[str, int] = {}  # owner -> bytes of its uploads under way in this process
        self.refused: str | None = None  # why new files and jobs are refused here (storage other nodes lack)

    def path(self, f: StoredFile, name: str = "content") -> str:
        return storage.join(self.root, f.owner, f.id, name)

    def _owners(self, owner: str | None) -> list[str]:
        return owners_seen(owner, lambda: storage.listdir(self.root))

    def _read(self, owner: str, file_id: str) -> StoredFile | None:
        try:
            meta = json.loads(storage.read_text(storage.join(self.root, owner, file_id, "meta.json")))
        except FileNotFoundError:
            return None
        return StoredFile(**{k: meta[k] for k in StoredFile.__dataclass_fields__})

    def list(
        self,
        owner: str | None,
        purpose: str | None = None,
        after: str | None = None,
        limit: int | None = None,
        order: str = "desc",
    ) -> tuple[list[StoredFile], bool]:
        """`owner`'s files, newest first (order "asc": oldest first), starting after the file id `after` in that
        order; at most `limit` of them, and whether more follow."""
        ids = sorted(
            (
                (i, o)
                for o in self._owners(owner)
                for i in storage.listdir(storage.join(self.root, o))
                if FILE_ID.match(i)
            ),
            reverse=order == "desc",
        )
        if after:
            ids = [(i, o) for i, o in ids if (i < after if order == "desc" else i > after)]
        out: list[StoredFile] = []
        for file_id, o in ids:
            f = self._read(o, file_id)
            if f is None or (purpose and f.purpose != purpose):
                continue
            if limit is not None and len(out) == limit:
                return out, True
            out.append(f)
        return out, False

    def get(self, owner: str | None, file_id: str) -> StoredFile:
        """The file `file_id`, if `owner` may see it; else a 404 ApiError."""
        if FILE_ID.match(file_id or ""):  # before it becomes part of a path
            for o in self._owners(owner):
                f = self._read(o, file_id)
                if f is not None:
                    return f
        raise not_found(file_id)

    def open(self, f: StoredFile):
        """The file's bytes, as a binary file object the caller closes (see read_chunks)."""
        return storage.open_binary(self.path(f))

    def delete(self, owner: str | None, file_id: str) -> StoredFile:
        f = self.get(owner, file_id)
        storage.remove(self.path(f, "meta.json"))  # out of every listing first, then the bytes
        storage.remove(storage.join(self.root, f.owner, f.id))
        self.charge(f.owner, f.id, None)
        return f

    # A key's usage is a record, <storage_path>/usage/<owner>.json: {item id: bytes} for its files and for each of
    # its fine-tuning jobs (the run it keeps), updated as they change, so a quota check reads one object instead of
    # every file's metadata. Items are set, not added to, so a write repeated after a crash counts once.

    def _usage_path(self, owner: str) -> str:
        return storage.join(storage_root(self.cfg.storage_path), "usage", f"{owner}.json")

    def usage(self, owner: str) -> dict[str, int]:
        """{file or job id: bytes} that count against `owner`'s quota; built from its files the first time."""
        try:
            return json.loads(storage.read_text(self._usage_path(owner)))["items"]
        except FileNotFoundError:
            items = {f.id: f.bytes for f in self.list(owner)[0]}
            storage.write_text(self._usage_path(owner), json.dumps({"items": items}))
            return items

    def charge(self, owner: str, item: str, nbytes: int | None) -> None:
        """Record that `item` (a file or a job id) holds `nbytes` of `owner`'s quota (None: nothing any more)."""
        with self._lock:
            items = self.usage(owner)
            if nbytes is None:
                items.pop(item, None)
            else:
                items[item] = int(nbytes)
            storage.write_text(self._usage_path(owner), json.dumps({"items": items}))

    def stored_bytes(self, owner: str) -> int:
        return sum(self.usage(owner).values())

    def begin(self, owner: str) -> Upload:
        """A new upload of `owner`'s; a 429 ApiError if its quota is already full, a 503 if the store is refused
        (`refused`: a local storage path other nodes of the cluster do not see)."""
        if self.refused:
            raise ApiError(503, self.refused, code="storage_not_shared")
        if not OWNER.match(owner):
            raise ValueError(f"owner {owner!r} must be 'local' or a key's SHA-256 hex digest")
        return Upload(self, owner)

    def _uploading_bytes(self, owner: str, add: int = 0) -> int:
        """Bytes of `owner`'s uploads under way in this process, after adding `add` (negative: they ended)."""
        with self._lock:
            held = self._uploading.get(owner, 0) + add
            if held > 0:
                self._uploading[owner] = held
            else:
                self._uploading.pop(owner, None)
            return held


class Upload:
    """One file arriving: its bytes go to storage as they come, held to serve.finetune.max_file_bytes and the
    owner's quota (what it stores plus its other uploads under way here); commit() makes it a file, abort()
    leaves nothing behind. Close it with one of them."""

    def __init__(self, store: FileStore, owner: str):
        self.store, self.owner = store, owner
        self.created_ns = time.time_ns()
        self.id = new_file_id(self.created_ns)
        self.dir = storage.join(store.root, owner, self.id)
        self.bytes = 0
        self.stored = store.stored_bytes(owner)
        self._out = None
        self._done = False
        self._check(0)

    def _check(self, n: int) -> None:
        cfg = self.store.cfg
        if self.bytes + n > cfg.max_file_bytes:
            raise too_large(cfg)
        others = self.store._uploading_bytes(self.owner) - self.bytes
        if self.stored + others + self.bytes + n > cfg.max_stored_bytes_per_key:
            held = f" (and {others} bytes in uploads under way)" if others else ""
            raise ApiError(
                429,
                f"storage quota exceeded: this API key stores {self.stored} bytes of files and fine-tuned models"
                f"{held}, and this upload ({self.bytes + n}+ bytes) would take it over its quota of "
                f"{cfg.max_stored_bytes_per_key} bytes (serve.finetune.max_stored_bytes_per_key); delete files "
                "(DELETE /v1/files/ID) or fine-tuned models (DELETE /v1/models/ID) it no longer needs",
                code="quota_exceeded",
                headers=NO_RETRY,
            )

    def write(self, data: bytes) -> None:
        """Store the next bytes; a 413 or 429 ApiError (nothing more stored) when they break a limit."""
        self._check(len(data))
        if self._out is None:
            self._out = storage.open_output(storage.join(self.dir, "content"))
        try:
            self._out.write(data)
        except OSError as e:
            raise storage.StorageError(f"cannot write {self.dir}: {e}") from None
        self.bytes += len(data)
        self.store._uploading_bytes(self.owner, len(data))

    def commit(self, filename: str, purpose: str) -> StoredFile:
        """The file, stored and listed (its meta.json written last)."""
        if self._out is None:  # an empty file
            self._out = storage.open_output(storage.join(self.dir, "content"))
        self._close()
        f = StoredFile(self.id, self.owner, self.bytes, self.created_ns // 10**9, filename, purpose)
        self.store.charge(self.owner, self.id, self.bytes)  # counted before it is listed: never stored uncounted
        storage.write_text(storage.join(self.dir, "meta.json"), json.dumps(asdict(f)))
        self._release()
        return f

    def abort(self) -> None:
        """Remove whatever was written (safe to call twice, or after commit: then it does nothing)."""
        if self._done:
            return
        try:
            self._close()
        except storage.StorageError:
            pass  # the bytes are removed anyway
        try:
            storage.remove(self.dir)
        finally:
            self._release()

    def _close(self) -> None:
        out, self._out = self._out, None
        if out is not None:
            try:
                out.close()
            except OSError as e:
                raise storage.StorageError(f"cannot write {self.dir}: {e}") from None

    def _release(self) -> None:
        if not self._done:
            self._done = True
            self.store._uploading_bytes(self.owner, -self.bytes)
