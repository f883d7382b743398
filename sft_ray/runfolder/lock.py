"""One run at a time per run folder.

Two drivers on one folder (a double submit, a retry while the first driver still lives)
would append to the same part files, or overwrite each other's parts on an object store.
A run therefore holds ``run.lock`` in its folder while it works:

- local (or shared) filesystems: the file is created with ``O_CREAT | O_EXCL`` (atomic, also
  on NFS v3+) and holds the holder's pid, host and start time. A lock whose pid is dead on
  this same host is stale and taken over; one held from another host is reported (its
  holder's host is named, and the file can be removed once that run is known to be gone).
- ``s3://``: a lease object created with a conditional write (``PutObject`` with
  ``If-None-Match: *``, which S3 and S3-compatible stores answer 412 when the object
  exists). pyarrow's S3 filesystem has no conditional put, hence boto3 here. The holder
  renews the lease every ``LEASE_RENEW_S``; a lease not renewed for ``LEASE_TTL_S`` is
  stale and is taken over with a conditional overwrite (``If-Match`` its ETag), so two
  runs breaking one stale lease cannot both win.
- other object stores (``gs://``): a lease written without a condition (pyarrow offers
  none there), checked before and after: it catches a second submit, not an exact race.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from typing import Any

import psutil

from sft_ray import io
from sft_ray.runfolder.layout import LOCK

LEASE_TTL_S = 300.0
LEASE_RENEW_S = 60.0


class LockError(RuntimeError):
    """The run folder is held by another run."""


def _holder_text(info: dict[str, Any]) -> str:
    started = info.get("started_at")
    when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(started)) if isinstance(started, (int, float)) else "?"
    return f"pid {info.get('pid', '?')} on host {info.get('host', '?')}, started {when}"


def _refuse(uri: str, info: dict[str, Any], extra: str = "") -> LockError:
    # Locks written before `command` was recorded were all taken by `sft-ray run`.
    command = info.get("command") if isinstance(info.get("command"), str) else "run"
    return LockError(f"{uri} is in use by another sft-ray {command} ({_holder_text(info)}). Wait for it to end, or "
                     f"use another output folder.{extra}")


class RunLock:
    """``with RunLock(run_dir).acquire(): ...``; released on exit (also after an error)."""

    def __init__(self, run_dir: str, command: str = "run") -> None:
        """``command``: the sft-ray command taking the lock (`run`, `filter`), named to those refused."""
        self.run_dir = run_dir
        self.uri = io.join(run_dir, LOCK)
        self.info = {"pid": os.getpid(), "host": socket.gethostname(), "started_at": time.time(),
                     "command": command}
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None
        self.scheme = run_dir.split("://", 1)[0] if "://" in run_dir else "file"

    # -- acquire / release --------------------------------------------------------------

    def acquire(self) -> "RunLock":
        if self.scheme == "file":
            self._acquire_local()
        elif self.scheme == "s3":
            self._acquire_s3()
            self._renewer = threading.Thread(target=self._renew_loop, name="sft-ray-lease", daemon=True)
            self._renewer.start()
        else:
            self._acquire_unconditional()
            self._renewer = threading.Thread(target=self._renew_loop, name="sft-ray-lease", daemon=True)
            self._renewer.start()
        return self

    def release(self) -> None:
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join(timeout=10)
        try:
            if self.scheme == "s3":
                client, bucket, key = self._s3()
                client.delete_object(Bucket=bucket, Key=key)
            else:
                io.delete(self.uri)
        except Exception:  # releasing is best effort: a leftover lock is stale and gets taken over
            pass

    def __enter__(self) -> "RunLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    # -- local --------------------------------------------------------------------------

    def _acquire_local(self) -> None:
        fs, path = io.filesystem(self.uri)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        for _ in range(3):
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                info = self._read_local(path)
                if info is None:
                    # Being written right now (created, not yet filled), or torn: look once more.
                    time.sleep(0.2)
                    info = self._read_local(path) or {}
                if info.get("host") == self.info["host"] and isinstance(info.get("pid"), int) \
                        and not _pid_alive(info["pid"], info.get("started_at")):
                    # Stale: its run died without releasing (kill -9). Remove it and try again;
                    # O_EXCL decides between two runs doing this at once.
                    try:
                        os.unlink(path)
                    except FileNotFoundError:
                        pass
                    continue
                raise _refuse(self.run_dir, info, "" if info.get("host") == self.info["host"] else
                              f" If that run is gone, delete {self.uri}.") from None
            with os.fdopen(fd, "w") as f:
                json.dump(self.info, f)
                f.flush()
                os.fsync(f.fileno())
            return
        raise LockError(f"could not take the lock {self.uri} (it keeps coming back)")

    @staticmethod
    def _read_local(path: str) -> dict[str, Any] | None:
        try:
            with open(path) as f:
                return json.load(f)
        except (OSError, ValueError):
            return None

    # -- s3 -----------------------------------------------------------------------------

    def _s3(self):
        try:
            import boto3
        except ImportError:
            raise LockError("an s3:// run folder needs boto3 for its lock (a conditional write): "
                            "pip install 'sft-ray[s3]'") from None
        bucket, _, key = self.uri.split("://", 1)[1].partition("/")
        # boto3 reads the same environment as pyarrow: AWS_ENDPOINT_URL(_S3), credentials, region.
        return boto3.client("s3"), bucket, key

    def _lease_body(self) -> bytes:
        return json.dumps({**self.info, "renewed_at": time.time()}).encode()

    def _acquire_s3(self) -> None:
        from botocore.exceptions import ClientError

        client, bucket, key = self._s3()
        try:
            client.put_object(Bucket=bucket, Key=key, Body=self._lease_body(), IfNoneMatch="*")
            return
        except ClientError as e:
            if _code(e) not in ("PreconditionFailed", "412", "ConditionalRequestConflict"):
                raise
        try:
            got = client.get_object(Bucket=bucket, Key=key)
        except ClientError as e:  # released meanwhile: try once more
            if _code(e) in ("NoSuchKey", "404"):
                return self._acquire_s3()
            raise
        info = json.loads(got["Body"].read() or b"{}")
        if time.time() - float(info.get("renewed_at") or 0) < LEASE_TTL_S:
            raise _refuse(self.run_dir, info, f" (its lease is renewed every {LEASE_RENEW_S:g} s and expires "
                          f"{LEASE_TTL_S:g} s after the last renewal)")
        try:  # stale: take it over, only if nobody else did since we read it
            client.put_object(Bucket=bucket, Key=key, Body=self._lease_body(), IfMatch=got["ETag"])
        except ClientError as e:
            if _code(e) in ("PreconditionFailed", "412", "ConditionalRequestConflict"):
                raise _refuse(self.run_dir, info) from None
            raise

    def _renew_loop(self) -> None:
        while not self._stop.wait(LEASE_RENEW_S):
            try:
                if self.scheme == "s3":
                    client, bucket, key = self._s3()
                    client.put_object(Bucket=bucket, Key=key, Body=self._lease_body())
                else:
                    io.write_bytes(self.uri, self._lease_body())
            except Exception:  # a missed renewal is retried at the next tick
                pass

    # -- other object stores --------------------------------------------------------------

    def _acquire_unconditional(self) -> None:
        if io.exists(self.uri):
            info = json.loads(io.read_bytes(self.uri) or b"{}")
            if time.time() - float(info.get("renewed_at") or info.get("started_at") or 0) < LEASE_TTL_S:
                raise _refuse(self.run_dir, info)
        io.makedirs(self.run_dir)
        io.write_bytes(self.uri, self._lease_body())


def _code(err) -> str:
    return str(err.response.get("Error", {}).get("Code", ""))


def _pid_alive(pid: int, started_at: float | None) -> bool:
    """Whether ``pid`` still runs the process that took the lock (a recycled pid started later)."""
    try:
        proc = psutil.Process(pid)
        if started_at is not None and proc.create_time() > float(started_at) + 1:
            return False
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:  # another user's live process
        return True
