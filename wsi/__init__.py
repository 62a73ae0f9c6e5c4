"""wsistore: whole-slide images to chunked OME-Zarr pyramids in object storage.

Public API: open a slide (`open_slide`), convert it (`convert_slide`), read what was published
(`open_published`, `open_published_async`, `PublishedStore`; many patches at once with their
`patches` method, random tissue patches with `sample_tissue_patches`, a PyTorch-style
`PatchDataset`), and the settings and value types they take. The `wsistore.jpeg` Zarr codec,
which a plain zarr-python user needs to read our JPEG chunks, is registered with zarr through an
entry point when the package is installed (and by importing `wsi.zarr_codec`). Each public name
is imported on first use, which keeps the CLI quick.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from wsi.convert import ConvertResult, ConvertSettings, convert_slide
    from wsi.errors import (
        AssociatedImageRefused,
        CorruptSlide,
        InvalidArgument,
        SlideNotFound,
        StoreError,
        UnsupportedSlide,
        WsiError,
    )
    from wsi.model import Level, SlideProperties, TileCodec
    from wsi.published.dataset import PatchDataset, to_chw_float
    from wsi.published.patches import PatchSettings, coords_from_level0
    from wsi.published.slide import AsyncPublishedSlide
    from wsi.published.store import PublishedStore, open_published_async
    from wsi.published.sync import PublishedSlide, open_published
    from wsi.published.tissue import (
        TissueMask,
        TissueRule,
        sample_tissue_patches,
        tissue_mask,
        tissue_mask_async,
    )
    from wsi.published.values import (
        PublishedAssociated,
        PublishedDicom,
        PublishedInstance,
        PublishedLevel,
        ReaderSettings,
    )
    from wsi.pyramid.builder import PyramidSettings
    from wsi.sources import SlideSource, open_slide
    from wsi.store.objects import Store, StoreSettings

_HOMES = {
    "wsi.convert": ("ConvertResult", "ConvertSettings", "convert_slide"),
    "wsi.errors": (
        "AssociatedImageRefused",
        "CorruptSlide",
        "InvalidArgument",
        "SlideNotFound",
        "StoreError",
        "UnsupportedSlide",
        "WsiError",
    ),
    "wsi.model": ("Level", "SlideProperties", "TileCodec"),
    "wsi.published.dataset": ("PatchDataset", "to_chw_float"),
    "wsi.published.patches": ("PatchSettings", "coords_from_level0"),
    "wsi.published.slide": ("AsyncPublishedSlide",),
    "wsi.published.store": ("PublishedStore", "open_published_async"),
    "wsi.published.sync": ("PublishedSlide", "open_published"),
    "wsi.published.tissue": (
        "TissueMask",
        "TissueRule",
        "sample_tissue_patches",
        "tissue_mask",
        "tissue_mask_async",
    ),
    "wsi.published.values": (
        "PublishedAssociated",
        "PublishedDicom",
        "PublishedInstance",
        "PublishedLevel",
        "ReaderSettings",
    ),
    "wsi.pyramid.builder": ("PyramidSettings",),
    "wsi.sources": ("SlideSource", "open_slide"),
    "wsi.store.objects": ("Store", "StoreSettings"),
}
_HOME = {name: module for module, names in _HOMES.items() for name in names}
"""The module each public name is defined in: imported when the name is first used (PEP 562),
so that `wsi convert` of a TIFF does not import the reader of published slides (and pydicom,
which the archive tier reads DICOM with), and a command's start-up pays for what it uses."""


def __getattr__(name: str) -> object:
    module = _HOME.get(name)
    if module is None:
        raise AttributeError(f"module 'wsi' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


__all__ = [
    "AssociatedImageRefused",
    "AsyncPublishedSlide",
    "ConvertResult",
    "ConvertSettings",
    "CorruptSlide",
    "InvalidArgument",
    "Level",
    "PatchDataset",
    "PatchSettings",
    "PublishedAssociated",
    "PublishedDicom",
    "PublishedInstance",
    "PublishedLevel",
    "PublishedSlide",
    "PublishedStore",
    "PyramidSettings",
    "ReaderSettings",
    "SlideNotFound",
    "SlideProperties",
    "SlideSource",
    "Store",
    "StoreError",
    "StoreSettings",
    "TileCodec",
    "TissueMask",
    "TissueRule",
    "UnsupportedSlide",
    "WsiError",
    "convert_slide",
    "coords_from_level0",
    "open_published",
    "open_published_async",
    "open_slide",
    "sample_tissue_patches",
    "tissue_mask",
    "tissue_mask_async",
    "to_chw_float",
]
