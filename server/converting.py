"""Slides not yet converted, served on the fly from their source files.

A folder given with `--sources` (and, later, the watch folder) is scanned for slides; each gets
its content id, so it has the same id before and after conversion and a viewer's URLs keep
working when the published copy takes over. Tiles follow the pyramid the conversion will write:
level-0 JPEG tiles are the source's bytes, everything else is decoded, downsampled and encoded.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import threading
from pathlib import Path
from typing import Any

import numpy as np
from aiohttp import web
from PIL import Image

from server.catalog import LevelView, SlideView
from server.keys import JOBS
from wsi.codecs import jpeg
from wsi.errors import InvalidArgument, SlideNotFound, WsiError
from wsi.model import TileCodec
from wsi.pyramid.builder import PyramidSettings, plan_pyramid
from wsi.slide_id import content_slide_id
from wsi.sources import BACKENDS, SlideSource, open_slide

_SKIP_SUFFIXES = {".json", ".txt", ".md", ".xml", ".tmp", ".part"}


def _is_candidate(path: Path) -> bool:
    if path.name.startswith(".") or path.suffix.lower() in _SKIP_SUFFIXES:
        return False
    return any(b.is_available() and b.can_open(path) for b in BACKENDS)


PIECE_PIXELS = 4_000_000
"""Source pixels read at a time while reducing a region (12 MB of RGB): with the output tile,
the memory one tile of a converting slide may take, whatever its zoom level."""


def reduced_region(
    source: SlideSource,
    index: int,
    origin: tuple[float, float],
    factor: float,
    size: tuple[int, int],
    budget: int,
) -> np.ndarray:
    """`size` (w, h) output pixels, each the area mean of `factor` x `factor` pixels of source
    level `index`, starting at `origin` (level pixels): white outside the level.

    A low zoom level of a single-level slide covers a huge square of its base (a 256-px tile at
    level 8 is 65,536 px across): it is read in pieces of at most PIECE_PIXELS, clipped to the
    level, each reduced into its part of the output, so memory is one piece plus the output.
    More than `budget` source pixels in all are refused: such a tile waits for the conversion,
    whose pyramid gives it at the cost of one stored tile."""
    out_w, out_h = size
    src = source.levels[index]
    x0, y0 = origin
    # Output pixels that fall inside the level (the rest stays white).
    inside_w = min(out_w, max(0, math.ceil((src.width - x0) / factor)))
    inside_h = min(out_h, max(0, math.ceil((src.height - y0) / factor)))
    out = np.full((out_h, out_w, 3), 255, np.uint8)
    needed = inside_w * inside_h * factor * factor
    if needed > budget:
        raise InvalidArgument(
            f"this tile of a slide still converting needs {needed:.0f} source pixels, over the "
            f"{budget} pixel budget: it is served once the conversion is published"
        )
    # Square pieces of output pixels whose source area fits PIECE_PIXELS.
    step = max(1, int(math.sqrt(PIECE_PIXELS) / factor))
    for r0 in range(0, inside_h, step):
        r1 = min(inside_h, r0 + step)
        for c0 in range(0, inside_w, step):
            c1 = min(inside_w, c0 + step)
            sx, sy = round(x0 + c0 * factor), round(y0 + r0 * factor)
            sw = max(1, round(x0 + c1 * factor) - sx)
            sh = max(1, round(y0 + r1 * factor) - sy)
            piece = source.read_region(index, sx, sy, sw, sh)
            if piece.shape[:2] != (r1 - r0, c1 - c0):
                piece = np.asarray(
                    Image.fromarray(piece).resize((c1 - c0, r1 - r0), Image.Resampling.BOX)
                )
            out[r0:r1, c0:c1] = piece
    return out


class SourceSlides:
    """Unconverted slides in some folders; blocking methods run on the caller's thread pool."""

    def __init__(self, folders: tuple[str, ...], pixel_budget: int = 16_000_000) -> None:
        self.folders = [Path(f) for f in folders]
        self.pixel_budget = pixel_budget
        """Most source pixels one tile may read (the service's render budget)."""
        self._paths: dict[str, Path] = {}
        self._registered: dict[str, Path] = {}
        self._open: dict[str, tuple[SlideSource, SlideView]] = {}
        self._lock = threading.Lock()

    def scan(self) -> dict[str, Path]:
        """Slide id -> path for every readable slide file directly in the folders."""
        found: dict[str, Path] = {}
        for folder in self.folders:
            if not folder.is_dir():
                continue
            for path in sorted(folder.iterdir()):
                with contextlib.suppress(OSError, WsiError):
                    if path.is_file() and _is_candidate(path):
                        found[content_slide_id(path)] = path
        with self._lock:
            for slide_id, path in list(self._registered.items()):
                if path.exists():
                    found.setdefault(slide_id, path)
                else:  # converted and moved away, or deleted: the store has it now
                    del self._registered[slide_id]
            self._paths = found
        return found

    def register(self, slide_id: str, path: Path) -> None:
        """A complete slide from a watch folder (the watcher vouches that it is no longer being
        copied; watch folders are never scanned here, so a partial file is never opened)."""
        with self._lock:
            self._registered[slide_id] = path
            self._paths[slide_id] = path

    def view(self, slide_id: str) -> SlideView:
        with self._lock:
            opened = self._open.get(slide_id)
            path = self._paths.get(slide_id)
        if opened is not None:
            return opened[1]
        if path is None:
            raise SlideNotFound(f"no slide {slide_id}")
        source = open_slide(path)
        plans = plan_pyramid(source, PyramidSettings())
        levels = tuple(
            LevelView(
                p.index,
                p.level.width,
                p.level.height,
                p.level.tile_width,
                p.level.tile_height,
                "jpeg",
                f"source:{p.source_level}",
                0,
            )
            for p in plans
        )
        props = source.properties
        view = SlideView(
            slide_id,
            "converting",
            levels,
            props.mpp_x,
            props.mpp_y,
            props.vendor,
            props.objective_power,
            {},
            None,
            f"src{slide_id[:8]}",
        )
        with self._lock:
            self._open[slide_id] = (source, view)
        return view

    def tile(self, slide_id: str, level: int, col: int, row: int) -> bytes:
        """A tile of the future pyramid, as a complete JPEG."""
        with self._lock:
            source, view = self._open[slide_id]
        lv = view.level(level)
        lv.check_tile(col, row)
        if level == 0 and source.tile_codec(0) is TileCodec.JPEG:
            return source.read_encoded_tile(0, col, row)
        scale = 2**level
        # The source level with the most pixels per output pixel without going below 1.
        index = max(i for i, s in enumerate(source.levels) if s.downsample <= scale + 1e-6)
        factor = scale / source.levels[index].downsample
        pixels = reduced_region(
            source,
            index,
            (col * lv.tile_width * factor, row * lv.tile_height * factor),
            factor,
            (lv.tile_width, lv.tile_height),
            self.pixel_budget,
        )
        return jpeg.encode(pixels, 90, True)

    def close(self) -> None:
        with self._lock:
            for source, _ in self._open.values():
                source.close()
            self._open.clear()


async def conversion_jobs(app: web.Application) -> dict[str, dict[str, Any]]:
    """Slide id -> `{"id", "state", "progress"}` of its queued or running job, for slides shown
    as converting (empty without ingest, or when the job table cannot be read: the listing
    does not depend on it)."""
    queue = app.get(JOBS)
    if queue is None:
        return {}
    found: dict[str, dict[str, Any]] = {}
    try:
        for state in ("running", "queued"):
            for job in await asyncio.to_thread(queue.list, state, 1000):
                if job.slide_id is not None:
                    found.setdefault(
                        job.slide_id,
                        {"id": job.id, "state": job.state.value, "progress": job.progress},
                    )
    except WsiError:
        return {}
    return found
