"""Runs a python grader's ``grade(sample, item)`` in a separate, limited process.

The parent side (:func:`run_in_sandbox`) starts one worker process per batch: ``python -I -B grader_sandbox.py``
with a scrubbed environment, a fresh temp dir (mode 700) as its cwd and HOME, stdin/stdout as a JSON-lines pipe
and stderr to a private log file. The worker sets its limits, loads the grader's source once, then grades the
samples one by one. The parent waits for each answer with a wall-clock deadline; a worker that misses it is
killed by pid (SIGKILL, then its own session), that sample is scored as a timeout, and a fresh worker takes the
rest of the batch. The temp dir is deleted when the worker ends.

What is enforced, in the order the worker applies it:

- **Resource limits** (``resource.setrlimit``, kernel-enforced): address space (``RLIMIT_AS``: an allocation
  past it is a ``MemoryError`` inside ``grade``), CPU seconds for the worker's life (``RLIMIT_CPU``: start-up
  budget plus the per-sample timeout times the samples it may grade; the kernel kills it past that), the size of
  any one file it writes (``RLIMIT_FSIZE``), no core dumps. The per-sample limit is the wall-clock deadline.
- **No network**: the worker enters a new, empty network namespace (``unshare(CLONE_NEWNET)``; as non-root with
  ``CLONE_NEWUSER`` as well) where the kernel allows it; nothing, not even 127.0.0.1, is reachable from there.
- **Not root**: a worker started by root drops to ``nobody`` (uid/gid 65534) when the Python install is
  readable by others (else it would no longer import the standard library); its temp dir is handed to nobody.
- **Landlock** (Linux >= 5.13, where the kernel enables it): creating, writing, truncating, renaming or removing
  files is refused everywhere except beneath the temp dir (and writing /dev/null); TCP bind/connect are refused
  (ABI >= 4); signals to processes outside the sandbox and abstract unix sockets are refused (ABI >= 6).
  ``no_new_privs`` is set first. Landlock is kernel-enforced, and every process the worker could start inherits
  it, so it holds even against code that gets past the audit hook below.
- **An audit hook** (``sys.addaudithook``), installed before the grader's source runs: it refuses opening a file
  for writing outside the temp dir (``os.open`` writes need an absolute path, since the hook does not see
  ``dir_fd``), removing/renaming/chmod-ing/... paths outside it, every ``socket.*`` event, ``subprocess.Popen``,
  ``os.system``, ``os.exec*``, ``os.spawn*``, ``os.posix_spawn``, ``os.fork``/``forkpty``, ``os.kill``,
  ``resource.setrlimit``, sqlite databases outside the temp dir, importing ``ctypes``/``cffi``, and every
  ``ctypes.*`` event (so a ctypes module already loaded is useless too).

What is *not* enforced: an audit hook is not a security boundary. C extensions can make system calls without
raising audit events (``_posixsubprocess.fork_exec`` starts a process; ``os.mkfifo`` has no event); where
Landlock and the network namespace are missing, such code can write files the worker's user may write and reach
the network. Reading files is not restricted beyond the worker user's permissions (a root worker that could not
drop to nobody can read what root reads). ``RLIMIT_FSIZE`` limits each file, not the disk used in total. A
process started around the hook can leave the worker's session and outlive it.

Start-up cost, measured on the development machine (2 cores under load, Python 3.11, Linux 6.18, root, every
layer applied; median of 15): 47 ms to grade one sample in a fresh worker, against 17 ms for a bare
``python -I -c pass``; a grader importing numpy, 117 ms. After start-up a sample costs about 0.1 ms of round trip:
100 trivial samples took 53 ms in one worker. Hence one worker per batch, and a fresh one only after a sample
had to be stopped.
"""

from __future__ import annotations

import json
import os
import sys

# Limits of OpenAI's python graders, which rayft keeps: the source is at most 256 KB.
MAX_SOURCE_BYTES = 256 * 1024

_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
_NOBODY = 65534


# ---------------------------------------------------------------------------------------------------------------
# Parse-time checks (parent side; nothing runs).


def check_grader_source(source: str) -> list[str]:
    """Problems with a python grader's source, for people; empty when it is usable.

    The source must be at most 256 KB, compile, and define at top level ``def grade(sample, item)`` callable with
    two positional arguments. Nothing is executed."""
    import ast

    size = len(source.encode("utf-8"))
    if size > MAX_SOURCE_BYTES:
        return [f"is {size / 1024:.0f} KB; a python grader's source may be at most 256 KB"]
    try:
        tree = ast.parse(source, filename="<grader>")
        compile(tree, "<grader>", "exec")
    except SyntaxError as e:
        where = f"line {e.lineno}" + (f", column {e.offset}" if e.offset else "")
        return [f"does not compile: {e.msg} ({where})"]
    except ValueError as e:  # e.g. a NUL byte in the source
        return [f"does not compile: {e}"]
    grade = [n for n in tree.body if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef) and n.name == "grade"]
    if not grade:
        return ["defines no top-level `def grade(sample, item) -> float`; OpenAI's python graders call grade()"]
    fn = grade[-1]
    if isinstance(fn, ast.AsyncFunctionDef):
        return [f"line {fn.lineno}: grade must be a plain function (`def`), not `async def`"]
    positional = [*fn.args.posonlyargs, *fn.args.args]
    required = len(positional) - len(fn.args.defaults)
    required_kwonly = sum(1 for d in fn.args.kw_defaults if d is None)
    if required > 2 or required_kwonly or (len(positional) < 2 and fn.args.vararg is None):
        return [f"line {fn.lineno}: grade must take exactly two arguments, grade(sample, item)"]
    return []


# ---------------------------------------------------------------------------------------------------------------
# Parent side.


class SandboxLimits:
    """Limits of one python grader's sandbox.

    timeout_s: wall-clock seconds one sample's grade() may take. memory_mb: address space of the worker
    (RLIMIT_AS). file_size_mb: largest file it may write (RLIMIT_FSIZE). startup_timeout_s: wall-clock seconds to
    start and run the source's top level. startup_cpu_s: CPU seconds for that start."""

    __slots__ = ("timeout_s", "memory_mb", "file_size_mb", "startup_timeout_s", "startup_cpu_s")

    def __init__(
        self,
        timeout_s: float = 30.0,
        memory_mb: int = 2048,
        file_size_mb: int = 1024,
        startup_timeout_s: float = 20.0,
        startup_cpu_s: int = 20,
    ) -> None:
        self.timeout_s = float(timeout_s)
        self.memory_mb = int(memory_mb)
        self.file_size_mb = int(file_size_mb)
        self.startup_timeout_s = float(startup_timeout_s)
        self.startup_cpu_s = int(startup_cpu_s)

    def with_timeout(self, timeout_s: float) -> SandboxLimits:
        return SandboxLimits(timeout_s, self.memory_mb, self.file_size_mb, self.startup_timeout_s, self.startup_cpu_s)

    def __repr__(self) -> str:
        return (
            f"SandboxLimits(timeout_s={self.timeout_s}, memory_mb={self.memory_mb}, "
            f"file_size_mb={self.file_size_mb}, startup_timeout_s={self.startup_timeout_s}, "
            f"startup_cpu_s={self.startup_cpu_s})"
        )


class SandboxOutcome:
    """What grading one sample in the sandbox gave.

    error is None (score holds the finite grade), "runtime" (grade() raised, returned something that is not a
    finite number, or hit a limit), "timeout" (no answer within timeout_s: the worker was killed) or "server"
    (the sandbox itself failed: the worker could not start or died for a reason of its own)."""

    __slots__ = ("score", "error", "details", "seconds")

    def __init__(self, score: float | None, error: str | None, details: str | None, seconds: float) -> None:
        self.score = score
        self.error = error
        self.details = details
        self.seconds = seconds

    def __repr__(self) -> str:
        return f"SandboxOutcome(score={self.score}, error={self.error!r}, details={self.details!r})"


class _WorkerGone(Exception):
    """The worker closed its pipe (it exited or was killed)."""


class _Worker:
    """One worker process and its temp dir, log and pipes."""

    def __init__(self, source: str, limits: SandboxLimits, n_samples: int, audit_hook: bool = True) -> None:
        import subprocess
        import tempfile

        self.tmpdir = tempfile.mkdtemp(prefix="rayft-grader-")
        self.log = tempfile.TemporaryFile()  # outside the sandbox dir: the worker holds only the open fd
        self._buf = b""
        env = {
            "PATH": os.defpath,
            "HOME": self.tmpdir,
            "TMPDIR": self.tmpdir,
            "LANG": "C.UTF-8",
            "LC_ALL": "C.UTF-8",
            # numerical libraries start one thread per core by default; each reserves address space (RLIMIT_AS)
            "OPENBLAS_NUM_THREADS": "1",
            "OMP_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1",
        }
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-I", "-B", os.path.abspath(__file__)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=self.log,
                cwd=self.tmpdir,
                env=env,
                close_fds=True,
                start_new_session=True,
            )
        except BaseException:
            self._remove_dir()
            self.log.close()
            raise
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self._in = self.proc.stdin.fileno()
        self._out = self.proc.stdout.fileno()
        os.set_blocking(self._in, False)
        cpu_s = limits.startup_cpu_s + int(limits.timeout_s + 1) * n_samples
        self.config = {
            "source": source,
            "tmpdir": self.tmpdir,
            "memory_mb": limits.memory_mb,
            "file_size_mb": limits.file_size_mb,
            "cpu_s": cpu_s,
            "audit_hook": audit_hook,
        }

    def send(self, message: dict, deadline: float) -> None:
        import select
        import time

        data = (json.dumps(message, default=str) + "\n").encode()
        view = memoryview(data)
        while view:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError
            _, writable, _ = select.select([], [self._in], [], remaining)
            if not writable:
                continue
            try:
                n = os.write(self._in, view)
            except (BrokenPipeError, ConnectionResetError) as e:
                raise _WorkerGone from e
            except BlockingIOError:
                continue
            view = view[n:]

    def receive(self, deadline: float) -> dict:
        """The worker's next message; TimeoutError past the deadline, _WorkerGone when the pipe closes."""
        import select
        import time

        while b"\n" not in self._buf:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError
            readable, _, _ = select.select([self._out], [], [], remaining)
            if not readable:
                continue
            chunk = os.read(self._out, 1 << 16)
            if not chunk:
                raise _WorkerGone
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return json.loads(line)

    def death(self) -> str:
        """Why the worker ended, for people (waits for it)."""
        import signal

        try:
            code = self.proc.wait(timeout=5)
        except Exception:
            return "the grader process did not exit"
        if code >= 0:
            reason = f"the grader process exited with status {code}"
        else:
            sig = -code
            name = signal.Signals(sig).name if sig in signal.Signals._value2member_map_ else f"signal {sig}"
            reason = {
                "SIGXCPU": "the grader process used up its CPU time (RLIMIT_CPU) and the kernel stopped it",
                "SIGKILL": "the grader process was killed (SIGKILL; out of memory?)",
                "SIGSEGV": "the grader process crashed (SIGSEGV)",
            }.get(name, f"the grader process was killed by {name}")
        tail = self.log_tail()
        return f"{reason}; its last output: {tail}" if tail else reason

    def log_tail(self, limit: int = 1500) -> str:
        try:
            self.log.seek(0, os.SEEK_END)
            size = self.log.tell()
            self.log.seek(max(0, size - limit))
            return self.log.read().decode("utf-8", "replace").strip()
        except (OSError, ValueError):
            return ""

    def kill(self) -> None:
        """Stops the worker by its pid (then anything left in its own session), waits for it."""
        import signal

        if self.proc.poll() is None:
            try:
                os.kill(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # its session (start_new_session): pgid == its pid
        except (ProcessLookupError, PermissionError):
            pass
        try:
            self.proc.wait(timeout=10)
        except Exception:
            pass

    def close(self) -> None:
        self.kill()
        for stream in (self.proc.stdin, self.proc.stdout):
            try:
                if stream is not None:
                    stream.close()
            except OSError:
                pass
        self.log.close()
        self._remove_dir()

    def _remove_dir(self) -> None:
        import shutil

        shutil.rmtree(self.tmpdir, ignore_errors=True)


def run_in_sandbox(
    source: str,
    payloads: list[tuple[dict, dict]],
    limits: SandboxLimits | None = None,
    *,
    audit_hook: bool = True,
) -> tuple[list[SandboxOutcome], list[str]]:
    """Grades each (sample, item) with the source's grade() in sandboxed worker processes.

    Returns one outcome per payload, in order, and the isolation layers the (last) worker applied. Never raises
    for anything the grader does: a failure is in the outcome. audit_hook=False leaves out the audit hook, only to
    test that the kernel-enforced layers hold by themselves."""
    import time

    limits = limits or SandboxLimits()
    outcomes: list[SandboxOutcome | None] = [None] * len(payloads)
    isolation: list[str] = []
    i = 0
    while i < len(payloads):
        t0 = time.monotonic()
        try:
            worker = _Worker(source, limits, len(payloads) - i, audit_hook)
        except Exception as e:
            details = f"could not start the grader process: {type(e).__name__}: {e}"
            for j in range(i, len(payloads)):
                outcomes[j] = SandboxOutcome(None, "server", details, 0.0)
            break
        try:
            ready: dict | None = None
            failure: SandboxOutcome | None = None
            try:
                deadline = time.monotonic() + limits.startup_timeout_s
                worker.send(worker.config, deadline)
                ready = worker.receive(deadline)
            except TimeoutError:
                failure = SandboxOutcome(
                    None,
                    "timeout",
                    f"the grader's source did not finish loading within {limits.startup_timeout_s:g} s "
                    "(its top-level code runs before any sample)",
                    time.monotonic() - t0,
                )
            except _WorkerGone:
                failure = SandboxOutcome(None, "server", worker.death(), time.monotonic() - t0)
            if ready is not None and not ready.get("ready"):
                failure = SandboxOutcome(None, "runtime", ready.get("details"), time.monotonic() - t0)
            if failure is not None:
                # The source itself fails (or the sandbox cannot start): every remaining sample fails alike.
                for j in range(i, len(payloads)):
                    outcomes[j] = failure
                break
            assert ready is not None
            isolation = list(ready.get("isolation", []))
            while i < len(payloads):
                sample, item = payloads[i]
                t0 = time.monotonic()
                deadline = t0 + limits.timeout_s
                try:
                    worker.send({"sample": sample, "item": item}, deadline)
                    reply = worker.receive(deadline)
                except TimeoutError:
                    outcomes[i] = SandboxOutcome(
                        None,
                        "timeout",
                        f"grade() did not return within {limits.timeout_s:g} s; the grader process was stopped",
                        time.monotonic() - t0,
                    )
                    i += 1
                    break  # a fresh worker takes the rest
                except _WorkerGone:
                    outcomes[i] = SandboxOutcome(None, "runtime", worker.death(), time.monotonic() - t0)
                    i += 1
                    break
                seconds = time.monotonic() - t0
                if "score" in reply:
                    outcomes[i] = SandboxOutcome(float(reply["score"]), None, None, seconds)
                else:
                    outcomes[i] = SandboxOutcome(None, "runtime", reply.get("details"), seconds)
                i += 1
        finally:
            worker.close()
    return [o if o is not None else SandboxOutcome(None, "server", "not graded", 0.0) for o in outcomes], isolation


def probe_sandbox(limits: SandboxLimits | None = None) -> dict:
    """Starts one worker with a trivial grader: its isolation layers and the seconds from spawn to its answer."""
    import time

    t0 = time.monotonic()
    outcomes, isolation = run_in_sandbox("def grade(sample, item):\n    return 1.0\n", [({}, {})], limits)
    return {"isolation": isolation, "seconds": time.monotonic() - t0, "ok": outcomes[0].score == 1.0}


# ---------------------------------------------------------------------------------------------------------------
# Worker side: runs as `python -I -B grader_sandbox.py`, standard library only.


def _set_limits(config: dict) -> list[str]:
    import resource
    import signal

    mib = 1024 * 1024
    layers = []
    for name, value in (
        ("RLIMIT_AS", config["memory_mb"] * mib),
        ("RLIMIT_FSIZE", config["file_size_mb"] * mib),
        ("RLIMIT_CPU", config["cpu_s"]),
        ("RLIMIT_CORE", 0),
    ):
        limit = getattr(resource, name)
        _, hard = resource.getrlimit(limit)
        if hard != resource.RLIM_INFINITY and hard < value:
            value = hard
        resource.setrlimit(limit, (value, value))
        layers.append(f"{name}={value}")
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a too-large write fails (EFBIG) instead of killing the worker
    return layers


def _libc():  # ctypes is imported here only, before the audit hook forbids it
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    return ctypes, libc


def _leave_network() -> str:
    clone_newnet, clone_newuser = 0x40000000, 0x10000000
    unshare = getattr(os, "unshare", None)  # Python >= 3.12
    for flags, label in ((clone_newnet, "network namespace"), (clone_newuser | clone_newnet, "user+network ns")):
        try:
            if unshare is not None:
                unshare(flags)
            else:
                ctypes, libc = _libc()
                if libc.unshare(ctypes.c_int(flags)) != 0:
                    continue
            return label
        except (OSError, AttributeError):
            continue
    return "no network namespace (not permitted here)"


def _others_can_read(path: str) -> bool:
    import stat

    path = os.path.realpath(path)
    try:
        if not os.stat(path).st_mode & stat.S_IROTH:
            return False
        while True:
            if not os.stat(path).st_mode & stat.S_IXOTH:
                return False
            parent = os.path.dirname(path)
            if parent == path:
                return True
            path = parent
    except OSError:
        return False


def _drop_root(tmpdir: str) -> str:
    if os.geteuid() != 0:
        return f"uid {os.geteuid()}"
    stdlib = os.path.dirname(os.__file__)
    roots = [stdlib, *[p for p in sys.path if p and os.path.isdir(p)]]
    if not all(_others_can_read(p) for p in roots):
        return "still root (the Python install is not readable by other users, so it could not import)"
    os.chown(tmpdir, _NOBODY, _NOBODY)
    os.setgroups([])
    os.setgid(_NOBODY)
    os.setuid(_NOBODY)
    return "uid nobody"


def _landlock(tmpdir: str) -> str:
    """Kernel-enforced: no file creation/writes outside tmpdir, no TCP, no signals out of the sandbox."""
    if not sys.platform.startswith("linux"):
        return "no landlock (not Linux)"
    try:
        ctypes, libc = _libc()
    except OSError:
        return "no landlock (no libc)"
    c_u32, c_u64, c_int, c_size = ctypes.c_uint32, ctypes.c_uint64, ctypes.c_int, ctypes.c_size_t
    create, add_rule, restrict = 444, 445, 446  # same numbers on x86_64 and arm64
    abi = libc.syscall(create, None, c_size(0), c_u32(1))  # LANDLOCK_CREATE_RULESET_VERSION
    if abi < 1:
        return "no landlock (kernel without it)"
    write_file, truncate = 1 << 1, 1 << 14
    fs = write_file | sum(1 << b for b in range(4, 13))  # remove dir/file, make char/dir/reg/sock/fifo/block/sym
    if abi >= 2:
        fs |= 1 << 13  # refer (cross-directory links and renames)
    if abi >= 3:
        fs |= truncate
    net = 0b11 if abi >= 4 else 0  # bind_tcp | connect_tcp, with no rule allowing any port
    scoped = 0b11 if abi >= 6 else 0  # abstract unix sockets | signals

    class RulesetAttr(ctypes.Structure):
        _fields_ = [("fs", c_u64), ("net", c_u64), ("scoped", c_u64)]

    class PathBeneath(ctypes.Structure):
        _pack_ = 1
        _fields_ = [("allowed", c_u64), ("parent_fd", ctypes.c_int32)]

    size = 24 if abi >= 6 else 16 if abi >= 4 else 8
    ruleset = libc.syscall(create, ctypes.byref(RulesetAttr(fs, net, scoped)), c_size(size), c_u32(0))
    if ruleset < 0:
        return f"no landlock (create_ruleset: {os.strerror(ctypes.get_errno())})"
    try:
        rules = [(tmpdir, fs), ("/dev/null", write_file | (truncate if abi >= 3 else 0))]
        for path, allowed in rules:
            fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
            try:
                if libc.syscall(add_rule, c_int(ruleset), c_int(1), ctypes.byref(PathBeneath(allowed, fd)), c_u32(0)):
                    if path == tmpdir:
                        return f"no landlock (add_rule: {os.strerror(ctypes.get_errno())})"
            finally:
                os.close(fd)
        if libc.prctl(c_int(38), ctypes.c_ulong(1), ctypes.c_ulong(0), ctypes.c_ulong(0), ctypes.c_ulong(0)):
            return "no landlock (no_new_privs refused)"
        if libc.syscall(restrict, c_int(ruleset), c_u32(0)):
            return f"no landlock (restrict_self: {os.strerror(ctypes.get_errno())})"
    finally:
        os.close(ruleset)
    return f"landlock ABI {abi}"


def _die_with_parent() -> None:
    if sys.platform.startswith("linux"):
        try:
            ctypes, libc = _libc()
            libc.prctl(ctypes.c_int(1), ctypes.c_ulong(9), ctypes.c_ulong(0), ctypes.c_ulong(0), ctypes.c_ulong(0))
        except OSError:
            pass


def _install_audit_hook(tmpdir: str) -> None:
    root = os.path.realpath(tmpdir)
    refused = {
        "subprocess.Popen": "starting a process",
        "os.system": "starting a process",
        "os.exec": "starting a process",
        "os.posix_spawn": "starting a process",
        "os.spawn": "starting a process",
        "os.fork": "starting a process",
        "os.forkpty": "starting a process",
        "pty.spawn": "starting a process",
        "os.kill": "sending a signal",
        "os.killpg": "sending a signal",
        "signal.pthread_kill": "sending a signal",
        "resource.setrlimit": "changing resource limits",
        "resource.prlimit": "changing resource limits",
    }
    blocked_modules = {"ctypes", "_ctypes", "cffi", "_cffi_backend"}
    # event -> ((path arg index, dir_fd arg index or None), ...): each path must lie in the temp dir
    mutating: dict[str, tuple[tuple[int, int | None], ...]] = {
        "os.remove": ((0, 1),),
        "os.rmdir": ((0, 1),),
        "os.mkdir": ((0, 2),),
        "os.rename": ((0, 2), (1, 3)),
        "os.link": ((1, 3),),
        "os.symlink": ((1, 2),),
        "os.chmod": ((0, 2),),
        "os.chown": ((0, 3),),
        "os.utime": ((0, 3),),
        "os.truncate": ((0, None),),
        "os.chflags": ((0, None),),
        "os.lchflags": ((0, None),),
        "os.setxattr": ((0, None),),
        "os.removexattr": ((0, None),),
        "shutil.rmtree": ((0, 1),),
        "shutil.chown": ((0, None),),
    }

    def inside(path: object, dir_fd: object = None) -> bool:
        if isinstance(path, int):
            return False
        base = os.getcwd()
        if isinstance(dir_fd, int) and dir_fd >= 0:
            base = os.readlink(f"/proc/self/fd/{dir_fd}")
        real = os.path.realpath(os.path.join(base, os.fsdecode(path)))  # type: ignore[arg-type]
        return real == root or real.startswith(root + os.sep) or real == "/dev/null"

    def refuse(what: str) -> PermissionError:
        return PermissionError(f"rayft grader sandbox: {what} is not allowed")

    def hook(event: str, args: tuple) -> None:
        if event == "open":
            path, mode, flags = args[0], args[1], args[2] if len(args) > 2 else 0
            writes = (isinstance(mode, str) and any(c in mode for c in "wax+")) or bool((flags or 0) & _WRITE_FLAGS)
            if not writes or isinstance(path, int):
                return
            if mode is None and not os.path.isabs(os.fsdecode(path)):
                raise refuse(f"os.open for writing with a relative path ({path!r}; use an absolute path)")
            try:
                ok = inside(path)
            except Exception:
                ok = False
            if not ok:
                raise refuse(f"writing {path!r} (outside the grader's temp dir)")
        elif event == "import":
            if args[0].partition(".")[0] in blocked_modules:
                raise ImportError(f"rayft grader sandbox: importing {args[0]} is not allowed")
        elif event.startswith(("socket.", "ctypes.")):
            raise refuse("the network" if event.startswith("socket.") else "ctypes")
        elif event in refused:
            raise refuse(refused[event])
        elif event in mutating:
            for path_at, fd_at in mutating[event]:
                if path_at >= len(args):
                    continue
                fd = args[fd_at] if fd_at is not None and fd_at < len(args) else None
                if event == "os.truncate" and isinstance(args[0], int):
                    continue  # ftruncate of a descriptor the grader opened for writing (already checked)
                try:
                    ok = inside(args[path_at], fd)
                except Exception:
                    ok = False
                if not ok:
                    raise refuse(f"{event} on {args[path_at]!r} (outside the grader's temp dir)")
        elif event == "sqlite3.connect":
            database = args[0]
            if database not in (":memory:", "", b":memory:", b"") and not inside(database):
                raise refuse(f"opening the database {database!r} (outside the grader's temp dir)")

    sys.addaudithook(hook)


def _write(fd: int, message: dict) -> None:
    data = memoryview((json.dumps(message) + "\n").encode())
    while data:
        data = data[os.write(fd, data) :]


def _worker_main() -> None:
    import math
    import numbers
    import traceback

    proto = os.dup(1)  # the protocol; fd 1 (prints, C-level writes) goes to the log instead
    os.dup2(2, 1)
    config = json.loads(sys.stdin.buffer.readline())
    tmpdir = config["tmpdir"]
    os.umask(0o077)
    os.chdir(tmpdir)
    isolation = ["separate process", *_set_limits(config)]
    _die_with_parent()
    isolation.append(_leave_network())
    isolation.append(_drop_root(tmpdir))
    isolation.append(_landlock(tmpdir))
    for name in [m for m in sys.modules if m == "ctypes" or m.startswith(("ctypes.", "_ctypes"))]:
        del sys.modules[name]  # a later `import ctypes` must reach the audit hook
    if config.get("audit_hook", True):
        _install_audit_hook(tmpdir)
        isolation.append("audit hook")

    def details(e: BaseException) -> str:
        # The grader's own frames and the error: the sandbox's frames (its loop, the audit hook) are noise here.
        frames = [f for f in traceback.extract_tb(e.__traceback__) if f.filename == "<grader>"]
        text = "".join(traceback.format_list(frames)) + "".join(traceback.format_exception_only(type(e), e))
        return text.strip()[-2000:]

    source = config["source"]
    import linecache

    linecache.cache["<grader>"] = (len(source), None, source.splitlines(True), "<grader>")
    namespace: dict = {"__name__": "__grader__"}
    try:
        exec(compile(source, "<grader>", "exec"), namespace)
        grade = namespace.get("grade")
        if not callable(grade):
            raise TypeError("the source defines no callable grade(sample, item)")
    except BaseException as e:  # the grader's top level failed: report it, do not grade
        _write(proto, {"ready": False, "details": f"loading the grader failed: {details(e)}"})
        return
    _write(proto, {"ready": True, "isolation": isolation})

    while True:
        line = sys.stdin.buffer.readline()
        if not line:
            return
        request = json.loads(line)
        try:
            value = grade(request["sample"], request["item"])
            if not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
                raise TypeError(f"grade() must return a finite number, not {value!r:.200}")
            reply = {"score": float(value)}
        except MemoryError as e:
            limit = f"the grader's memory limit is {config['memory_mb']} MiB"
            reply = {"error": "runtime", "details": f"{details(e)} ({limit})"}
        except BaseException as e:  # SystemExit from the grader included: it is the grader's error
            reply = {"error": "runtime", "details": details(e)}
        _write(proto, reply)


if __name__ == "__main__":
    _worker_main()
