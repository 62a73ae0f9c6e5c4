"""`wsi`: inspect and convert slides. Errors are one readable line and a non-zero exit."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from wsi import __version__
from wsi.convert import FORMATS, ConvertResult, ConvertSettings, convert_slide
from wsi.errors import InvalidArgument, StoreError, WsiError
from wsi.export import export_dicom_location
from wsi.pyramid.builder import Progress, PyramidSettings, plan_pyramid
from wsi.sources import backend_names, open_slide
from wsi.store.objects import Store, StoreSettings

EXIT_TEMPFAIL = 75
"""Exit status when a slide failed because the store did, or for a reason we cannot classify
(sysexits EX_TEMPFAIL): ingest retries those with backoff, while status 1 (the slide itself is
unreadable) is final."""


def _info(args: argparse.Namespace) -> int:
    with open_slide(args.source, args.backend) as src:
        props = src.properties
        doc: dict[str, Any] = {
            "backend": src.name,
            "vendor": props.vendor,
            "mpp_x": props.mpp_x,
            "mpp_y": props.mpp_y,
            "objective_power": props.objective_power,
            "levels": [
                {
                    "width": lv.width,
                    "height": lv.height,
                    "downsample": lv.downsample,
                    "tile_width": lv.tile_width,
                    "tile_height": lv.tile_height,
                    "tile_codec": src.tile_codec(i).value,
                }
                for i, lv in enumerate(src.levels)
            ],
            "associated_images": {
                name: dict(
                    zip(("height", "width"), src.read_associated(name).shape[:2], strict=False)
                )
                for name in src.associated_names
            },
            "icc_profile_bytes": len(props.icc_profile) if props.icc_profile else 0,
            "output_levels": [
                {
                    "width": p.level.width,
                    "height": p.level.height,
                    "from": f"source level {p.source_level}" if p.passthrough else "derived",
                }
                for p in plan_pyramid(src, PyramidSettings())
            ],
            "properties": dict(props.vendor_properties),
        }
    json.dump(doc, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


def _progress_bar(enabled: bool, label: str) -> tuple[Any, Any]:
    if not enabled:
        return None, None
    from tqdm import tqdm

    bar = tqdm(total=0, unit="tile", desc=label, file=sys.stderr, leave=False)

    def update(done: int, total: int) -> None:
        bar.total = total
        bar.n = done
        bar.refresh() if done == total or done % 64 == 0 else None

    return bar, update


class ProgressChannel:
    """`--progress-fd N`: the conversion's overall progress as JSON lines (`{"progress": 12.5}`)
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
            self._out.write(json.dumps({"progress": value}) + "\n")


def _exit_with_stdin() -> None:
    """`--exit-with-stdin`: end this process when standard input reaches end-of-file.

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
        os._exit(EXIT_TEMPFAIL)

    threading.Thread(target=watch, name="wsi-stdin-watch", daemon=True).start()


def _formats(choice: str | None, lossless: bool) -> tuple[str, ...]:
    if choice is None:
        return ("zarr",) if lossless else FORMATS
    return FORMATS if choice == "both" else (choice,)


def _convert(args: argparse.Namespace) -> int:
    settings = ConvertSettings(
        pyramid=PyramidSettings(
            quality=args.quality,
            lossless=args.lossless,
            workers=args.workers,
            tile_size=args.tile_size,
            reuse_levels=not args.no_reuse_levels,
            subsample_420=args.subsampling == "420",
        ),
        backend=args.backend,
        include_associated=not args.no_associated,
        formats=_formats(args.format, args.lossless),
        metadata_file=args.metadata,
        deidentify=args.deidentify,
        keep_label=args.keep_label,
        keep_macro=args.keep_macro,
    )
    if args.slide_id and len(args.sources) > 1:
        raise WsiError("--slide-id names one slide; give one source with it")
    if args.exit_with_stdin:
        _exit_with_stdin()
    store = Store(StoreSettings(args.out, endpoint_url=args.s3_endpoint))
    show = args.progress if args.progress is not None else sys.stderr.isatty()
    channel = None
    if args.progress_fd is not None:
        channel = ProgressChannel(args.progress_fd, len(args.sources))
    failures = 0
    transient = False
    for index, source in enumerate(args.sources):
        bar, update = _progress_bar(show, Path(source).name)
        try:
            result = _convert_one(args, index, source, store, settings, update, channel)
        except StoreError as exc:  # the store, not the slide: worth retrying later
            failures += 1
            transient = True
            print(f"wsi: error: {source}: {exc}", file=sys.stderr)
            continue
        except WsiError as exc:
            failures += 1
            print(f"wsi: error: {source}: {exc}", file=sys.stderr)
            continue
        except Exception as exc:  # a library failed in a way it does not document
            # (botocore's connection errors, a reader's own exception): maybe the network,
            # maybe the slide; retryable, so ingest tries again before it gives up.
            failures += 1
            transient = True
            print(
                f"wsi: error: {source}: cannot convert ({type(exc).__name__}: {exc})",
                file=sys.stderr,
            )
            continue
        finally:
            if bar is not None:
                bar.close()
        rate = "already published" if result.skipped else f"{result.megapixels_per_second:.1f} MP/s"
        print(f"{result.slide_id}\t{result.url}\t{rate}", flush=True)
    if transient:
        return EXIT_TEMPFAIL
    return 1 if failures else 0


def _convert_one(
    args: argparse.Namespace,
    index: int,
    source: str,
    store: Store,
    settings: ConvertSettings,
    update: Progress | None,
    channel: ProgressChannel | None,
) -> ConvertResult:
    """One slide; an `s3://` source is first staged in a local spool folder (the readers need
    files), downloaded with bounded memory and removed afterwards."""
    from wsi.ingest.staging import STAGE_SHARE, is_remote, staged

    remote = is_remote(source)
    start = STAGE_SHARE if remote else 0.0

    def tiles(done: int, total: int) -> None:
        if update is not None:
            update(done, total)
        if channel is not None and total:
            channel.report(index, start + (1.0 - start) * done / total)

    if not remote:
        return convert_slide(source, store, settings, args.slide_id, tiles)

    def download(done: int, total: int) -> None:
        if channel is not None and total:
            channel.report(index, STAGE_SHARE * done / total)

    with staged(source, args.s3_endpoint, args.spool, download) as local:
        return convert_slide(local, store, settings, args.slide_id, tiles)


def _export(args: argparse.Namespace) -> int:
    for path in export_dicom_location(args.slide, args.dest, args.s3_endpoint):
        print(path)
    return 0


def _ingest_role(args: argparse.Namespace) -> int:
    from wsi.ingest.queue import SQLiteJobQueue
    from wsi.ingest.watcher import check_watch_folders
    from wsi.ingest.worker import IngestSettings, run_roles

    settings = IngestSettings(
        store=args.store,
        s3_endpoint=args.s3_endpoint,
        after_success=args.after,
        done_dir=args.done_dir,
        quarantine_dir=args.quarantine_dir,
        poll_seconds=args.poll_seconds,
        stop_timeout=args.stop_timeout,
        job_timeout=args.job_timeout,
        stall_timeout=args.stall_timeout,
        spool_dir=args.spool,
    )
    watch = tuple(args.folders) if args.command == "watch" else ()
    check_watch_folders(
        watch,
        store=args.store,
        **{"job table": str(Path(args.jobs).resolve().parent)},
        done=args.done_dir,
        quarantine=args.quarantine_dir,
    )
    Path(args.jobs).parent.mkdir(parents=True, exist_ok=True)
    with SQLiteJobQueue(args.jobs) as queue:
        workers = args.workers if args.command == "worker" else 0
        run_roles(
            queue,
            settings,
            workers,
            watch,
            args.quiet_seconds,
            args.poll_seconds,
            args.keep_jobs_days,
        )
    return 0


def _list(args: argparse.Namespace) -> int:
    store = Store(StoreSettings(args.store, endpoint_url=args.s3_endpoint))
    for slide_id in store.published_slides():
        print(slide_id)
    return 0


def _add_convert(sub: Any) -> None:
    """`wsi convert`: one or many slides into a store."""
    conv = sub.add_parser("convert", help="convert slides to OME-Zarr in a folder or s3:// URL")
    conv.add_argument(
        "sources", nargs="+", metavar="SRC", help="slide files or folders, or s3:// URLs"
    )
    conv.add_argument("--out", required=True, metavar="DIR_OR_URL")
    conv.add_argument("--quality", type=int, default=90, help="JPEG quality of tiles we encode")
    conv.add_argument(
        "--subsampling",
        choices=["420", "444"],
        default="420",
        help="tiles we encode: YCbCr 4:2:0, or RGB-coded 4:4:4 (larger, sharper)",
    )
    conv.add_argument(
        "--format",
        choices=["both", "zarr", "dicom"],
        default=None,
        help="views to publish; both share one copy of the pixels "
        "(default: both; zarr with --lossless, whose zstd tiles DICOM cannot carry)",
    )
    conv.add_argument(
        "--metadata",
        metavar="FILE",
        help="patient/study/specimen JSON (default: the slide's sidecar JSON)",
    )
    conv.add_argument(
        "--deidentify",
        action="store_true",
        help="DICOM PS3.15 Basic Profile: no identifiers, no label or macro",
    )
    conv.add_argument("--keep-label", action="store_true", help="with --deidentify: keep label")
    conv.add_argument("--keep-macro", action="store_true", help="with --deidentify: keep macro")
    conv.add_argument("--lossless", action="store_true", help="encode tiles we make with zstd")
    conv.add_argument("--workers", type=int, default=0, help="threads (default: one per core)")
    conv.add_argument("--tile-size", type=int, default=256, help="tile size when re-encoding")
    conv.add_argument(
        "--no-reuse-levels",
        action="store_true",
        help="derive every level from the base instead of copying source levels",
    )
    conv.add_argument("--no-associated", action="store_true", help="skip label/macro/thumbnail")
    conv.add_argument("--slide-id", help="use this id instead of one derived from the content")
    conv.add_argument("--backend", choices=backend_names())
    conv.add_argument("--s3-endpoint", help="S3 endpoint URL (default: $AWS_ENDPOINT_URL)")
    conv.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None)
    conv.add_argument(
        "--spool",
        metavar="DIR",
        help="where s3:// sources are downloaded for conversion (default: the temp folder)",
    )
    conv.add_argument(
        "--progress-fd",
        type=int,
        metavar="FD",
        help="write progress as JSON lines to this open file descriptor (for supervisors)",
    )
    conv.add_argument(
        "--exit-with-stdin",
        action="store_true",
        help="stop when standard input closes (a supervisor holding the pipe has died)",
    )
    conv.set_defaults(func=_convert)


def _add_roles(sub: Any) -> None:
    """`wsi worker` and `wsi watch`: ingest roles on their own."""
    for role in ("worker", "watch"):
        helptext = (
            "run conversion workers on a job table, without the HTTP service"
            if role == "worker"
            else "turn complete drops in folders into jobs, without the HTTP service"
        )
        cmd = sub.add_parser(role, help=helptext)
        if role == "watch":
            cmd.add_argument("folders", nargs="+", metavar="DIR")
        cmd.add_argument("--store", required=True, metavar="DIR_OR_URL")
        cmd.add_argument("--jobs", required=True, metavar="SQLITE_FILE", help="the job table")
        cmd.add_argument("--workers", type=int, default=1)
        cmd.add_argument("--s3-endpoint")
        cmd.add_argument("--after", choices=["keep", "move", "delete"], default="keep")
        cmd.add_argument("--done-dir", default="done")
        cmd.add_argument("--quarantine-dir", default="quarantine")
        cmd.add_argument("--quiet-seconds", type=float, default=5.0)
        cmd.add_argument("--poll-seconds", type=float, default=2.0)
        cmd.add_argument("--stop-timeout", type=float, default=30.0, help="seconds, on SIGTERM")
        cmd.add_argument("--job-timeout", type=float, default=0.0, help="seconds (0: none)")
        cmd.add_argument(
            "--stall-timeout", type=float, default=600.0, help="seconds without progress"
        )
        cmd.add_argument("--keep-jobs-days", type=float, default=30.0)
        cmd.add_argument("--spool", help="download folder for s3:// sources")
        cmd.set_defaults(func=_ingest_role)


CommandAdder = Callable[[Any], None]
"""Adds one subcommand to the `wsi` parser (the service adds `serve` this way)."""


def build_parser(commands: Sequence[CommandAdder] = ()) -> argparse.ArgumentParser:
    """The `wsi` parser: the library's commands, then `commands` from the layers above it."""
    parser = argparse.ArgumentParser(
        prog="wsi", description="Convert whole-slide images to OME-Zarr pyramids in object storage."
    )
    parser.add_argument("--version", action="version", version=f"wsistore {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    info = sub.add_parser("info", help="print a slide's levels, properties and associated images")
    info.add_argument("source")
    info.add_argument("--backend", choices=backend_names())
    info.set_defaults(func=_info)

    _add_convert(sub)
    exp = sub.add_parser("export-dicom", help="a slide's DICOM view as a folder of .dcm files")
    exp.add_argument("slide", metavar="SLIDE_DIR_OR_URL", help="STORE/<slide-id>")
    exp.add_argument("dest", metavar="DEST_DIR")
    exp.add_argument("--s3-endpoint")
    exp.set_defaults(func=_export)

    for add in commands:
        add(sub)
    _add_roles(sub)
    ls = sub.add_parser("list", help="list the published slides of a store")
    ls.add_argument("store", metavar="DIR_OR_URL")
    ls.add_argument("--s3-endpoint")
    ls.set_defaults(func=_list)
    return parser


def main(argv: Sequence[str] | None = None, commands: Sequence[CommandAdder] = ()) -> int:
    """Run one `wsi` command; `commands` adds subcommands of layers above the library."""
    args = build_parser(commands).parse_args(argv)
    # Reader libraries warn about quirks of the files they read (over-long UIDs ...): that is not
    # the user's business here, and their messages may quote header values.
    warnings.simplefilter("ignore")
    try:
        return int(args.func(args))
    except WsiError as exc:
        print(f"wsi: error: {exc}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        return 1
    except KeyboardInterrupt:
        print("wsi: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
