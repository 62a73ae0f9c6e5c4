"""The `wsi` command as a user runs it: JSON info, one line per slide, one line per error."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from server.cli import _add_serve
from wsi.cli import build_parser

from .conftest import sample
from .helpers import run_wsi as wsi


def test_info_prints_levels_properties_and_associated_images() -> None:
    run = wsi("info", str(sample("CMU-1-Small-Region.svs")))
    assert run.returncode == 0, run.stderr
    doc = json.loads(run.stdout)
    assert doc["backend"] == "tiff" and doc["vendor"] == "aperio"
    assert doc["levels"][0] == {
        "width": 2220,
        "height": 2967,
        "downsample": 1.0,
        "tile_width": 240,
        "tile_height": 240,
        "tile_codec": "jpeg",
    }
    assert doc["associated_images"]["label"] == {"height": 463, "width": 387}
    assert doc["mpp_x"] == 0.499 and doc["properties"]["aperio.AppMag"] == "20"
    assert doc["output_levels"][-1]["width"] <= 240


def test_an_unopenable_source_is_named_once(tmp_path: Path) -> None:
    """`wsi convert` said "x.svs: no such file or folder: x.svs"; `wsi info` named no file when
    no backend could read it."""
    missing, junk = tmp_path / "missing.svs", tmp_path / "junk.svs"
    junk.write_bytes(b"not a slide")
    for command in ("info", "convert"):
        for path, says in ((missing, "no such file or folder"), (junk, "no backend can read")):
            args = ["--out", str(tmp_path / "out"), "--no-progress"] if command == "convert" else []
            run = wsi(command, str(path), *args)
            assert run.returncode == 1
            assert run.stderr.startswith(f"wsi: error: {path}: {says}"), run.stderr
            assert run.stderr.count(str(path)) == 1 and len(run.stderr.splitlines()) == 1


def test_info_of_a_slide_in_a_bucket_says_it_reads_local_slides() -> None:
    """`wsi info s3://bucket/case.svs` said "no such file or folder" of an object that exists
    (`wsi convert` takes the same URL): the line now says what `wsi info` reads."""
    url = "s3://scanner-drop/2026/case-17.svs"
    run = wsi("info", url)
    assert (run.returncode, run.stdout) == (1, "")
    assert run.stderr == (
        f"wsi: error: {url}: wsi info reads a slide on this machine: copy it here first "
        "(wsi convert downloads an s3:// slide itself)\n"
    )


def test_a_bad_source_limit_names_the_flag_that_sets_it(tmp_path: Path) -> None:
    """`wsi convert s3://... --max-source-bytes -5` said "max_bytes must be a positive
    integer", a name no flag or variable has, and a source over the limit named only
    WSI_MAX_SOURCE_BYTES, which `wsi convert` does not read. Both name the flag now (refused
    before the bucket is asked anything)."""
    run = wsi("convert", "s3://bucket/x.svs", "--out", str(tmp_path / "o"),
              "--max-source-bytes", "-5", "--no-progress")  # fmt: skip
    assert (run.returncode, run.stdout) == (1, "")
    assert run.stderr == (
        "wsi: error: s3://bucket/x.svs: --max-source-bytes (WSI_MAX_SOURCE_BYTES) must be a "
        "positive integer\n"
    )


def test_convert_batch_goes_on_past_broken_slides(tmp_path: Path) -> None:
    good = [sample("openslide-python-fixtures/small.svs"), sample("CMU-1-Small-Region.svs")]
    bad = [
        sample("openslide-python-fixtures/unopenable.tiff"),
        tmp_path / "missing.svs",
        sample("openslide-python-fixtures/unreadable.svs"),
    ]
    out = tmp_path / "out"
    run = wsi(
        "convert",
        str(bad[0]),
        str(good[0]),
        str(bad[1]),
        str(good[1]),
        str(bad[2]),
        "--out",
        str(out),
        "--no-progress",
    )
    assert run.returncode == 1
    lines = run.stdout.strip().splitlines()
    assert len(lines) == 2
    for line in lines:
        slide_id, where, rate = line.split("\t")
        assert (out / slide_id / "manifest.json").exists() and where.endswith("slide.zarr")
        assert rate.endswith("MP/s")
    errors = run.stderr.strip().splitlines()
    assert len(errors) == 3 and all(e.startswith("wsi: error: ") for e in errors)
    assert "Traceback" not in run.stderr
    listed = wsi("list", str(out))
    assert sorted(listed.stdout.split()) == sorted(line.split("\t")[0] for line in lines)
    again = wsi("convert", str(good[0]), "--out", str(out), "--no-progress")
    assert again.returncode == 0 and "already published" in again.stdout


def test_bad_arguments_are_one_line_and_nonzero(tmp_path: Path) -> None:
    src = str(sample("openslide-python-fixtures/small.svs"))
    for args in (
        ["--quality", "0"],
        ["--tile-size", "100"],
        ["--workers", "-1"],
        ["--slide-id", "../x"],
    ):
        run = wsi("convert", src, "--out", str(tmp_path), "--no-progress", *args)
        assert run.returncode != 0
        assert len(run.stderr.strip().splitlines()) == 1, run.stderr
        assert "Traceback" not in run.stderr
    run = wsi("info", str(tmp_path / "nothing.svs"))
    assert run.returncode == 1 and run.stderr.startswith("wsi: error: ")


def test_a_fifo_or_a_device_is_refused_instead_of_read_for_ever(tmp_path: Path) -> None:
    """`wsi info` and `wsi convert` of a FIFO waited for a writer for ever."""
    fifo = tmp_path / "slide.svs"
    os.mkfifo(fifo)
    for args in (["info", str(fifo)], ["convert", str(fifo), "--out", str(tmp_path / "o")]):
        run = wsi(*args)
        assert run.returncode == 1 and len(run.stderr.strip().splitlines()) == 1, run.stderr
        assert run.stderr.startswith("wsi: error: ") and "not a regular file" in run.stderr
    run = wsi("info", "/dev/zero")
    assert run.returncode == 1 and "not a regular file" in run.stderr


def test_progress_fd_reports_rising_json_lines(tmp_path: Path, medium_jpeg_tiff: Path) -> None:
    read_fd, write_fd = os.pipe()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "wsi.cli",
            "convert",
            str(medium_jpeg_tiff),
            "--out",
            str(tmp_path / "out"),
            "--no-progress",
            "--no-reuse-levels",
            "--progress-fd",
            str(write_fd),
        ],
        pass_fds=(write_fd,),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    os.close(write_fd)
    with proc, os.fdopen(read_fd) as lines:
        values = [json.loads(line)["progress"] for line in lines]
        assert proc.wait(300) == 0
    assert values[-1] == 100.0
    assert values == sorted(values) and len(set(values)) == len(values)
    assert any(0 < v < 100 for v in values), values


def test_exit_with_stdin_stops_when_the_supervisor_goes(
    tmp_path: Path, medium_jpeg_tiff: Path
) -> None:
    """The supervisor (an ingest worker) holds the write end of stdin; when it dies, the pipe
    closes and the conversion stops instead of publishing behind the job's next attempt.

    Stdin closes as soon as the first progress line says the conversion is under way: a signal,
    not a sleep (the default conversion of this slide takes about 1 s, so a fixed pause can
    outlast it). Almost every tile of the 108 MP base level is then still to be decoded by
    OpenSlide and re-encoded on one thread, about 7 s of work on the machine this was measured
    on, so the close lands mid-conversion even on a much faster one.
    """
    read_fd, write_fd = os.pipe()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "wsi.cli",
            "convert",
            str(medium_jpeg_tiff),
            "--out",
            str(tmp_path / "out"),
            "--no-progress",
            "--no-reuse-levels",
            "--backend",
            "openslide",
            "--workers",
            "1",
            "--progress-fd",
            str(write_fd),
            "--exit-with-stdin",
        ],
        stdin=subprocess.PIPE,
        pass_fds=(write_fd,),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    os.close(write_fd)
    with proc, os.fdopen(read_fd) as lines:
        assert proc.stdin is not None
        first = json.loads(lines.readline())["progress"]
        proc.stdin.close()  # as if the supervisor died
        assert proc.wait(10) == 75
        later = [json.loads(line)["progress"] for line in lines]
    assert first < 100 and all(v < 100 for v in later), (first, later)
    assert not list((tmp_path / "out").glob("*/manifest.json"))


def test_bad_progress_fd_is_one_line(tmp_path: Path) -> None:
    for fd in ("97", "1"):
        run = wsi(
            "convert",
            str(sample("CMU-1-Small-Region.svs")),
            "--out",
            str(tmp_path),
            "--progress-fd",
            fd,
        )
        assert run.returncode == 1
        assert run.stderr.count("\n") == 1 and "--progress-fd" in run.stderr, run.stderr
        assert not list(tmp_path.iterdir())  # nothing written


def test_reader_libraries_add_no_lines_to_stderr(tmp_path: Path) -> None:
    """A damaged TIFF made tifffile log its own warnings ("incorrect StripOffsets count ...")
    before the one `wsi: error:` line; they quote header values, and file names where a library
    logs them (wsidicom's "Failed to open file <path>")."""
    from .conftest import make_tiff

    good = make_tiff(tmp_path / "s.tif", 700, 600)
    cut = tmp_path / "cut.tif"
    cut.write_bytes(good.read_bytes()[:-1])
    info = wsi("info", str(cut))  # it reads the header only: nothing wrong to say
    assert info.returncode == 0 and info.stderr == "", info.stderr
    run = wsi("convert", str(cut), "--out", str(tmp_path / "o"))
    assert run.returncode == 1, run.stdout
    assert run.stderr.splitlines() == [run.stderr.strip()], run.stderr
    assert run.stderr.startswith("wsi: error: "), run.stderr


def test_a_local_store_that_is_not_a_folder_is_one_line(tmp_path: Path) -> None:
    """A store path typed wrong: the commands that read a store say so, instead of "0 slides"
    and exit 0 (an empty, healthy store); a store path that is a file, or lies under one, is
    one line from `convert` and `sync`'s target, not NotADirectoryError with exit 75 ("retry
    later"). Nothing is written."""
    missing, file = tmp_path / "nodir", tmp_path / "file"
    file.write_bytes(b"")
    (tmp_path / "empty").mkdir()
    for store, says in ((missing, "does not exist"), (file, "is not a folder")):
        for args in (
            ["list", str(store)],
            ["du", str(store)],
            ["verify", str(store)],
            ["sync", str(store), str(tmp_path / "copy")],
        ):
            run = wsi(*args)
            assert (run.returncode, run.stdout) == (1, ""), args
            assert run.stderr == f"wsi: error: store {store} {says}\n", args
    src = str(sample("openslide-python-fixtures/small.svs"))
    for out, says in ((file, "is not a folder"), (file / "sub", f"cannot be a folder: {file}")):
        run = wsi("convert", src, src, "--out", str(out), "--no-progress")
        assert (run.returncode, run.stdout) == (1, "")
        assert run.stderr.startswith(f"wsi: error: store {out} {says}"), run.stderr
        assert run.stderr.count("\n") == 1, run.stderr
        sync = wsi("sync", str(tmp_path / "empty"), str(out))
        assert (sync.returncode, sync.stdout, sync.stderr) == (1, "", run.stderr)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "file"]


def test_a_store_url_typed_wrong_is_one_line_not_a_local_folder(tmp_path: Path) -> None:
    """`--out s3:/bucket/x` (one slash), `S3://bucket/x` or another scheme converted into a
    local folder named `s3:` (`S3:`, `ftp:`) under the current folder and exited 0: the user
    believed the slide was in the bucket. Refused in one line by every command; `./s3:/x`
    still names a local folder."""
    src = str(sample("openslide-python-fixtures/small.svs"))
    for url in ("s3:/bucket/x", "S3://bucket/x", "s3:bucket/x", "ftp://host/x"):
        for args in (
            ["convert", src, "--out", url, "--no-progress"],
            ["list", url],
            ["serve", "--store", url, "--port", "8999"],
        ):
            run = subprocess.run(
                [sys.executable, "-m", "server.cli", *args],
                capture_output=True,
                text=True,
                timeout=60,  # a service that starts would run until stopped
                check=False,
                cwd=tmp_path,
            )
            assert (run.returncode, run.stdout) == (1, ""), (args, run.stdout)
            assert run.stderr.startswith(f"wsi: error: store {url} reads as a URL"), args
            assert run.stderr.count("\n") == 1, run.stderr
    assert list(tmp_path.iterdir()) == []
    run = subprocess.run(
        [sys.executable, "-m", "server.cli", "convert", src, "--out", "./s3:/x", "--no-progress"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=tmp_path,
    )
    assert run.returncode == 0, run.stderr
    assert (tmp_path / "s3:" / "x").is_dir()


def test_an_s3_endpoint_without_its_scheme_is_one_line(tmp_path: Path) -> None:
    """`--s3-endpoint 127.0.0.1:8333` (or AWS_ENDPOINT_URL so) made obstore panic while it
    signed the first request: a Rust backtrace and a Python traceback, ~90 lines, for
    `wsi list` and `wsi convert` alike. One line now, naming where the endpoint came from."""
    src = str(sample("openslide-python-fixtures/small.svs"))
    env = {k: v for k, v in os.environ.items() if k != "AWS_ENDPOINT_URL"}
    for args, extra_env, given in (
        (["list", "s3://bucket/slides", "--s3-endpoint", "127.0.0.1:8333"], {}, "--s3-endpoint"),
        (["convert", src, "--out", "s3://bucket/slides", "--no-progress"],
         {"AWS_ENDPOINT_URL": "127.0.0.1:8333"}, "AWS_ENDPOINT_URL"),
    ):  # fmt: skip
        run = wsi(*args, env={**env, **extra_env})
        assert (run.returncode, run.stdout) == (1, ""), run.stdout
        assert run.stderr.count("\n") == 1, run.stderr
        assert f"S3 endpoint 127.0.0.1:8333 ({given}) must be a URL" in run.stderr, run.stderr


def test_the_service_and_ingest_roles_refuse_a_store_that_is_a_file(tmp_path: Path) -> None:
    """`wsi serve` served a store path that is a file as an empty store (`/readyz`: ready, store
    reachable), and `wsi watch` / `wsi worker` made their state folder beside it and took jobs
    no conversion could publish. Each now stops at start with the one line `convert` gives."""
    file = tmp_path / "file"
    file.write_bytes(b"")
    (tmp_path / "inbox").mkdir()
    sub = (file / "sub", f"cannot be a folder: {file} is not one")
    for store, says in ((file, "is not a folder"), sub):
        for args in (
            ["serve", "--store", str(store), "--port", "8999"],
            ["watch", str(tmp_path / "inbox"), "--store", str(store)],
            ["worker", "--store", str(store)],
        ):
            run = subprocess.run(
                [sys.executable, "-m", "server.cli", *args],
                capture_output=True,
                text=True,
                timeout=60,  # a role that starts would run until stopped
                check=False,
            )
            assert (run.returncode, run.stdout) == (1, ""), (args, run.stdout)
            assert run.stderr == f"wsi: error: store {store} {says}\n", args
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "inbox"]


def test_the_service_without_ingest_refuses_a_store_that_does_not_exist(tmp_path: Path) -> None:
    """`wsi serve --store ./typo` served an empty store (`/readyz`: ready, store reachable; the
    viewer: no slides) and made `typo.state` beside it. Without watch folders or s3 sources
    nothing would ever make that folder: one line now, as `wsi list` gives."""
    typo = tmp_path / "typo"
    run = subprocess.run(
        [sys.executable, "-m", "server.cli", "serve", "--store", str(typo), "--port", "8999"],
        capture_output=True,
        text=True,
        timeout=60,  # a service that starts would run until stopped
        check=False,
    )
    assert (run.returncode, run.stdout) == (1, ""), run.stdout
    assert run.stderr == f"wsi: error: store {typo} does not exist\n"
    assert list(tmp_path.iterdir()) == []


def test_the_service_refuses_a_source_folder_typed_wrong(tmp_path: Path) -> None:
    """`wsi serve --sources ./typo` served none of the folder's slides, `/readyz` ready, and
    no line said why (a watch folder that cannot be listed is reported; a source folder was
    not). One line at start now, from the flag or from WSI_SOURCES."""
    store, typo, file = tmp_path / "store", tmp_path / "typo", tmp_path / "file.svs"
    store.mkdir()
    file.write_bytes(b"")
    for extra, env, says in (
        (["--sources", str(typo)], {}, f"source folder {typo} does not exist"),
        ([], {"WSI_SOURCES": f"{store},{typo}"}, f"source folder {typo} does not exist"),
        (["--sources", str(file)], {}, f"source folder {file} is not a folder"),
    ):
        run = subprocess.run(
            [sys.executable, "-m", "server.cli", "serve", "--store", str(store), *extra],
            capture_output=True,
            text=True,
            timeout=60,  # a service that starts would run until stopped
            check=False,
            env={**os.environ, "WSI_PORT": "8999", **env},
        )
        assert (run.returncode, run.stdout) == (1, ""), (extra, env, run.stdout)
        assert run.stderr == f"wsi: error: {says}\n"


def test_the_service_refuses_an_audit_log_it_cannot_write_in_one_line(tmp_path: Path) -> None:
    """`wsi serve --audit-log /no/such/folder/audit.log` said it served, then each serving
    process ended in a traceback (77 lines with two processes). One line now, before any line
    that says it serves."""
    store = tmp_path / "store"
    store.mkdir()
    for path, says in (
        (tmp_path / "no" / "audit.log", "No such file or directory"),
        (tmp_path, "Is a directory"),
    ):
        run = subprocess.run(
            [sys.executable, "-m", "server.cli", "serve", "--store", str(store),
             "--audit-log", str(path), "--port", "8999", "--processes", "2"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )  # fmt: skip
        assert (run.returncode, run.stdout) == (1, ""), run.stdout
        assert run.stderr == f"wsi: error: audit log {path}: {says}\n"


def test_options_may_come_after_the_positionals(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`wsi verify STORE --rate 50 ID` was "unrecognized arguments: ID": argparse filled the
    positionals before the first option. Every subcommand now takes its options anywhere."""
    parser = build_parser([_add_serve])
    args = parser.parse_args(["verify", "data", "--rate", "50", "a", "b"])
    assert (args.store, args.ids, args.rate) == ("data", ["a", "b"], 50.0)
    args = parser.parse_args(["sync", "A", "--rate", "50", "B", "ID", "--repair"])
    assert (args.source, args.target, args.ids, args.rate, args.repair) == (
        "A", "B", ["ID"], 50.0, True,
    )  # fmt: skip
    args = parser.parse_args(["convert", "x.svs", "--out", "o", "y.svs", "--quality", "80"])
    assert (args.sources, args.out, args.quality) == (["x.svs", "y.svs"], "o", 80)
    args = parser.parse_args(["watch", "in1", "--store", "s", "in2"])
    assert (args.folders, args.store) == (["in1", "in2"], "s")
    args = parser.parse_args(["du", "data", "--json", "ID", "--by-level"])
    assert (args.ids, args.json, args.by_level) == (["ID"], True, True)
    args = parser.parse_args(["convert", "--out", "o", "--", "-x.svs", "--y.svs"])
    assert (args.sources, args.out) == (["-x.svs", "--y.svs"], "o")  # `--` as before
    # Every subcommand's parser is one that intermixing accepts (it refuses some argparse
    # features with TypeError), and prints its help.
    [commands] = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    subcommands = list(commands.choices)
    assert {"convert", "verify", "sync", "serve", "export-dicom", "archive"} <= set(subcommands)
    for name in subcommands:
        with pytest.raises(SystemExit) as exits:
            parser.parse_args([name, "--help"])
        assert exits.value.code == 0
        assert capsys.readouterr().out.startswith(f"usage: wsi {name} ")
    for bad in (["verify", "data", "--bogus"], ["verify"], ["convert", "x.svs"]):
        with pytest.raises(SystemExit) as exits:
            parser.parse_args(bad)
        assert exits.value.code == 2
    capsys.readouterr()
    run = wsi("verify", str(tmp_path / "nodir"), "--rate", "50", "ID")  # parsed, then refused
    assert run.stderr == f"wsi: error: store {tmp_path / 'nodir'} does not exist\n"


def test_a_command_line_typed_wrong_is_one_line(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A flag typed wrong printed argparse's whole usage (14 lines for `wsi convert`) before
    the line saying what was wrong; `wsi serve --stroe` was "unrecognized arguments" under the
    top-level usage, which does not list serve's options, and `convert x --outt d` said only
    that --out was missing. One line now, exit 2 as before, naming the nearest option."""
    parser = build_parser([_add_serve])
    for argv, says in (
        (["serve", "--stroe", "data"], "wsi serve: error: unrecognized arguments: --stroe data; "
         "did you mean --store? (see wsi serve --help)"),
        (["convert", "x.svs", "--outt", "d"], "wsi convert: error: unrecognized arguments: "
         "--outt; did you mean --out? (the following arguments are required: --out) "
         "(see wsi convert --help)"),
        (["verify", "data", "--rates=5"], "wsi verify: error: unrecognized arguments: "
         "--rates=5; did you mean --rate? (see wsi verify --help)"),
        (["convert", "x.svs", "--out", "d", "--quality", "high"], "wsi convert: error: "
         "argument --quality: invalid int value: 'high' (see wsi convert --help)"),
        (["lst"], "wsi: error: argument command: invalid choice: 'lst'"),
    ):  # fmt: skip
        with pytest.raises(SystemExit) as exits:
            parser.parse_args(argv)
        assert exits.value.code == 2, argv
        captured = capsys.readouterr()
        assert captured.out == "" and captured.err.count("\n") == 1, captured.err
        assert captured.err.startswith(says), captured.err


def test_a_slide_cut_before_its_tiff_directory_says_so(tmp_path: Path) -> None:
    """A slide still being copied (or cut short) whose header points past its end: every
    backend said "no backend can read this slide", as for a damaged scan. Told apart now, for
    the little-endian TIFF and the BigTIFF header alike; still one line and exit 1."""
    source = sample("CMU-1-Small-Region.svs")
    data = source.read_bytes()
    first = int.from_bytes(data[4:8], "little")
    cut = tmp_path / "cut.svs"
    cut.write_bytes(data[: first - 100])
    big = tmp_path / "big.tif"  # a BigTIFF header whose first directory is past the end
    big.write_bytes(b"II+\x00\x08\x00\x00\x00" + (10**6).to_bytes(8, "little") + b"\0" * 64)
    for path, at in ((cut, first), (big, 10**6)):
        run = wsi("convert", str(path), "--out", str(tmp_path / "out"), "--no-progress")
        assert run.returncode == 1, run.stderr
        assert run.stderr.strip().splitlines() == [
            f"wsi: error: {path}: the file ends ({path.stat().st_size} bytes) before its first "
            f"TIFF directory (at byte {at}): a copy still under way, or a file cut short"
        ]
    whole = wsi("info", str(source))  # a whole file is not taken for a cut one
    assert whole.returncode == 0, whole.stderr
