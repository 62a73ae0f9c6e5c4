"""A real PostgreSQL for the tests: Debian's server, loopback only, a free port, a temp folder.

Use the session fixture `postgres` (and `database`, a fresh database a test) by importing
it into a test module or conftest.py:

    from tests.pgserver import database, postgres  # noqa: F401

The server comes from the Debian package `postgresql` (`./dev setup` installs it); a missing
binary or a server that does not come up is an error, never a skip: PostgreSQL is what a
deployment on many machines uses. PostgreSQL refuses to run as root, so when the tests run as
root the cluster folder is given to the `postgres` user and the server runs as that user
(`setpriv`, which execs: the process we hold is the server itself). It listens on 127.0.0.1 and
a Unix socket in its own folder only, with password authentication (so a test can check that a
password never shows in an error), and it trades durability for speed (`fsync=off`): the data
of a test session is thrown away. `PostgresServer.database()` makes a fresh database per test.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
import pytest

USER = "wsi"
PASSWORD = "wsi-test-secret-7Qx"
"""The test cluster's password: tests check that it never appears in an error message."""
STARTUP_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 15.0
_SERVER_OPTIONS = (
    "listen_addresses=127.0.0.1",
    "fsync=off",
    "synchronous_commit=off",
    "full_page_writes=off",
    "max_connections=300",
)


def find_bindir() -> Path:
    """The folder of `initdb` and `postgres`: Debian keeps them per major version under
    /usr/lib/postgresql (the newest wins); elsewhere they are on the PATH."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/postgres"), key=_major)
    if found:
        return Path(found[-1]).parent
    on_path = shutil.which("postgres")
    if on_path is None:
        raise RuntimeError(
            "PostgreSQL's server is not installed (Debian: apt-get install postgresql; "
            "./dev setup does it)"
        )
    return Path(on_path).resolve().parent


def _children(pid: int) -> list[int]:
    """The processes whose parent is `pid` (a postmaster's backends and workers), from /proc."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                stat = Path(f"/proc/{entry}/stat").read_text()
                if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(entry))
    return found


def _major(path: str) -> int:
    version = Path(path).parents[1].name
    return int(version) if version.isdigit() else 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class PostgresServer:
    """A running server (mutable: `stop` and `start` take it down and bring it back on the same
    port with the same data)."""

    port: int
    folder: Path
    bindir: Path
    as_user: str | None
    """The unprivileged user the server runs as when the tests run as root."""
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def data_dir(self) -> Path:
        return self.folder / "data"

    @property
    def log_path(self) -> Path:
        return self.folder / "server.log"

    def url(self, database: str = "postgres", password: str = PASSWORD) -> str:
        """`postgresql://wsi:PASSWORD@127.0.0.1:PORT/DATABASE`."""
        return f"postgresql://{USER}:{password}@127.0.0.1:{self.port}/{database}"

    def database(self) -> str:
        """A new empty database; its URL."""
        name = f"t_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def drop(self, url: str) -> None:
        """Drop the database of `url`, closing whatever connections are still open on it."""
        name = url.rsplit("/", 1)[1]
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def _command(self, *argv: str) -> list[str]:
        if self.as_user is None:
            return list(argv)
        return ["setpriv", f"--reuid={self.as_user}", f"--regid={self.as_user}", "--init-groups",
                "--", *argv]  # fmt: skip

    def start(self, timeout: float = STARTUP_TIMEOUT_S) -> None:
        options = [arg for opt in _SERVER_OPTIONS for arg in ("-c", opt)]
        cmd = self._command(
            str(self.bindir / "postgres"),
            "-D", str(self.data_dir), "-p", str(self.port), "-k", str(self.folder),
            *options,
        )  # fmt: skip
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True,
            )  # fmt: skip
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"PostgreSQL exited at start:\n{self.log_tail()}")
            with contextlib.suppress(psycopg.OperationalError):
                psycopg.connect(self.url(), connect_timeout=2).close()
                return
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"PostgreSQL did not come up:\n{self.log_tail()}")
            time.sleep(0.05)

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> None:
        """Fast shutdown (SIGINT: sessions are ended, the data is kept); SIGKILL if it hangs."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)

    @contextlib.contextmanager
    def outage(self) -> Iterator[None]:
        """The server is down inside the block and back (same port, same data) after it."""
        self.stop()
        try:
            yield
        finally:
            self.start()

    @contextlib.contextmanager
    def frozen(self) -> Iterator[None]:
        """The server hangs inside the block: every one of its processes stopped (SIGSTOP), so
        its kernel still accepts connections and acknowledges what is sent, and nothing answers
        (a host whose database is stuck, not gone: no TCP timeout ends a wait). Resumed after."""
        assert self.proc is not None
        pids = [self.proc.pid, *_children(self.proc.pid)]
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)
        try:
            yield
        finally:
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGCONT)

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


def run_postgres(base: Path | None = None) -> Iterator[PostgresServer]:
    """Initialise a cluster in a new temp folder, start it, yield it, stop it and remove the
    folder."""
    bindir = find_bindir()
    as_user = "postgres" if os.geteuid() == 0 else None
    folder = Path(tempfile.mkdtemp(prefix="wsi-pg-", dir=base))
    try:
        if as_user is not None:
            entry = pwd.getpwnam(as_user)
            os.chown(folder, entry.pw_uid, entry.pw_gid)
        server = PostgresServer(_free_port(), folder, bindir, as_user)
        pwfile = folder / "pw"
        pwfile.write_text(PASSWORD + "\n")
        if as_user is not None:
            os.chown(pwfile, entry.pw_uid, entry.pw_gid)
        init = server._command(
            str(bindir / "initdb"), "-D", str(server.data_dir), "-U", USER,
            f"--pwfile={pwfile}", "--auth=scram-sha-256", "-E", "UTF8", "--locale=C", "--no-sync",
            "--no-instructions",
        )  # fmt: skip
        done = subprocess.run(init, capture_output=True, text=True, check=False)
        pwfile.unlink()
        if done.returncode != 0:
            raise RuntimeError(f"initdb failed: {done.stderr.strip() or done.stdout.strip()}")
        server.start()
        try:
            yield server
        finally:
            server.stop()
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """One PostgreSQL for the test session (about a second to start)."""
    yield from run_postgres()


@pytest.fixture
def database(postgres: PostgresServer) -> Iterator[str]:
    """A fresh database of the session's server for one test; dropped after it."""
    url = postgres.database()
    yield url
    postgres.drop(url)
