"""wsistore: whole-slide images to chunked OME-Zarr pyramids in object storage.

Public API: open a slide (`open_slide`), convert it (`convert_slide`), and the settings and value
types they take. Importing the package registers the `wsistore.jpeg` Zarr codec, which is what a
plain zarr-python user needs to read our JPEG chunks.
"""

from __future__ import annotations

__version__ = "0.1.0"

from . import zarr_codec  # noqa: E402,F401  (registers the Zarr codec)
from .convert import ConvertResult, ConvertSettings, convert_slide  # noqa: E402
from .errors import (  # noqa: E402
    CorruptSlide,
    InvalidArgument,
    SlideNotFound,
    StoreError,
    UnsupportedSlide,
    WsiError,
)
from .model import Level, SlideProperties, TileCodec  # noqa: E402
from .pyramid import PyramidSettings  # noqa: E402
from .sources import SlideSource, open_slide  # noqa: E402
from .store import Store, StoreSettings  # noqa: E402

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
