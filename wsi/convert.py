"""Convert one slide into a store: open, plan, build, publish. The unit the CLI and ingest use.

Publishing protocol: a finished slide has `<id>/manifest.json`, written last (the commit point).
A run holds the slide's lock (one conversion of a slide at a time on a machine), checks the
manifest (same settings: nothing to do), and writes every object. A first conversion writes in
place; a new version of a published slide is built in `<id>/staging-<run>/` while the old one
stays readable, then swapped in (unpublish, move, publish): a failed re-conversion loses nothing.
A run that fails (an error, Ctrl-C, SIGTERM) deletes what it wrote before it ends; what a killed
one left, the next conversion of the slide deletes. Output is deterministic, so a run killed at
any point and started again ends with the same bytes as an uninterrupted one.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import hashlib
import json
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from wsi.errors import CorruptSlide, InvalidArgument
from wsi.metadata import (
    DUMMY_DATE,
    DUMMY_TIME,
    SlideMetadata,
    metadata_for,
    neutral_icc_profile,
    neutral_name,
    safe_vendor_properties,
    slide_case,
    slide_name,
)
from wsi.model import MICRONS_PER_PIXEL_AT_1X, Level, SlideProperties
from wsi.pseudonyms import published_ids
from wsi.published.layout import (
    JPEG,
    JPEG2000,
    STAGING,
    ZSTD,
    ChunkFormat,
    LevelOrigin,
    Manifest,
    SlideKeys,
)
from wsi.pyramid.builder import LevelPlan, Progress, PyramidBuilder, PyramidSettings
from wsi.slide_id import content_slide_id, slide_files
from wsi.slidefiles import dicom_series_files, sidecar_path, slide_parts
from wsi.sources import SlideSource, open_slide
from wsi.store.objects import Store, check_slide_id
from wsi.store.versions import finish_swap, swap_in
from wsi.writers.base import SlideInfo
from wsi.writers.dicom import DicomSlide
from wsi.writers.omezarr import OmeZarrWriter

if TYPE_CHECKING:
    import numpy as np

    from wsi.pyramid.cluster import ClusterOptions

FORMATS = ("zarr", "dicom")
DEIDENTIFY_REVISION = 3
"""Recorded in a de-identified slide's manifest settings: raised whenever de-identification
removes more, so that a slide published under an earlier revision is converted again rather
than found up to date (revision 2: thumbnails that may show the label, ICC profile texts;
revision 3: the comments of codestreams kept with --keep-jpeg2000, and the comments and
EXIF/XMP blocks of JPEG tiles kept with --keep-source-jpeg)."""


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
    """Apply the DICOM PS3.15 Basic Application Level Confidentiality Profile: no identifiers
    (the sidecar and the source's own are not read), dummy dates, allow-listed vendor
    properties, no label, macro or thumbnail that may show the label, neutral ICC texts."""
    keep_label: bool = False
    """With `deidentify`: keep the label image (it usually shows names or barcodes), and a
    thumbnail that may show it."""
    keep_macro: bool = False
    """With `deidentify`: keep the macro (overview) image, which usually shows the label."""
    deidentify_key_file: str | None = None
    """With `deidentify`: the file of the key that makes the slide's id from its content id
    (`wsi.pseudonyms`); None: the default key file, made if absent. Not in the fingerprint: it
    decides only the id, which a slide published under it already has."""
    max_pixels: int = 10**11
    """Largest base level accepted (pixels): 316,000 px square, beyond any scanner's slide."""
    max_pixels_per_byte: int = 20_000
    """Largest base level accepted per byte of the slide's files. Real slides store a pixel in
    well under a byte even on blank glass (a white 256-px JPEG tile is ~600 bytes, 100 px per
    byte); a small sparse TIFF can declare 10^12 pixels of nothing and would fill the disk with
    millions of white tiles."""

    def __post_init__(self) -> None:
        if not self.formats or any(f not in FORMATS for f in self.formats):
            raise InvalidArgument(f"formats must be some of {', '.join(FORMATS)}")
        if self.max_pixels <= 0 or self.max_pixels_per_byte <= 0:
            raise InvalidArgument("max_pixels and max_pixels_per_byte must be positive")
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
        return ChunkFormat(ZSTD) if self.pyramid.lossless else ChunkFormat(JPEG, 92)

    def wants_associated(self, name: str, shows_label: bool = True) -> bool:
        """Whether the associated image `name` is published; `shows_label`: whether it may show
        the slide's label, as its source says (`SlideSource.associated_shows_label`)."""
        if not self.include_associated:
            return False
        if not self.deidentify:
            return True
        if name == "macro":
            return self.keep_macro
        if name == "label" or shows_label:
            return self.keep_label
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
            "deidentify": DEIDENTIFY_REVISION if self.deidentify else False,
            "keep_label": self.keep_label,
            "keep_macro": self.keep_macro,
            "metadata_sha256": digest.hexdigest(),
        }


@dataclass(frozen=True)
class ConvertResult:
    slide_id: str
    url: str
    """Where the slide's output is (`published_location`): its Zarr group, or the slide's
    folder when it was published as DICOM only."""
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
    cluster: ClusterOptions | None = None,
) -> ConvertResult:
    """Convert the slide at `path` into `store` under its content id (or `slide_id`); with
    `cluster`, its pyramid is built in bands on a Dask cluster (the same bytes)."""
    start = time.perf_counter()
    settings = settings or ConvertSettings()
    path = Path(path)
    with open_slide(path, settings.backend) as source:
        made: str | None  # the source's own id (`Manifest.source_id`)
        if slide_id is not None:
            sid = check_slide_id(slide_id)
            # De-identified, nothing that links (and the key is not needed: ingest's workers
            # are given the job's id).
            made = None if settings.deidentify else content_slide_id(path)
        else:
            sid = made = _published_id(path, settings)
        metadata, properties = _identity(path, source.properties, settings)
        fingerprint = settings.fingerprint(metadata)
        base = source.levels[0]
        check_declared_size(base, _stored_bytes(path, source.name), settings)
        with store.slide_lock(sid):
            finish_swap(store, sid)  # a version a killed run had begun to swap in: published
            published = _readable_manifest(store, sid) if store.is_published(sid) else None
            # A DICOM-only slide published before its manifest kept its attributes is made
            # again (the same instances) so that the service can read it; so is a slide whose
            # id was given and whose source is another file.
            if (
                published is not None
                and published.settings == fingerprint
                and published.servable
                and published.source_id in (None, made)
            ):
                stored = published.stored_bytes
                url = published_location(store, published)
                return ConvertResult(sid, url, base.width * base.height, 0.0, stored, True)
            replacing = store.is_published(sid)
            _remove_leftovers(store, sid)  # of killed runs: none is running (the lock)
            # A new version of a published slide is built beside it and swapped in only when
            # complete: a failed or interrupted re-conversion leaves the published one as it was.
            keys = SlideKeys(sid).staging(uuid.uuid4().hex[:12]) if replacing else SlideKeys(sid)
            dicom = (
                dicom_slide(sid, metadata, properties, base, path, uid_variant(fingerprint))
                if settings.dicom
                else None
            )
            writer = _writer_type(cluster)(store, keys, dicom, "zarr" in settings.formats)
            # Up to the commit, any failure (the source deleted under us fails only here, at
            # `source_bytes`) removes what this run wrote: no later run may come to remove it.
            with _removed_on_failure(writer, store, keys):
                with _associated_read_ahead(source, settings) as associated:
                    plans = _build_pyramid(
                        path, source, writer, settings.pyramid, progress, cluster
                    )
                _write_associated(associated.result(), writer, settings)
                info = SlideInfo(sid, properties, source.name)
                objects = writer.finish(info)
                name, case = slide_naming(sid, path, metadata)
                manifest = Manifest.build(
                    sid,
                    base,
                    fingerprint,
                    objects,
                    writer.dicom_instances,
                    keys,
                    name,
                    case,
                    source_bytes=source_bytes(path, source.name),
                    source_id=made,
                    levels=level_origins(source, plans),
                    attributes=writer.attributes(info),
                )
                if replacing:
                    _swap_in(store, keys, manifest, published)
                else:
                    store.publish(sid, manifest)
            stored = manifest.stored_bytes
    url = published_location(store, manifest)
    return ConvertResult(
        sid, url, base.width * base.height, time.perf_counter() - start, stored, False
    )


def _published_id(path: Path, settings: ConvertSettings) -> str:
    """The id the slide at `path` is published under: its content id, or de-identified, the
    keyed pseudonym of it (`wsi.pseudonyms`), which no one without the key links to the
    identified slide."""
    ids = published_ids(settings.deidentify, settings.deidentify_key_file)
    return ids.of(content_slide_id(path))


def published_location(store: Store, manifest: Manifest) -> str:
    """Where a published slide's output is, as `wsi convert` reports it: its Zarr group, or for
    a slide published as DICOM only (`--format dicom`: no Zarr view) the slide's folder, which
    holds its manifest and DICOM instances (`wsi export-dicom` writes them out as .dcm files)."""
    keys = SlideKeys(manifest.slide_id)
    return store.full_url(keys.zarr_root if manifest.zarr_view else keys.root)


@contextlib.contextmanager
def _removed_on_failure(writer: OmeZarrWriter, store: Store, keys: SlideKeys) -> Iterator[None]:
    """On any failure of the block, which builds and publishes the version `keys` (an
    exception, Ctrl-C, SIGTERM: not a kill), abort `writer`'s open objects and remove what the
    run wrote (`_remove_unpublished`), then let the failure go on as it was. A clean-up that
    fails too (the store is down) is dropped: the caller sees why the conversion failed, and
    the next conversion of the slide removes the rest (`_remove_leftovers`), as after a kill.
    The run must clean up itself: a slide whose source is gone (deleted mid-way, the usual
    cause) is never converted again, and objects without a manifest are listed nowhere."""
    try:
        yield
    except BaseException:
        with contextlib.suppress(Exception):
            writer.abort()
        with contextlib.suppress(Exception):
            _remove_unpublished(store, keys)
        raise


def _remove_unpublished(store: Store, keys: SlideKeys) -> None:
    """Delete the version `keys` a failed run was writing, and its unfinished uploads, unless it
    may be needed: a first conversion (written in place) is deleted, the slide's whole folder,
    while the slide is not published (the failure came before the manifest was in place); a
    staged one (`<id>/staging-<run>/`) while the slide is published (the old version, the swap
    not begun; or the new one, in place already). A slide unpublished with a staged version is a
    swap cut short, which the next run finishes (`finish_swap`). Call holding the slide's lock:
    nothing else writes the slide, so everything under `keys.root` is this run's or a killed
    run's. The published version is never touched: a staging folder holds none of it."""
    staged = keys.root != keys.slide_id
    if store.is_published(keys.slide_id) != staged:
        return
    store.remove_temporaries(keys.root)
    store.delete_prefix(keys.root)


@dataclass(frozen=True)
class _Associated:
    """One associated image to publish, read from the source."""

    name: str
    shows_label: bool
    pixels: np.ndarray = field(repr=False)
    """(h, w, 3) uint8."""


@contextlib.contextmanager
def _associated_read_ahead(
    source: SlideSource, settings: ConvertSettings
) -> Iterator[cf.Future[list[_Associated]]]:
    """The label, macro and thumbnail that `settings` publish (`wants_associated`), read on a
    thread of their own while the block builds the pyramid: their decode (50 ms for an Aperio
    slide's three, through OpenSlide) then runs beside the build's start-up, where a core is
    idle, instead of after its last tile. Sources are thread-safe for reads. The thread has
    finished when the block ends, however it ends: nothing reads a closed source."""

    def read() -> list[_Associated]:
        wanted = []
        for name in source.associated_names:
            shows_label = source.associated_shows_label(name)
            if settings.wants_associated(name, shows_label):
                wanted.append(_Associated(name, shows_label, source.read_associated(name)))
        return wanted

    with cf.ThreadPoolExecutor(1, thread_name_prefix="wsi-associated") as pool:
        yield pool.submit(read)


def _write_associated(
    images: list[_Associated], writer: OmeZarrWriter, settings: ConvertSettings
) -> None:
    fmt = settings.associated_format
    for image in images:
        writer.write_associated(image.name, image.pixels, fmt, image.shows_label)


def _writer_type(cluster: ClusterOptions | None) -> type[OmeZarrWriter]:
    """The writer of a pyramid built here, or on `cluster`: the cluster's module (and its
    imports) is loaded only for a build on a cluster."""
    if cluster is None:
        return OmeZarrWriter
    from wsi.pyramid.cluster import ClusterWriter

    return ClusterWriter


def _build_pyramid(
    path: Path,
    source: SlideSource,
    writer: OmeZarrWriter,
    settings: PyramidSettings,
    progress: Progress | None,
    cluster: ClusterOptions | None,
) -> list[LevelPlan]:
    """Build the pyramid into `writer`, here or on `cluster`; the plans it followed."""
    if cluster is None:
        builder = PyramidBuilder(source, writer, settings, progress)
        builder.run()
        return builder.plans
    from wsi.pyramid.cluster import ClusterWriter, build_on_cluster

    assert isinstance(writer, ClusterWriter)
    return build_on_cluster(str(path), source, writer, settings, cluster, progress)


def _identity(
    path: Path, properties: SlideProperties, settings: ConvertSettings
) -> tuple[SlideMetadata, SlideProperties]:
    """The identifiers and properties to publish: the sidecar's and the source's, or under
    `deidentify` neutral ones (no sidecar read, free text and ICC text tags neutralised)."""
    if not settings.deidentify:
        return metadata_for(path, settings.metadata_file, properties.identifiers), properties
    icc = properties.icc_profile
    return SlideMetadata().deidentify(), replace(
        properties,
        vendor_properties=safe_vendor_properties(properties.vendor_properties),
        scan_datetime=None,
        serial_number=None,
        identifiers={},
        icc_profile=neutral_icc_profile(icc) if icc else None,
    )


def level_origins(source: SlideSource, plans: list[LevelPlan]) -> tuple[LevelOrigin, ...]:
    """What the builder does with each planned level, for the manifest: a copy of a source
    level's JPEG or JPEG 2000 tiles (how the source hands them out), or made here: the base
    decoded and encoded, the level below a copy by DCT-scaled half decoding (JPEG) or a 1/2
    resolution decode (JPEG 2000), any other level by 2x2 means of the one above it (see
    `wsi.pyramid.builder`)."""
    out = []
    for plan in plans:
        if plan.source_level is not None:
            method = source.encoded_tile_method(plan.source_level)
            out.append(LevelOrigin(plan.index, method, source_level=plan.source_level))
        elif plan.index == 0:
            out.append(LevelOrigin(0, "decoded+encoded", source_level=0))
        else:
            parent = plans[plan.index - 1]
            method = "mean2x2"
            if parent.passthrough:
                j2k = parent.chunk_format.codec == JPEG2000
                method = "wavelet-half" if j2k else "dct-half"
            out.append(LevelOrigin(plan.index, method, from_level=parent.index))
    return tuple(out)


def slide_naming(slide_id: str, path: Path, metadata: SlideMetadata) -> tuple[str, str | None]:
    """The display name and case recorded in the manifest: from the identifiers (sidecar or the
    source's header) or the file's stem; under de-identification a neutral name made from the id
    and no case, so the name the slide had is never stored."""
    if metadata.deidentified:
        return neutral_name(slide_id), None
    return slide_name(metadata, path), slide_case(metadata)


def _swap_in(
    store: Store, staged: SlideKeys, manifest: Manifest, published: Manifest | None
) -> None:
    """Replace a published version by the one built in `staged` (`wsi.store.versions.swap_in`:
    a swap cut short is finished by the next run); what only the old version had is deleted,
    with the folders that leaves empty (`Store.delete_objects`)."""
    swap_in(store, staged, manifest.to_bytes(), manifest.objects)
    old = published.objects if published is not None else {}
    gone = sorted(set(old) - set(manifest.objects))
    store.delete_objects(staged.slide_id, [SlideKeys(staged.slide_id).in_store(k) for k in gone])


def check_declared_size(base: Level, stored_bytes: int, settings: ConvertSettings) -> None:
    """Refuse a slide whose declared base level is implausible for its files (CorruptSlide)."""
    pixels = base.width * base.height
    if pixels > settings.max_pixels:
        raise CorruptSlide(
            f"declares {base.width} x {base.height} pixels, over the {settings.max_pixels} "
            "pixel limit"
        )
    if pixels > settings.max_pixels_per_byte * max(stored_bytes, 1):
        raise CorruptSlide(
            f"declares {base.width} x {base.height} pixels in {stored_bytes} bytes of files "
            f"(over {settings.max_pixels_per_byte} pixels per byte): a sparse or corrupt file"
        )


def _stored_bytes(path: Path, backend: str) -> int:
    """Bytes of the slide's files: a DICOM instance given alone brings its series' folder."""
    files = slide_files(path.parent if backend == "dicom" and path.is_file() else path)
    return sum(f.stat().st_size for f in files)


def source_bytes(path: Path, backend: str) -> int:
    """Bytes of the source slide, recorded in the manifest as the base of storage ratios: every
    file of the slide (`wsi.slidefiles.slide_parts`: a MIRAX folder, the files a VMS lists; not
    its metadata sidecar), and for DICOM the instances of its series only."""
    if backend == "dicom":
        files = dicom_series_files(path) if path.is_file() else slide_files(path)
    else:
        sidecar = sidecar_path(path)
        parts = [p for p in slide_parts(path) if p != sidecar]
        files = [f for part in parts for f in ([part] if part.is_file() else slide_files(part))]
    return sum(f.stat().st_size for f in dict.fromkeys(files))


def _remove_leftovers(store: Store, slide_id: str) -> None:
    """Temporaries and staging folders that killed runs left in a slide's folder."""
    store.remove_temporaries(slide_id)
    for name in store.children(slide_id):
        if name.startswith(STAGING):
            store.delete_prefix(f"{slide_id}/{name}")


def _readable_manifest(store: Store, slide_id: str) -> Manifest | None:
    """The manifest of the published version; None when it cannot be parsed (a version to
    replace, not an error)."""
    try:
        return store.manifest(slide_id)
    except CorruptSlide:
        return None


UID_NEUTRAL_SETTINGS = frozenset({"metadata_sha256", "formats"})
"""Settings that leave every DICOM instance as it is: the sidecar's identifiers (their
correction keeps a slide's UIDs, as PACS updates do) and the views published (`--format dicom`
only leaves out the Zarr metadata: the same instances, so the same series, not a second one)."""


def uid_variant(fingerprint: dict[str, Any]) -> str:
    """`DicomSlide.variant` of a conversion: its settings (`ConvertSettings.fingerprint`) but
    those that change no instance (`UID_NEUTRAL_SETTINGS`)."""
    kept = {k: v for k, v in fingerprint.items() if k not in UID_NEUTRAL_SETTINGS}
    return hashlib.sha256(json.dumps(kept, sort_keys=True).encode()).hexdigest()[:32]


def dicom_slide(
    slide_id: str,
    metadata: SlideMetadata,
    props: SlideProperties,
    base: Level,
    path: Path,
    variant: str = "",
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
    mpp_x = props.mpp_x or (
        MICRONS_PER_PIXEL_AT_1X / props.objective_power if props.objective_power else 0.25
    )
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
        objective_power=props.objective_power,
        variant=variant,
    )
