"""Pyramid writers: one module per output format."""

from wsi.writers.base import ChunkFormat, PyramidWriter, SlideInfo, StoredObject
from wsi.writers.omezarr import OmeZarrWriter

__all__ = ["ChunkFormat", "OmeZarrWriter", "PyramidWriter", "SlideInfo", "StoredObject"]
