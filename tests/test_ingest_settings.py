"""Ingest settings are read once, one way: `wsi serve`, `wsi watch` and `wsi worker` get equal
`IngestSettings` from the same environment and the same flags."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest

import wsi
from server.cli import _add_serve, serve_settings
from server.settings import ServerSettings
from wsi.cli import build_parser, role_settings
from wsi.ingest.settings import IngestSettings

from .helpers import run_wsi

ENV = {
    "WSI_WORKERS": "3",
    "WSI_QUIET_SECONDS": "1.5",
    "WSI_POLL_SECONDS": "0.5",
    "WSI_LEASE_SECONDS": "20",
    "WSI_AFTER_SUCCESS": "move",
    "WSI_DONE_DIR": "/srv/done",
    "WSI_QUARANTINE_DIR": "/srv/quarantine",
    "WSI_STOP_TIMEOUT": "10",
    "WSI_JOB_TIMEOUT": "3600",
    "WSI_STALL_TIMEOUT": "120",
    "WSI_KEEP_JOBS_DAYS": "7",
    "WSI_ARCHIVE_AFTER_DAYS": "90",
    "WSI_JOBS_DB": "/srv/jobs/jobs.sqlite",
    "WSI_SPOOL_DIR": "/srv/spool",
    "WSI_STATE_DIR": "/srv/state",
    "WSI_MAX_SOURCE_OBJECTS": "500",
    "WSI_MAX_SOURCE_BYTES": "1000000",
    "WSI_SPOOL_QUOTA_BYTES": "3000000",
    "WSI_DEIDENTIFY": "yes",
    "WSI_KEEP_LABEL": "1",
    "WSI_KEEP_MACRO": "true",
    "WSI_DEIDENTIFY_KEY_FILE": "/srv/deidentify.key",
}
"""Every ingest variable the README documents, none at its default."""

FLAGS = [
    "--workers",
    "2",
    "--quiet-seconds",
    "0.3",
    "--poll-seconds",
    "0.1",
    "--lease-seconds",
    "5",
    "--after",
    "delete",
    "--done-dir",
    "/d",
    "--quarantine-dir",
    "/q",
    "--stop-timeout",
    "1",
    "--job-timeout",
    "2",
    "--stall-timeout",
    "3",
    "--keep-jobs-days",
    "4",
    "--archive-after-days",
    "30",
    "--jobs",
    "/j/jobs.sqlite",
    "--spool",
    "/s",
    "--state",
    "/st",
    "--max-source-objects",
    "9",
    "--max-source-bytes",
    "2000",
    "--spool-quota-bytes",
    "4000",
    "--no-deidentify",
    "--no-keep-label",
    "--no-keep-macro",
]
"""Every ingest flag, none at its default."""


def parse(*argv: str):  # type: ignore[no-untyped-def]
    return build_parser([_add_serve]).parse_args(list(argv))


def settings_of_every_command(env: dict[str, str], *flags: str) -> list[IngestSettings]:
    store = ["--store", "/srv/store"]
    return [
        serve_settings(parse("serve", *store, *flags), env).ingest,
        role_settings(parse("worker", *store, *flags), env),
        role_settings(parse("watch", "/srv/inbox", *store, *flags), env),
    ]


def test_every_command_reads_the_same_environment_the_same_way() -> None:
    serve, worker, watch = settings_of_every_command(ENV)
    assert serve == worker == watch
    assert serve == IngestSettings(
        workers=3,
        quiet_seconds=1.5,
        poll_seconds=0.5,
        lease_seconds=20.0,
        after_success="move",
        done_dir="/srv/done",
        quarantine_dir="/srv/quarantine",
        stop_timeout=10.0,
        job_timeout=3600.0,
        stall_timeout=120.0,
        keep_jobs_days=7.0,
        archive_after_days=90.0,
        jobs_db="/srv/jobs/jobs.sqlite",
        spool_dir="/srv/spool",
        state_dir="/srv/state",
        max_source_objects=500,
        max_source_bytes=1_000_000,
        spool_quota_bytes=3_000_000,
        deidentify=True,
        keep_label=True,
        keep_macro=True,
        deidentify_key_file="/srv/deidentify.key",
    )
    # Every field but the in-code one comes from the environment: none was left out.
    set_from_env = {f.name for f in fields(IngestSettings) if getattr(serve, f.name) != f.default}
    assert set_from_env == {f.name for f in fields(IngestSettings)} - {"convert_args"}


def test_flags_win_over_the_environment_alike() -> None:
    serve, worker, watch = settings_of_every_command(ENV, *FLAGS)
    assert serve == worker == watch
    assert (serve.workers, serve.after_success, serve.jobs_db, serve.spool_dir) == (
        2,
        "delete",
        "/j/jobs.sqlite",
        "/s",
    )
    assert (serve.poll_seconds, serve.stall_timeout, serve.keep_jobs_days) == (0.1, 3.0, 4.0)
    assert serve.archive_after_days == 30.0
    assert (serve.state_dir, serve.max_source_objects, serve.spool_quota_bytes) == ("/st", 9, 4000)
    assert (serve.deidentify, serve.keep_label, serve.keep_macro) == (False, False, False)


def test_one_set_of_defaults() -> None:
    """Without variables or flags every command gets `IngestSettings()`: the README's defaults."""
    serve, worker, watch = settings_of_every_command({})
    assert serve == worker == watch == IngestSettings()
    assert ServerSettings.from_env({}).ingest == IngestSettings()
    defaults = IngestSettings()
    assert (defaults.workers, defaults.quiet_seconds, defaults.poll_seconds) == (1, 5.0, 2.0)
    assert (defaults.after_success, defaults.state_dir) == ("keep", None)
    assert (defaults.done_dir, defaults.quarantine_dir, defaults.jobs_db) == (None, None, "")
    assert (defaults.deidentify, defaults.keep_label, defaults.keep_macro) == (False,) * 3
    assert (defaults.max_source_objects, defaults.max_source_bytes) == (10_000, 50 << 30)
    assert defaults.spool_quota_bytes == 100 << 30
    assert (defaults.lease_seconds, defaults.stop_timeout, defaults.job_timeout) == (60, 30, 0)
    assert (defaults.stall_timeout, defaults.keep_jobs_days) == (600, 30)


def test_state_lives_in_one_folder_beside_a_local_store() -> None:
    """Never in the folder a process happens to be started from."""
    settings = IngestSettings()
    assert settings.state_path("/srv/store") == "/srv/store.state"
    assert settings.state_path("/srv/store/") == "/srv/store.state"
    assert settings.jobs_path("/srv/store") == "/srv/store.state/jobs.sqlite"
    assert settings.spool_path("/srv/store") == "/srv/store.state/spool"
    assert settings.done_path("/srv/store") == "/srv/store.state/done"
    assert settings.quarantine_path("/srv/store") == "/srv/store.state/quarantine"
    assert os.path.isabs(settings.state_path("data"))  # a relative store: still one folder
    given = IngestSettings(state_dir="/st", jobs_db="/j/t.sqlite", quarantine_dir="/q")
    assert given.jobs_path("/x") == "/j/t.sqlite"
    assert (given.spool_path("/x"), given.done_path("/x")) == ("/st/spool", "/st/done")
    assert given.quarantine_path("/x") == "/q"
    assert IngestSettings(spool_dir="/s").spool_path("/x") == "/s"
    resolved = given.for_store("/x")
    assert (resolved.state_dir, resolved.spool_dir, resolved.done_dir) == (
        "/st",
        "/st/spool",
        "/st/done",
    )


def test_an_s3_store_keeps_its_state_in_the_users_state_folder(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg"))
    settings = IngestSettings()
    one = settings.state_path("s3://bucket/slides")
    assert Path(one).parent == tmp_path / "xdg" / "wsistore"
    assert settings.state_path("s3://bucket/slides/") == one  # the same store
    assert settings.state_path("s3://bucket/other") != one  # never a shared job table
    assert settings.jobs_path("s3://bucket/slides") == os.path.join(one, "jobs.sqlite")
    monkeypatch.delenv("XDG_STATE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert settings.state_path("s3://bucket/slides").startswith(
        str(tmp_path / "home" / ".local" / "state" / "wsistore")
    )


@pytest.mark.parametrize("store", ["/srv/store", "s3://bucket/slides"])
def test_every_command_finds_the_same_state(store: str) -> None:
    """`wsi serve`, `wsi watch` and `wsi worker` agree on every folder, from the defaults, the
    environment and the flags alike."""
    for env, flags in [({}, ()), ({"WSI_STATE_DIR": "/srv/state"}, ()), (ENV, tuple(FLAGS))]:
        argv = ["--store", store, *flags]
        serve = serve_settings(parse("serve", *argv), env)
        commands = [
            serve.ingest,
            role_settings(parse("worker", *argv), env),
            role_settings(parse("watch", "/srv/inbox", *argv), env),
        ]
        folders = {
            (
                s.state_path(store),
                s.jobs_path(store),
                s.spool_path(store),
                s.done_path(store),
                s.quarantine_path(store),
            )
            for s in commands
        }
        assert len(folders) == 1, folders
        assert serve.store == store


def test_the_state_is_private_whatever_the_umask(tmp_path: Path) -> None:
    settings = IngestSettings(jobs_db=str(tmp_path / "jobs" / "jobs.sqlite"))
    store = str(tmp_path / "store")
    old = os.umask(0)
    try:
        settings.make_state(store)
    finally:
        os.umask(old)
    state = Path(settings.state_path(store))
    for folder in (state, state / "spool", tmp_path / "jobs"):
        assert folder.is_dir() and folder.stat().st_mode & 0o007 == 0, folder
    jobs = Path(settings.jobs_path(store))
    assert jobs.stat().st_mode & 0o777 == 0o640
    jobs.chmod(0o666)  # left readable by an earlier version
    settings.make_state(store)
    assert jobs.stat().st_mode & 0o777 == 0o660


def test_serve_and_the_roles_print_where_the_state_is(tmp_path: Path) -> None:
    """Folders only: none of them names a slide."""
    store = tmp_path / "store"
    settings = IngestSettings(quarantine_dir=str(tmp_path / "q"))
    line = settings.describe_state(str(store))
    assert line == f"ingest state in {store}.state (quarantine {tmp_path / 'q'})"
    worker = subprocess.Popen(
        [sys.executable, "-m", "server.cli", "worker", "--store", str(store), "--workers", "0"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert worker.stdout is not None
        first = worker.stdout.readline()
    finally:
        worker.terminate()
        worker.communicate(timeout=30)
    assert first == f"wsistore: worker: ingest state in {store}.state\n"
    assert (Path(f"{store}.state") / "jobs.sqlite").is_file()


@pytest.mark.parametrize(
    ("env", "words"),
    [
        ({"WSI_WORKERS": "two"}, "WSI_WORKERS must be a number"),
        ({"WSI_WORKERS": "-1"}, "workers"),
        ({"WSI_POLL_SECONDS": "0"}, "poll_seconds"),
        ({"WSI_STALL_TIMEOUT": "inf"}, "finite"),
        ({"WSI_AFTER_SUCCESS": "archive"}, "after_success"),
        ({"WSI_AFTER_SUCCESS": "move", "WSI_DONE_DIR": ""}, "done folder"),
        ({"WSI_STATE_DIR": ""}, "state_dir"),
        ({"WSI_MAX_SOURCE_OBJECTS": "0"}, "WSI_MAX_SOURCE_OBJECTS"),
        ({"WSI_MAX_SOURCE_BYTES": "200", "WSI_SPOOL_QUOTA_BYTES": "100"}, "fit the spool"),
    ],
)
def test_bad_values_are_refused_by_every_command(env: dict[str, str], words: str) -> None:
    for build in (
        lambda: serve_settings(parse("serve"), env),
        lambda: role_settings(parse("worker", "--store", "/s"), env),
    ):
        with pytest.raises(wsi.InvalidArgument, match=words):
            build()


def test_a_boolean_variable_that_is_neither_yes_nor_no_is_refused() -> None:
    """Every value but 1/true/yes/on was false: `WSI_DEIDENTIFY=y` (or `enabled`) ran a service
    that published every slide identified while its admin believed it de-identified, and
    `WSI_ALLOW_LABEL=ture` withheld labels without a word. Refused at start now, by the service
    and the roles alike; the usual spellings of both answers still read as before."""
    for name, value in (("WSI_DEIDENTIFY", "y"), ("WSI_DEIDENTIFY", "enabled")):
        for build in (
            lambda: serve_settings(parse("serve"), {name: value}),
            lambda: role_settings(parse("worker", "--store", "/s"), {name: value}),
        ):
            with pytest.raises(wsi.InvalidArgument, match=f"{name} must be 1, true, yes or on"):
                build()
    with pytest.raises(wsi.InvalidArgument, match="WSI_ALLOW_LABEL must be"):
        ServerSettings.from_env({"WSI_ALLOW_LABEL": "ture"})
    for value, meant in (
        ("Yes", True),
        (" on ", True),
        ("TRUE", True),
        ("off", False),
        ("", False),
    ):
        assert IngestSettings.from_env({"WSI_DEIDENTIFY": value}).deidentify is meant, value


def test_convert_args_are_not_read_from_the_environment() -> None:
    assert IngestSettings.from_env({"WSI_CONVERT_ARGS": "--lossless"}).convert_args == ()


def test_a_bad_flag_is_one_line_from_the_cli(tmp_path: Path) -> None:
    done = run_wsi("worker", "--store", str(tmp_path), "--poll-seconds", "0")
    assert done.returncode == 1
    assert done.stderr == "wsi: error: poll_seconds and lease_seconds must be positive\n"


def test_a_job_table_url_that_is_not_postgresql_is_refused_without_its_password(
    tmp_path: Path,
) -> None:
    """`--jobs postgresql+psycopg://wsi:pw@db/wsi` (SQLAlchemy's spelling), `mysql://...` or
    `postgresql:/...` named a SQLite file: the worker made folders named after the URL, the
    password among them, printed the URL with its password in its start line, and converted
    nothing the shared table held. One line now, naming the scheme only; nothing is made."""
    for url in (
        "postgresql+psycopg://wsi:s3cret-pw@127.0.0.1:1/wsi",
        "mysql://wsi:s3cret-pw@db/wsi",
        "postgresql:/wsi:s3cret-pw@db/wsi",
    ):
        scheme = url.split(":", 1)[0]
        done = subprocess.run(
            [sys.executable, "-m", "server.cli", "worker", "--store", "data", "--jobs", url],
            capture_output=True,
            text=True,
            timeout=60,  # a worker that starts would run until stopped
            check=False,
            cwd=tmp_path,
        )
        assert (done.returncode, done.stdout) == (1, ""), (url, done.stdout)
        assert done.stderr.startswith(f"wsi: error: job table {scheme}:/...: "), done.stderr
        assert "s3cret" not in done.stderr and done.stderr.count("\n") == 1
        with pytest.raises(wsi.InvalidArgument, match="job table"):
            IngestSettings.from_env({"WSI_JOBS_DB": url})
    assert list(tmp_path.iterdir()) == []
    assert IngestSettings(jobs_db="postgres://wsi@db/wsi").jobs_db  # still databases
    assert IngestSettings(jobs_db="state/jobs:1.sqlite").jobs_db  # and files


def test_watch_lists_only_what_it_uses_and_says_what_it_ignores(tmp_path: Path) -> None:
    """`wsi watch --help` listed every conversion setting (`--workers`, `--after`, timeouts),
    which only the roles that convert use: a lab giving `wsi watch --workers 4` saw nothing
    converted and no word why. The help now lists what the watcher uses; the other flags are
    still taken (a command line written for a worker keeps working) and named at start."""
    help_text = {
        role: subprocess.run(
            [sys.executable, "-m", "server.cli", role, "--help"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        for role in ("watch", "worker")
    }
    for flag in ("--quiet-seconds", "--poll-seconds", "--lease-seconds", "--state", "--jobs"):
        assert flag in help_text["watch"]
    for flag in ("--workers", "--after", "--job-timeout", "--deidentify", "--quarantine-dir"):
        assert flag not in help_text["watch"] and flag in help_text["worker"]

    file = tmp_path / "file"  # a store that is a file: the role stops right after its checks
    file.write_bytes(b"")
    (tmp_path / "inbox").mkdir()
    flags = ["--store", str(file), "--workers", "4", "--after", "move", "--quiet-seconds", "1"]
    run = subprocess.run(
        [sys.executable, "-m", "server.cli", "watch", str(tmp_path / "inbox"), *flags],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    lines = run.stderr.splitlines()
    assert lines[0] == (
        "wsistore: watch: ignoring --workers, --after (conversions run in `wsi worker` or "
        "`wsi serve`)"
    )
    assert run.returncode == 1 and lines[1].startswith("wsi: error: store")
