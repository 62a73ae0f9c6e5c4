"""Slides not yet converted, served on the fly from their source files.

A folder given with `--sources` (and, later, the watch folder) is scanned for slides; each gets
its content id, so it has the same id before and after conversion and a viewer's URLs keep
working when the published copy takes over. Tiles follow the pyramid the conversion will write:
level-0 JPEG tiles are the source's bytes (without their free-text segments), everything else is
decoded, downsampled and encoded.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import math
import stat as _stat
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from aiohttp import web
from PIL import Image

from server.catalog import SourceLevel, SourcePyramid
from server.keys import JOBS
from wsi.codecs import jpeg
from wsi.errors import InvalidArgument, SlideNotFound, WsiError
from wsi.metadata import file_stem
from wsi.model import TileCodec
from wsi.pseudonyms import CONTENT_IDS, PublishedIds
from wsi.pyramid.builder import PyramidSettings, plan_pyramid
from wsi.slide_id import content_slide_id
from wsi.slidefiles import is_non_slide, is_temporary
from wsi.sources import BACKENDS, SlideSource, open_slide


def _is_candidate(path: Path) -> bool:
    """A file a reader opens as a slide; temporary and non-slide names (sidecars, databases such
    as the job table, ...) are never probed."""
    if is_temporary(path.name) or is_non_slide(path.name):
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


MAX_OPEN_SOURCES = 32
"""Source slides kept open at once (each holds file descriptors and reader caches): beyond this
the least recently used one that no request is reading is closed."""


@dataclass
class _Opened:
    source: SlideSource
    view: SourcePyramid
    users: int = 0
    """Requests reading it now: an open source is closed only when none is."""


class SourceSlides:
    """Unconverted slides in some folders; blocking methods run on the caller's thread pool.

    Scans are cheap when nothing changed: a file's slide id (a content hash) and whether a reader
    takes it are remembered by (size, mtime), so listing slides does not re-read every source.
    A file that no reader takes, or that fails, is skipped on its own: it never hides the rest."""

    def __init__(
        self,
        folders: tuple[str, ...],
        pixel_budget: int = 16_000_000,
        ids: PublishedIds = CONTENT_IDS,
    ) -> None:
        self.folders = [Path(f) for f in folders]
        self.pixel_budget = pixel_budget
        self.ids = ids
        """The id a slide is served under: the one its conversion will publish it under."""
        """Most source pixels one tile may read (the service's render budget)."""
        self._paths: dict[str, Path] = {}
        self._registered: dict[str, Path] = {}
        self._known: dict[Path, tuple[int, int, str | None]] = {}
        """path -> (size, mtime_ns, slide id or None when no reader takes it)."""
        self._open: collections.OrderedDict[str, _Opened] = collections.OrderedDict()
        self._views: dict[str, tuple[Path, SourcePyramid]] = {}
        """slide id -> (its path, its pyramid) of every slide `view` described, kept after its
        source is closed (one entry a slide found, the slide's content fixed by its id)."""
        self._lock = threading.Lock()

    def _slide_id(self, path: Path) -> str | None:
        """The slide id of a candidate file, from the cache while the file is unchanged."""
        stat = path.stat()
        if not _stat.S_ISREG(stat.st_mode):
            return None
        stamp = (stat.st_size, stat.st_mtime_ns)
        known = self._known.get(path)
        if known is not None and known[:2] == stamp:
            return known[2]
        slide_id: str | None = None
        with contextlib.suppress(OSError, WsiError):
            if _is_candidate(path):
                slide_id = self.ids.of(content_slide_id(path))
        self._known[path] = (*stamp, slide_id)
        return slide_id

    def scan(self) -> dict[str, Path]:
        """Slide id -> path for every readable slide file directly in the folders."""
        found: dict[str, Path] = {}
        seen: set[Path] = set()
        for folder in self.folders:
            if not folder.is_dir():
                continue
            for path in sorted(folder.iterdir()):
                seen.add(path)
                with contextlib.suppress(OSError):
                    slide_id = self._slide_id(path)
                    if slide_id is not None:
                        found[slide_id] = path
        with self._lock:
            for gone in set(self._known) - seen:
                del self._known[gone]
            for slide_id, path in list(self._registered.items()):
                if path.exists():
                    found.setdefault(slide_id, path)
                else:  # converted and moved away, or deleted: the store has it now
                    del self._registered[slide_id]
            self._paths = found
            for slide_id in set(self._views) - set(found):  # converted, or gone
                del self._views[slide_id]
        return found

    def register(self, slide_id: str, path: Path) -> None:
        """A complete slide from a watch folder (the watcher vouches that it is no longer being
        copied; watch folders are never scanned here, so a partial file is never opened)."""
        with self._lock:
            self._registered[slide_id] = path
            self._paths[slide_id] = path

    def view(self, slide_id: str) -> SourcePyramid:
        """The pyramid the conversion of `slide_id` will write. Its source is opened to make
        it once, not at every call: every listing describes every slide still converting, and
        with more of them than `MAX_OPEN_SOURCES` each listing opened them all again (300
        slides queued: 1.6-2.1 s for every `GET /slides?limit=10`)."""
        with self._lock:
            path = self._paths.get(slide_id)
            described = self._views.get(slide_id)
            if described is not None and described[0] == path:
                return described[1]
        return self._open_source(slide_id)

    def _open_source(self, slide_id: str) -> SourcePyramid:
        """Open the source of `slide_id` (unless it is open) and describe it."""
        with self._lock:
            opened = self._open.get(slide_id)
            path = self._paths.get(slide_id)
            if opened is not None:
                self._open.move_to_end(slide_id)
                return opened.view
        if path is None:
            raise SlideNotFound(f"no slide {slide_id}")
        source = open_slide(path)
        try:
            levels = tuple(
                SourceLevel(
                    p.level.width,
                    p.level.height,
                    p.level.tile_width,
                    p.level.tile_height,
                    p.level.downsample,
                    index=p.index,
                )
                for p in plan_pyramid(source, PyramidSettings())
            )
        except BaseException:
            source.close()
            raise
        view = SourcePyramid(slide_id, levels, source.properties, name=file_stem(path))
        with self._lock:
            if slide_id in self._open:  # another thread opened it meanwhile
                source.close()
                return self._open[slide_id].view
            self._open[slide_id] = _Opened(source, view)
            self._views[slide_id] = (path, view)
        self._close_unused()
        return view

    @contextlib.contextmanager
    def _reading(self, slide_id: str) -> Iterator[_Opened]:
        """The open source of `slide_id`, not closed while this is held (reopened if needed)."""
        while True:
            with self._lock:
                opened = self._open.get(slide_id)
                if opened is not None:
                    opened.users += 1
                    self._open.move_to_end(slide_id)
                    break
            self._open_source(slide_id)
        try:
            yield opened
        finally:
            with self._lock:
                opened.users -= 1
            self._close_unused()

    def _close_unused(self) -> None:
        """Close least recently used sources beyond MAX_OPEN_SOURCES that nobody reads."""
        closing = []
        with self._lock:
            excess = len(self._open) - MAX_OPEN_SOURCES
            for slide_id, opened in list(self._open.items())[:-1]:  # never the newest
                if excess <= 0:
                    break
                if opened.users == 0:
                    del self._open[slide_id]
                    closing.append(opened.source)
                    excess -= 1
        for source in closing:
            source.close()

    def tile(self, slide_id: str, level: int, col: int, row: int) -> bytes:
        """A tile of the future pyramid, as a complete JPEG."""
        with self._reading(slide_id) as opened:
            return self._tile(opened.source, opened.view, level, col, row)

    def _tile(
        self, source: SlideSource, view: SourcePyramid, level: int, col: int, row: int
    ) -> bytes:
        lv = view.level(level)
        lv.check_tile(col, row)
        if level == 0 and source.tile_codec(0) is TileCodec.JPEG:
            # The source's bytes, but for the comments and EXIF/XMP blocks that encoders fill
            # with names and dates: the converted slide's tiles hold none either.
            return jpeg.without_text(source.read_encoded_tile(0, col, row))
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
            for opened in self._open.values():
                opened.source.close()
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
