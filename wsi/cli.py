"""`wsi`: inspect and convert slides. Errors are one readable line and a non-zero exit."""

from __future__ import annotations

import argparse
import contextlib
import difflib
import functools
import gc
import json
import os
import sys
import threading
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

# Before numpy is imported: OpenBLAS would start a thread per core that spins waiting for work
# (~0.1 CPU-s per command, a tenth of a 1-second conversion, and wall time on a busy machine).
# Our only matrix products are (n, 3) colours by a 3-vector, far too small to share out.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

from wsi import __version__
from wsi.errors import InvalidArgument, SlideBusy, SlideIncomplete, StoreError, WsiError
from wsi.ingest.protocol import (
    DEIDENTIFY_FLAG,
    KEEP_LABEL_FLAG,
    KEEP_MACRO_FLAG,
    ExitCode,
    ResultLine,
    add_staging_arguments,
    add_supervision_arguments,
    sources_of,
    staging_limits,
)
from wsi.ingest.settings import IngestSettings, add_ingest_arguments, ignored_by_watch
from wsi.process_logging import quiet_readers, report_ingest
from wsi.pseudonyms import KEY_FILE_ENV
from wsi.sources import backend_names
from wsi.store.objects import Store, StoreSettings
from wsi.store_commands import add_export_command, add_store_commands
from wsi.supervised import ProgressChannel, exit_with_stdin, terminate_as_interrupt

if TYPE_CHECKING:
    from wsi.convert import ConvertResult, ConvertSettings
    from wsi.pyramid.builder import Progress
    from wsi.pyramid.cluster import ClusterOptions
    from wsi.sources import SlideSource

DEIDENTIFY_KEY_FLAG = "--deidentify-key-file"

# Each command imports what only it uses (the converter, the reader of published slides and
# pydicom, the checks of `wsi verify` ...) in its own function: every command, `wsi convert`
# above all, starts without the others' modules.


def _output_levels(src: SlideSource) -> list[dict[str, Any]]:
    """The levels a conversion with default settings makes, and where each one's tiles come
    from (what the manifest will record)."""
    from wsi.convert import level_origins
    from wsi.pyramid.builder import PyramidSettings, plan_pyramid

    plans = plan_pyramid(src, PyramidSettings())
    return [
        {"width": p.level.width, "height": p.level.height, **origin.to_json()}
        for p, origin in zip(plans, level_origins(src, plans), strict=True)
    ]


def _info(args: argparse.Namespace) -> int:
    from wsi.ingest.staging import is_remote
    from wsi.sources import open_slide

    if is_remote(args.source):  # it said "no such file or folder" of an object that exists
        raise InvalidArgument(
            f"{args.source}: wsi info reads a slide on this machine: copy it here first "
            "(wsi convert downloads an s3:// slide itself)"
        )
    try:
        source = open_slide(args.source, args.backend)
    except WsiError as exc:  # a line that names the slide, as `wsi convert` gives
        raise WsiError(f"{args.source}: {exc}") from exc
    with source as src:
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
            "output_levels": _output_levels(src),
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


def _formats(choice: str | None, lossless: bool) -> tuple[str, ...]:
    from wsi.convert import FORMATS

    if choice is None:
        return ("zarr",) if lossless else FORMATS
    return FORMATS if choice == "both" else (choice,)


def _convert(args: argparse.Namespace) -> int:
    from wsi.convert import ConvertSettings
    from wsi.pyramid.builder import PyramidSettings

    settings = ConvertSettings(
        pyramid=PyramidSettings(
            quality=args.quality,
            lossless=args.lossless,
            workers=args.workers,
            tile_size=args.tile_size,
            reuse_levels=not args.no_reuse_levels,
            subsample_420=args.subsampling == "420",
            optimize_huffman=not args.keep_source_jpeg,
            keep_background=args.keep_background,
            keep_jpeg2000=args.keep_jpeg2000,
        ),
        backend=args.backend,
        include_associated=not args.no_associated,
        formats=_formats(args.format, args.lossless),
        metadata_file=args.metadata,
        deidentify=args.deidentify,
        keep_label=args.keep_label,
        keep_macro=args.keep_macro,
        deidentify_key_file=args.deidentify_key_file or os.environ.get(KEY_FILE_ENV) or None,
    )
    args.sources = sources_of(args, os.environ)
    if args.slide_id and len(args.sources) > 1:
        raise WsiError("--slide-id names one slide; give one source with it")
    finished = threading.Event()
    if args.exit_with_stdin:
        exit_with_stdin(finished)
    return _convert_into(args, settings, finished)


def _convert_into(
    args: argparse.Namespace, settings: ConvertSettings, finished: threading.Event
) -> int:
    store = Store(StoreSettings(args.out, endpoint_url=args.s3_endpoint))
    store.check_folder(exists=False)
    channel = None
    if args.progress_fd is not None:
        channel = ProgressChannel(args.progress_fd, len(args.sources))
    try:
        if args.dask is None:
            return _convert_all(args, store, settings, channel)
        from wsi.pyramid.cluster import ClusterOptions, check_address, cluster_address

        with cluster_address(check_address(args.dask)) as (address, threads):
            cluster = ClusterOptions(address, threads=threads)
            return _convert_all(args, store, settings, channel, cluster)
    finally:
        # Done before the progress descriptor closes: a supervisor that lets go of stdin once
        # it sees that end-of-file does not turn this status into TEMPFAIL.
        finished.set()
        if channel is not None:
            channel.close()


def _convert_all(
    args: argparse.Namespace,
    store: Store,
    settings: ConvertSettings,
    channel: ProgressChannel | None,
    cluster: ClusterOptions | None = None,
) -> ExitCode:
    """Convert every source in turn, printing a result line for each one published; the status
    says whether a failure is final or worth retrying (`wsi.ingest.protocol.ExitCode`)."""
    show = args.progress if args.progress is not None else sys.stderr.isatty()
    failures = 0
    transient = False
    busy = 0  # sources another process is converting now: no attempt was made
    for index, source in enumerate(args.sources):
        label = f"source {index + 1}" if settings.deidentify else Path(source).name
        bar, update = _progress_bar(show, label)
        try:
            result = _convert_one(args, index, source, store, settings, update, channel, cluster)
        except SlideBusy as exc:
            failures += 1
            busy += 1
            _error(args, index, source, str(exc))
            continue
        except (StoreError, SlideIncomplete) as exc:  # worth retrying later
            failures += 1
            transient = True
            _error(args, index, source, str(exc))
            continue
        except WsiError as exc:
            failures += 1
            _error(args, index, source, str(exc))
            continue
        except Exception as exc:  # a library failed in a way it does not document
            # (botocore's connection errors, a reader's own exception): maybe the network,
            # maybe the slide; retryable, so ingest tries again before it gives up.
            failures += 1
            transient = True
            _error(args, index, source, f"cannot convert ({type(exc).__name__}: {exc})")
            continue
        finally:
            if bar is not None:
                bar.close()
        rate = None if result.skipped else result.megapixels_per_second
        print(ResultLine(result.slide_id, result.url, rate).format(), flush=True)
    if busy and busy == failures:  # nothing failed: only not attempted yet
        return ExitCode.SLIDE_BUSY
    if transient or busy:
        return ExitCode.TEMPFAIL
    return ExitCode.FAILED if failures else ExitCode.OK


def _error(args: argparse.Namespace, index: int, source: str, message: str) -> None:
    """One error line for `source` (the `index`th). With `--deidentify` it names the slide by its
    id (or its place on the command line) and no name of its files, which are often patients'
    names: the line becomes the job's error, which the service shows."""
    if args.deidentify:
        from wsi.ingest.privacy import redact, reference, source_names

        ref = reference(args.slide_id) if args.slide_id else f"source {index + 1}"
        source, message = ref, redact(message, source_names(source), ref)
    print(f"wsi: error: {source}: {message}", file=sys.stderr)


def _told_once(source: str) -> Callable[[], None]:
    """What a conversion at a terminal says when its download waits for room in the spool
    (copies of conversions running beside it hold the quota): one line, not silence."""
    told: list[bool] = []

    def waiting() -> None:
        if not told:
            told.append(True)
            print(
                f"wsi: {source}: waiting for room in the spool: the copies of other conversions "
                "hold its quota (--spool-quota-bytes); the download starts once they end",
                file=sys.stderr,
                flush=True,
            )

    return waiting


def _convert_one(
    args: argparse.Namespace,
    index: int,
    source: str,
    store: Store,
    settings: ConvertSettings,
    update: Progress | None,
    channel: ProgressChannel | None,
    cluster: ClusterOptions | None = None,
) -> ConvertResult:
    """One slide; an `s3://` source is first staged in a local spool folder (the readers need
    files), downloaded with bounded memory and removed afterwards."""
    from wsi.convert import convert_slide
    from wsi.ingest.staging import STAGE_SHARE, is_remote, staged

    remote = is_remote(source)
    start = STAGE_SHARE if remote else 0.0

    def tiles(done: int, total: int) -> None:
        if update is not None:
            update(done, total)
        if channel is not None and total:
            channel.report(index, start + (1.0 - start) * done / total)

    if not remote:
        return convert_slide(source, store, settings, args.slide_id, tiles, cluster)

    def download(done: int, total: int) -> None:
        if channel is not None and total:
            channel.report(index, STAGE_SHARE * done / total)

    limits = staging_limits(args)
    waiting = channel.alive if channel is not None else _told_once(source)
    with staged(
        source, args.s3_endpoint, args.spool, download, limits=limits, waiting=waiting
    ) as local:
        return convert_slide(local, store, settings, args.slide_id, tiles, cluster)


def role_settings(
    args: argparse.Namespace, environ: Mapping[str, str] | None = None
) -> IngestSettings:
    """The ingest settings of `wsi watch` / `wsi worker`: their flags over the `WSI_*`
    variables over the defaults, exactly as `wsi serve` reads them; the watch folders checked."""
    settings = IngestSettings.from_args(args, environ)
    settings.check_watch_folders(args.folders if args.command == "watch" else (), args.store)
    return settings


def _ingest_role(args: argparse.Namespace) -> int:
    from wsi.ingest.queue import open_queue
    from wsi.ingest.roles import run_roles

    settings = role_settings(args)
    if args.command == "watch" and (ignored := ignored_by_watch(args)):
        print(
            f"wsistore: watch: ignoring {', '.join(ignored)} (conversions run in `wsi worker` "
            "or `wsi serve`)",
            file=sys.stderr,
        )
    store = StoreSettings(args.store, endpoint_url=args.s3_endpoint)
    Store(store).check_folder(exists=False)  # before a state folder is made beside a file
    settings.make_state(args.store)
    print(f"wsistore: {args.command}: {settings.describe_state(args.store)}", flush=True)
    with open_queue(settings.jobs_path(args.store)) as queue:
        if args.command == "watch":
            run_roles(queue, store, settings, watch=tuple(args.folders))
        else:
            loops = _archiving(store, settings)
            run_roles(queue, store, settings, convert=True, housekeeping=loops)
    return 0


def _archiving(
    store: StoreSettings, settings: IngestSettings
) -> dict[str, Callable[[Any], Awaitable[None]]]:
    """The archive policy loop of a converting role, when `archive_after_days` asks for one."""
    if not settings.archive_after_days:
        return {}
    from wsi.published.archive import archive_policy

    return {"archive": functools.partial(archive_policy, store, settings.archive_after_days)}


def _add_convert(sub: Any) -> None:
    """`wsi convert`: one or many slides into a store. The option groups are added in the order
    `--help` lists them."""
    conv = sub.add_parser("convert", help="convert slides to OME-Zarr in a folder or s3:// URL")
    _add_convert_locations(conv)
    _add_convert_encoding(conv)
    _add_convert_privacy(conv)
    _add_convert_tiles(conv)
    _add_convert_running(conv)
    add_staging_arguments(conv)
    add_supervision_arguments(conv)
    conv.set_defaults(func=_convert, cleans_up=True)


def _add_convert_locations(conv: argparse.ArgumentParser) -> None:
    """Where the slides come from and the store they go to."""
    conv.add_argument(
        "sources", nargs="*", metavar="SRC", help="slide files or folders, or s3:// URLs"
    )
    conv.add_argument("--out", required=True, metavar="DIR_OR_URL")


def _add_convert_encoding(conv: argparse.ArgumentParser) -> None:
    """How the tiles we encode are coded, and which views of the pixels are published."""
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


def _add_convert_privacy(conv: argparse.ArgumentParser) -> None:
    """The identifiers published with a slide, and what de-identification removes."""
    conv.add_argument(
        "--metadata",
        metavar="FILE",
        help="patient/study/specimen JSON (default: the slide's sidecar JSON)",
    )
    conv.add_argument(
        DEIDENTIFY_FLAG,
        action="store_true",
        help="DICOM PS3.15 Basic Profile: no identifiers, no label or macro (nor a thumbnail "
        "that may show the label), a neutral ICC profile text; errors name no file",
    )
    conv.add_argument(
        KEEP_LABEL_FLAG,
        action="store_true",
        help="with --deidentify: keep the label (and a thumbnail that may show it)",
    )
    conv.add_argument(KEEP_MACRO_FLAG, action="store_true", help="with --deidentify: keep macro")
    conv.add_argument(
        DEIDENTIFY_KEY_FLAG,
        metavar="FILE",
        help="with --deidentify: the key file that makes the slide id from its content (default: "
        f"${KEY_FILE_ENV}, else ~/.config/wsistore/deidentify.key, made if absent)",
    )


def _add_convert_tiles(conv: argparse.ArgumentParser) -> None:
    """How the pyramid's tiles are made: codec of the tiles we make, threads, tile size, which
    source tiles are copied as they are, and which images are left out."""
    conv.add_argument("--lossless", action="store_true", help="encode tiles we make with zstd")
    conv.add_argument("--workers", type=int, default=0, help="threads (default: one per core)")
    conv.add_argument("--tile-size", type=int, default=256, help="tile size when re-encoding")
    conv.add_argument(
        "--no-reuse-levels",
        action="store_true",
        help="derive every level from the base instead of copying source levels",
    )
    conv.add_argument(
        "--keep-source-jpeg",
        action="store_true",
        help="store source JPEG tiles byte for byte (default: lossless Huffman optimisation)",
    )
    conv.add_argument(
        "--keep-jpeg2000",
        action="store_true",
        help="keep a JPEG 2000 source's base tiles as they are (DICOM JPEG 2000 transfer syntax; "
        "served to viewers as JPEG); default: decoded and stored as JPEG",
    )
    conv.add_argument(
        "--keep-background",
        action="store_true",
        help="store blank-glass tiles too (default: left out, read back as the fill grey)",
    )
    conv.add_argument("--no-associated", action="store_true", help="skip label/macro/thumbnail")


def _add_convert_running(conv: argparse.ArgumentParser) -> None:
    """How a run proceeds, not what it makes: the slide id, the reader, S3 access, progress,
    the spool of s3:// sources and a Dask cluster (the same bytes with or without one)."""
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
        "--dask",
        metavar="ADDRESS",
        help="build each pyramid in bands on a Dask cluster: tcp://SCHEDULER:8786 (workers "
        "reach the source and the store by the same path or URL), or local:N for N worker "
        "processes on this machine; the same bytes as without",
    )


def _add_roles(sub: Any) -> None:
    """`wsi worker` and `wsi watch`: ingest roles on their own, sharing a job table."""
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
        cmd.add_argument("--s3-endpoint", help="S3 endpoint URL (default: $AWS_ENDPOINT_URL)")
        add_ingest_arguments(cmd, watching=role == "watch")
        cmd.set_defaults(func=_ingest_role, unattended=True)


CommandAdder = Callable[[Any], None]
"""Adds one subcommand to the `wsi` parser (the service adds `serve` this way)."""


USAGE_ERROR = 2
"""argparse's exit status for a command line it cannot take (kept: scripts test for it)."""


class _OneLineParser(argparse.ArgumentParser):
    """A parser whose errors are one line: argparse printed its whole usage first (14 lines for
    `wsi convert`), and the line that said what was wrong came last, under it. The line names
    the closest option to one it does not know (`--outt`: did you mean --out?) and where the
    options are listed."""

    _given: Sequence[str] = ()
    """The arguments being parsed: a required option reported missing may be one typed wrong."""

    def error(self, message: str) -> NoReturn:
        options = self._option_string_actions
        unknown = [
            a
            for a in self._given
            if a.startswith("--")
            and not any(o.startswith(a.split("=", 1)[0]) for o in options)  # argparse's prefixes
        ]
        if unknown and message.startswith("the following arguments are required"):
            message = f"{self.unrecognized(unknown)} ({message})"  # `--outt x`: --out is missing
        self.exit(USAGE_ERROR, f"{self.prog}: error: {message} (see {self.prog} --help)\n")

    def unrecognized(self, extras: Sequence[str]) -> str:
        """The error for arguments nobody took, with the option nearest the first unknown one."""
        message = f"unrecognized arguments: {' '.join(extras)}"
        unknown = next((a.split("=", 1)[0] for a in extras if a.startswith("--")), None)
        options = [o for o in self._option_string_actions if o.startswith("--")]
        close = difflib.get_close_matches(unknown, options, n=1) if unknown else []
        return f"{message}; did you mean {close[0]}?" if close else message

    def parse_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> argparse.Namespace:
        # argparse reports what a subcommand left over from the top-level parser, whose error
        # knows neither the subcommand nor its options: the subcommand's parser says it.
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:
            parser = self._subcommand(getattr(parsed, "command", None))
            parser.error(parser.unrecognized(extras))
        return parsed

    def _subcommand(self, name: str | None) -> _OneLineParser:
        for action in self._actions:
            if isinstance(action, argparse._SubParsersAction) and name in action.choices:
                chosen = action.choices[name]
                if isinstance(chosen, _OneLineParser):
                    return chosen
        return self


class _SubcommandParser(_OneLineParser):
    """A subcommand's parser that takes options anywhere among the positionals, as
    `parse_intermixed_args` does: `wsi verify STORE --rate 50 ID`. Plain argparse fills the
    positionals (STORE, no ID) before the first option and then finds ID unrecognized.
    Arguments with `--` are parsed as before: intermixing drops the `--` (Python 3.11), and a
    name after it that starts with `-` would be taken for an option."""

    _intermixing = False

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        # `_intermixing`: the two passes of parse_known_intermixed_args, which call this.
        if not self._intermixing:
            self._given = list(args or ())
        if self._intermixing or args is None or "--" in args:
            return super().parse_known_args(args, namespace)
        self._intermixing = True
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._intermixing = False


def build_parser(commands: Sequence[CommandAdder] = ()) -> argparse.ArgumentParser:
    """The `wsi` parser: the library's commands, then `commands` from the layers above it."""
    parser = _OneLineParser(
        prog="wsi", description="Convert whole-slide images to OME-Zarr pyramids in object storage."
    )
    parser.add_argument("--version", action="version", version=f"wsistore {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_SubcommandParser)

    info = sub.add_parser("info", help="print a slide's levels, properties and associated images")
    info.add_argument("source")
    info.add_argument("--backend", choices=backend_names())
    info.set_defaults(func=_info)

    _add_convert(sub)
    add_export_command(sub)

    for add in commands:
        add(sub)
    _add_roles(sub)
    add_store_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None, commands: Sequence[CommandAdder] = ()) -> int:
    """Run one `wsi` command; `commands` adds subcommands of layers above the library."""
    args = build_parser(commands).parse_args(argv)
    quiet_readers(stamped=getattr(args, "unattended", False))
    if argv is None:  # the command line's own process: a caller's logging is its own
        report_ingest()
    cleans_up = getattr(args, "cleans_up", False)  # set by the commands that write
    try:
        with terminate_as_interrupt() if cleans_up else contextlib.nullcontext():
            return int(args.func(args))
    except WsiError as exc:
        print(f"wsi: error: {exc}", file=sys.stderr)
        return ExitCode.FAILED
    except BrokenPipeError:
        return ExitCode.FAILED
    except KeyboardInterrupt:
        print("wsi: interrupted", file=sys.stderr)
        return ExitCode.INTERRUPTED
    finally:
        if argv is None:  # the command line's own process, which ends now
            _skip_exit_collection()


def _skip_exit_collection() -> None:
    """Spare the interpreter's collections at exit over every object the imports made
    (numpy, tifffile, OpenSlide ...): 0.1 CPU-s and 0.3 s of a loaded machine's wall time after
    the work is done (on a 1-second conversion, a tenth of it). Every file the command wrote
    is closed by then; what the exit leaves is objects in reference cycles unfinalized, their
    memory going with the process."""
    gc.freeze()


if __name__ == "__main__":
    sys.exit(main())
