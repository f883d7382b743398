"""Run an untrusted Python program in a throw-away, operating-system-isolated sandbox.

Each run is one ``bwrap`` (bubblewrap) call; the isolation is the kernel's, not Python's:

- new mount, PID, network, IPC and UTS namespaces (``--unshare-*``): no network of any kind
  (only a loopback device of its own; abstract Unix sockets are per network namespace), a
  fresh ``/proc`` that shows only the sandbox's own processes, and every process it starts dies
  with it (``--die-with-parent``; bwrap is PID 1 of the namespace and the kernel kills the rest
  when it ends);
- a file system that holds only read-only binds of ``/usr`` (with the ``/bin``, ``/lib*``
  links), two files of ``/etc`` and the interpreter's prefixes (``sys.base_prefix`` and the
  virtual environment's ``sys.prefix``), a minimal ``/dev``, and a private writable tmpfs
  (``/sandbox``: working directory, ``HOME``, ``TMPDIR``) capped at ``file_mb`` + 1 MiB. The
  host's ``/tmp``, Ray's temporary folder (and its sockets), the run folder and the home
  directory are not there;
- an unprivileged user (uid/gid 65534) with no capabilities and ``no_new_privs``: run as root,
  bwrap keeps the host's user namespace and ``setpriv`` drops to 65534 before the interpreter
  starts (so the kernel enforces ``RLIMIT_NPROC``, which it never does for root, also not for a
  uid mapped to root); run as another user, bwrap maps 65534 to that user in a new user namespace;
- resource limits set before the program runs: CPU seconds, address space, file size, processes
  (``RLIMIT_NPROC`` = 0 extra processes or threads by default), no core dumps;
- the harness (:mod:`sft_ray.verifiers.harness`, run as the interpreter's ``-c`` source) reads its
  input from inherited file descriptors and closes them before any untrusted code runs, then
  installs an audit hook that denies sockets, process creation, signals, ``ctypes``, tracing, the
  garbage collector's object walks and ``/proc/*/mem`` from Python (a second layer, with a clean
  ``PermissionError``);
- for HumanEval / MBPP-style tests (:func:`run_checked`), two sandboxes: the program's module code
  and its entry point in one, the test in the other (the checker), the entry point called across
  a pipe as plain data. The checker never executes the program's code and the program's process
  never holds the test, the expected values or the per-run nonce; only when the checks returned,
  the pipe unbroken, does the checker's harness write the nonce to a pipe the parent reads (the
  proof that the checks ran). Exiting early or between calls, hanging, answering out of turn or
  flooding the pipe leaves no proof;
- its own process group (session), killed whole when the run ends or its wall-clock deadline
  passes; output read up to a byte cap.

Memory is bounded per process (``RLIMIT_AS``); with the default of no extra processes there is
one process per sandbox, so that bounds it. cgroups are not used (see docs/sandbox.md).

Without bwrap (or on a kernel that refuses its namespaces) :func:`require` raises
:class:`SandboxUnavailable`; ``verifier.sandbox: none`` runs the same harness without the
operating-system layer (unsafe: trusted code only).

Runs are asyncio subprocesses bounded by a semaphore (``workers``, default one per core),
so thousands of rows can be scored from one event loop.
"""

from __future__ import annotations

import asyncio
import functools
import json
import math
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from sft_ray.verifiers import harness

SANDBOX_UID = 65534  # "nobody" on Debian and most distributions
WORKDIR = "/sandbox"
INSTALL_HINT = "install bubblewrap on every node that scores (Debian/Ubuntu: `sudo apt-get install -y bubblewrap`)"

# What every sandboxed interpreter runs first (the file's source, its roles: see its doc).
HARNESS = Path(harness.__file__).read_text()
EARLY_EXIT_CODE = harness.EARLY_EXIT


class SandboxUnavailable(RuntimeError):
    """This node cannot isolate programs (no bwrap, or the kernel refuses its namespaces)."""


class SandboxFailure(RuntimeError):
    """One run's sandbox failed before the program ran: no verdict (the row is a ``verifier_error``)."""


@dataclass(frozen=True)
class Limits:
    cpu_s: float = 10.0
    memory_mb: int = 1024
    file_mb: int = 16
    max_output_bytes: int = 1 << 20
    processes: int = 0  # extra processes or threads (RLIMIT_NPROC); 0: none

    @property
    def wall_s(self) -> float:
        """Wall-clock deadline: CPU time plus room for a loaded machine (a sleeping program ends here)."""
        return 2 * self.cpu_s + 5


@dataclass
class RunResult:
    returncode: int | None  # the program's; in check mode the checker's (0: the checks returned)
    stdout: bytes  # the program's
    stderr: bytes
    timed_out: bool
    output_limited: bool
    wall_s: float
    proof: bool = False  # check mode: the checker's harness saw the checks return, the pipe unbroken
    exited_before_checks: bool = False  # check mode: the program ended of its own accord before the checks did

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out and not self.output_limited


def _interpreter_binds() -> list[str]:
    """bwrap arguments for a read-only view of what the interpreter needs, and nothing else."""
    args = ["--ro-bind", "/usr", "/usr"]
    for d in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        if os.path.islink(d):
            args += ["--symlink", os.readlink(d), d]
        elif os.path.isdir(d):
            args += ["--ro-bind", d, d]
    for f in ("/etc/ld.so.cache", "/etc/localtime"):
        if os.path.exists(f):
            args += ["--ro-bind", f, f]
    binds: dict[str, str] = {}
    for p in (sys.base_prefix, sys.prefix, os.path.dirname(os.path.realpath(sys.executable))):
        for path in (os.path.realpath(p), os.path.abspath(p)):
            if path == "/usr" or path.startswith("/usr/") or not os.path.isdir(path):
                continue
            if not any(path == b or path.startswith(b + "/") for b in binds):  # not inside one already bound
                binds[path] = os.path.realpath(p)
    # The folders above them, world-searchable (a prefix under /root: the host's /root is 0700; here it
    # holds only the prefix).
    parents = sorted({d for path in binds for d in _parents(path)} - set(binds), key=lambda d: d.count("/"))
    for d in parents:
        args += ["--perms", "0755", "--dir", d]
    for path, src in binds.items():
        args += ["--ro-bind", src, path]
    return args


def _parents(path: str) -> list[str]:
    out = []
    while (path := os.path.dirname(path)) not in ("/", ""):
        out.append(path)
    return out


def bwrap_command(bwrap: str, file_mb: int, root: bool) -> list[str]:
    """The bwrap call (up to and including the interpreter) for one run."""
    if root:
        # Root keeps the host's user namespace (a uid mapped to root escapes RLIMIT_NPROC) and drops to an
        # unprivileged user, without capabilities, before the interpreter starts.
        ns = ["--unshare-ipc", "--unshare-pid", "--unshare-net", "--unshare-uts", "--unshare-cgroup-try"]
        drop = [shutil.which("setpriv") or "setpriv", f"--reuid={SANDBOX_UID}", f"--regid={SANDBOX_UID}", "--clear-groups",
                "--inh-caps=-all", "--bounding-set=-all"]
    else:
        ns = ["--unshare-all", "--uid", str(SANDBOX_UID), "--gid", str(SANDBOX_UID)]
        drop = []
    return [bwrap, *ns, "--die-with-parent", "--new-session", "--hostname", "sandbox", *_interpreter_binds(),
            "--proc", "/proc", "--dev", "/dev", "--perms", "1777", "--size", str((file_mb + 1) << 20),
            "--tmpfs", WORKDIR, "--chdir", WORKDIR, "--", *drop, sys.executable]


@functools.cache
def _bwrap_command(bwrap: str, file_mb: int, root: bool) -> tuple[str, ...]:
    return tuple(bwrap_command(bwrap, file_mb, root))


@functools.cache
def _probe(bwrap: str | None, root: bool) -> str | None:
    """None when a bwrap sandbox starts an interpreter here, else why not. Cached: probed once per process
    (and bwrap path)."""
    if bwrap is None:
        return f"`bwrap` was not found on PATH: {INSTALL_HINT}"
    if root and not shutil.which("setpriv"):
        return "`setpriv` (util-linux) was not found on PATH: install util-linux"
    # The same interpreter as outside (not another python the view happens to show), unprivileged.
    cmd = bwrap_command(bwrap, 1, root) + [
        "-I", "-c", f"import os, sys; sys.exit(os.getuid() == 0 or sys.base_prefix != {sys.base_prefix!r})"]
    try:
        done = subprocess.run(cmd, capture_output=True, timeout=60, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.SubprocessError) as e:
        return f"bwrap ({bwrap}) could not run: {e}; {INSTALL_HINT}"
    if done.returncode != 0:
        err = done.stderr.decode("utf-8", "replace").strip().splitlines()
        return (f"bwrap ({bwrap}) cannot create a sandbox on this node (exit {done.returncode}: "
                f"{err[-1] if err else 'no message'}); it needs user and PID namespaces (on Ubuntu 24.04, "
                "AppArmor's kernel.apparmor_restrict_unprivileged_userns=0 or a bwrap profile)")
    return None


def find_bwrap() -> str | None:
    return shutil.which("bwrap")


def require(sandbox: str = "bwrap") -> None:
    """Raise :class:`SandboxUnavailable` (one line, saying what to install) when ``sandbox`` cannot run here."""
    if sandbox == "none":
        return
    if sandbox != "bwrap":
        raise SandboxUnavailable(f"verifier.sandbox: {sandbox!r} is not `bwrap` or `none`")
    why = _probe(find_bwrap(), os.geteuid() == 0)
    if why:
        raise SandboxUnavailable(f"the code verifier runs programs only in a sandbox: {why} "
                                 "(or set verifier.sandbox: none to run them unisolated: trusted code only)")


_SEMAPHORES: dict[tuple[int, int], asyncio.Semaphore] = {}


def _semaphore(workers: int) -> asyncio.Semaphore:
    """One semaphore per event loop and size: runs in flight across every verifier of the loop."""
    key = (id(asyncio.get_running_loop()), workers)
    if key not in _SEMAPHORES:
        _SEMAPHORES[key] = asyncio.Semaphore(workers)
    return _SEMAPHORES[key]


async def _read_capped(stream: asyncio.StreamReader, cap: int, on_over=None) -> tuple[bytes, bool]:
    """Read to EOF, keeping ``cap`` bytes. Draining on is what lets the process's end be seen
    (asyncio waits for its pipes to close); ``on_over`` is called once when the cap is passed."""
    buf = bytearray()
    over = False
    while True:
        chunk = await stream.read(1 << 16)
        if not chunk:
            return bytes(buf[:cap]), over
        if not over:
            buf += chunk
            if len(buf) > cap:
                over = True
                if on_over is not None:
                    on_over()


async def _drive(proc: asyncio.subprocess.Process, stdin: bytes | None, cap: int) -> tuple[bytes, bytes, bool]:
    async def feed() -> None:
        if proc.stdin is None:
            return
        try:
            if stdin:
                proc.stdin.write(stdin)
                await proc.stdin.drain()
        except (BrokenPipeError, ConnectionResetError):
            pass  # the program did not read its input: its business
        finally:
            proc.stdin.close()

    assert proc.stdout is not None and proc.stderr is not None
    _, (out, over), (err, _) = await asyncio.gather(
        feed(), _read_capped(proc.stdout, cap, lambda: _kill_group(proc.pid)), _read_capped(proc.stderr, 8192))
    await proc.wait()
    return out, err, over


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _memfd(name: str, data: bytes) -> int:
    """An anonymous in-memory file holding ``data``, at offset 0: handed to the child, never on a disk."""
    fd = os.memfd_create(name, 0)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.lseek(fd, 0, os.SEEK_SET)
    except BaseException:
        os.close(fd)
        raise
    return fd



def _read_status(fd: int) -> bytes:
    """What the child wrote on its status pipe (every writer is gone: no wait), at most 4 KiB."""
    os.set_blocking(fd, False)
    try:
        return os.read(fd, 4096)
    except BlockingIOError:
        return b""


# The two interpreters of a checked row skip `site` (its .pth files: an editable install's import hook,
# sitecustomize) and get the site-packages folders on their path instead: a package the program or the test
# imports is there, at about half the start-up (a script keeps `site`: it runs as it always did).
_FLAGS = {"script": ("-I",), "program": ("-I", "-S"), "checker": ("-I", "-S")}
SITE_PACKAGES = [p for p in sys.path if os.path.basename(p) in ("site-packages", "dist-packages") and os.path.isdir(p)]

_CPU_KILLED = (-signal.SIGXCPU, -signal.SIGKILL, 128 + signal.SIGXCPU, 128 + signal.SIGKILL)


class _Run:
    """The descriptors, temporary folders and processes of one run, released together."""

    def __init__(self, sandbox: str, limits: Limits) -> None:
        self.sandbox, self.limits = sandbox, limits
        self.prefix = (_bwrap_command(find_bwrap() or "bwrap", limits.file_mb, os.geteuid() == 0)
                       if sandbox == "bwrap" else (sys.executable,))
        self.fds: list[int] = []
        self.tmps: list[str] = []
        self.procs: list[asyncio.subprocess.Process] = []

    def memfd(self, name: str, data: bytes) -> int:
        self.fds.append(fd := _memfd(name, data))
        return fd

    def pipe(self) -> tuple[int, int]:
        r, w = os.pipe()
        self.fds += (r, w)
        return r, w

    async def start(self, role: str, fds: list[int]) -> asyncio.subprocess.Process:
        """One sandboxed interpreter running the harness as ``role``, holding ``fds`` (closed here once it has them)."""
        lim = self.limits
        args = [role, str(math.ceil(lim.cpu_s)), str(lim.memory_mb << 20), str(lim.file_mb << 20), str(lim.processes),
                *map(str, fds)]
        if self.sandbox == "bwrap":
            home, cwd = WORKDIR, None
        else:  # no tmpfs of its own: a private temporary directory, removed after
            import tempfile

            home = cwd = tempfile.mkdtemp(prefix="sft-ray-code-")
            self.tmps.append(home)
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": home, "TMPDIR": home, "LANG": "C.UTF-8",
               "PYTHONDONTWRITEBYTECODE": "1", "PYTHONHASHSEED": "0", "OMP_NUM_THREADS": "1",
               "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}  # no thread pools: NPROC may be 0
        try:
            proc = await asyncio.create_subprocess_exec(
                *self.prefix, *_FLAGS[role], "-c", HARNESS, *args, cwd=cwd, env=env, pass_fds=fds,
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
                start_new_session=True)
        finally:
            for fd in fds:  # the child holds its copies; a pipe's end is seen once every holder is gone
                self.fds.remove(fd)
                os.close(fd)
        self.procs.append(proc)
        return proc

    def close(self) -> None:
        for proc in self.procs:
            _kill_group(proc.pid)  # whatever it started, finished or not
        for fd in self.fds:
            os.close(fd)
        for tmp in self.tmps:
            shutil.rmtree(tmp, ignore_errors=True)


async def _settle(tasks: list[asyncio.Future], procs: list[asyncio.subprocess.Process]) -> None:
    """Kill ``procs``' groups, then let their readers drain the pipes to EOF (5 s at most: a descendant that
    left the group, with sandbox none, may still hold them)."""
    for proc in procs:
        _kill_group(proc.pid)
    pending = [t for t in tasks if not t.done()]
    if pending:
        await asyncio.wait(pending, timeout=5)
    for t in tasks:
        if not t.done():
            t.cancel()


def _drained(task: asyncio.Future) -> tuple[bytes, bytes, bool]:
    return task.result() if task.done() and not task.cancelled() else (b"", b"", False)


async def run_python(source: str, stdin: bytes | None = None, limits: Limits = Limits(),
                     workers: int | None = None, *, sandbox: str = "bwrap") -> RunResult:
    """Run ``source`` as a program, its stdin ``stdin`` (None: empty). ``sandbox``: ``bwrap`` (see the module doc;
    raises :class:`SandboxUnavailable` when it cannot run here) or ``none`` (no operating-system isolation).
    Raises :class:`SandboxFailure` when the sandbox failed before the program ran."""
    require(sandbox)
    async with _semaphore(workers or os.cpu_count() or 1):
        run = _Run(sandbox, limits)
        try:
            payload = run.memfd("sft-ray-payload", json.dumps({"source": source}).encode())
            status_r, status_w = run.pipe()
            t0 = time.monotonic()
            proc = await run.start("script", [payload, status_w])
            task = asyncio.ensure_future(_drive(proc, stdin, limits.max_output_bytes))
            done, _ = await asyncio.wait({task}, timeout=limits.wall_s)
            timed_out = not done
            await _settle([task], [proc])
            out, err, over = _drained(task)
            rc = proc.returncode
            # Killed by its CPU limit (SIGXCPU, then SIGKILL at the hard limit) is a timeout too.
            timed_out = timed_out or (rc in _CPU_KILLED and not over)
            if not _read_status(status_r).startswith(b"S") and not over:
                # The harness never got to the program: bwrap, setpriv or the interpreter failed (or the machine
                # was too loaded to start it in time). Not the program's fault: no verdict.
                raise SandboxFailure(_no_start("program", rc, timed_out, err))
            return RunResult(rc, out, err, timed_out, over, time.monotonic() - t0)
        finally:
            run.close()


def _no_start(what: str, rc: int | None, timed_out: bool, err: bytes) -> str:
    last = err.decode("utf-8", "replace").strip().splitlines()
    return (f"the sandbox did not start the {what} (exit {rc}{', timed out' if timed_out else ''}): "
            f"{last[-1] if last else 'no message'}")


async def run_checked(source: str, test: str, entry_point: str, context: str | None = None,
                      limits: Limits = Limits(), workers: int | None = None, *, sandbox: str = "bwrap") -> RunResult:
    """HumanEval / MBPP style: ``source``'s module code in one sandboxed interpreter, ``test`` in another (after
    ``context``, the row's prompt, for the helpers a test calls), the entry point called across a pipe as plain
    data (see :mod:`sft_ray.verifiers.harness`). Both start at once. :attr:`RunResult.proof` says whether the
    checker's harness saw the checks return with the pipe unbroken. Raises :class:`SandboxUnavailable` /
    :class:`SandboxFailure` as :func:`run_python` does."""
    require(sandbox)
    async with _semaphore(workers or os.cpu_count() or 1):
        run = _Run(sandbox, limits)
        try:
            nonce = secrets.token_hex(32).encode()
            p_payload = run.memfd("sft-ray-program", json.dumps({"source": source, "entry_point": entry_point,
                                                                 "path": SITE_PACKAGES}).encode())
            c_payload = run.memfd("sft-ray-checks", json.dumps({
                "test": test, "context": context, "entry_point": entry_point, "max_frame": limits.max_output_bytes,
                "call_s": limits.cpu_s + 5, "ready_s": limits.wall_s, "path": SITE_PACKAGES}).encode())
            c_nonce = run.memfd("sft-ray-nonce", nonce)
            p_status, p_status_w = run.pipe()
            c_status, c_status_w = run.pipe()
            req_r, req_w = run.pipe()
            rep_r, rep_w = run.pipe()
            t0 = time.monotonic()
            # The checker first: it compiles the test while the program loads.
            checker = await run.start("checker", [c_payload, c_nonce, c_status_w, req_w, rep_r])
            program = await run.start("program", [p_payload, p_status_w, req_r, rep_w])
            cap = limits.max_output_bytes
            c_task = asyncio.ensure_future(_drive(checker, None, cap))
            p_task = asyncio.ensure_future(_drive(program, None, cap))
            done, _ = await asyncio.wait({c_task}, timeout=limits.wall_s)
            timed_out = not done
            c_said = _read_status(c_status) if done else b""
            fault = c_said[1:2] if c_said[1:2] in (b"X", b"T", b"O") else b""
            if fault == b"X":  # the program ended: its sandbox (bwrap) is collecting its status
                await asyncio.wait({p_task}, timeout=5)
            await _settle([c_task, p_task], [program, checker])  # the verdict is in: the program is done too
            p_out, p_err, p_over = _drained(p_task)
            _, c_err, c_over = _drained(c_task)
            p_said = _read_status(p_status)
            if not done:  # killed at the deadline: what it said before
                c_said = _read_status(c_status)
                fault = c_said[1:2] if c_said[1:2] in (b"X", b"T", b"O") else b""
            prc, crc = program.returncode, checker.returncode
            timed_out = (timed_out or fault == b"T" or (crc in _CPU_KILLED and not c_over)
                         or (fault == b"X" and prc in _CPU_KILLED and not p_over))
            if not c_said.startswith(b"S") and not c_over:
                raise SandboxFailure(_no_start("checks", crc, timed_out, c_err))
            if not p_said.startswith(b"S") and not p_over and (fault == b"X" or timed_out):
                raise SandboxFailure(_no_start("program", prc, timed_out, p_err))
            proof = c_said == b"S" + nonce
            early = (not proof and fault == b"X" and prc in (0, EARLY_EXIT_CODE) and not timed_out and not p_over)
            return RunResult(crc, p_out, p_err + c_err, timed_out, p_over, time.monotonic() - t0, proof, early)
        finally:
            run.close()
