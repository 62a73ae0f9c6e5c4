"""The worker-converter contract (`wsi.ingest.protocol`): its lines round-trip, the argv it builds
is one `wsi convert` accepts, and a real `wsi convert` speaks it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import wsi
from server.cli import _add_serve
from wsi.cli import build_parser
from wsi.errors import InvalidArgument
from wsi.ingest.protocol import (
    ExitCode,
    ProgressLine,
    ResultLine,
    convert_command,
    is_permanent_failure,
    parse_results,
    source_environment,
    sources_of,
    staging_limits,
)
from wsi.ingest.staging import StagingLimits
from wsi.slide_id import content_slide_id

from .conftest import sample

SID = "0123456789abcdef01234567"


@pytest.mark.parametrize("percent", [0.0, 0.1, 12.5, 99.9, 100.0, 50])
def test_progress_line_round_trip(percent: float) -> None:
    line = ProgressLine(percent).format()
    assert line.endswith("\n") and line.count("\n") == 1
    assert ProgressLine.parse(line) == ProgressLine(float(percent))
    assert ProgressLine.parse(line.encode()) == ProgressLine(float(percent))


@pytest.mark.parametrize(
    "line",
    [
        b"",
        b"{",
        b'{"progress": 100.5}\n',
        b'{"progress": -1}\n',
        b'{"progress": NaN}\n',
        b'{"progress": "50"}\n',
        b'{"progress": true}\n',
        b'{"done": 50}\n',
        b"[50]\n",
        b"\xff\xfe\n",
    ],
)
def test_malformed_progress_lines_are_skipped(line: bytes) -> None:
    assert ProgressLine.parse(line) is None


def test_progress_out_of_range_is_refused() -> None:
    for bad in (-0.1, 100.1, float("nan")):
        with pytest.raises(wsi.InvalidArgument):
            ProgressLine(bad)


@pytest.mark.parametrize(
    "result",
    [
        ResultLine(SID, f"/data/store/{SID}", 12.3),
        ResultLine(SID, f"s3://bucket/prefix/{SID}", 0.0),
        ResultLine(SID, f"/data/store/{SID}", None),
        ResultLine(SID, f"/odd\tfolder/{SID}", 1.5),  # a tab in a path survives
    ],
)
def test_result_line_round_trip(result: ResultLine) -> None:
    line = result.format()
    assert "\n" not in line and line.startswith(SID + "\t")
    assert ResultLine.parse(line) == result
    assert ResultLine.parse(line + "\n") == result
    assert result.skipped is (result.megapixels_per_second is None)
    assert parse_results(f"noise\n{line}\n\n{line}\n") == [result, result]


@pytest.mark.parametrize(
    "line",
    [
        "",
        SID,
        f"{SID}\t/store/x",
        f"{SID}\t/store/x\tfast",
        f"{SID}\t/store/x\tabc MP/s",
        "Not-An-Id\t/store/x\t1.0 MP/s",
        f"{SID}\t\t1.0 MP/s",
    ],
)
def test_lines_that_are_not_results_are_refused(line: str) -> None:
    with pytest.raises(wsi.InvalidArgument):
        ResultLine.parse(line)
    assert parse_results(line) == []


def test_exit_codes_say_what_is_final() -> None:
    assert [int(c) for c in ExitCode] == [0, 1, 75, 69, 130]
    assert is_permanent_failure(ExitCode.FAILED)
    for code in (ExitCode.OK, ExitCode.TEMPFAIL, ExitCode.SLIDE_BUSY, ExitCode.INTERRUPTED, -9, 2):
        assert not is_permanent_failure(code), code


def test_convert_command_is_what_wsi_convert_accepts(tmp_path: Path) -> None:
    cmd = convert_command(
        store=str(tmp_path / "store"),
        progress_fd=7,
        slide_id=SID,
        s3_endpoint="http://127.0.0.1:8333",
        spool_dir=str(tmp_path / "spool"),
        limits=StagingLimits(max_objects=7, max_bytes=100, spool_quota=1000),
        deidentify=True,
        keep_label=True,
        extra=("--format", "zarr"),
        python="/usr/bin/python3",
    )
    # -P: the working folder is not on the conversion's sys.path (tests/test_ingest_phi.py).
    assert cmd[:5] == ["/usr/bin/python3", "-P", "-m", "wsi.cli", "convert"]
    args = build_parser([_add_serve]).parse_args(cmd[4:])
    assert args.command == "convert" and args.sources == [] and args.source_in_env
    # The source is in the environment, not in argv: the process list shows every user argv.
    environ = source_environment("s3://bucket/DOE JANE.svs")
    assert sources_of(args, environ) == ["s3://bucket/DOE JANE.svs"]
    assert not any("DOE" in part for part in cmd)
    assert (args.out, args.slide_id, args.progress_fd) == (str(tmp_path / "store"), SID, 7)
    assert args.exit_with_stdin and args.progress is False
    assert (args.s3_endpoint, args.spool) == ("http://127.0.0.1:8333", str(tmp_path / "spool"))
    assert args.format == "zarr"
    assert staging_limits(args) == StagingLimits(7, 100, 1000)
    assert (args.deidentify, args.keep_label, args.keep_macro) == (True, True, False)
    bare = build_parser().parse_args(convert_command(store="s", progress_fd=3)[4:])
    assert (bare.slide_id, bare.s3_endpoint, bare.spool) == (None, None, None)
    assert staging_limits(bare) == StagingLimits() and not bare.deidentify


def _supervised(source: Path, store: Path, slide_id: str | None = None) -> tuple[int, str, list]:
    """Run `wsi convert` as a worker does: argv from the protocol, progress on a pipe, stdin a
    pipe held open while it converts; returns (exit status, stdout, parsed progress lines)."""
    read_fd, write_fd = os.pipe()
    proc = subprocess.Popen(
        convert_command(store=str(store), progress_fd=write_fd, slide_id=slide_id),
        env={**os.environ, **source_environment(str(source))},
        pass_fds=(write_fd,),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as progress:
        lines = [ProgressLine.parse(line) for line in progress]
    # Lets go of stdin as soon as the progress descriptor closes, maybe before the process has
    # exited: the status must still be the conversion's own, not the TEMPFAIL of a lost pipe.
    out, _ = proc.communicate(timeout=300)
    return proc.returncode, out, lines


def test_a_real_conversion_speaks_the_protocol(tmp_path: Path) -> None:
    slide = sample("openslide-python-fixtures/small.svs")
    store = tmp_path / "store"
    code, out, lines = _supervised(slide, store)
    assert code == ExitCode.OK
    sid = content_slide_id(slide)
    assert parse_results(out) == [ResultLine.parse(out.strip())]
    result = parse_results(out)[0]
    assert (result.slide_id, result.skipped) == (sid, False)
    assert Path(result.url).is_relative_to(store / sid)
    assert wsi.Store(wsi.StoreSettings(str(store))).published_slides() == [sid]
    assert lines and None not in lines, lines
    percents = [p.percent for p in lines if p is not None]
    assert percents == sorted(percents) and percents[-1] == 100.0

    again_code, again_out, _ = _supervised(slide, store, slide_id=sid)
    assert again_code == ExitCode.OK
    assert parse_results(again_out) == [ResultLine(sid, result.url, None)]


def test_an_unreadable_slide_fails_for_good(tmp_path: Path) -> None:
    code, out, _ = _supervised(sample("openslide-python-fixtures/unopenable.tiff"), tmp_path)
    assert is_permanent_failure(code) and parse_results(out) == []


def test_a_source_comes_from_argv_or_the_environment_never_both(tmp_path: Path) -> None:
    """A supervised conversion's source is in its environment (`--source-in-env`); a command
    line gives its own. Both, or neither, is one error line."""
    parser = build_parser()
    env = source_environment("x.svs")
    assert sources_of(parser.parse_args(["convert", "a.svs", "--out", "s"]), {}) == ["a.svs"]
    for argv, environ in (
        (["convert", "--source-in-env", "a.svs", "--out", "s"], env),
        (["convert", "--source-in-env", "--out", "s"], {}),
        (["convert", "--out", "s"], env),
    ):
        with pytest.raises(InvalidArgument):
            sources_of(parser.parse_args(argv), environ)
    run = subprocess.run(
        [sys.executable, "-m", "wsi.cli", "convert", "--source-in-env", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        check=False,
        env={k: v for k, v in os.environ.items() if k != "WSI_CONVERT_SOURCE"},
    )
    assert run.returncode == 1
    assert run.stderr == (
        "wsi: error: --source-in-env: the one source is $WSI_CONVERT_SOURCE, alone\n"
    )
