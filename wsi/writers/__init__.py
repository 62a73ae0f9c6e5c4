"""Pyramid writers: one module per output format."""

from wsi.writers.base import BlankTiles, ChunkFormat, PyramidWriter, SlideInfo, StoredObject
from wsi.writers.omezarr import OmeZarrWriter

__all__ = [
    "BlankTiles",
    "ChunkFormat",
    "OmeZarrWriter",
    "PyramidWriter",
    "SlideInfo",
    "StoredObject",
]
