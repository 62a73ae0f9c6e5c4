"""Slide sources: one module per backend, chosen by probing an ordered registry."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from wsi.errors import CorruptSlide, InvalidArgument, SlideNotFound, UnsupportedSlide
from wsi.sources.base import SlideSource
from wsi.sources.dicom_backend import DicomSource
from wsi.sources.leica_backend import LeicaSource
from wsi.sources.mirax_backend import MiraxSource
from wsi.sources.ndpi_backend import NdpiSource
from wsi.sources.openslide_backend import OpenSlideSource
from wsi.sources.philips_backend import PhilipsSource
from wsi.sources.tiff_backend import TiffSource, truncated_before_directory
from wsi.sources.ventana_backend import VentanaSource

BACKENDS: tuple[type[SlideSource], ...] = (
    DicomSource,
    TiffSource,
    NdpiSource,
    PhilipsSource,
    LeicaSource,
    VentanaSource,
    MiraxSource,
    OpenSlideSource,
)
"""Probe order: backends that hand out stored tile bytes come before the decoding fallback."""


def backend_names() -> list[str]:
    return [b.name for b in BACKENDS]


def open_slide(
    path: str | Path,
    backend: str | None = None,
    backends: Sequence[type[SlideSource]] = BACKENDS,
) -> SlideSource:
    """Open `path` with the named backend, or the first in `backends` whose probe accepts it.
    Errors do not name `path`: the caller knows it, and names it (or, de-identifying, not)."""
    path = Path(path)
    if not path.exists():
        raise SlideNotFound("no such file or folder")
    if not (path.is_file() or path.is_dir()):  # a FIFO or a device: reading it may never end
        raise UnsupportedSlide("not a regular file or folder")
    cut = truncated_before_directory(path) if path.is_file() else None
    if cut is not None:
        raise CorruptSlide(cut)
    if backend is not None:
        chosen = [b for b in backends if b.name == backend]
        if not chosen:
            raise InvalidArgument(
                f"unknown backend {backend!r} (known: {', '.join(backend_names())})"
            )
        if not chosen[0].is_available():
            raise UnsupportedSlide(f"backend {backend!r} is not installed")
        return chosen[0](path)
    errors: list[str] = []
    for candidate in backends:
        if candidate.is_available() and candidate.can_open(path):
            try:
                return candidate(path)
            except UnsupportedSlide as exc:
                errors.append(f"{candidate.name}: {exc}")
    if not errors and path.is_dir():  # a folder no backend even tried: a folder of slides?
        raise UnsupportedSlide(
            "this folder is neither a DICOM series nor a MIRAX slide: convert the slide files "
            "in it one by one (each file as its own argument)"
        )
    detail = f" ({'; '.join(errors)})" if errors else ""
    raise UnsupportedSlide(f"no backend can read this slide{detail}")


__all__ = [
    "BACKENDS",
    "DicomSource",
    "LeicaSource",
    "MiraxSource",
    "NdpiSource",
    "OpenSlideSource",
    "PhilipsSource",
    "SlideSource",
    "TiffSource",
    "VentanaSource",
    "open_slide",
]
