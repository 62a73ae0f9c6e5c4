"""The `wsi` commands over a store's published slides: `list`, `delete`, `du`, `verify`,
`sync`, `archive`, `restore` and `export-dicom`. Each imports what only it uses when it runs, so
that no other command (`wsi convert` above all) starts with their modules. One readable line
per error, exit 1 when a slide failed (`wsi.ingest.protocol.ExitCode`)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING, Any

from wsi.errors import InvalidArgument, WsiError
from wsi.ingest.protocol import ExitCode
from wsi.store.objects import Store, StoreSettings

if TYPE_CHECKING:
    from wsi.published.verify import ReadRate

__all__ = ["add_export_command", "add_store_commands"]


def add_store_commands(sub: Any) -> None:
    """`wsi list`, `delete`, `du`, `verify`, `sync`, `archive` and `restore` on `sub` (the
    `wsi` parser's subparsers)."""
    ls = sub.add_parser("list", help="list the published slides of a store")
    ls.add_argument("store", metavar="DIR_OR_URL")
    ls.add_argument("--s3-endpoint")
    ls.set_defaults(func=_list)
    rm = sub.add_parser("delete", help="remove published slides and every object of them")
    rm.add_argument("store", metavar="DIR_OR_URL")
    rm.add_argument("ids", nargs="+", metavar="SLIDE_ID")
    rm.add_argument("--s3-endpoint")
    rm.set_defaults(func=_delete)
    _add_storage_commands(sub)
    _add_archive_commands(sub)


def add_export_command(sub: Any) -> None:
    """`wsi export-dicom`: a slide's DICOM view as a folder of .dcm files."""
    exp = sub.add_parser("export-dicom", help="a slide's DICOM view as a folder of .dcm files")
    exp.add_argument("slide", metavar="SLIDE_DIR_OR_URL", help="STORE/<slide-id>")
    exp.add_argument("dest", metavar="DEST_DIR")
    exp.add_argument("--s3-endpoint")
    exp.set_defaults(func=_export, cleans_up=True)


def _export(args: argparse.Namespace) -> int:
    from wsi.export import export_dicom_location

    for path in export_dicom_location(args.slide, args.dest, args.s3_endpoint):
        print(path)
    return 0


def _existing_store(url: str, endpoint: str | None) -> Store:
    """The store a command only reads: a local folder that must exist (`Store.check_folder`)."""
    store = Store(StoreSettings(url, endpoint_url=endpoint))
    store.check_folder(exists=True)
    return store


def _list(args: argparse.Namespace) -> int:
    store = _existing_store(args.store, args.s3_endpoint)
    for slide_id in store.published_slides():
        print(slide_id)
    return 0


def _delete(args: argparse.Namespace) -> int:
    """`wsi delete STORE ID...`: `<id> TAB deleted TAB <bytes> bytes` per slide, one line per
    failure; exit 1 when a slide could not be deleted (not published, a conversion of it
    running here, the store refusing)."""
    from wsi.store.versions import delete_slide

    store = _existing_store(args.store, args.s3_endpoint)  # a typo is not a new, empty store
    failed = 0
    for slide_id in args.ids:
        try:
            freed = delete_slide(store, slide_id)
        except WsiError as exc:
            print(f"wsi: delete: {slide_id}: {exc}", file=sys.stderr, flush=True)
            failed += 1
            continue
        print(f"{slide_id}\tdeleted\t{freed} bytes", flush=True)
    return ExitCode.FAILED if failed else ExitCode.OK


def _du(args: argparse.Namespace) -> int:
    from wsi.published.usage import report_lines, store_usage

    usage = store_usage(_existing_store(args.store, args.s3_endpoint), args.ids)
    if args.json:
        json.dump(usage.to_json(by_level=args.by_level), sys.stdout, indent=1)
        sys.stdout.write("\n")
    else:
        print("\n".join(report_lines(usage, by_level=args.by_level)))
    return ExitCode.FAILED if usage.unreadable else ExitCode.OK


def _read_rate(args: argparse.Namespace) -> ReadRate:
    """`--rate MB/s` (10^6 bytes a second), unbounded without it."""
    from wsi.published.verify import ReadRate

    if args.rate is not None and not args.rate > 0:  # NaN too
        raise InvalidArgument(f"--rate must be a positive number of MB/s, got {args.rate:g}")
    return ReadRate(args.rate * 1e6 if args.rate is not None else None)


def _verify(args: argparse.Namespace) -> int:
    """One line per slide as it is checked; exit 1 when any slide is damaged or unknown (an id
    the store has no slide under)."""
    from wsi.published.verify import verify_store

    store = _existing_store(args.store, args.s3_endpoint)
    checked = damaged = unknown = read = 0
    for check in verify_store(store, args.ids, _read_rate(args)):
        print(check.line(), flush=True)
        if check.unknown:
            unknown += 1
            continue
        checked, read = checked + 1, read + check.bytes_read
        damaged += not check.ok
    absent = f", {unknown} unknown" if unknown else ""
    summary = f"{checked} slides, {damaged} damaged{absent}, {read:,} bytes read"
    print(f"wsi: verify: {summary}", file=sys.stderr)
    return ExitCode.FAILED if damaged or unknown else ExitCode.OK


def _sync(args: argparse.Namespace) -> int:
    """`wsi sync A B`: one line per slide; exit 1 when a slide failed (or, with --repair, has
    an object damaged in both stores)."""
    from wsi.published.replicate import repair_store, sync_store

    source = _existing_store(args.source, args.s3_endpoint)
    target_endpoint = args.target_s3_endpoint or args.s3_endpoint
    target = Store(StoreSettings(args.target, endpoint_url=target_endpoint))
    target.check_folder(exists=False)
    if source.is_same_store(target):
        raise InvalidArgument(
            f"{args.source} and {args.target} are the same store: sync copies to a second one"
        )
    run = repair_store if args.repair else sync_store
    failed = 0
    for result in run(source, target, args.ids, _read_rate(args)):
        print(result.line(), flush=True)
        failed += not result.ok
    return ExitCode.FAILED if failed else ExitCode.OK


def _add_storage_commands(sub: Any) -> None:
    """`wsi du`, `wsi verify`, `wsi sync`: what published slides cost, whether their bytes are
    intact, and a verified copy in a second store."""
    du = sub.add_parser("du", help="storage used per slide, level and tier, against the source")
    du.add_argument("store", metavar="DIR_OR_URL")
    du.add_argument("ids", nargs="*", metavar="SLIDE_ID", help="these slides only")
    du.add_argument("--by-level", action="store_true", help="a line per pyramid level")
    du.add_argument("--json", action="store_true", help="the report as JSON")
    du.add_argument("--s3-endpoint")
    du.set_defaults(func=_du)

    rate_help = "most MB (10^6 bytes) read per second (default: unbounded)"
    verify = sub.add_parser(
        "verify", help="re-read every object of published slides and check it against its manifest"
    )
    verify.add_argument("store", metavar="DIR_OR_URL")
    verify.add_argument("ids", nargs="*", metavar="SLIDE_ID", help="these slides only")
    verify.add_argument("--rate", type=float, metavar="MB/s", help=rate_help)
    verify.add_argument("--s3-endpoint")
    verify.set_defaults(func=_verify)

    sync = sub.add_parser(
        "sync", help="copy published slides to a second store, incrementally and verified"
    )
    sync.add_argument("source", metavar="STORE_A")
    sync.add_argument("target", metavar="STORE_B")
    sync.add_argument("ids", nargs="*", metavar="SLIDE_ID", help="these slides only")
    sync.add_argument(
        "--repair",
        action="store_true",
        help="copy nothing new: check both stores and replace each damaged object by the "
        "other store's good copy",
    )
    sync.add_argument("--rate", type=float, metavar="MB/s", help=rate_help)
    sync.add_argument("--s3-endpoint", help="S3 endpoint of both stores (or of STORE_A)")
    sync.add_argument("--target-s3-endpoint", help="S3 endpoint of STORE_B, when another")
    sync.set_defaults(func=_sync, cleans_up=True)


def _archive(args: argparse.Namespace) -> int:
    """`wsi archive` / `wsi restore`: one line per slide (bytes before and after), one line per
    failure; exit 1 when a slide failed."""
    from wsi.published.archive import ArchiveSettings, archive, restore

    run = archive if args.command == "archive" else restore
    store = _existing_store(args.store, args.s3_endpoint)  # a typo is not a new, empty store
    settings = ArchiveSettings(threads=args.workers)
    failed = 0
    for slide_id in args.ids:
        try:
            print(run(store, slide_id, settings).line(), flush=True)
        except WsiError as exc:
            print(f"wsi: {args.command}: {slide_id}: {exc}", file=sys.stderr, flush=True)
            failed += 1
    return ExitCode.FAILED if failed else ExitCode.OK


def _add_archive_commands(sub: Any) -> None:
    """`wsi archive` and `wsi restore`: the lossless JPEG XL tier of published slides."""
    helps = {
        "archive": "recompress published slides' JPEG tiles losslessly with JPEG XL (~20-30%% "
        "smaller; still served as JPEG)",
        "restore": "give archived slides back their JPEG form, byte for byte",
    }
    for name, helptext in helps.items():
        cmd = sub.add_parser(name, help=helptext)
        cmd.add_argument("store", metavar="DIR_OR_URL")
        cmd.add_argument("ids", nargs="+", metavar="SLIDE_ID")
        cmd.add_argument("--workers", type=int, default=0, help="threads (default: one per core)")
        cmd.add_argument("--s3-endpoint", help="S3 endpoint URL (default: $AWS_ENDPOINT_URL)")
        cmd.set_defaults(func=_archive, cleans_up=True)
