"""Types of the C extension `wsi.codecs._jpeglib` (see _jpeglib.c and jpegtran.py)."""

from typing import Any

import numpy as np
from typing_extensions import Buffer

from wsi.errors import CorruptSlide

MAX_INPUT_BYTES: int
MAX_SIDE: int
MAX_TRANSCODE_PIXELS: int
MAX_SCANS: int
MAX_MEMORY: int
LIBJPEG_VERSION: int
COLOUR_MARGIN: float

CopiedTile = tuple[
    bool | None,
    str,
    tuple[int, ...],
    tuple[int, ...],
    bytes | None,
    tuple[float, ...],
    tuple[float, ...],
]
"""What `copy_tile` gives for one tile, and `copy_tiles` for each tile of a row."""

def transcode(
    data: Buffer,
    optimize: bool,
    libjpeg_tables: bool = False,
    width: int = 0,
    height: int = 0,
    /,
) -> tuple[
    str, tuple[int, ...], tuple[int, ...], bytes | None, tuple[float, ...], tuple[float, ...]
]: ...
def copy_tile(
    data: Buffer,
    optimize: bool,
    width: int,
    height: int,
    limits: Buffer,
    counts: Buffer | np.ndarray[Any, Any],
    low: int,
    n: int,
    half: np.ndarray[Any, Any] | None,
    blank_fill: int = -1,
    /,
) -> CopiedTile: ...
def within(
    data: Buffer, width: int, height: int, blues: Buffer | np.ndarray[Any, Any], /
) -> bool: ...
def decode_region(
    data: Buffer,
    x: int,
    y: int,
    out: Buffer | np.ndarray[Any, Any],
    expected_width: int,
    expected_height: int,
    /,
) -> None: ...
def encode(
    pixels: Buffer | np.ndarray[Any, Any], quality: int, subsample_420: bool, /
) -> bytes: ...
def copy_tiles(
    tiles: list[Buffer],
    optimize: bool,
    regions: list[tuple[int, int]],
    limits: Buffer,
    counts: Buffer | np.ndarray[Any, Any],
    low: int,
    n: int,
    halves: list[np.ndarray[Any, Any] | None] | None,
    blank_fill: int = -1,
    /,
) -> list[CopiedTile | CorruptSlide]: ...
def without_text(stream: bytes, /) -> bytes: ...
