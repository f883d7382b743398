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
- a preamble (the harness) that reads the program, the tests and a per-run nonce from
  inherited file descriptors and closes them before the program's code runs, then installs an
  audit hook that denies sockets, process creation, signals, ``ctypes``, tracing, the garbage
  collector's object walks and ``/proc/*/mem`` from Python (a second layer, with a clean
  ``PermissionError``);
- for HumanEval-style tests, proof that the tests ran to the end: the harness runs the program's
  module code, then the test source in a new namespace (the program's names, builtins as they were
  before the program ran), then ``check(entry_point)``; only when that call returns does the
  harness write the nonce to a pipe the parent reads. Exiting early (``sys.exit``, ``os._exit``,
  an exception hook, killing itself) leaves no nonce: the tests did not pass. The nonce lives only
  in the audit hook's closure while the program runs, and the hook gives it only to the harness's
  own code object, raised once. Residual risk: the program runs in the same interpreter as the
  tests, so a program written against this harness can still interfere with what ``check`` calls
  (e.g. patch a shared module such as ``math``) or reach the harness through frame objects;
- its own process group (session), killed whole when the run ends or its wall-clock deadline
  passes; output read up to a byte cap.

Memory is bounded per process (``RLIMIT_AS``); with the default of no extra processes there is
one process per run, so that bounds the run. cgroups are not used (see docs/sandbox.md).

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

SANDBOX_UID = 65534  # "nobody" on Debian and most distributions
WORKDIR = "/sandbox"
INSTALL_HINT = "install bubblewrap on every node that scores (Debian/Ubuntu: `sudo apt-get install -y bubblewrap`)"
EARLY_EXIT_CODE = 86  # the harness's exit status when the program raised SystemExit before the checks returned

# The harness: runs in the child before the program. argv: limits, then the file descriptors of
# the payload (JSON: mode, source, test, entry_point), of the nonce and of the proof pipe.
PREAMBLE = r"""
def _setup():
    import builtins, json, os, resource, sys
    cpu, mem, fsize, nproc, payload_fd, nonce_fd, proof_fd = (int(a) for a in sys.argv[1:8])

    def read_all(fd):
        chunks = []
        while True:
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                break
            chunks.append(chunk)
        os.close(fd)
        return b"".join(chunks)

    payload = json.loads(read_all(payload_fd))
    nonce = read_all(nonce_fd)
    for lim, val in ((resource.RLIMIT_CPU, (cpu, cpu + 1)), (resource.RLIMIT_AS, (mem, mem)),
                     (resource.RLIMIT_FSIZE, (fsize, fsize)), (resource.RLIMIT_NPROC, (nproc, nproc)),
                     (resource.RLIMIT_CORE, (0, 0))):
        resource.setrlimit(lim, val)
    clean_builtins = dict(builtins.__dict__)
    excepthook = sys.__excepthook__
    denied = ("socket.", "subprocess.", "os.fork", "os.forkpty", "os.posix_spawn", "os.exec", "os.spawn",
              "os.system", "os.kill", "os.killpg", "os.startfile", "pty.", "ctypes.", "gc.get_", "sys._current_frames",
              "sys.settrace", "sys.setprofile", "sys.addaudithook", "_posixsubprocess.", "signal.pthread_kill")
    state = {"started": False, "spent": False}

    def hook(event, args):
        # The proof: given once, to the harness's own code (not a copy the program built), and only
        # when the harness started once (a program that re-runs the harness poisons the proof).
        if event == "sft_ray.harness.start":
            state["spent"] = state["spent"] or state["started"]
            state["started"] = True
        elif event == "sft_ray.harness.checked":
            caller = sys._getframe(1)
            if not state["spent"] and caller.f_code is main_code:
                state["spent"] = True
                os.write(proof_fd, nonce)
        elif event.startswith(denied) or (event == "open" and isinstance(args[0], str)
                                          and args[0].startswith("/proc/") and args[0].endswith("/mem")):
            raise PermissionError(f"not allowed in the sandbox: {event}")

    def main():
        sys.audit("sft_ray.harness.start")
        sys.argv = ["main.py"]
        ns = {"__name__": "__main__", "__file__": "main.py", "__builtins__": builtins}
        try:
            exec(compile(payload["source"], "main.py", "exec"), ns)
            if payload["mode"] == "check":
                tests = dict(ns, __name__="__check__", __builtins__=dict(clean_builtins))
                exec(compile(payload["test"], "test.py", "exec"), tests)
                check, candidate = tests["check"], ns[payload["entry_point"]]
                check(plain(candidate) if payload["plain_returns"] else candidate)
                sys.audit("sft_ray.harness.checked")
        except SystemExit as e:
            if payload["mode"] == "check":
                os._exit(EARLY_EXIT)
            raise
        except BaseException as e:
            excepthook(type(e), e, e.__traceback__)
            flush()
            # A program that replaced the exception hook meant to turn this failure into an exit: counted as one.
            os._exit(EARLY_EXIT if payload["mode"] == "check" and sys.excepthook is not excepthook else 1)
        if payload["mode"] == "check":
            # Not the interpreter's own exit: no atexit handler or leftover thread of the program runs after.
            flush()
            os._exit(0)

    # Builtin types only (compared exactly, so not a subclass of the program's): a returned object whose
    # class claims to equal anything (the classic way to pass `assert candidate(x) == y`) fails instead.
    plain_types = {int, float, complex, bool, str, bytes, bytearray, type(None), list, tuple, dict, set, frozenset,
                   range, slice, type(Ellipsis)}

    def plain(candidate):
        def call(*a, **k):
            out = candidate(*a, **k)
            if "numpy" in sys.modules:  # numpy's own types (C types: their comparisons cannot be patched)
                np = sys.modules["numpy"]
                plain_types.update(t for t in set(getattr(np, "sctypeDict", {}).values()) | {np.ndarray}
                                   if isinstance(t, type))
            todo, seen = [out], 0
            while todo:
                v = todo.pop()
                seen += 1
                if type(v) not in plain_types or seen > 1_000_000:
                    raise TypeError(f"{payload['entry_point']} returned a {type(v).__name__}: "
                                    "only plain data (builtin types) is compared")
                if type(v) in (list, tuple, set, frozenset):
                    todo.extend(v)
                elif type(v) is dict:
                    todo.extend(v.keys())
                    todo.extend(v.values())
                elif type(v).__name__ == "ndarray" and v.dtype == object:
                    todo.extend(v.ravel().tolist())
            return out

        call.__name__ = getattr(candidate, "__name__", "candidate")
        call.__doc__ = getattr(candidate, "__doc__", None)
        return call

    def flush():
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except BaseException:
                pass

    main_code = main.__code__
    sys.addaudithook(hook)
    os.write(proof_fd, b"S")  # set up: what fails from here on is the program's doing
    return main


EARLY_EXIT = %d
_main = _setup()
del _setup
_main()
""" % EARLY_EXIT_CODE


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
    returncode: int | None
    stdout: bytes
    stderr: bytes
    timed_out: bool
    output_limited: bool
    wall_s: float
    proof: bool = False  # check mode: the harness saw check(entry_point) return

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out and not self.output_limited

    @property
    def exited_before_checks(self) -> bool:
        """Check mode: ended of its own accord (status 0, SystemExit, or a failure after the program replaced
        ``sys.excepthook``) without the proof."""
        return (not self.proof and not self.timed_out and not self.output_limited
                and self.returncode in (0, EARLY_EXIT_CODE))


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


def _read_proof(fd: int) -> bytes:
    """What the child wrote on the proof pipe (every writer is gone: no wait), at most 4 KiB."""
    os.set_blocking(fd, False)
    try:
        return os.read(fd, 4096)
    except BlockingIOError:
        return b""


async def run_python(source: str, stdin: bytes | None = None, limits: Limits = Limits(),
                     workers: int | None = None, *, test: str | None = None, entry_point: str | None = None,
                     sandbox: str = "bwrap", plain_returns: bool = True) -> RunResult:
    """Run ``source`` as a program; its stdin is ``stdin`` (None: empty). With ``test`` and ``entry_point``
    (HumanEval style), ``test`` then ``check(entry_point)`` run after the program's own code, and
    :attr:`RunResult.proof` says whether that call returned (with ``plain_returns``, every value the entry
    point returned to ``check`` was plain data). ``sandbox``: ``bwrap`` (see the module doc; raises
    :class:`SandboxUnavailable` when it cannot run here) or ``none`` (no operating-system isolation).
    Raises :class:`SandboxFailure` when the sandbox failed before the program ran."""
    require(sandbox)
    prefix = (_bwrap_command(find_bwrap() or "bwrap", limits.file_mb, os.geteuid() == 0) if sandbox == "bwrap"
              else (sys.executable,))
    check = test is not None and entry_point is not None
    async with _semaphore(workers or os.cpu_count() or 1):
        nonce = secrets.token_hex(32).encode()
        payload = json.dumps({"mode": "check" if check else "script", "source": source, "test": test,
                              "entry_point": entry_point, "plain_returns": plain_returns}).encode()
        fds: list[int] = []
        proof_r = -1
        tmp = None
        try:
            fds.append(_memfd("sft-ray-payload", payload))
            fds.append(_memfd("sft-ray-nonce", nonce))
            proof_r, proof_w = os.pipe()
            fds.append(proof_w)
            args = [str(math.ceil(limits.cpu_s)), str(limits.memory_mb << 20), str(limits.file_mb << 20),
                    str(limits.processes), *map(str, fds)]
            if sandbox == "bwrap":
                home, cwd = WORKDIR, None
            else:  # no tmpfs of its own: a private temporary directory, removed after
                import tempfile

                tmp = home = cwd = tempfile.mkdtemp(prefix="sft-ray-code-")
            env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": home, "TMPDIR": home, "LANG": "C.UTF-8",
                   "PYTHONDONTWRITEBYTECODE": "1", "PYTHONHASHSEED": "0", "OMP_NUM_THREADS": "1",
                   "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}  # no thread pools: NPROC may be 0
            t0 = time.monotonic()
            try:
                proc = await asyncio.create_subprocess_exec(
                    *prefix, "-I", "-c", PREAMBLE, *args, cwd=cwd, env=env, pass_fds=fds,
                    stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
                    start_new_session=True)
            finally:
                for fd in fds:  # the child holds its copies; the proof pipe's end is seen once it is gone
                    os.close(fd)
                fds.clear()
            timed_out = over = False
            out = err = b""
            task = asyncio.ensure_future(_drive(proc, stdin, limits.max_output_bytes))
            try:
                done, _ = await asyncio.wait({task}, timeout=limits.wall_s)
                if not done:
                    timed_out = True
                    _kill_group(proc.pid)
                    # Its readers drain the pipes to EOF once the group is dead.
                    done, _ = await asyncio.wait({task}, timeout=5)
                if done:
                    out, err, over = task.result()
                else:  # a descendant that left the group (sandbox none) still holds the pipes
                    task.cancel()
            finally:
                if not task.done():
                    task.cancel()
                _kill_group(proc.pid)  # whatever it started, finished or not
            rc = proc.returncode
            # Killed by its CPU limit (SIGXCPU, then SIGKILL at the hard limit) is a timeout too.
            if rc in (-signal.SIGXCPU, -signal.SIGKILL, 128 + signal.SIGXCPU, 128 + signal.SIGKILL) and not over:
                timed_out = True
            said = _read_proof(proof_r)
            if not said.startswith(b"S") and not over:
                # The harness never got to the program: bwrap, setpriv or the interpreter failed (or the machine
                # was too loaded to start it in time). Not the program's fault: no verdict.
                last = err.decode("utf-8", "replace").strip().splitlines()
                raise SandboxFailure(f"the sandbox did not start the program (exit {rc}"
                                     f"{', timed out' if timed_out else ''}): {last[-1] if last else 'no message'}")
            proof = check and said == b"S" + nonce
            return RunResult(rc, out, err, timed_out, over, time.monotonic() - t0, proof)
        finally:
            for fd in fds:
                os.close(fd)
            if proof_r >= 0:
                os.close(proof_r)
            if tmp:
                shutil.rmtree(tmp, ignore_errors=True)
