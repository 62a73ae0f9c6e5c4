"""The servers `bench/serve.py` measures, each run as `python bench/serve.py --serve KIND ...`
in its own process (`serve_load.server_process` starts them): ours (`wsi serve`, N processes
with `--processes N`), the fixed in-memory tile (the ceilings `fixed-1` and `fixed-N`) and the
OpenSlide DeepZoom way.

Every one runs on the event loop `wsi serve` uses and answers `/healthz`, so that the fixed tile
is a fair ceiling and the benchmark waits for each the same way.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures as cf
import io
import multiprocessing
import sys
from pathlib import Path

from aiohttp import web
from serve_load import pin

OPENSLIDE_QUALITY = 75


def run(app: web.Application, port: int, reuse_port: bool = False) -> None:
    """Every server on the same event loop as `wsi serve` (uvloop when installed), so the fixed
    tile stays a fair ceiling."""
    from server.app import new_event_loop

    web.run_app(
        app,
        host="127.0.0.1",
        port=port,
        access_log=None,
        print=None,
        loop=new_event_loop(),
        reuse_port=reuse_port or None,
    )


def serve_ours(args: argparse.Namespace) -> None:
    if args.code_root:  # another checkout's packages (`--base`), ahead of this one's
        sys.path.insert(0, str(args.code_root))
    from server.app import create_app
    from server.settings import ServerSettings

    settings = ServerSettings(
        store=args.store_url or str(args.store),
        port=args.port,
        threads=args.threads,
        s3_endpoint=args.s3_endpoint,
        processes=args.processes,
        tile_cache_mb=args.tile_cache_mb,
    )
    if args.processes > 1:
        from server.processes import run_processes

        sys.exit(run_processes(settings))
    try:  # as `wsi serve` runs it (a checkout before `server.runner` ran it as `run` does)
        from server.app import new_event_loop
        from server.runner import run as run_service
    except ImportError:
        run(create_app(settings), args.port)
        return
    run_service(create_app(settings), "127.0.0.1", args.port, new_event_loop())


def serve_openslide(args: argparse.Namespace) -> None:
    import openslide
    from openslide.deepzoom import DeepZoomGenerator

    slide = openslide.OpenSlide(str(args.src))
    dz = DeepZoomGenerator(slide, tile_size=args.tile_size, overlap=0, limit_bounds=False)
    pool = cf.ThreadPoolExecutor(args.threads, thread_name_prefix="openslide")

    def render(level: int, col: int, row: int) -> bytes:
        image = dz.get_tile(dz.level_count - 1 - level, (col, row))
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=OPENSLIDE_QUALITY)
        return buffer.getvalue()

    async def tile(request: web.Request) -> web.Response:
        level, col, row = (int(request.match_info[k]) for k in ("level", "col", "row"))
        loop = asyncio.get_running_loop()
        body = await loop.run_in_executor(pool, render, level, col, row)
        return web.Response(body=body, content_type="image/jpeg")

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get(r"/tiles/{level:\d+}/{col:\d+}/{row:\d+}", tile)
    run(app, args.port)


def _fixed_app(body: bytes) -> web.Application:
    async def tile(request: web.Request) -> web.Response:
        return web.Response(body=body, content_type="image/jpeg")

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/tile", tile)
    return app


def _fixed_process(body: bytes, port: int) -> None:
    run(_fixed_app(body), port, reuse_port=True)


def serve_fixed(args: argparse.Namespace) -> None:
    """One process, or with `--processes N` this one and N - 1 children on the same port
    (`SO_REUSEPORT`, as `wsi serve --processes N`); the children are daemons: they end with it."""
    body = Path(args.fixed_tile).read_bytes()
    if args.processes > 1:
        context = multiprocessing.get_context("fork")
        for _ in range(args.processes - 1):
            context.Process(target=_fixed_process, args=(body, args.port), daemon=True).start()
    run(_fixed_app(body), args.port, reuse_port=args.processes > 1)


async def healthz(request: web.Request) -> web.Response:
    return web.Response(text="ok")


def serve(args: argparse.Namespace) -> int:
    pin(args.cpus)
    {"ours": serve_ours, "openslide": serve_openslide, "fixed": serve_fixed}[args.serve](args)
    return 0
