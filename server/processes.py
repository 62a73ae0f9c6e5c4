"""`wsi serve --processes N`: N serving processes on one port, started and kept by a supervisor.

One event loop serves hot tiles at about half of what the machine's cores could; the service
therefore runs one process per core. Each is the whole app (`create_app`) with its own event
loop, thread pool and tile cache, listening on the same port with `SO_REUSEPORT`: the kernel
spreads connections over them. Process 0 also runs the ingest roles (watcher, workers, purge,
archive policy, integrity check) so that nothing runs twice; the others share its job table and
its state through the files of `server.replica`.

The supervisor binds nothing (it checks first that the port is free, so that a port in use is one
line and exit 1 instead of N failing children) and serves nothing: it starts the processes,
restarts one that dies (after `RESTART` backoff, so that a crash loop does not spin), and on
SIGTERM or SIGINT stops them all (each once: the ingest process lets a running conversion finish
or gives it back, as a process alone does) and exits 0. If it is killed outright, its children are
killed with it (Linux `PR_SET_PDEATHSIG`), as the threads of a process alone would be.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import multiprocessing
import multiprocessing.connection
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from dataclasses import dataclass, field
from multiprocessing.process import BaseProcess
from pathlib import Path

from aiohttp import web

from server.app import create_app, new_event_loop
from server.runner import run
from server.settings import ProcessRole, ServerSettings
from wsi.errors import InvalidArgument, WsiError
from wsi.ingest.queue import open_queue
from wsi.ingest.roles import shutdown_seconds
from wsi.ingest.supervise import Backoff
from wsi.process_logging import quiet_readers, report_ingest

RESTART = Backoff(first=0.5, cap=30.0, healthy_after=60.0)
"""A process that dies is started again after 0.5 s, doubling up to 30 s while it keeps dying
within a minute of its start."""
STOP_GRACE_SECONDS = 70.0
"""How long a stopping process may take beyond the ingest roles' own stop: aiohttp gives open
requests 60 s."""
_PR_SET_PDEATHSIG = 1


def log(message: str) -> None:
    print(f"wsistore: {message}", file=sys.stderr, flush=True)


def check_port(host: str, port: int) -> None:
    """InvalidArgument unless every address `host` names can listen on `port` now. Bound without
    SO_REUSEPORT, so a listener that has it (another `wsi serve`) counts as in use too."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise InvalidArgument(f"cannot listen on {host}: {exc.strerror}") from exc
    for family, kind, proto, _, address in infos:
        with socket.socket(family, kind, proto) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind(address)
            except OSError as exc:
                raise InvalidArgument(
                    f"cannot listen on {host} port {port}: {exc.strerror}"
                ) from exc


# --------------------------------------------------------------------------------------------
# One serving process


def _die_with(parent: int) -> None:
    """Be killed when the supervisor dies (Linux), as a thread of a process alone would be: a
    supervisor killed outright (the OOM killer) leaves no serving process or conversion behind."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:  # it died before the line above
        os._exit(1)


def ready_marker(shared: str | Path, pid: int) -> Path:
    """Written by a process once it listens: the supervisor then knows the service started."""
    return Path(shared) / f"ready-{pid}"


def _listening(role: ProcessRole) -> None:
    assert role.shared is not None
    ready_marker(role.shared, os.getpid()).touch(mode=0o600)


def serve_process(settings: ServerSettings, role: ProcessRole, parent: int) -> None:
    """The body of one serving process (started by `ProcessSupervisor`)."""
    _die_with(parent)
    quiet_readers(stamped=True)  # as `wsi serve`: readers' warnings may quote file names
    report_ingest()
    loop = new_event_loop()
    stopping = False

    def stop() -> None:
        # The first signal stops the process; a second one (a terminal's Ctrl-C reaches the
        # whole group, then the supervisor's SIGTERM) must not cut that graceful stop short.
        nonlocal stopping
        if not stopping:
            stopping = True
            raise web.GracefulExit

    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop)
    try:
        run(
            create_app(settings, role),
            settings.host,
            settings.port,
            loop,
            reuse_port=True,
            handle_signals=False,
            listening=functools.partial(_listening, role),
        )
    except WsiError as exc:  # one line, as `wsi` gives it; no traceback
        print(f"wsi: error: {exc}", file=sys.stderr, flush=True)
        sys.exit(1)


# --------------------------------------------------------------------------------------------
# The supervisor


@dataclass
class _Slot:
    """One serving process's place: the process now in it, and its record of deaths."""

    role: ProcessRole
    process: BaseProcess | None = None
    started: float = 0.0
    deaths_in_a_row: int = 0
    restart_at: float | None = None
    pids: list[int] = field(default_factory=list)
    """Every process that held this place, in order."""


class ProcessSupervisor:
    """Starts `settings.processes` serving processes and keeps them until told to stop."""

    def __init__(self, settings: ServerSettings, shared: str) -> None:
        self.settings = settings
        self.shared = shared
        self.context = multiprocessing.get_context("spawn")
        self.slots = [
            _Slot(ProcessRole(index=i, ingest=i == 0, shared=shared))
            for i in range(settings.processes)
        ]
        self.stopping = False
        self.served = False
        """Whether any process ever listened: until then a death is a failure to start."""

    def _start(self, slot: _Slot) -> None:
        process = self.context.Process(
            target=serve_process,
            args=(self.settings, slot.role, os.getpid()),
            name=f"wsi-serve-{slot.role.index}",
        )
        process.start()
        slot.process, slot.started, slot.restart_at = process, time.monotonic(), None
        assert process.pid is not None
        slot.pids.append(process.pid)

    def _listened(self, slot: _Slot) -> bool:
        pid = slot.process.pid if slot.process is not None else None
        return pid is not None and ready_marker(self.shared, pid).exists()

    def _died(self, slot: _Slot) -> bool:
        """Record the death of `slot`'s process; False when the service never started (a
        process died before any listened): restarting would only repeat that."""
        process = slot.process
        assert process is not None
        process.join()
        code = process.exitcode
        why = f"exit status {code}" if code is None or code >= 0 else signal.Signals(-code).name
        with contextlib.suppress(OSError):
            ready_marker(self.shared, process.pid or 0).unlink()
        slot.process = None
        if not self.served:
            log(f"serving process {slot.role.index} ended ({why}) before the service started")
            return False
        now = time.monotonic()
        healthy = now - slot.started >= RESTART.healthy_after
        slot.deaths_in_a_row = 1 if healthy else slot.deaths_in_a_row + 1
        delay = RESTART.delay(slot.deaths_in_a_row)
        slot.restart_at = now + delay
        role = "serving and ingest" if slot.role.ingest else "serving"
        log(
            f"{role} process {slot.role.index} (pid {process.pid}) ended ({why}); "
            f"restarting in {delay:.1f} s"
        )
        return True

    def run(self) -> int:
        """Until SIGTERM or SIGINT: 0 after a clean stop, 1 when the service could not start."""
        wake_read, wake_write = os.pipe()
        os.set_blocking(wake_read, False)
        os.set_blocking(wake_write, False)
        previous = signal.set_wakeup_fd(wake_write)

        def stop(signum: int, frame: object) -> None:
            self.stopping = True

        handlers = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
        failed = False
        try:
            for slot in self.slots:
                self._start(slot)
            failed = self._keep(wake_read)
        finally:
            self._stop_all()
            for signum, handler in handlers.items():
                signal.signal(signum, handler)
            signal.set_wakeup_fd(previous)
            os.close(wake_read)
            os.close(wake_write)
        return 1 if failed else 0

    def _keep(self, wake: int) -> bool:
        """Restart what dies until told to stop; True when the service failed to start."""
        while not self.stopping:
            now = time.monotonic()
            due = [s.restart_at for s in self.slots if s.restart_at is not None]
            timeout = max(0.0, min(due) - now) if due else None
            if not self.served:
                timeout = min(timeout if timeout is not None else 0.1, 0.1)
            sentinels = [s.process.sentinel for s in self.slots if s.process is not None]
            multiprocessing.connection.wait([*sentinels, wake], timeout)
            with contextlib.suppress(BlockingIOError):
                os.read(wake, 512)
            if self.stopping:
                break
            if not self.served:
                self.served = any(self._listened(s) for s in self.slots)
            for slot in self.slots:
                dead = slot.process is not None and not slot.process.is_alive()
                if dead and not self._died(slot):
                    return True
                if slot.restart_at is not None and slot.restart_at <= time.monotonic():
                    self._start(slot)
        return False

    def _stop_all(self) -> None:
        """SIGTERM to each process (once), then wait; SIGKILL what is left after the grace."""
        alive = [s.process for s in self.slots if s.process is not None and s.process.is_alive()]
        for process in alive:
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.pid or 0, signal.SIGTERM)
        grace = STOP_GRACE_SECONDS
        if self.settings.watch or self.settings.s3_sources:
            grace += shutdown_seconds(self.settings.ingest)
        deadline = time.monotonic() + grace
        for process in alive:
            process.join(max(0.0, deadline - time.monotonic()))
        for process in alive:
            if process.is_alive():
                log(f"process {process.name} did not stop in {grace:.0f} s: killed")
                process.kill()
                process.join()


def check_job_table(settings: ServerSettings) -> None:
    """With ingest on: the state folder made and the job table opened once, so that a job table
    that cannot be opened is the one-line error (JobQueueUnavailable) of a process alone, not N
    processes failing."""
    if not (settings.watch or settings.s3_sources or settings.ingest.jobs_db):
        return
    ingest = settings.ingest
    ingest.make_state(settings.store)
    open_queue(ingest.jobs_path(settings.store)).close()


def run_processes(settings: ServerSettings) -> int:
    """`wsi serve` with `settings.processes` > 1: the supervisor's life; its exit status."""
    check_port(settings.host, settings.port)
    check_job_table(settings)
    shared = tempfile.mkdtemp(prefix="wsi-serve-")  # mode 0700: status files, nobody else's
    try:
        return ProcessSupervisor(settings, shared).run()
    finally:
        shutil.rmtree(shared, ignore_errors=True)


__all__ = ["ProcessSupervisor", "check_job_table", "check_port", "run_processes", "serve_process"]
