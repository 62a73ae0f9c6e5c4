"""Pyramid writers: one module per output format."""

from .base import ChunkFormat, PyramidWriter, SlideInfo, StoredObject
from .omezarr import OmeZarrWriter

__all__ = ["ChunkFormat", "OmeZarrWriter", "PyramidWriter", "SlideInfo", "StoredObject"]
