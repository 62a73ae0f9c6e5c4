"""wsistore: whole-slide images to chunked OME-Zarr pyramids in object storage.

Public API: open a slide (`open_slide`), convert it (`convert_slide`), and the settings and value
types they take. The `wsistore.jpeg` Zarr codec, which a plain zarr-python user needs to read our
JPEG chunks, is registered with zarr through an entry point when the package is installed (and by
importing `wsi.zarr_codec`); zarr itself is not imported here, which keeps the CLI quick.
"""

from __future__ import annotations

__version__ = "0.1.0"

from wsi.convert import ConvertResult, ConvertSettings, convert_slide
from wsi.errors import (
    CorruptSlide,
    InvalidArgument,
    SlideNotFound,
    StoreError,
    UnsupportedSlide,
    WsiError,
)
from wsi.model import Level, SlideProperties, TileCodec
from wsi.pyramid.builder import PyramidSettings
from wsi.sources import SlideSource, open_slide
from wsi.store.objects import Store, StoreSettings

__all__ = [
    "ConvertResult",
    "ConvertSettings",
    "CorruptSlide",
    "InvalidArgument",
    "Level",
    "PyramidSettings",
    "SlideNotFound",
    "SlideProperties",
    "SlideSource",
    "Store",
    "StoreError",
    "StoreSettings",
    "TileCodec",
    "UnsupportedSlide",
    "WsiError",
    "convert_slide",
    "open_slide",
]
