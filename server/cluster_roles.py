"""The processes of `./dev cluster` (`server.cluster`), and how to tell that one is up.

`Role` is one process: its command line, its log file (not world-readable: `FILE_MODE`),
the signal that stops it cleanly, and the check that says it is ready. The helpers
around it find free ports on 127.0.0.1 and ask a role whether it answers (HTTP status, JSON,
TCP), on loopback only; the tests that start a cluster use them too. What the roles are and in
which order they start is `server.cluster`'s.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import secrets
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from wsi.errors import InvalidArgument
from wsi.store.objects import FILE_MODE

STOP_TIMEOUT_S = 90.0
"""A `wsi serve` or `wsi worker` lets a running conversion finish for 30 s, then stops it."""
_GRPC_OFFSET = 10000
"""SeaweedFS puts each component's gRPC port at its HTTP port + 10000."""
_PORT_RANGE = (15000, 22000)
_PR_SET_PDEATHSIG = 1


# --------------------------------------------------------------------------------------------
# Ports, readiness


def port_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_ports(count: int, taken: set[int], *, with_grpc: bool = False) -> list[int]:
    """`count` ports free on 127.0.0.1 now (and their +10000 gRPC twins), none in `taken`,
    which they are added to: a role's ports are not bound until it starts, so the cluster keeps
    track of those it handed out."""
    chosen: list[int] = []
    for _ in range(5000):
        port = _PORT_RANGE[0] + secrets.randbelow(_PORT_RANGE[1] - _PORT_RANGE[0])
        twins = (port, port + _GRPC_OFFSET) if with_grpc else (port,)
        if any(p in taken for p in twins) or not all(port_free(p) for p in twins):
            continue
        chosen.append(port)
        taken.update(twins)
        if len(chosen) == count:
            return chosen
    raise InvalidArgument(f"no {count} free ports on 127.0.0.1 in {_PORT_RANGE}")


def loopback_url(url: str) -> str:
    """`url` if it is plain HTTP on loopback, the only place the cluster's roles answer (the
    checks below never open a file: or another scheme by mistake)."""
    if not url.startswith(("http://127.0.0.1:", "http://localhost:")):
        raise InvalidArgument(f"not a loopback HTTP URL: {url}")
    return url


def http_status(url: str, timeout: float = 2.0) -> int:
    """The HTTP status `url` answers with (0: no answer)."""
    try:
        with urllib.request.urlopen(loopback_url(url), timeout=timeout) as response:  # noqa: S310
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except OSError:
        return 0


def http_json(url: str, body: object = None, timeout: float = 10.0) -> tuple[int, Any]:
    """GET (or POST `body` as JSON) `url`: its status and decoded JSON (0, None: no answer)."""
    data = None if body is None else json.dumps(body).encode()
    method = "GET" if body is None else "POST"
    request = urllib.request.Request(loopback_url(url), data=data, method=method)  # noqa: S310
    request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310
            return int(response.status), json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return int(exc.code), json.loads(exc.read() or b"null")
    except (OSError, ValueError):
        return 0, None


def tcp_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1.0)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def wait_until(check: Callable[[], Any], what: str, timeout: float) -> Any:
    """Poll `check` every 0.1 s until it returns something true (returned), at most `timeout`
    seconds; TimeoutError naming `what` after that."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.1)


# --------------------------------------------------------------------------------------------
# Roles


def _die_with_parent() -> None:
    """In the child, before exec: killed when the cluster process dies (Linux), even by SIGKILL.
    (Cleared where exec changes credentials: the database then stops when its socket's clients
    go, or by `stop`.)"""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


@dataclass
class Role:
    """One process of the cluster: how it starts, where it answers, when it is ready."""

    name: str
    argv: list[str]
    where: str
    """What `server.cluster.say` prints for it: a URL, or what it does."""
    ready: Callable[[Role], bool]
    env: dict[str, str] = field(default_factory=dict)
    cwd: Path | None = None
    stop_signal: int = signal.SIGTERM
    log_path: Path | None = None
    proc: subprocess.Popen[bytes] | None = None
    _log: IO[bytes] | None = None

    def start(self, logs: Path) -> None:
        self.log_path = logs / f"{self.name.replace(' ', '-')}.log"
        fd = os.open(self.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, FILE_MODE)
        self._log = os.fdopen(fd, "ab")
        self.proc = subprocess.Popen(
            self.argv,
            env={**os.environ, **self.env},
            cwd=self.cwd,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # a terminal's Ctrl-C reaches the cluster, which stops us
            preexec_fn=_die_with_parent,
        )

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace") if self.log_path else ""
        except OSError:
            return ""

    def log_tail(self, lines: int = 20) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> None:
        """`stop_signal` to its process group, SIGKILL after `timeout`."""
        proc = self.proc
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, self.stop_signal)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
        if self._log is not None:
            self._log.close()
            self._log = None


def when_logged(text: str) -> Callable[[Role], bool]:
    return lambda role: text in role.log_text()


def when_answering(url: str) -> Callable[[Role], bool]:
    return lambda role: http_status(url) == 200
