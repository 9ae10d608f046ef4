"""Where a run's files live: a local path (or an NFS mount) or a cloud URI (s3://, gs://, abfss://, ...).

Cloud paths go through pyarrow's filesystems, the ones Ray Train stores checkpoints with and Ray Data reads
with, so one set of credentials serves all three: the provider's usual environment (AWS_ACCESS_KEY_ID,
AWS_PROFILE, GOOGLE_APPLICATION_CREDENTIALS, ...), and AWS_ENDPOINT_URL for an S3-compatible server
(MinIO, Ceph, a local test server). Everything here takes the same strings a job file holds.
"""

from __future__ import annotations

import contextlib
import fnmatch
import io
import os
import posixpath
import re
import shutil
import tempfile
from collections.abc import Iterator


class StorageError(Exception):
    """A run directory or data path that cannot be read or written; the message says which and why."""

    error_kind = "storage"  # what `rayft` calls it ("storage error ..."); rayft.training.run_dir.user_error


def is_remote(path: str) -> bool:
    """A URI with a scheme other than file:// (s3://bucket/runs, gs://bucket/runs, ...)."""
    return "://" in str(path) and not str(path).startswith("file://")


def join(base: str, *parts: str) -> str:
    """`base`/`part`/...: os.path.join for local paths, '/' for URIs (which keep their scheme)."""
    if not is_remote(base):
        return os.path.join(base, *parts)
    out = str(base).rstrip("/")
    for p in parts:
        out = f"{out}/{str(p).strip('/')}"
    return out


def basename(path: str) -> str:
    return posixpath.basename(str(path).rstrip("/")) if is_remote(path) else os.path.basename(str(path).rstrip("/"))


def _fs(path: str):
    import pyarrow.fs as pafs

    if not is_remote(path):
        return pafs.LocalFileSystem(), os.path.abspath(str(path).removeprefix("file://"))
    try:
        return pafs.FileSystem.from_uri(str(path))
    except Exception as e:  # pyarrow raises ArrowInvalid / OSError with the provider's message
        raise StorageError(f"{path}: cannot open this storage: {e}") from None


def _where(path: str, action: str, e: Exception) -> StorageError:
    hint = ""
    if is_remote(path):
        hint = (
            "; check the bucket name and the credentials in this environment (and AWS_ENDPOINT_URL for "
            "S3-compatible servers)"
        )
    return StorageError(f"cannot {action} {path}: {e}{hint}")


def absolute(path: str) -> str:
    """A local path made absolute; a URI as it is."""
    return str(path) if is_remote(path) else os.path.abspath(str(path).removeprefix("file://"))


class _RawFile(io.RawIOBase):
    """A pyarrow input file as a Python raw stream, so that io.BufferedReader gives it readline()."""

    def __init__(self, native):
        self.native = native

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        data = self.native.read(len(b))
        b[: len(data)] = data
        return len(data)

    def seek(self, offset: int, whence: int = 0) -> int:
        return self.native.seek(offset, whence)

    def tell(self) -> int:
        return self.native.tell()

    def close(self) -> None:
        self.native.close()
        super().close()


def open_binary(path: str):
    """A seekable binary file object (with readline) for a local path or a URI."""
    if not is_remote(path):
        return open(path, "rb")  # noqa: SIM115 - the caller closes it
    fs, p = _fs(path)
    try:
        return io.BufferedReader(_RawFile(fs.open_input_file(p)), buffer_size=1 << 20)
    except OSError as e:
        raise _where(path, "read", e) from None


def open_text(path: str, newline: str | None = None):
    return io.TextIOWrapper(open_binary(path), encoding="utf-8", errors="replace", newline=newline)


def size(path: str) -> int:
    if not is_remote(path):
        return os.path.getsize(path)
    fs, p = _fs(path)
    try:
        return fs.get_file_info(p).size
    except OSError as e:
        raise _where(path, "look at", e) from None


def find_files(path: str) -> list[str]:
    """Every file under a directory (recursively), as full paths, sorted."""
    if not is_remote(path):
        return sorted(os.path.join(d, n) for d, _, names in os.walk(path) for n in names)
    import pyarrow.fs as pafs

    fs, p = _fs(path)
    scheme = str(path).split("://", 1)[0]
    try:
        infos = fs.get_file_info(pafs.FileSelector(p, recursive=True, allow_not_found=True))
    except OSError as e:
        raise _where(path, "list", e) from None
    return sorted(f"{scheme}://{i.path}" for i in infos if i.type == pafs.FileType.File)


def match(pattern: str) -> list[str]:
    """Files matching a glob pattern (`*`, `?`, `[...]`, and `**` for any depth), local or in a bucket."""
    if not is_remote(pattern):
        import glob as globlib

        return sorted(p for p in globlib.glob(pattern, recursive=True) if os.path.isfile(p))
    # The part before the first wildcard is listed; the rest is matched against each file's path.
    cut = min(i for i, c in enumerate(pattern) if c in "*?[")
    root = pattern[: pattern.rfind("/", 0, cut) + 1]
    regex = re.compile(_glob_regex(pattern))
    return [f for f in find_files(root) if regex.fullmatch(f)]


def _glob_regex(pattern: str) -> str:
    """`**/` = any number of directories, `*` and `?` = within one path segment, `[...]` = a character class."""
    out, i = [], 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out.append("(?:[^/]+/)*")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^/]")
            i += 1
        elif pattern[i] == "[" and "]" in pattern[i + 1 :]:
            end = pattern.index("]", i + 1)
            body = pattern[i + 1 : end]
            out.append("[" + ("^" + body[1:] if body.startswith("!") else body) + "]")
            i = end + 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return "".join(out)


def exists(path: str) -> bool:
    if not is_remote(path):
        return os.path.exists(path)
    import pyarrow.fs as pafs

    fs, p = _fs(path)
    try:
        return fs.get_file_info(p).type != pafs.FileType.NotFound
    except OSError as e:
        raise _where(path, "look at", e) from None


def is_dir(path: str) -> bool:
    if not is_remote(path):
        return os.path.isdir(path)
    import pyarrow.fs as pafs

    fs, p = _fs(path)
    try:
        return fs.get_file_info(p).type == pafs.FileType.Directory
    except OSError as e:
        raise _where(path, "look at", e) from None


def listdir(path: str) -> list[str]:
    """Names of the entries directly under `path` (empty when it does not exist)."""
    if not is_remote(path):
        return sorted(os.listdir(path)) if os.path.isdir(path) else []
    import pyarrow.fs as pafs

    fs, p = _fs(path)
    try:
        infos = fs.get_file_info(pafs.FileSelector(p, allow_not_found=True, recursive=False))
    except OSError as e:
        raise _where(path, "list", e) from None
    return sorted(posixpath.basename(i.path.rstrip("/")) for i in infos)


def glob(path: str, pattern: str) -> list[str]:
    """Entries directly under `path` whose names match `pattern` (fnmatch), as full paths, sorted."""
    return [join(path, n) for n in listdir(path) if fnmatch.fnmatch(n, pattern)]


def read_bytes(path: str) -> bytes:
    if not is_remote(path):
        with open(path, "rb") as f:
            return f.read()
    fs, p = _fs(path)
    try:
        with fs.open_input_stream(p) as f:
            return f.read()
    except FileNotFoundError:
        raise
    except OSError as e:
        if "not found" in str(e).lower() or "does not exist" in str(e).lower():
            raise FileNotFoundError(path) from None
        raise _where(path, "read", e) from None


def read_text(path: str) -> str:
    return read_bytes(path).decode()


def write_bytes(path: str, data: bytes) -> None:
    """Write a whole file. A local file is replaced atomically (readers never see half of it)."""
    if not is_remote(path):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
        return
    fs, p = _fs(path)
    try:
        with fs.open_output_stream(p) as f:
            f.write(data)
    except OSError as e:
        raise _where(path, "write", e) from None


def write_text(path: str, text: str) -> None:
    write_bytes(path, text.encode())


def open_output(path: str):
    """A binary file object that writes `path` (a local path or a URI) as data arrives, for files too large to
    hold in memory; the caller closes it. An object store holds the file only once it is closed; a caller that
    gives up removes `path` (remove) after closing."""
    if not is_remote(path):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        return open(path, "wb")  # noqa: SIM115 - the caller closes it
    fs, p = _fs(path)
    try:
        return fs.open_output_stream(p)
    except OSError as e:
        raise _where(path, "write", e) from None


def makedirs(path: str) -> None:
    if not is_remote(path):
        os.makedirs(path, exist_ok=True)
        return
    fs, p = _fs(path)
    try:
        fs.create_dir(p, recursive=True)
    except OSError as e:
        raise _where(path, "create", e) from None


def remove(path: str) -> None:
    """Delete a file or a directory tree; nothing happens when it does not exist."""
    if not is_remote(path):
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        elif os.path.lexists(path):
            os.remove(path)
        return
    import pyarrow.fs as pafs

    fs, p = _fs(path)
    try:
        kind = fs.get_file_info(p).type
        if kind == pafs.FileType.Directory:
            fs.delete_dir(p)
        elif kind == pafs.FileType.File:
            fs.delete_file(p)
    except OSError as e:
        raise _where(path, "delete", e) from None


def upload(local: str, dest: str) -> None:
    """Copy a local file or directory tree to `dest` (a local path or a URI), replacing files of the same name."""
    import pyarrow.fs as pafs

    if not is_remote(dest):
        if os.path.abspath(local) == os.path.abspath(dest):
            return
        if os.path.isdir(local):
            shutil.copytree(local, dest, dirs_exist_ok=True)
        else:
            os.makedirs(os.path.dirname(os.path.abspath(dest)), exist_ok=True)
            shutil.copy2(local, dest)
        return
    fs, p = _fs(dest)
    try:
        if os.path.isdir(local):
            pafs.copy_files(local, p, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
        else:
            with open(local, "rb") as src, fs.open_output_stream(p) as out:
                shutil.copyfileobj(src, out, 8 << 20)
    except OSError as e:
        raise _where(dest, "upload to", e) from None


def download(src: str, local: str, skip: tuple[str, ...] = ()) -> None:
    """Copy the file or directory tree at `src` to the local path `local`. Files whose path under `src`
    matches a pattern in `skip` (fnmatch) are left out: a checkpoint's optimizer states, for instance."""
    import pyarrow.fs as pafs

    fs, p = _fs(src)
    try:
        info = fs.get_file_info(p)
        if info.type == pafs.FileType.NotFound:
            raise FileNotFoundError(src)
        if info.type == pafs.FileType.File:
            os.makedirs(os.path.dirname(os.path.abspath(local)), exist_ok=True)
            with fs.open_input_stream(p) as f, open(local, "wb") as out:
                shutil.copyfileobj(f, out, 8 << 20)
            return
        for entry in fs.get_file_info(pafs.FileSelector(p, recursive=True)):
            if entry.type != pafs.FileType.File:
                continue
            rel = entry.path[len(p.rstrip("/")) + 1 :]
            if any(fnmatch.fnmatch(rel, pat) for pat in skip):
                continue
            target = os.path.join(local, rel)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            with fs.open_input_stream(entry.path) as f, open(target, "wb") as out:
                shutil.copyfileobj(f, out, 8 << 20)
    except FileNotFoundError:
        raise
    except OSError as e:
        raise _where(src, "download", e) from None


@contextlib.contextmanager
def local_copy(path: str, skip: tuple[str, ...] = ()) -> Iterator[str]:
    """`path` itself when it is local; else a temporary local copy of it (removed afterwards)."""
    if not is_remote(path):
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="rayft-dl-") as tmp:
        local = os.path.join(tmp, basename(path) or "data")
        download(path, local, skip)
        yield local


@contextlib.contextmanager
def staged(dest: str) -> Iterator[str]:
    """A local directory whose contents end up at `dest`: `dest` itself when it is local; else a temporary
    directory uploaded to `dest` when the block ends without an error (nothing is uploaded after an error)."""
    if not is_remote(dest):
        os.makedirs(dest, exist_ok=True)
        yield dest
        return
    with tempfile.TemporaryDirectory(prefix="rayft-up-") as tmp:
        yield tmp
        upload(tmp, dest)


def move_aside(path: str, dest: str) -> None:
    """Move a run directory out of the way (--restart): a rename locally, copy-then-delete on object stores."""
    if not is_remote(path):
        os.replace(path, dest)
        return
    import pyarrow.fs as pafs

    fs, p = _fs(path)
    _, d = _fs(dest)
    try:
        pafs.copy_files(p, d, source_filesystem=fs, destination_filesystem=fs)
        fs.delete_dir(p)
    except OSError as e:
        raise _where(path, "move aside", e) from None


def tree_fingerprint(path: str) -> str:
    """A short hash of every file's name, size and modification time under `path`: it changes when a file
    is rewritten (a re-export to the same place), so a cached copy is never stale."""
    import hashlib

    import pyarrow.fs as pafs

    fs, p = _fs(path)
    try:
        infos = fs.get_file_info(pafs.FileSelector(p, recursive=True))
    except OSError as e:
        raise _where(path, "list", e) from None
    h = hashlib.sha256()
    for i in sorted(infos, key=lambda i: i.path):
        if i.type == pafs.FileType.File:
            h.update(f"{i.path}\0{i.size}\0{i.mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def cache_dir() -> str:
    return os.environ.get("RAYFT_REMOTE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "rayft", "remote")


def cache_limit_bytes() -> int:
    """How much the node's copies of cloud models and adapters may hold (RAYFT_REMOTE_CACHE_GIB, default 50 GiB):
    past it, the copies used longest ago are removed."""
    return int(float(os.environ.get("RAYFT_REMOTE_CACHE_GIB", "50")) * 1024**3)


def _tree_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, n)) for d, _, names in os.walk(path) for n in names)


def _evict(keep: str) -> list[str]:
    """Remove the least recently used copies until the cache fits its limit (never `keep`, the one in use now);
    the copies removed. A copy removed under a replica that still names it is downloaded again at its next use."""
    import fcntl

    root, limit = cache_dir(), cache_limit_bytes()
    with open(os.path.join(root, ".evict.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        entries = [os.path.join(root, n) for n in os.listdir(root) if not n.startswith(".") and not n.endswith(".lock")]
        sizes = {e: _tree_bytes(e) for e in entries if os.path.isdir(e)}
        total, removed = sum(sizes.values()), []
        for entry in sorted(sizes, key=lambda e: os.stat(e).st_mtime):  # least recently used first
            if total <= limit:
                break
            if entry == keep:
                continue
            shutil.rmtree(entry, ignore_errors=True)
            total -= sizes[entry]
            removed.append(entry)
        return removed


def cached(path: str) -> str:
    """A local copy of the model or adapter directory at `path`, downloaded once per machine: every replica
    and evaluation actor on a node shares it (a lock file keeps concurrent first uses to one download). A
    local `path` is returned as it is."""
    if not is_remote(path):
        return path
    import fcntl
    import hashlib

    key = hashlib.sha256(path.encode()).hexdigest()[:12]
    target = os.path.join(cache_dir(), f"{basename(path)}-{key}-{tree_fingerprint(path)}")
    if os.path.isdir(target):
        os.utime(target)  # used now: the last to go when the cache is over its limit
        return target
    os.makedirs(cache_dir(), exist_ok=True)
    with open(target + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not os.path.isdir(target):
            tmp = tempfile.mkdtemp(prefix=".download-", dir=cache_dir())
            try:
                download(path, tmp)
                os.replace(tmp, target)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            _evict(keep=target)
    return target
