"""The `wsi` command: the library's commands (`wsi.cli`) plus `serve`, which belongs to the
service. The console script points here so that the library never imports the service."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from wsi import cli as library_cli
from wsi.ingest.settings import IngestSettings, add_ingest_arguments
from wsi.store.objects import Store, StoreSettings, check_folder

if TYPE_CHECKING:
    from server.settings import ServerSettings


def serve_settings(
    args: argparse.Namespace, environ: Mapping[str, str] | None = None
) -> ServerSettings:
    """`wsi serve`'s settings: the flags given over the `WSI_*` variables over the defaults; the
    ingest part read exactly as `wsi watch` and `wsi worker` read it."""
    from server.settings import ServerSettings

    return ServerSettings.from_env(
        environ,
        store=args.store,
        sources=tuple(args.sources) if args.sources else None,
        host=args.host,
        port=args.port,
        s3_endpoint=args.s3_endpoint,
        allow_label=True if args.allow_label else None,
        watch=tuple(args.watch) if args.watch else None,
        s3_sources=tuple(args.s3_source) if args.s3_source else None,
        cors_origins=tuple(args.cors_origin) if args.cors_origin else None,
        audit_log=args.audit_log,
        verify_every_hours=args.verify_every_hours,
        verify_rate_mb=args.verify_rate,
        processes=args.processes,
        tile_cache_mb=args.tile_cache_mb,
        ingest=IngestSettings.from_args(args, environ),
    )


def _serve(args: argparse.Namespace) -> int:
    # The service (aiohttp, its TLS set-up, the API) is imported only to serve: the library's
    # commands, `wsi convert` above all, start without it (~0.4 s of CPU each).
    from server.app import serve
    from server.processes import check_port, run_processes

    settings = serve_settings(args)
    # Before any line that says it serves: a store path that is a file (which would serve as
    # an empty, ready store) or a port in use is then the one line there is. Without ingest
    # nothing here makes the store, so a folder that does not exist is a path typed wrong: it
    # was served as an empty store, `/readyz` "store reachable", with a state folder made
    # beside it. With `--sources` the slides are there before any is published: a store to
    # come is no typo.
    ingest = bool(settings.watch or settings.s3_sources or settings.sources)
    Store(StoreSettings(settings.store, settings.s3_endpoint)).check_folder(exists=not ingest)
    # A `--sources` folder typed wrong served none of its slides, `/readyz` ready, and nothing
    # said so (a watch folder that cannot be listed is reported; this one was not).
    for folder in settings.sources:
        check_folder(folder, "source folder", exists=True)
    if settings.audit_log:
        from server.audit import open_for_append

        os.close(open_for_append(settings.audit_log))
    check_port(settings.host, settings.port)
    shown = "localhost" if settings.host in ("127.0.0.1", "::1") else settings.host
    print(
        f"wsistore: serving {settings.store}; viewer at http://{shown}:{settings.port}/", flush=True
    )
    if settings.watch or settings.s3_sources:  # folders only: no slide is named
        print(f"wsistore: {settings.ingest.describe_state(settings.store)}", flush=True)
    if settings.processes == 1:
        serve(settings)
        return 0
    total = settings.processes * settings.tile_cache_mb
    print(
        f"wsistore: {settings.processes} serving processes, tile cache "
        f"{settings.tile_cache_mb} MB each ({total} MB in all)",
        flush=True,
    )
    return run_processes(settings)


def _add_serve(sub: Any) -> None:
    """`wsi serve`: the tile service (and ingest with --watch)."""
    serve = sub.add_parser("serve", help="serve tiles, DeepZoom, IIIF, DICOMweb and a viewer")
    _add_serve_slides(serve)
    _add_serve_capacity(serve)
    _add_serve_access(serve)
    _add_serve_ingest(serve)
    add_ingest_arguments(serve)
    serve.set_defaults(func=_serve, unattended=True)


def _add_serve_slides(serve: Any) -> None:
    """What is served, and where the service listens."""
    serve.add_argument("--store", help="published slides: folder or s3:// URL (WSI_STORE)")
    serve.add_argument(
        "--sources",
        action="append",
        metavar="DIR",
        help="folder of slides not yet converted, served on the fly (repeatable)",
    )
    serve.add_argument("--host", help="listen address (WSI_HOST, default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port (WSI_PORT, default 8000)")
    serve.add_argument("--s3-endpoint", help="S3 endpoint URL (WSI_S3_ENDPOINT)")


def _add_serve_capacity(serve: Any) -> None:
    """Processes and the memory each holds."""
    serve.add_argument(
        "--processes",
        type=int,
        metavar="N",
        help="serving processes sharing the port, each with its own tile cache; process 0 also "
        "runs ingest (WSI_PROCESSES, default: the CPU cores; 1: one process)",
    )
    serve.add_argument(
        "--tile-cache-mb",
        type=int,
        metavar="MB",
        help="stored tiles kept in memory, per process: N processes hold up to N x this "
        "(WSI_TILE_CACHE_MB, default 256)",
    )


def _add_serve_access(serve: Any) -> None:
    """Who may see what: labels and macros, other pages' origins, the audit trail."""
    serve.add_argument(
        "--allow-label", action="store_true", help="serve label and macro images (WSI_ALLOW_LABEL)"
    )
    serve.add_argument(
        "--cors-origin",
        action="append",
        metavar="ORIGIN",
        help="a page origin (https://host[:port]) that may read cross-origin "
        "(repeatable; WSI_CORS_ORIGINS; default: none)",
    )
    serve.add_argument(
        "--audit-log",
        metavar="FILE",
        help="one JSON line per slide access (WSI_AUDIT_LOG)",
    )


def _add_serve_ingest(serve: Any) -> None:
    """What the service converts by itself, and the integrity check of what it published."""
    serve.add_argument(
        "--watch",
        action="append",
        metavar="DIR",
        help="convert every complete slide dropped here (repeatable; WSI_WATCH)",
    )
    serve.add_argument(
        "--s3-source",
        action="append",
        metavar="S3_PREFIX",
        help="POST /jobs may convert slides under this s3://bucket/prefix/ (repeatable; "
        "WSI_S3_SOURCES)",
    )
    serve.add_argument(
        "--verify-every-hours",
        type=float,
        metavar="HOURS",
        help="with ingest on: check every published object against its manifest this often "
        "(0: never; WSI_VERIFY_EVERY_HOURS, default 24)",
    )
    serve.add_argument(
        "--verify-rate",
        type=float,
        metavar="MB/s",
        help="most MB read per second by that check (WSI_VERIFY_RATE_MB, default 50)",
    )


def main(argv: Sequence[str] | None = None) -> int:
    return library_cli.main(argv, commands=(_add_serve,))


if __name__ == "__main__":
    sys.exit(main())
