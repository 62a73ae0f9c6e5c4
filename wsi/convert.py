"""Convert one slide into a store: open, plan, build, publish. The unit the CLI and ingest use.

Publishing protocol: a finished slide has `<id>/manifest.json`. A run first checks for it (same
settings: nothing to do), otherwise removes it (readers stop seeing the old version), writes every
object, and writes the manifest last. Output is deterministic, so a run killed at any point and
started again ends with the same bytes as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .errors import WsiError
from .pyramid import Progress, PyramidBuilder, PyramidSettings
from .slide_id import content_slide_id
from .sources import open_slide
from .store import Store, check_slide_id
from .writers.base import ChunkFormat, SlideInfo
from .writers.omezarr import OmeZarrWriter

MANIFEST_FORMAT = "wsistore-manifest/1"


@dataclass(frozen=True)
class ConvertSettings:
    """Everything that decides a conversion's output (and so goes into its manifest)."""

    pyramid: PyramidSettings = field(default_factory=PyramidSettings)
    backend: str | None = None
    """Force a slide source backend by name; None probes."""
    include_associated: bool = True

    @property
    def associated_format(self) -> ChunkFormat:
        """Labels carry barcodes: JPEG at high quality without chroma subsampling, or zstd."""
        return ChunkFormat("zstd") if self.pyramid.lossless else ChunkFormat("jpeg", 92)

    def fingerprint(self) -> dict[str, Any]:
        """Settings that change the stored bytes (workers do not)."""
        p = asdict(self.pyramid)
        p.pop("workers")
        return {"pyramid": p, "backend": self.backend, "associated": self.include_associated}


@dataclass(frozen=True)
class ConvertResult:
    slide_id: str
    url: str
    base_pixels: int
    seconds: float
    stored_bytes: int
    skipped: bool
    """True when the same slide was already published with the same settings."""

    @property
    def megapixels_per_second(self) -> float:
        return self.base_pixels / 1e6 / self.seconds if self.seconds > 0 else 0.0


def convert_slide(
    path: str | Path,
    store: Store,
    settings: ConvertSettings | None = None,
    slide_id: str | None = None,
    progress: Progress | None = None,
) -> ConvertResult:
    """Convert the slide at `path` into `store` under its content id (or `slide_id`)."""
    start = time.perf_counter()
    settings = settings or ConvertSettings()
    path = Path(path)
    with open_slide(path, settings.backend) as source:
        sid = check_slide_id(slide_id) if slide_id is not None else content_slide_id(path)
        base = source.levels[0]
        url = store.full_url(f"{sid}/slide.zarr")
        if store.is_published(sid):
            manifest = store.read_manifest(sid)
            if manifest.get("settings") == settings.fingerprint():
                return ConvertResult(
                    sid,
                    url,
                    base.width * base.height,
                    0.0,
                    int(manifest.get("stored_bytes", 0)),
                    True,
                )
            store.unpublish(sid)
        store.remove_temporaries(sid)
        writer = OmeZarrWriter(store, f"{sid}/slide.zarr")
        try:
            PyramidBuilder(source, writer, settings.pyramid, progress).run()
            if settings.include_associated:
                for name in source.associated_names:
                    pixels = source.read_associated(name)
                    writer.write_associated(name, pixels, settings.associated_format)
            objects = writer.finish(SlideInfo(sid, source.properties, source.name))
        except BaseException:
            writer.abort()
            # Leave nothing behind: the slide is unpublished, so its objects serve no reader.
            with contextlib.suppress(Exception):
                store.delete_prefix(sid)
            raise
        stored = sum(o.size for o in objects)
        manifest = {
            "format": MANIFEST_FORMAT,
            "slide_id": sid,
            "zarr": "slide.zarr",
            "width": base.width,
            "height": base.height,
            "settings": settings.fingerprint(),
            "stored_bytes": stored,
            "objects": {
                o.key[len(sid) + 1 :]: {"size": o.size, "crc32c": o.crc32c}
                for o in sorted(objects, key=lambda o: o.key)
            },
        }
        store.publish(sid, manifest)
    return ConvertResult(
        sid, url, base.width * base.height, time.perf_counter() - start, stored, False
    )


__all__ = ["ConvertResult", "ConvertSettings", "WsiError", "convert_slide"]
