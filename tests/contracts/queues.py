"""`JobQueueContract`: what every `JobQueue` backend must do, tested through the interface only.

A backend's test module subclasses the contract and provides two fixtures:

- `open_queue`: a `QueueFactory` that opens the backend on one shared backing store per test
  (every queue it returns sees the same jobs; it closes them all at teardown), with the injected
  `clock` and `retry` policy;
- `queue_spec`: a `QueueSpec` naming how another OS process opens that same store, for the
  cases where real processes race or die.

Time is moved by the injected clock, never by sleeping.
"""

from __future__ import annotations

import json
import math
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import pytest

from wsi.errors import InvalidArgument, WsiError
from wsi.ingest.queue import (
    Clock,
    Job,
    JobNotFound,
    JobQueue,
    JobState,
    RetryPolicy,
    SourceFile,
)

from ..helpers import FakeClock
from .processes import QueueSpec, child, race

T0 = 1_700_000_000.0
"""The fake clock's start (2023-11-14T22:13:20Z): job times are checked to the millisecond."""
RETRY = RetryPolicy(max_attempts=3, backoff_unit=1.0, backoff_cap=3.0)


class QueueFactory(Protocol):
    """Opens the backend under test on the test's one backing store."""

    def __call__(self, *, clock: Clock = ..., retry: RetryPolicy | None = ...) -> JobQueue: ...


class JobQueueContract:
    """The `JobQueue` interface's promises; subclass and provide `open_queue` and `queue_spec`."""

    @pytest.fixture
    def open_queue(self) -> QueueFactory:
        raise NotImplementedError("a JobQueue test module provides `open_queue`")

    @pytest.fixture
    def queue_spec(self) -> QueueSpec:
        raise NotImplementedError("a JobQueue test module provides `queue_spec`")

    @pytest.fixture
    def clock(self) -> FakeClock:
        clock = FakeClock()
        clock.now = T0
        return clock

    @pytest.fixture
    def queue(self, open_queue: QueueFactory, clock: FakeClock) -> JobQueue:
        return open_queue(clock=clock, retry=RETRY)

    # -- lifecycle ------------------------------------------------------------------------------

    def test_full_lifecycle(self, queue: JobQueue, clock: FakeClock) -> None:
        job = queue.submit("/scans/a.svs", options={"quality": 80, "format": "both"})
        assert job.state is JobState.QUEUED
        assert (job.attempts, job.progress, job.worker, job.lease_until) == (0, 0.0, None, None)
        assert job.created == job.updated == job.next_attempt_at == T0
        assert dict(job.options) == {"quality": 80, "format": "both"}

        clock.step(1)
        running = queue.claim("w1", lease_seconds=30)
        assert running is not None and running.id == job.id
        assert running.state is JobState.RUNNING
        assert (running.worker, running.lease_until, running.attempts) == ("w1", T0 + 31, 1)
        assert running.started == T0 + 1
        assert queue.claim("w2", lease_seconds=30) is None  # the only job is taken

        clock.step(10)
        assert queue.heartbeat(job.id, "w1", 42.5)
        beat = queue.get(job.id)
        assert (beat.progress, beat.lease_until) == (42.5, T0 + 41)

        clock.step(5)
        assert queue.complete(job.id, "w1", "abc123")
        done = queue.get(job.id)
        assert done.state is JobState.DONE
        assert (done.slide_id, done.progress, done.error) == ("abc123", 100.0, None)
        assert (done.worker, done.lease_until, done.finished) == (None, None, T0 + 16)
        assert queue.claim("w1", 30) is None

        api = json.loads(json.dumps(done.to_dict()))
        assert api["state"] == "done" and api["slide_id"] == "abc123"
        assert api["created"] == "2023-11-14T22:13:20.000Z"
        assert api["finished"] == "2023-11-14T22:13:36.000Z"
        assert api["options"] == {"format": "both", "quality": 80}
        assert api["lease_until"] is None

    def test_claim_takes_oldest_first(self, queue: JobQueue, clock: FakeClock) -> None:
        ids = []
        for i in range(3):
            ids.append(queue.submit(f"/s/{i}.svs").id)
            clock.step(0 if i == 0 else 1)  # first two share a timestamp: insertion order wins
        claimed = [queue.claim("w", 60) for _ in range(3)]
        assert [j.id for j in claimed if j] == ids

    def test_jobs_survive_reopening(self, open_queue: QueueFactory, clock: FakeClock) -> None:
        first = open_queue(clock=clock)
        queued = first.submit("/a.svs", slide_id="s1", options={"tile_size": 512})
        running = first.submit("/b.svs")
        assert first.claim("w", 60) is not None
        assert first.claim("w", 60) is not None
        assert first.cancel(queued.id).state is JobState.CANCELLED
        before = {j.id: j for j in first.list()}
        first.close()

        second = open_queue(clock=clock)
        after = {j.id: j for j in second.list()}
        assert after == before
        assert after[running.id].state is JobState.RUNNING and after[running.id].worker == "w"
        assert dict(after[queued.id].options) == {"tile_size": 512}
        assert second.heartbeat(running.id, "w", 99)  # a restarted worker of that name resumes

    def test_job_values_are_read_only(self, queue: JobQueue) -> None:
        job = queue.submit("/a.svs", options={"q": [1, 2]})
        with pytest.raises(AttributeError):
            job.state = JobState.DONE  # type: ignore[misc]
        with pytest.raises(TypeError):
            job.options["q"] = 3  # type: ignore[index]
        assert isinstance(hash(job), int)
        assert job == queue.get(job.id)
        assert isinstance(job, Job)

    # -- submit: one job per slide --------------------------------------------------------------

    def test_submit_is_idempotent_by_slide_id(self, queue: JobQueue) -> None:
        first = queue.submit("/scans/a.svs", slide_id="s1")
        assert queue.submit("/scans/copy-of-a.svs", slide_id="s1") == first  # queued
        assert queue.claim("w", 60) is not None
        assert queue.submit("/scans/a.svs", slide_id="s1").id == first.id  # running
        assert queue.complete(first.id, "w", "s1")
        again = queue.submit("/scans/a.svs", slide_id="s1")  # done
        assert again.id == first.id and again.state is JobState.DONE

        other = queue.submit("/scans/b.svs", slide_id="s2")
        assert other.id != first.id
        # Without a slide id nothing is known about the content: each drop is a job.
        assert queue.submit("/x.svs").id != queue.submit("/x.svs").id
        assert len(queue.list()) == 4

    def test_failed_or_cancelled_slide_can_be_resubmitted(self, queue: JobQueue) -> None:
        failed = queue.submit("/a.svs", slide_id="s1")
        assert queue.claim("w", 60) is not None
        assert queue.fail(failed.id, "w", "unreadable", transient=False)
        retry = queue.submit("/a.svs", slide_id="s1")
        assert retry.id != failed.id and retry.state is JobState.QUEUED
        assert retry.attempts == 0

        cancelled = queue.cancel(retry.id)
        assert cancelled.state is JobState.CANCELLED
        third = queue.submit("/a.svs", slide_id="s1")
        assert third.id not in (failed.id, retry.id)
        # ... and the new live job is what a further drop returns.
        assert queue.submit("/a.svs", slide_id="s1").id == third.id

    def test_a_watcher_gets_the_cancelled_or_failed_job_back(
        self, queue: JobQueue, clock: FakeClock
    ) -> None:
        """A cancel or a failure lasts: the slide still in its folder, reported again by a
        restarted watcher, is answered by its latest job; only a user's submission (a retry)
        makes a new one, which is then what the watcher gets."""
        cancelled = queue.cancel(queue.submit("/a.svs", slide_id="s1").id)
        assert queue.submit("/a.svs", slide_id="s1", watched=True) == cancelled
        clock.step(1)
        retried = queue.submit("/a.svs", slide_id="s1")
        assert retried.id != cancelled.id and retried.state is JobState.QUEUED
        assert queue.submit("/a.svs", slide_id="s1", watched=True).id == retried.id
        assert queue.claim("w", 60) is not None
        assert queue.fail(retried.id, "w", "unreadable", transient=False)
        again = queue.submit("/a.svs", slide_id="s1", watched=True)
        assert again.id == retried.id and again.state is JobState.FAILED
        assert len(queue.list()) == 2

    def test_a_slide_renamed_while_queued_moves_its_job(
        self, queue: JobQueue, tmp_path: Path
    ) -> None:
        """Renamed before a worker took it: the next submission (the watcher's report of the new
        name) moves the queued job to the new files, which the worker then converts. A copy
        (the old files still there) leaves the job alone, as does a running job."""
        old, new = tmp_path / "a.svs", tmp_path / "b.svs"
        old.write_bytes(b"slide")
        job = queue.submit(str(old), slide_id="s1", files=(SourceFile.of(old),))
        copy = tmp_path / "copy.svs"
        copy.write_bytes(b"slide")
        same = queue.submit(str(copy), slide_id="s1", files=(SourceFile.of(copy),), watched=True)
        assert same == job
        old.rename(new)
        moved = queue.submit(str(new), slide_id="s1", files=(SourceFile.of(new),), watched=True)
        assert moved.id == job.id and moved.state is JobState.QUEUED
        assert (moved.source, moved.files) == (str(new), (SourceFile.of(new),))
        claimed = queue.claim("w", 60)
        assert claimed is not None and claimed.source == str(new)
        new.rename(old)  # while running: the job is its worker's, not moved
        running = queue.submit(str(old), slide_id="s1", files=(SourceFile.of(old),))
        assert running.id == job.id and running.source == str(new)

    def test_complete_records_slide_id_and_refuses_another(self, queue: JobQueue) -> None:
        unknown = queue.submit("/a.svs")
        assert queue.claim("w", 60) is not None
        assert queue.complete(unknown.id, "w", "found-later")
        assert queue.get(unknown.id).slide_id == "found-later"
        # Content dropped twice before its id was known: the second conversion is done too.
        dup = queue.submit("/copy.svs")
        assert queue.claim("w", 60) is not None
        assert queue.complete(dup.id, "w", "found-later")

        known = queue.submit("/b.svs", slide_id="s-b")
        assert queue.claim("w", 60) is not None
        with pytest.raises(InvalidArgument):
            queue.complete(known.id, "w", "s-other")
        assert queue.get(known.id).state is JobState.RUNNING

    # -- failures and retries -------------------------------------------------------------------

    def test_transient_failures_back_off_then_fail(self, queue: JobQueue, clock: FakeClock) -> None:
        job = queue.submit("/a.svs")
        # attempt 1 fails: 2**1 = 2 s
        assert queue.claim("w", 60) is not None
        clock.step(1)
        assert queue.fail(job.id, "w", "store unavailable", transient=True)
        queued = queue.get(job.id)
        assert queued.state is JobState.QUEUED
        assert (queued.next_attempt_at, queued.error, queued.worker) == (
            T0 + 3,
            "store unavailable",
            None,
        )
        clock.step(1.9)
        assert queue.claim("w", 60) is None  # still backing off
        clock.step(0.1)
        second = queue.claim("w", 60)
        assert second is not None and second.attempts == 2 and second.progress == 0
        # attempt 2 fails: 2**2 = 4 s, capped at 3 s
        assert queue.fail(job.id, "w", "timeout", transient=True)
        assert queue.get(job.id).next_attempt_at == clock.now + 3
        clock.step(3)
        assert queue.claim("w", 60) is not None
        # attempt 3 of 3 fails: no attempts left
        clock.step(1)
        assert queue.fail(job.id, "w", "timeout again", transient=True)
        failed = queue.get(job.id)
        assert failed.state is JobState.FAILED
        assert (failed.attempts, failed.error, failed.finished) == (3, "timeout again", clock.now)
        clock.step(1000)
        assert queue.claim("w", 60) is None

    def test_permanent_failure_fails_at_once(self, queue: JobQueue) -> None:
        job = queue.submit("/a.svs")
        assert queue.claim("w", 60) is not None
        assert queue.fail(job.id, "w", "not a slide", transient=False)
        failed = queue.get(job.id)
        assert (failed.state, failed.error, failed.attempts) == (JobState.FAILED, "not a slide", 1)

    def test_error_messages_are_bounded(self, queue: JobQueue) -> None:
        job = queue.submit("/a.svs")
        assert queue.claim("w", 60) is not None
        assert queue.fail(job.id, "w", "x\0" * 10_000, transient=False)
        error = queue.get(job.id).error
        assert error is not None and len(error) <= 2000 and "\0" not in error

    def test_a_path_that_is_not_utf8_is_kept_exactly(self, queue: JobQueue) -> None:
        """A Latin-1 file name (lone surrogates in Python) is stored and given back byte for
        byte, its files too; messages quoting it are stored with U+FFFD; the API shows the
        path's `file://` URI. Every submit of such a slide raised UnicodeEncodeError before."""
        path = os.fsdecode(b"/scans/M\xfcller Jane/M\xfcller.svs")
        named = SourceFile(path, 1, 2, 3, 4)
        job = queue.submit(path, slide_id="s1", files=(named,))
        again = queue.submit(path, slide_id="s1", files=(named,))
        assert again.id == job.id
        (got,) = queue.list()
        assert os.fsencode(got.source) == b"/scans/M\xfcller Jane/M\xfcller.svs"
        assert got.files == (named,)
        assert queue.claim("w", 60) is not None
        assert queue.fail(job.id, "w", f"{path}: not a slide", transient=False)
        assert queue.get(job.id).error == "/scans/M\ufffdller Jane/M\ufffdller.svs: not a slide"
        api = json.loads(json.dumps(queue.get(job.id).to_dict()))
        assert api["source"] == "file:///scans/M%FCller%20Jane/M%FCller.svs"
        assert api["files"] == [api["source"]]
        with pytest.raises(InvalidArgument):  # names are text: `lease_name` makes them so
            queue.hold_lease("watch:" + path, "w", 30)

    def test_release_gives_the_job_back_without_counting_the_attempt(
        self, queue: JobQueue, clock: FakeClock
    ) -> None:
        job = queue.submit("/in/a.svs", "aaaa")
        claimed = queue.claim("w1", 10)
        assert claimed is not None and claimed.attempts == 1
        assert not queue.release(job.id, "w2", "not mine")  # only the holder may give it back
        clock.step(1)
        assert queue.release(job.id, "w1", "service shutting down")
        back = queue.get(job.id)
        assert (back.state, back.attempts, back.worker, back.lease_until) == (
            JobState.QUEUED,
            0,
            None,
            None,
        )
        assert back.error == "service shutting down" and back.next_attempt_at == clock.now
        again = queue.claim("w2", 10)  # runnable at once, by anyone
        assert again is not None and again.id == job.id and again.attempts == 1
        assert not queue.release(job.id, "w1", "too late")

    def test_release_after_a_delay_keeps_the_job_until_then(
        self, queue: JobQueue, clock: FakeClock
    ) -> None:
        """A conversion that could not start (another process holds the slide's lock) gives its
        job back for later, the attempt not counted however often it happens."""
        job = queue.submit("/in/a.svs", "aaaa")
        for _ in range(RETRY.max_attempts + 2):  # more often than a job may be attempted
            claimed = queue.claim("w1", 10)
            assert claimed is not None and claimed.attempts == 1
            assert queue.release(job.id, "w1", "slide busy", after=5)
            back = queue.get(job.id)
            assert (back.state, back.attempts) == (JobState.QUEUED, 0)
            assert back.next_attempt_at == clock.now + 5
            assert queue.claim("w1", 10) is None  # not before then
            clock.step(5)
        with pytest.raises(InvalidArgument):
            queue.release(job.id, "w1", "x", after=-1)

    # -- leases ---------------------------------------------------------------------------------

    def test_expired_lease_is_claimed_again(self, queue: JobQueue, clock: FakeClock) -> None:
        job = queue.submit("/a.svs")
        assert queue.claim("crashed", lease_seconds=10) is not None
        clock.step(10)
        assert queue.claim("w2", 10) is None  # the lease still holds at its last instant
        clock.step(0.5)
        resumed = queue.claim("w2", 10)
        assert resumed is not None and resumed.id == job.id
        assert (resumed.worker, resumed.attempts, resumed.lease_until) == ("w2", 2, clock.now + 10)
        # The old worker, if it was only slow, learns it lost the job and records nothing.
        assert not queue.heartbeat(job.id, "crashed", 90)
        assert not queue.complete(job.id, "crashed", "abc")
        assert not queue.fail(job.id, "crashed", "late", transient=True)
        assert queue.get(job.id).worker == "w2"
        assert queue.complete(job.id, "w2", "abc")

    def test_heartbeat_keeps_the_lease(self, queue: JobQueue, clock: FakeClock) -> None:
        job = queue.submit("/a.svs")
        assert queue.claim("w1", lease_seconds=10) is not None
        for _ in range(5):
            clock.step(8)
            assert queue.heartbeat(job.id, "w1", 10)
            assert queue.claim("w2", 10) is None
        assert queue.get(job.id).lease_until == clock.now + 10

    def test_late_heartbeat_of_unclaimed_lease_still_counts(
        self, queue: JobQueue, clock: FakeClock
    ) -> None:
        job = queue.submit("/a.svs")
        assert queue.claim("w1", lease_seconds=10) is not None
        clock.step(20)  # expired, but nobody took it over
        assert queue.heartbeat(job.id, "w1", 50)
        assert queue.claim("w2", 10) is None

    def test_a_job_that_keeps_losing_workers_fails(self, queue: JobQueue, clock: FakeClock) -> None:
        job = queue.submit("/poison.svs")
        for _ in range(RETRY.max_attempts):
            assert queue.claim("w", lease_seconds=5) is not None
            clock.step(6)
        # Handed over once more, to be failed (and its source quarantined) by the claimer.
        last = queue.claim("w", 5)
        assert last is not None and last.id == job.id
        lost = queue.lost_every_attempt(last)
        assert lost is not None and "lease expired" in lost
        assert queue.fail(job.id, "w", lost, transient=False)
        assert queue.claim("w", 5) is None
        failed = queue.get(job.id)
        assert failed.state is JobState.FAILED and failed.error == lost

    def test_a_job_with_attempts_left_is_not_lost_every_attempt(
        self, queue: JobQueue, clock: FakeClock
    ) -> None:
        queue.submit("/a.svs")
        for _ in range(RETRY.max_attempts):
            claimed = queue.claim("w", lease_seconds=5)
            assert claimed is not None and queue.lost_every_attempt(claimed) is None
            clock.step(6)

    def test_recover_requeues_expired_leases_only(self, queue: JobQueue, clock: FakeClock) -> None:
        lost = queue.submit("/lost.svs")
        live = queue.submit("/live.svs")
        queued = queue.submit("/queued.svs")
        assert queue.claim("dead", lease_seconds=5) is not None
        assert queue.claim("alive", lease_seconds=100) is not None
        clock.step(10)
        assert queue.recover() == 1
        again = queue.get(lost.id)
        assert again.state is JobState.QUEUED
        assert (again.worker, again.lease_until, again.next_attempt_at) == (None, None, clock.now)
        assert again.error is not None and "lease expired" in again.error
        assert queue.get(live.id).state is JobState.RUNNING  # another machine's live lease
        assert queue.get(queued.id).state is JobState.QUEUED
        assert queue.recover() == 0
        assert queue.recover(now=clock.now + 1000) == 1  # explicit time: the live lease ran out
        assert queue.get(live.id).state is JobState.QUEUED
        # The requeued job is claimed in its turn (oldest first), not after the newer queued one.
        nxt = queue.claim("w", 5)
        assert nxt is not None and nxt.id == lost.id and nxt.attempts == 2

    def test_recover_takes_back_at_once_the_jobs_of_workers_said_gone(
        self, queue: JobQueue, clock: FakeClock
    ) -> None:
        """A service restarted after a kill -9 waited out its dead worker's lease (a minute;
        longer after the clock stepped back) before converting again: `gone` says which
        workers no longer run, and their jobs come back at once, the attempt counted."""
        dead = queue.submit("/dead.svs")
        live = queue.submit("/live.svs")
        assert queue.claim("host:1:dead", lease_seconds=600) is not None
        assert queue.claim("host:2:live", lease_seconds=600) is not None
        assert queue.recover() == 0  # both leases run
        asked: list[str] = []

        def gone(worker: str) -> bool:
            asked.append(worker)
            return worker == "host:1:dead"

        assert queue.recover(gone=gone) == 1
        assert sorted(asked) == ["host:1:dead", "host:2:live"]
        again = queue.get(dead.id)
        assert again.state is JobState.QUEUED and again.worker is None
        assert again.error is not None and "process is gone" in again.error
        assert queue.get(live.id).state is JobState.RUNNING
        nxt = queue.claim("host:3:new", 5)
        assert nxt is not None and nxt.id == dead.id and nxt.attempts == 2

    def test_recover_hands_jobs_out_of_attempts_to_be_failed(
        self, queue: JobQueue, clock: FakeClock
    ) -> None:
        job = queue.submit("/poison.svs")
        for _ in range(RETRY.max_attempts):
            assert queue.claim("w", lease_seconds=5) is not None
            clock.step(6)
            assert queue.recover() == 1
        # Out of attempts: requeued to be claimed, failed and quarantined by a worker.
        last = queue.claim("w", 5)
        assert last is not None and last.id == job.id
        assert queue.lost_every_attempt(last) is not None

    # -- cancel ---------------------------------------------------------------------------------

    def test_cancel_queued_job(self, queue: JobQueue, clock: FakeClock) -> None:
        job = queue.submit("/a.svs")
        clock.step(2)
        cancelled = queue.cancel(job.id)
        assert cancelled.state is JobState.CANCELLED and cancelled.finished == clock.now
        assert queue.claim("w", 60) is None
        assert queue.cancel(job.id) == cancelled  # idempotent

    def test_cancel_running_job_stops_its_worker(self, queue: JobQueue, clock: FakeClock) -> None:
        job = queue.submit("/a.svs")
        assert queue.claim("w", 60) is not None
        assert queue.heartbeat(job.id, "w", 10)
        cancelled = queue.cancel(job.id)
        assert cancelled.state is JobState.CANCELLED
        assert (cancelled.worker, cancelled.lease_until) == (None, None)
        assert not queue.heartbeat(job.id, "w", 20)
        assert not queue.complete(job.id, "w", "abc")
        assert not queue.fail(job.id, "w", "boom", transient=True)
        assert not queue.release(job.id, "w", "shutting down")
        assert queue.get(job.id).state is JobState.CANCELLED
        clock.step(3600)
        assert queue.claim("w2", 60) is None  # not resurrected when its lease would have expired
        assert queue.recover() == 0

    def test_cancel_after_completion_changes_nothing(self, queue: JobQueue) -> None:
        job = queue.submit("/a.svs")
        assert queue.claim("w", 60) is not None
        assert queue.complete(job.id, "w", "s1")
        assert queue.cancel(job.id).state is JobState.DONE

    def test_a_cancel_that_came_after_the_publish_can_be_completed(
        self, queue: JobQueue, clock: FakeClock
    ) -> None:
        """The worker whose conversion had published when the cancel came records the job done;
        only for the attempt that was cancelled, never for one taken over since."""
        job = queue.submit("/a.svs", slide_id="s1")
        claimed = queue.claim("w", 60)
        assert claimed is not None and queue.cancel(job.id).state is JobState.CANCELLED
        assert not queue.complete(job.id, "w", "s1")  # without saying which attempt: refused
        assert not queue.complete(job.id, "w", "s1", cancelled_attempt=claimed.attempts + 1)
        assert queue.complete(job.id, "w", "s1", "too late", cancelled_attempt=claimed.attempts)
        done = queue.get(job.id)
        assert (done.state, done.slide_id, done.warning) == (JobState.DONE, "s1", "too late")
        assert done.worker is None and done.lease_until is None
        # Lease lost and taken over: the cancel hit the other worker's attempt, not ours.
        other = queue.submit("/b.svs", slide_id="s2")
        first = queue.claim("w1", 5)
        assert first is not None and first.id == other.id
        clock.step(6)
        assert queue.claim("w2", 60) is not None
        queue.cancel(other.id)
        assert not queue.complete(other.id, "w1", "s2", cancelled_attempt=first.attempts)
        assert queue.get(other.id).state is JobState.CANCELLED

    # -- listing and housekeeping ---------------------------------------------------------------

    def test_progress_is_recorded_and_listed(self, queue: JobQueue, clock: FakeClock) -> None:
        job = queue.submit("/a.svs")
        assert queue.claim("w", 60) is not None
        for progress in (0.0, 12.5, 99.9):
            clock.step(1)
            assert queue.heartbeat(job.id, "w", progress)
            (listed,) = queue.list(state=JobState.RUNNING)
            assert (listed.id, listed.progress, listed.updated) == (job.id, progress, clock.now)
            assert listed.to_dict()["progress"] == progress

    def test_list_newest_first_with_filter_and_paging(
        self, queue: JobQueue, clock: FakeClock
    ) -> None:
        ids = []
        for i in range(5):
            ids.append(queue.submit(f"/{i}.svs").id)
            clock.step(1)
        queue.cancel(ids[1])
        assert [j.id for j in queue.list()] == ids[::-1]
        assert [j.id for j in queue.list(limit=2, offset=1)] == [ids[3], ids[2]]
        assert [j.id for j in queue.list(state=JobState.CANCELLED)] == [ids[1]]
        assert [j.id for j in queue.list(state="queued")] == [ids[4], ids[3], ids[2], ids[0]]
        assert queue.list(state="done") == []
        assert queue.list(limit=0) == []

    def test_counts_are_the_jobs_listed_in_each_state(
        self, queue: JobQueue, clock: FakeClock
    ) -> None:
        """Every state has a count, 0 when no job is in it; a job cancelled while queued and
        one cancelled while running both count as cancelled; purged jobs are no longer counted."""
        assert queue.counts() == dict.fromkeys(JobState, 0)
        jobs = [queue.submit(f"/in/{i}.svs") for i in range(7)]
        for expected in jobs[:4]:
            claimed = queue.claim("w", 60)
            assert claimed is not None and claimed.id == expected.id
        assert queue.complete(jobs[0].id, "w", "s0")
        assert queue.fail(jobs[1].id, "w", "unreadable", transient=False)
        queue.cancel(jobs[2].id)  # while running
        queue.cancel(jobs[4].id)  # while queued
        counts = queue.counts()
        assert counts == {
            JobState.QUEUED: 2,
            JobState.RUNNING: 1,
            JobState.DONE: 1,
            JobState.FAILED: 1,
            JobState.CANCELLED: 2,
        }
        assert all(type(n) is int for n in counts.values())
        assert counts == {s: len(queue.list(s, limit=1000)) for s in JobState}
        assert queue.fail(jobs[3].id, "w", "store down", transient=True)  # queued again
        clock.step(10)
        assert queue.purge(clock.now) == 4
        assert queue.counts() == {**dict.fromkeys(JobState, 0), JobState.QUEUED: 3}

    def test_purge_deletes_only_old_finished_jobs(self, queue: JobQueue, clock: FakeClock) -> None:
        done = queue.submit("/in/done.svs", "d0")
        failed = queue.submit("/in/failed.svs", "f0")
        cancelled = queue.submit("/in/cancelled.svs", "c0")
        for expected in (done, failed):
            claimed = queue.claim("w", 10)
            assert claimed is not None and claimed.id == expected.id
        assert queue.complete(done.id, "w", "d0")
        assert queue.fail(failed.id, "w", "unreadable", transient=False)
        queue.cancel(cancelled.id)
        clock.step(100)
        running = queue.submit("/in/running.svs", "r0")
        claimed = queue.claim("w", 10)
        assert claimed is not None and claimed.id == running.id
        queued = queue.submit("/in/queued.svs", "q0")
        late = queue.submit("/in/late.svs", "l0")
        queue.cancel(late.id)  # finished now: newer than the cut-off below
        assert queue.purge(clock.now - 50) == 3
        left = {j.id for j in queue.list(limit=1000)}
        assert left == {queued.id, running.id, late.id}
        assert queue.purge(clock.now - 50) == 0
        with pytest.raises(InvalidArgument):
            queue.purge(float("nan"))

    def test_purge_keeps_the_jobs_it_is_told_to(self, queue: JobQueue, clock: FakeClock) -> None:
        jobs = [queue.submit(f"/in/{n}.svs", f"{n}0") for n in ("a", "b", "c")]
        for job in jobs:
            queue.cancel(job.id)
        clock.step(100)
        kept = {jobs[0].id, jobs[2].id, "f" * 32}  # an id no job has: nothing to keep
        assert queue.purge(clock.now - 50, keep=kept) == 1
        assert {j.id for j in queue.list(limit=1000)} == {jobs[0].id, jobs[2].id}
        assert queue.purge(clock.now - 50) == 2
        assert queue.list() == []

    # -- refusals -------------------------------------------------------------------------------

    def test_unknown_job_ids(self, queue: JobQueue) -> None:
        calls: list[Callable[[], object]] = [
            lambda: queue.get("nope"),
            lambda: queue.cancel("0" * 32),
            lambda: queue.heartbeat("nope", "w", 1),
            lambda: queue.complete("nope", "w", "s1"),
            lambda: queue.fail("nope", "w", "e", transient=True),
        ]
        for call in calls:
            with pytest.raises(JobNotFound) as info:
                call()
            assert isinstance(info.value, WsiError) and isinstance(info.value, LookupError)

    @pytest.mark.parametrize(
        "call",
        [
            lambda q: q.submit(""),
            lambda q: q.submit("/a\0.svs"),
            lambda q: q.submit(42),
            lambda q: q.submit("x" * 5000),
            lambda q: q.submit("/a.svs", slide_id="Bad/Id"),
            lambda q: q.submit("/a.svs", slide_id=".."),
            lambda q: q.submit("/a.svs", options={"x": object()}),
            lambda q: q.submit("/a.svs", options={"x": math.nan}),
            lambda q: q.submit("/a.svs", options={1: 2}),
            lambda q: q.submit("/a.svs", options=["quality"]),
            lambda q: q.claim("", 10),
            lambda q: q.claim("w", 0),
            lambda q: q.claim("w", -1),
            lambda q: q.claim("w", math.inf),
            lambda q: q.heartbeat("id", "w", 101),
            lambda q: q.heartbeat("id", "w", -0.5),
            lambda q: q.heartbeat("id", "w", math.nan),
            lambda q: q.heartbeat(7, "w", 1),
            lambda q: q.complete("id", "w", "UPPER"),
            lambda q: q.fail("id", "w", None, transient=True),
            lambda q: q.list(state="bogus"),
            lambda q: q.list(limit=-1),
            lambda q: q.list(limit=10_000),
            lambda q: q.list(offset=-1),
            lambda q: q.recover(now=math.nan),
        ],
    )
    def test_bad_input_is_refused(
        self, queue: JobQueue, call: Callable[[JobQueue], object]
    ) -> None:
        with pytest.raises(InvalidArgument):
            call(queue)
        assert queue.list() == []

    # -- concurrency ----------------------------------------------------------------------------

    def test_threads_share_one_queue(self, open_queue: QueueFactory) -> None:
        q = open_queue(clock=time.time)
        ids = {q.submit(f"/{i}.svs").id for i in range(100)}
        claimed: list[str] = []
        lock = threading.Lock()

        def work(name: str) -> None:
            while (job := q.claim(name, 60)) is not None:
                assert q.complete(job.id, name, job.id)
                with lock:
                    claimed.append(job.id)

        threads = [threading.Thread(target=work, args=(f"t{i}",)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(claimed) == sorted(ids)
        assert len(q.list(state="done", limit=1000)) == 100

    @pytest.mark.slow
    def test_processes_claim_each_job_exactly_once(
        self, open_queue: QueueFactory, queue_spec: QueueSpec, tmp_path: Path
    ) -> None:
        q = open_queue(clock=time.time)
        ids = [q.submit(f"/scans/{i}.svs").id for i in range(200)]
        per_process = race(queue_spec, tmp_path / "go", "claim", [[f"p{n}"] for n in range(4)])
        claimed = [job_id for pairs in per_process for job_id, _ in pairs]
        assert len(claimed) == len(set(claimed)) == 200  # nobody got a job twice
        assert set(claimed) == set(ids)
        assert all(completed for pairs in per_process for _, completed in pairs)
        assert sum(1 for pairs in per_process if pairs) >= 2, "the processes did not overlap"
        done = q.list(state="done", limit=1000)
        assert len(done) == 200
        assert all(j.attempts == 1 and j.slide_id == j.id and j.worker is None for j in done)

    @pytest.mark.slow
    def test_processes_submitting_the_same_slides_get_one_job_each(
        self, open_queue: QueueFactory, queue_spec: QueueSpec, tmp_path: Path
    ) -> None:
        q = open_queue(clock=time.time)
        slides = list(range(40))
        orders = [slides, slides[::-1], slides[20:] + slides[:20]]
        per_process = race(
            queue_spec,
            tmp_path / "go",
            "submit",
            [[f"p{n}", json.dumps(o)] for n, o in enumerate(orders)],
        )
        job_for: dict[int, set[str]] = {}
        for pairs in per_process:
            for i, job_id in pairs:
                job_for.setdefault(i, set()).add(job_id)
        assert len(job_for) == 40
        assert all(len(v) == 1 for v in job_for.values())  # everyone got the same job per slide
        jobs = q.list(limit=1000)
        assert len(jobs) == 40
        assert {j.slide_id for j in jobs} == {f"slide-{i}" for i in slides}

    @pytest.mark.slow
    def test_killed_process_loses_its_job_after_the_lease(
        self, open_queue: QueueFactory, queue_spec: QueueSpec, clock: FakeClock
    ) -> None:
        """A worker process SIGKILLed while renewing its lease (perhaps inside a transaction):
        the queue stays usable, the job stays its until the lease ends, then anyone takes it."""
        queue = open_queue(clock=clock, retry=RETRY)
        job = queue.submit("/scans/victim.svs", slide_id="victim")
        holder = child(queue_spec, "hold", "-", "doomed")
        try:
            assert holder.stdout is not None
            line = holder.stdout.readline()
            assert line, holder.communicate()[1]
            assert json.loads(line) == job.id
            clock.now = time.time()  # the child's leases run on the real clock
            assert queue.claim("rescuer", 30) is None  # held, and renewed continuously
            os.kill(holder.pid, signal.SIGKILL)
            holder.wait(timeout=60)
        finally:
            if holder.poll() is None:
                holder.kill()
            holder.communicate()
        assert holder.returncode == -signal.SIGKILL
        held = queue.get(job.id)
        assert (held.state, held.worker, held.attempts) == (JobState.RUNNING, "doomed", 1)
        assert held.lease_until is not None
        clock.now = held.lease_until
        assert queue.claim("rescuer", 30) is None  # the lease holds to its last instant
        clock.step(0.5)
        resumed = queue.claim("rescuer", 30)
        assert resumed is not None and resumed.id == job.id
        assert (resumed.worker, resumed.attempts) == ("rescuer", 2)
        assert not queue.heartbeat(job.id, "doomed", 50)
        assert queue.complete(job.id, "rescuer", "victim")
        assert queue.get(job.id).state is JobState.DONE
