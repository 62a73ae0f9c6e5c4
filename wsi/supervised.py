"""How a `wsi` command lives under a supervisor (an ingest worker, systemd, docker, a shell's
Ctrl-C): its progress on a pipe the supervisor reads, its end when the supervisor goes away, and
SIGTERM taken as Ctrl-C by the commands that clean up after themselves."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Iterator

from wsi.errors import InvalidArgument
from wsi.ingest.protocol import ExitCode, ProgressLine


class ProgressChannel:
    """`--progress-fd N`: the conversion's overall progress as `wsi.ingest.protocol.ProgressLine`s
    on a descriptor the supervisor (an ingest worker) reads, so its job shows a live percentage.

    Writes at most every 0.25 s and only when the value changed: the supervisor also reads a
    line as a sign of life, so a conversion that stalls goes quiet and can be stopped.
    """

    def __init__(self, fd: int, sources: int) -> None:
        try:
            if fd < 3:  # stdin, stdout, stderr carry other things
                raise OSError("a standard stream")
            self._out = os.fdopen(fd, "w", buffering=1)
        except OSError as exc:
            raise InvalidArgument(
                f"--progress-fd {fd} is not an open file descriptor for writing ({exc})"
            ) from None
        self._sources = max(1, sources)
        self._last_write = 0.0
        self._last_value = -1.0

    def report(self, index: int, fraction: float) -> None:
        """Source `index` (0-based) is `fraction` (0-1) done."""
        value = round(100.0 * (index + min(max(fraction, 0.0), 1.0)) / self._sources, 1)
        now = time.monotonic()
        if value == self._last_value or (now - self._last_write < 0.25 and fraction < 1.0):
            return
        self._last_write, self._last_value = now, value
        # The supervisor may have gone away: nobody to tell then.
        with contextlib.suppress(BrokenPipeError, ValueError):
            self._out.write(ProgressLine(value).format())

    def alive(self) -> None:
        """Repeat the last value: a sign of life while the conversion waits (for room in the
        spool) without progressing, so that its supervisor does not take it for stalled."""
        with contextlib.suppress(BrokenPipeError, ValueError):
            self._out.write(ProgressLine(max(self._last_value, 0.0)).format())

    def close(self) -> None:
        """No more progress: the supervisor reads end-of-file."""
        with contextlib.suppress(OSError):
            self._out.close()


def exit_with_stdin(finished: threading.Event) -> None:
    """`--exit-with-stdin`: end this process when standard input reaches end-of-file, unless
    `finished` is set by then (the work is done: the exit status is then the conversions' own,
    however soon the supervisor lets go of the pipe).

    The ingest worker holds the other end of the pipe, so the conversion dies with the service
    even when the service is SIGKILLed, without sharing its process group (a SIGTERM or Ctrl-C
    meant for the service must not cut the conversion short: the service decides when to stop
    it). An orphaned conversion would otherwise publish behind its job's next attempt.
    """

    def watch() -> None:
        # The raw descriptor, not sys.stdin: a daemon thread blocked inside a buffered reader
        # aborts the interpreter at exit.
        with contextlib.suppress(OSError):
            while os.read(0, 65536):
                pass
        if not finished.is_set():
            os._exit(ExitCode.TEMPFAIL)

    threading.Thread(target=watch, name="wsi-stdin-watch", daemon=True).start()


@contextlib.contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """SIGTERM ends the block as Ctrl-C does (KeyboardInterrupt), for the commands that write a
    store or files (`cleans_up` in their parser's defaults): a worker cancelling or timing out
    its job, `systemctl stop` or `docker stop` then leave nothing half-written, as each removes
    what it was writing on the way out. Python's default would end the process at once,
    leaving temporaries, a slide's lock file, and for a conversion level objects without a
    manifest, which only a later run on the same slide removes (never, for a cancelled job).
    Only where signals can be handled (the main thread); the previous handler is put back."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
