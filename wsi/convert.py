"""Convert one slide into a store: open, plan, build, publish. The unit the CLI and ingest use.

Publishing protocol: a finished slide has `<id>/manifest.json`. A run first checks for it (same
settings: nothing to do), otherwise removes it (readers stop seeing the old version), writes every
object, and writes the manifest last. Output is deterministic, so a run killed at any point and
started again ends with the same bytes as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from wsi.errors import InvalidArgument
from wsi.metadata import DUMMY_DATE, DUMMY_TIME, SlideMetadata, metadata_for, safe_vendor_properties
from wsi.model import Level, SlideProperties
from wsi.pyramid.builder import Progress, PyramidBuilder, PyramidSettings
from wsi.slide_id import content_slide_id
from wsi.sources import open_slide
from wsi.store.objects import Store, check_slide_id
from wsi.writers.base import ChunkFormat, SlideInfo, StoredObject
from wsi.writers.dicom import DicomSlide
from wsi.writers.omezarr import OmeZarrWriter

MANIFEST_FORMAT = "wsistore-manifest/1"


FORMATS = ("zarr", "dicom")


@dataclass(frozen=True)
class ConvertSettings:
    """Everything that decides a conversion's output (and so goes into its manifest)."""

    pyramid: PyramidSettings = field(default_factory=PyramidSettings)
    backend: str | None = None
    """Force a slide source backend by name; None probes."""
    include_associated: bool = True
    formats: tuple[str, ...] = FORMATS
    """Views to publish: the OME-Zarr metadata, the DICOM-WSI headers, or both (same pixels)."""
    metadata_file: str | None = None
    """Patient/study/specimen identifiers (JSON); default: the slide's sidecar JSON, if any."""
    deidentify: bool = False
    """Apply the DICOM PS3.15 Basic Application Level Confidentiality Profile."""
    keep_label: bool = False
    """With `deidentify`: keep the label image (it usually shows names or barcodes)."""
    keep_macro: bool = False
    """With `deidentify`: keep the macro (overview) image, which usually shows the label."""

    def __post_init__(self) -> None:
        if not self.formats or any(f not in FORMATS for f in self.formats):
            raise InvalidArgument(f"formats must be some of {', '.join(FORMATS)}")
        if "dicom" in self.formats and self.pyramid.lossless:
            raise InvalidArgument(
                "--lossless stores zstd tiles, which DICOM cannot carry: use --format zarr"
            )

    @property
    def dicom(self) -> bool:
        return "dicom" in self.formats

    @property
    def associated_format(self) -> ChunkFormat:
        """Labels carry barcodes: JPEG at high quality without chroma subsampling, or zstd."""
        return ChunkFormat("zstd") if self.pyramid.lossless else ChunkFormat("jpeg", 92)

    def wants_associated(self, name: str) -> bool:
        if not self.include_associated:
            return False
        if self.deidentify and name == "label":
            return self.keep_label
        if self.deidentify and name == "macro":
            return self.keep_macro
        return True

    def fingerprint(self, metadata: SlideMetadata) -> dict[str, Any]:
        """Settings that change the stored bytes (workers do not). Identifiers appear only as a
        digest: the manifest must not become one more place that holds patient data."""
        p = asdict(self.pyramid)
        p.pop("workers")
        digest = hashlib.sha256(json.dumps(metadata.to_dict(), sort_keys=True).encode())
        return {
            "pyramid": p,
            "backend": self.backend,
            "associated": self.include_associated,
            "formats": sorted(self.formats),
            "deidentify": self.deidentify,
            "keep_label": self.keep_label,
            "keep_macro": self.keep_macro,
            "metadata_sha256": digest.hexdigest(),
        }


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
        metadata = metadata_for(path, settings.metadata_file, source.properties.identifiers)
        properties = source.properties
        if settings.deidentify:
            metadata = metadata.deidentify()
            properties = replace(
                properties,
                vendor_properties=safe_vendor_properties(properties.vendor_properties),
                scan_datetime=None,
                serial_number=None,
                identifiers={},
            )
        fingerprint = settings.fingerprint(metadata)
        base = source.levels[0]
        url = store.full_url(f"{sid}/slide.zarr")
        if store.is_published(sid):
            manifest = store.read_manifest(sid)
            if manifest.get("settings") == fingerprint:
                stored = int(manifest.get("stored_bytes", 0))
                return ConvertResult(sid, url, base.width * base.height, 0.0, stored, True)
            store.unpublish(sid)
        store.remove_temporaries(sid)
        dicom = dicom_slide(sid, metadata, properties, base, path) if settings.dicom else None
        writer = OmeZarrWriter(store, f"{sid}/slide.zarr", dicom, "zarr" in settings.formats)
        try:
            PyramidBuilder(source, writer, settings.pyramid, progress).run()
            fmt = settings.associated_format
            for name in source.associated_names:
                if settings.wants_associated(name):
                    writer.write_associated(name, source.read_associated(name), fmt)
            objects = writer.finish(SlideInfo(sid, properties, source.name))
        except BaseException:
            writer.abort()
            # Leave nothing behind: the slide is unpublished, so its objects serve no reader.
            with contextlib.suppress(Exception):
                store.delete_prefix(sid)
            raise
        stored = sum(o.size for o in objects)
        manifest = _manifest(sid, base, fingerprint, objects, writer.dicom_instances)
        store.publish(sid, manifest)
    return ConvertResult(
        sid, url, base.width * base.height, time.perf_counter() - start, stored, False
    )


def _manifest(
    sid: str,
    base: Level,
    fingerprint: dict[str, Any],
    objects: list[StoredObject],
    dicom_instances: list[dict[str, Any]],
) -> dict[str, Any]:
    """The commit record: every object with its size and CRC32C, keys relative to the slide."""
    return {
        "format": MANIFEST_FORMAT,
        "slide_id": sid,
        "zarr": "slide.zarr",
        "width": base.width,
        "height": base.height,
        "settings": fingerprint,
        "stored_bytes": sum(o.size for o in objects),
        "objects": {
            o.key[len(sid) + 1 :]: {"size": o.size, "crc32c": o.crc32c}
            for o in sorted(objects, key=lambda o: o.key)
        },
        "dicom": [{**inst, "key": inst["key"][len(sid) + 1 :]} for inst in dicom_instances],
    }


def dicom_slide(
    slide_id: str, metadata: SlideMetadata, props: SlideProperties, base: Level, path: Path
) -> DicomSlide:
    """Per-slide DICOM values. Dates: the scan time when the file says, else the source file's
    modification time (stable, so a rerun writes the same bytes); a dummy when de-identified."""
    if metadata.deidentified:
        date, clock = DUMMY_DATE, DUMMY_TIME
    elif props.scan_datetime:
        date, clock = props.scan_datetime[:8], props.scan_datetime[8:14]
    else:
        stamp = datetime.fromtimestamp(path.stat().st_mtime, tz=UTC)
        date, clock = stamp.strftime("%Y%m%d"), stamp.strftime("%H%M%S")
    # DICOM needs a pixel spacing; without one in the file, estimate it from the objective
    # (10 um / magnification, the usual scanner optics) or assume 0.25 um (a 40x scan).
    mpp_x = props.mpp_x or (10.0 / props.objective_power if props.objective_power else 0.25)
    mpp_y = props.mpp_y or mpp_x
    return DicomSlide(
        slide_id=slide_id,
        metadata=metadata,
        manufacturer=props.manufacturer or "Unknown",
        model_name=props.model or "Unknown",
        serial_number=props.serial_number or "Unknown",
        software_versions=props.vendor or "Unknown",
        mpp_mm=(mpp_y / 1000.0, mpp_x / 1000.0),
        base_width=base.width,
        base_height=base.height,
        content_date=date,
        content_time=clock,
        icc_profile=props.icc_profile,
    )
