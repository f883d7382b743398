"""The harness that runs inside each sandboxed interpreter (see :mod:`sft_ray.verifiers.sandbox`).

This file's source is the program that every sandbox runs (``python -I -c <this file> ROLE ...``): it imports
only the standard library, and its functions are importable for the tests. Three roles:

- ``script``: the program alone, stdin to stdout (stdin/stdout tests).
- ``program``: the program's module code, then the entry point served over a pipe: the harness reads
  a call, calls the entry point, writes the answer back. This process never holds the tests, the
  expected values, the nonce or anything that becomes the verdict.
- ``checker``: the test's code (and the row's prompt, for its helpers) with the entry point's name
  bound to a proxy that calls the program over the pipe; HumanEval's ``check(candidate)`` is called
  when the test defines it, MBPP's module-level asserts run as they are. Only when the checks
  returned does the checker's harness write the run's nonce to the verdict pipe. It never imports or
  executes the program's code: what comes back is decoded as plain data.

Calls cross the pipe as frames (4-byte length, then JSON) holding plain data in a tagged form
(:func:`encode` / :func:`decode`): builtin types only (``bool``, ``int``, ``float``, ``complex``, ``str``,
``bytes``, ``bytearray``, ``None``, ``list``, ``tuple``, ``dict``, ``set``, ``frozenset``, ``range``,
``slice``, ``...``), exact types (no subclass), nesting up
to :data:`MAX_DEPTH`, each frame at most ``max_output_bytes``. Hand-written rather than a library:
pickle and its kin execute code by design, and JSON alone loses tuples, sets and bytes.
"""

import builtins
import json
import os
import select
import sys
import time

MAX_DEPTH = 100
EARLY_EXIT = 86  # the program's status when it raised SystemExit (its own exit, not a failure)
FAULTS = {"ended": b"X", "timeout": b"T", "protocol": b"O"}  # what the checker says of a program that broke the pipe


class NotPlain(TypeError):
    """A value that is not plain data (or a frame that does not decode to it)."""


_SCALARS = (type(None), bool, int, float, str)


def encode(v, depth=0):
    """``v`` as JSON-able data: scalars as themselves, everything else ``[tag, ...]``."""
    t = type(v)
    if depth > MAX_DEPTH:
        raise NotPlain(f"nested deeper than {MAX_DEPTH}")
    if t in _SCALARS:
        return v
    d = depth + 1
    if t is list or t is tuple or t is set or t is frozenset:
        return [{list: "l", tuple: "t", set: "s", frozenset: "f"}[t], *(encode(x, d) for x in v)]
    if t is dict:
        out = ["d"]
        for k, x in v.items():
            out += (encode(k, d), encode(x, d))
        return out
    if t is bytes or t is bytearray:
        return ["b" if t is bytes else "B", v.hex()]
    if t is complex:
        return ["c", v.real, v.imag]
    if t is range:
        return ["r", v.start, v.stop, v.step]
    if t is slice:
        return ["S", encode(v.start, d), encode(v.stop, d), encode(v.step, d)]
    if v is Ellipsis:
        return ["e"]
    raise NotPlain(f"a {t.__name__}")


def decode(w, depth=0):
    """The inverse of :func:`encode`; raises :class:`NotPlain` for anything it would not have written."""
    t = type(w)
    if depth > MAX_DEPTH + 1:
        raise NotPlain(f"nested deeper than {MAX_DEPTH}")
    if t in _SCALARS:
        return w
    if t is not list or not w or type(w[0]) is not str:
        raise NotPlain("not a tagged value")
    tag, items, d = w[0], w[1:], depth + 1
    try:
        if tag in ("l", "t", "s", "f"):
            return {"l": list, "t": tuple, "s": set, "f": frozenset}[tag](decode(x, d) for x in items)
        if tag == "d" and len(items) % 2 == 0:
            return {decode(items[i], d): decode(items[i + 1], d) for i in range(0, len(items), 2)}
        if tag in ("b", "B") and len(items) == 1 and type(items[0]) is str:
            return (bytes if tag == "b" else bytearray).fromhex(items[0])
        if tag == "c" and len(items) == 2 and all(type(x) in (int, float) for x in items):
            return complex(*items)
        if tag == "r" and len(items) == 3 and all(type(x) is int for x in items):
            return range(*items)
        if tag == "S" and len(items) == 3:
            return slice(*(decode(x, d) for x in items))
        if tag == "e" and not items:
            return Ellipsis
    except (TypeError, ValueError) as e:  # an unhashable key or member, bad hex, a zero step
        raise NotPlain(str(e)) from None
    raise NotPlain(f"not a tagged value ({tag!r})")


def frame(msg):
    body = json.dumps(msg, separators=(",", ":")).encode()
    return len(body).to_bytes(4, "big") + body


class Broken(BaseException):
    """The pipe broke: the program ended, timed out or broke the protocol (not an Exception: a test's
    ``except Exception`` does not swallow it)."""

    def __init__(self, fault, why):
        super().__init__(why)
        self.fault = fault


def read_exact(fd, n, deadline):
    buf = bytearray()
    while len(buf) < n:
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise Broken("timeout", "no answer in time")
        chunk = os.read(fd, n - len(buf))
        if not chunk:
            raise Broken("ended", "the program ended")
        buf += chunk
    return bytes(buf)


def read_frame(fd, cap, deadline=None):
    n = int.from_bytes(read_exact(fd, 4, deadline), "big")
    if n > cap:
        raise Broken("protocol", f"a frame of {n} bytes (at most {cap})")
    try:
        return json.loads(read_exact(fd, n, deadline))
    except (ValueError, RecursionError) as e:
        raise Broken("protocol", f"a frame that is not JSON ({e})") from None


def write_all(fd, data, deadline=None):
    view = memoryview(data)
    while view:
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([], [fd], [], left)[1]:
                raise Broken("timeout", "the program did not read its call in time")
        try:
            view = view[os.write(fd, view[:1 << 16]):]
        except BlockingIOError:  # (the checker's end is non-blocking: a full pipe waits in select, to its deadline)
            continue
        except BrokenPipeError:
            raise Broken("ended", "the program ended") from None


def flush():
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BaseException:
            pass


def read_all(fd):
    chunks = []
    while chunk := os.read(fd, 1 << 20):
        chunks.append(chunk)
    os.close(fd)
    return b"".join(chunks)


def _guard(limits, proof=None):
    """Resource limits, then the audit hook (a second layer behind the operating system's). ``proof``:
    (nonce, fd, the code object allowed to write it), for the checker."""
    import resource

    cpu, mem, fsize, nproc = limits
    for lim, val in ((resource.RLIMIT_CPU, (cpu, cpu + 1)), (resource.RLIMIT_AS, (mem, mem)),
                     (resource.RLIMIT_FSIZE, (fsize, fsize)), (resource.RLIMIT_NPROC, (nproc, nproc)),
                     (resource.RLIMIT_CORE, (0, 0))):
        resource.setrlimit(lim, val)
    denied = ("socket.", "subprocess.", "os.fork", "os.forkpty", "os.posix_spawn", "os.exec", "os.spawn",
              "os.system", "os.kill", "os.killpg", "os.startfile", "pty.", "ctypes.", "gc.get_", "sys._current_frames",
              "sys.settrace", "sys.setprofile", "sys.addaudithook", "_posixsubprocess.", "signal.pthread_kill")
    state = {"spent": False}

    def hook(event, args):
        if event == "sft_ray.harness.checked":
            # The verdict: given once, to the harness's own code (not a copy a test built).
            if proof is not None and not state["spent"] and sys._getframe(1).f_code is proof[2]:
                state["spent"] = True
                os.write(proof[1], proof[0])
        elif event.startswith(denied) or (event == "open" and isinstance(args[0], str)
                                          and args[0].startswith("/proc/") and args[0].endswith("/mem")):
            raise PermissionError(f"not allowed in the sandbox: {event}")

    sys.addaudithook(hook)


def _run_script(payload):
    sys.argv = ["main.py"]
    ns = {"__name__": "__main__", "__file__": "main.py", "__builtins__": builtins}
    try:
        exec(compile(payload["source"], "main.py", "exec"), ns)
    except SystemExit:
        raise
    except BaseException as e:
        sys.__excepthook__(type(e), e, e.__traceback__)
        flush()
        os._exit(1)


def _serve(payload, req_fd, rep_fd):
    """The program's side: its module code, then calls of the entry point until the checker closes the pipe."""
    sys.argv = ["main.py"]
    sys.path.extend(payload["path"])  # started without `site`: its packages' folders, without their .pth hooks
    ns = {"__name__": "__main__", "__file__": "main.py", "__builtins__": builtins}
    entry = payload["entry_point"]
    try:
        exec(compile(payload["source"], "main.py", "exec"), ns)
        fn = ns.get(entry)
        if not callable(fn):
            raise NameError(f"the program defines no function {entry!r}")
        os.write(rep_fd, frame(["ready"]))
        while True:
            try:
                msg = read_frame(req_fd, 1 << 30)
            except Broken:
                flush()
                os._exit(0)  # the checker is done
            _, cid, args, kwargs = msg
            try:
                out = fn(*decode(args), **decode(kwargs))
                try:
                    reply = ["ret", cid, encode(out)]
                except (NotPlain, ValueError, RecursionError):  # (ValueError: an int past str()'s digit limit)
                    reply = ["bad", cid, type(out).__name__]
            except SystemExit:
                raise
            except BaseException as e:
                try:
                    why = str(e)[:2000]
                except BaseException:
                    why = ""
                reply = ["exc", cid, type(e).__name__, why]
            write_all(rep_fd, frame(reply))
    except SystemExit:
        flush()
        os._exit(EARLY_EXIT)
    except BaseException as e:
        sys.__excepthook__(type(e), e, e.__traceback__)
        flush()
        os._exit(1)


# Exceptions the program raised that the test sees as themselves (a test may expect ValueError); any
# other arrives as RuntimeError. No BaseException, no StopIteration.
_PASSED_ON = {n: c for n, c in vars(builtins).items() if isinstance(c, type) and issubclass(c, Exception)
              and not issubclass(c, (StopIteration, StopAsyncIteration, Warning))}


def _check(payload, status_fd, req_fd, rep_fd):
    """The checker's side: the test, with the entry point's name bound to the proxy."""
    entry, cap, call_s = payload["entry_point"], payload["max_frame"], payload["call_s"]
    state = {"fault": None}
    os.set_blocking(req_fd, False)  # a program that stops reading cannot hold the checker past a call's deadline
    sys.path.extend(payload["path"])  # started without `site`: its packages' folders, without their .pth hooks

    def broke(b):
        if state["fault"] is None:
            state["fault"] = b
            os.write(status_fd, FAULTS[b.fault])
        return b

    def expect(deadline):
        try:
            return read_frame(rep_fd, cap, deadline)
        except Broken as b:
            raise broke(b) from None

    def candidate(*args, **kwargs):
        if state["fault"] is not None:
            raise state["fault"]
        try:
            call = frame(["call", cid := os.urandom(8).hex(), encode(args), encode(kwargs)])
        except NotPlain as e:
            raise TypeError(f"the test passed {entry} {e}: only plain data crosses to the program") from None
        if select.select([rep_fd], [], [], 0)[0]:  # the program wrote before it was asked
            raise broke(Broken("ended", "the program ended") if not os.read(rep_fd, 1)
                        else Broken("protocol", "the program answered out of turn"))
        deadline = time.monotonic() + call_s
        try:
            write_all(req_fd, call, deadline)
        except Broken as b:
            raise broke(b) from None
        msg = expect(deadline)
        if type(msg) is not list or len(msg) < 3 or msg[1] != cid or msg[0] not in ("ret", "bad", "exc"):
            raise broke(Broken("protocol", "the program answered out of turn"))
        if msg[0] == "ret" and len(msg) == 3:
            try:
                return decode(msg[2])
            except NotPlain as e:
                raise broke(Broken("protocol", f"an answer that is not plain data ({e})")) from None
        if msg[0] == "bad":
            raise TypeError(f"{entry} returned a {str(msg[2])[:100]}: only plain data (builtin types) is compared")
        if msg[0] == "exc" and len(msg) == 4:
            text = f"{str(msg[2])[:100]}: {str(msg[3])[:2000]}"
            try:
                error = _PASSED_ON.get(msg[2] if type(msg[2]) is str else "", RuntimeError)(text)
            except Exception:  # one that takes other arguments (UnicodeDecodeError, ExceptionGroup)
                error = RuntimeError(text)
            raise error
        raise broke(Broken("protocol", "a malformed answer"))

    candidate.__name__ = candidate.__qualname__ = entry
    ns = {"__name__": "__check__", "__builtins__": builtins}
    test = compile(payload["test"], "test.py", "exec")
    context = None
    if payload["context"]:
        try:
            context = compile(payload["context"], "prompt.py", "exec")
        except (SyntaxError, ValueError):
            pass  # a prompt in words: no helpers
    msg = expect(time.monotonic() + payload["ready_s"])  # the program loaded: the checks start
    if msg != ["ready"]:
        raise broke(Broken("protocol", "the program answered out of turn"))
    if context is not None:
        try:
            exec(context, ns)  # the row's prompt: the helpers its test calls (HumanEval/32's poly)
        except Exception:
            pass
    ns[entry] = candidate
    exec(test, ns)
    check = ns.get("check")
    if callable(check) and check is not candidate:
        check(candidate)
    if state["fault"] is not None:
        raise state["fault"]
    sys.audit("sft_ray.harness.checked")


def _main():
    role, *limits = sys.argv[1:6]
    fds = [int(a) for a in sys.argv[6:]]
    limits = [int(a) for a in limits]
    payload = json.loads(read_all(fds[0]))
    if role == "script":
        _guard(limits)
        os.write(fds[1], b"S")  # set up: what fails from here on is the program's doing
        os.close(fds[1])
        return _run_script(payload)
    if role == "program":
        _guard(limits)
        os.write(fds[1], b"S")
        os.close(fds[1])
        return _serve(payload, fds[2], fds[3])
    nonce = read_all(fds[1])
    status_fd = fds[2]

    def run():
        try:
            _check(payload, status_fd, fds[3], fds[4])
        except BaseException as e:
            if not isinstance(e, Broken):
                sys.__excepthook__(type(e), e, e.__traceback__)
            else:
                print(f"the program broke the checks: {e}", file=sys.stderr)
            flush()
            os._exit(1)
        flush()
        os._exit(0)

    _guard(limits, (nonce, status_fd, _check.__code__))
    del nonce
    os.write(status_fd, b"S")
    run()


if __name__ == "__main__":
    _main()
