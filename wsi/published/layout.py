"""The published layout of a slide: the one definition that the writers and the reader share.

A published slide is, relative to the store root:

    <slide-id>/manifest.json                   the commit point: every object, its size and CRC32C
    <slide-id>/slide.zarr/zarr.json            OME-Zarr 0.5 group; `wsistore` attributes
    <slide-id>/slide.zarr/<k>/zarr.json        level k: one array, one shard over the whole level
    <slide-id>/slide.zarr/<k>/c/0/0/0          the shard (and, with the DICOM view, an instance)
    <slide-id>/slide.zarr/associated/<name>/   label, macro, thumbnail: single-chunk arrays

Keys, the attribute schema, the chunk codecs, the shard index and the manifest are defined here
and nowhere else, so a change in the writer cannot silently break a reader. Changing anything
here changes the stored bytes: existing stores must stay readable.
"""

from __future__ import annotations

import base64
import functools
import json
import re
import struct
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from types import MappingProxyType
from typing import Any, Literal, TypeAlias, cast

import google_crc32c
import numpy as np

from wsi.codecs import jpeg, jpeg2000, jxl
from wsi.errors import CorruptSlide, InvalidArgument
from wsi.model import JPEG_CODEC_NAME, Level, SlideProperties

# -- keys -----------------------------------------------------------------------------------------
SLIDE_ID = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
MANIFEST = "manifest.json"
ZARR_ROOT = "slide.zarr"
METADATA = "zarr.json"
STAGING = "staging-"
"""Prefix of the folder (inside a slide's folder) where a new version is built while the
published one stays readable."""
SHARD = "c/0/0/0"
"""The only chunk key of every array: one shard covers the whole level."""
ASSOCIATED_GROUP = "associated"
ATTRIBUTES = "wsistore"
"""Name of our attributes in the root group's zarr.json."""
FORMAT_VERSION = 1
MANIFEST_FORMAT = "wsistore-manifest/1"
FILL_VALUE = 255
"""The fill grey of slides published without a chosen one: white. A slide's own fill
(`SlideAttributes.fill`, each level array's `fill_value`) is the grey of its blank glass, what
readers give for pixels outside the stored tiles and for chunks a shard does not hold."""


def check_slide_id(slide_id: str) -> str:
    """Slide ids are opaque, lower-case and safe as one path segment or object-key segment."""
    if not isinstance(slide_id, str) or not SLIDE_ID.match(slide_id) or ".." in slide_id:
        raise InvalidArgument(
            "slide id must be 1-64 characters of a-z, 0-9, '.', '_', '-', starting alphanumeric"
        )
    return slide_id


def level_path(index: int) -> str:
    """Array path of pyramid level `index` inside the Zarr group."""
    return str(index)


def associated_path(name: str) -> str:
    """Array path of an associated image inside the Zarr group."""
    return f"{ASSOCIATED_GROUP}/{name}"


@dataclass(frozen=True)
class SlideKeys:
    """The object keys of one slide, relative to the store root.

    `root` is where this version's objects are written: the slide's own folder, or a staging
    folder inside it (`<id>/staging-<run>`) while a new version is built beside the published
    one. The manifest (the commit point) is always `<id>/manifest.json`, and keys in a manifest
    are relative to the root, so staged objects keep them when promoted."""

    slide_id: str
    root: str = ""

    def __post_init__(self) -> None:
        check_slide_id(self.slide_id)
        if not self.root:
            object.__setattr__(self, "root", self.slide_id)
        elif not self.root.startswith(f"{self.slide_id}/{STAGING}"):
            raise InvalidArgument(f"{self.root!r} is not a staging folder of {self.slide_id}")

    def staging(self, run: str) -> SlideKeys:
        """The keys of a version built in `<id>/staging-<run>` (run: a-z0-9)."""
        if not run.isalnum() or not run.isascii():
            raise InvalidArgument(f"bad run id {run!r}")
        return SlideKeys(self.slide_id, f"{self.slide_id}/{STAGING}{run}")

    @property
    def manifest(self) -> str:
        return f"{self.slide_id}/{MANIFEST}"

    @property
    def zarr_root(self) -> str:
        return f"{self.root}/{ZARR_ROOT}"

    @property
    def root_metadata(self) -> str:
        return f"{self.zarr_root}/{METADATA}"

    @property
    def associated_group_metadata(self) -> str:
        return f"{self.zarr_root}/{ASSOCIATED_GROUP}/{METADATA}"

    def array_metadata(self, path: str) -> str:
        """zarr.json of the array at `path` (a level path or an associated path)."""
        return f"{self.zarr_root}/{path}/{METADATA}"

    def shard(self, path: str) -> str:
        """The one shard object of the array at `path`."""
        return f"{self.zarr_root}/{path}/{SHARD}"

    def in_slide(self, key: str) -> str:
        """A store key of this version -> the key relative to the slide (the manifest's form)."""
        head = f"{self.root}/"
        if not key.startswith(head):
            raise InvalidArgument(f"{key!r} is not a key of slide {self.slide_id}")
        return key[len(head) :]

    def in_store(self, key_in_slide: str) -> str:
        """A key relative to the slide (the manifest's form) -> the store key of this version."""
        return f"{self.root}/{key_in_slide}"


def dump_json(doc: Mapping[str, Any]) -> bytes:
    """Every JSON document we store: sorted keys, so the same slide gives the same bytes."""
    return json.dumps(dict(doc), indent=1, sort_keys=True).encode()


def load_json(data: bytes, what: str) -> dict[str, Any]:
    """A stored JSON document (CorruptSlide when it is not a JSON object)."""
    try:
        doc = json.loads(data)
    except ValueError as exc:
        raise CorruptSlide(f"{what} is not valid JSON") from exc
    if not isinstance(doc, dict):
        raise CorruptSlide(f"{what} is not a JSON object")
    return doc


def _field(doc: Mapping[str, Any], name: str, kind: type | tuple[type, ...], what: str) -> Any:
    """A required field of a stored JSON document, type-checked (CorruptSlide otherwise)."""
    if name not in doc:
        raise CorruptSlide(f"{what}: field {name!r} is missing")
    value = doc[name]
    if not isinstance(value, kind) or (isinstance(value, bool) and kind in (int, (int, float))):
        raise CorruptSlide(f"{what}: field {name!r} has the wrong type")
    return value


# -- chunk codecs ---------------------------------------------------------------------------------
CodecId: TypeAlias = Literal["jpeg", "zstd", "jpegxl", "jpeg2000"]
JPEG: CodecId = "jpeg"
"""Each chunk is a complete baseline JPEG stream (the `wsistore.jpeg` Zarr codec)."""
ZSTD: CodecId = "zstd"
"""Each chunk is the zstd of the interleaved RGB bytes (`bytes` + `zstd` Zarr codecs)."""
JPEGXL: CodecId = "jpegxl"
"""Each chunk is a JPEG chunk recompressed losslessly with JPEG XL (the `wsistore.jpegxl` Zarr
codec): the archive tier (`wsi.published.archive`). The JPEG is rebuilt byte for byte to serve
or decode it, so everything that reads JPEG chunks reads these too."""
JPEG2000: CodecId = "jpeg2000"
"""Each chunk is a bare JPEG 2000 codestream of R, G, B components, a source's tile kept as it
is (`--keep-jpeg2000`; the `wsistore.jpeg2000` Zarr codec, DICOM's JPEG 2000 transfer
syntaxes). Handed out to viewers as a JPEG transcoded at `JPEG2000_SERVED_QUALITY`."""
CODEC_IDS: tuple[CodecId, ...] = (JPEG, ZSTD, JPEGXL, JPEG2000)
JPEG2000_SERVED_QUALITY = 90
"""JPEG quality of the tiles transcoded from JPEG 2000 chunks for viewers."""


@dataclass(frozen=True)
class ChunkFormat:
    """How the chunks (tiles) of one output level are encoded."""

    codec: CodecId
    quality: int = 85
    """JPEG quality (1-100) of tiles we encode; passed-through tiles keep the source's."""
    zstd_level: int = 3

    def __post_init__(self) -> None:
        if self.codec not in CODEC_IDS:
            raise InvalidArgument(f"unknown chunk codec {self.codec!r}")
        if not 1 <= self.quality <= 100:
            raise InvalidArgument(f"JPEG quality must be 1-100, got {self.quality}")


def chunk_codecs(fmt: ChunkFormat) -> list[dict[str, Any]]:
    """Inner codecs of a level's chunks: channels last, then JPEG or raw bytes + zstd."""
    transpose = {"name": "transpose", "configuration": {"order": [1, 2, 0]}}
    if fmt.codec == JPEG2000:
        return [transpose, {"name": jpeg2000.ZARR_CODEC_NAME, "configuration": {}}]
    if fmt.codec in (JPEG, JPEGXL):
        name = JPEG_CODEC_NAME if fmt.codec == JPEG else jxl.ZARR_CODEC_NAME
        return [transpose, {"name": name, "configuration": {"quality": fmt.quality}}]
    return [
        transpose,
        {"name": "bytes"},
        {"name": "zstd", "configuration": {"level": fmt.zstd_level, "checksum": False}},
    ]


def codec_of_array(metadata: Mapping[str, Any], what: str) -> CodecId:
    """The chunk codec id of an array, from its zarr.json (the inverse of `chunk_codecs`)."""
    try:
        [sharding] = metadata["codecs"]
        names = [c["name"] for c in sharding["configuration"]["codecs"]]
    except (KeyError, TypeError, ValueError) as exc:
        raise CorruptSlide(f"{what}: not a sharded array of ours") from exc
    if JPEG_CODEC_NAME in names:
        return JPEG
    if jxl.ZARR_CODEC_NAME in names:
        return JPEGXL
    if jpeg2000.ZARR_CODEC_NAME in names:
        return JPEG2000
    if "zstd" in names:
        return ZSTD
    raise CorruptSlide(f"{what}: unknown chunk codecs {names}")


def encode_chunk_zstd(pixels: np.ndarray, level: int = 3) -> bytes:
    """(h, w, 3) uint8 -> zstd of the interleaved bytes (what `transpose` + `bytes` produce)."""
    return bytes(_zstd(level).encode(np.ascontiguousarray(pixels)))


def _zstd(level: int = 0) -> Any:
    """numcodecs' Zstd codec (the level matters only to encode). numcodecs is imported here,
    not with this module: importing it scans the codec entry points (~50 ms of CPU), which
    every `wsi` command would pay and only lossless chunks need."""
    from numcodecs import Zstd

    return Zstd(level=level)


def decode_chunk(codec: CodecId, data: bytes, height: int, width: int) -> np.ndarray:
    """A stored chunk -> (height, width, 3) uint8 RGB: the whole chunk, edge padding included.
    A JPEG declaring another size is refused before anything is allocated (`jpeg.check_size`)."""
    if codec in (JPEG, JPEGXL):
        stream = jxl.jxl_to_jpeg(data) if codec == JPEGXL else data
        pixels = jpeg.decode(stream, expected=(height, width))
    elif codec == JPEG2000:
        jpeg2000.check_size(data, height, width)
        pixels = jpeg2000.decode(data)
    else:
        raw = _zstd().decode(data)
        if len(raw) != height * width * 3:
            raise CorruptSlide(f"zstd chunk holds {len(raw)} bytes, not {height}x{width}x3")
        pixels = np.frombuffer(raw, np.uint8).reshape(height, width, 3)
    if pixels.shape != (height, width, 3):
        raise CorruptSlide(f"chunk decodes to {pixels.shape}, expected ({height}, {width}, 3)")
    return pixels


# -- array and group metadata ---------------------------------------------------------------------
def _array_metadata(
    level: Level, fmt: ChunkFormat, attributes: dict[str, Any], fill: int = FILL_VALUE
) -> dict[str, Any]:
    """zarr.json of an array: a single shard over the tile grid (padded to whole tiles)."""
    th, tw = level.tile_height, level.tile_width
    return {
        "zarr_format": 3,
        "node_type": "array",
        "shape": [3, level.height, level.width],
        "data_type": "uint8",
        "chunk_grid": {
            "name": "regular",
            "configuration": {"chunk_shape": [3, level.rows * th, level.cols * tw]},
        },
        "chunk_key_encoding": {"name": "default", "configuration": {"separator": "/"}},
        "fill_value": fill,
        "codecs": [
            {
                "name": "sharding_indexed",
                "configuration": {
                    "chunk_shape": [3, th, tw],
                    "codecs": chunk_codecs(fmt),
                    "index_codecs": [
                        {"name": "bytes", "configuration": {"endian": "little"}},
                        {"name": "crc32c"},
                    ],
                    "index_location": "end",
                },
            }
        ],
        "attributes": attributes,
        "dimension_names": ["c", "y", "x"],
    }


def level_array_metadata(
    index: int, level: Level, fmt: ChunkFormat, fill: int = FILL_VALUE
) -> dict[str, Any]:
    """zarr.json of pyramid level `index`; `fill` is the grey of its missing (blank) tiles."""
    attributes = {"level": index, "downsample": level.downsample}
    return _array_metadata(level, fmt, attributes, fill)


@functools.lru_cache(maxsize=64)
def background_chunk(codec: CodecId, width: int, height: int, fill: int) -> bytes:
    """The stored form of a chunk the shard does not hold: a `width` x `height` tile of the
    grey (fill, fill, fill). JPEG at quality 100 (4:2:0) decodes to exactly that grey in
    libjpeg-turbo, Pillow and imagecodecs (checked for every grey), ~1.7 KB for 256 px."""
    pixels = np.full((height, width, 3), fill, np.uint8)
    if codec == JPEG:
        return jpeg.encode(pixels, 100, subsample_420=True)
    if codec == JPEG2000:
        return jpeg2000.encode_flat(pixels)
    return encode_chunk_zstd(pixels)


def associated_array_metadata(name: str, level: Level, fmt: ChunkFormat) -> dict[str, Any]:
    """zarr.json of an associated image: one chunk holds the whole image."""
    return _array_metadata(level, fmt, {"associated": name})


ASSOCIATED_GROUP_METADATA: Mapping[str, Any] = MappingProxyType(
    {"zarr_format": 3, "node_type": "group", "attributes": {}}
)


def root_metadata(attributes: SlideAttributes) -> dict[str, Any]:
    """The root group's zarr.json: OME-Zarr 0.5 multiscales (micrometre scales from the MPP and
    each level's downsample), omero channels, and our attributes."""
    mpp = attributes.mpp_x
    datasets = [
        {
            "path": lv.path,
            "coordinateTransformations": [
                {
                    "type": "scale",
                    "scale": [
                        1.0,
                        lv.downsample * (attributes.mpp_y or mpp or 1.0),
                        lv.downsample * (mpp or 1.0),
                    ],
                }
            ],
        }
        for lv in attributes.levels
    ]
    unit = {"unit": "micrometer"} if mpp else {}
    axes = [
        {"name": "c", "type": "channel"},
        {"name": "y", "type": "space", **unit},
        {"name": "x", "type": "space", **unit},
    ]
    channels = [
        {
            "label": label,
            "color": color,
            "active": True,
            "window": {"start": 0, "end": 255, "min": 0, "max": 255},
        }
        for label, color in (("R", "FF0000"), ("G", "00FF00"), ("B", "0000FF"))
    ]
    return {
        "zarr_format": 3,
        "node_type": "group",
        "attributes": {
            "ome": {
                "version": "0.5",
                "multiscales": [{"name": attributes.slide_id, "axes": axes, "datasets": datasets}],
                "omero": {"channels": channels, "rdefs": {"model": "color"}},
            },
            ATTRIBUTES: attributes.to_json(),
        },
    }


# -- the archive tier -----------------------------------------------------------------------------
ARCHIVE_CODECS: Mapping[CodecId, CodecId] = MappingProxyType({JPEG: JPEGXL, JPEGXL: JPEG})
"""What the archive recodes (JPEG chunks to JPEG XL), and what restoring gives back. zstd
chunks are left as they are."""


def served_codec(codec: CodecId) -> CodecId:
    """How chunks stored as `codec` are handed to readers that ask for encoded tiles: an
    archived chunk as the JPEG it was made from, a JPEG 2000 one transcoded to JPEG."""
    return JPEG if codec in (JPEGXL, JPEG2000) else codec


def _codec_name(codec: CodecId) -> str:
    if codec not in ARCHIVE_CODECS:
        raise InvalidArgument(f"chunk codec {codec!r} is not recoded by the archive")
    return JPEG_CODEC_NAME if codec == JPEG else jxl.ZARR_CODEC_NAME


def recode_array_metadata(data: bytes, to: CodecId, what: str) -> bytes:
    """An array's zarr.json with its chunk codec switched between JPEG and JPEG XL (the
    configuration, the JPEG quality, stays): nothing else changes, so the switch back gives the
    same bytes."""
    doc = load_json(data, what)
    try:
        [sharding] = doc["codecs"]
        inner = sharding["configuration"]["codecs"]
    except (KeyError, TypeError, ValueError) as exc:
        raise CorruptSlide(f"{what}: not a sharded array of ours") from exc
    current = codec_of_array(doc, what)
    source, target = _codec_name(current), _codec_name(to)
    for codec in inner:
        if codec.get("name") == source:
            codec["name"] = target
    return dump_json(doc)


def recode_root_metadata(data: bytes, paths: Iterable[str], to: CodecId, what: str) -> bytes:
    """The root zarr.json with the `wsistore` codec of the levels at `paths` set to `to`
    (JPEG or JPEG XL: the tier of each level); nothing else changes."""
    doc = load_json(data, what)
    SlideAttributes.from_root_metadata(data, what)  # refuses what is not ours
    wanted = set(paths)
    for level in doc["attributes"][ATTRIBUTES]["levels"]:
        if level["path"] in wanted:
            _codec_name(level["codec"])
            level["codec"] = to
    return dump_json(doc)


# -- shard index ----------------------------------------------------------------------------------
EMPTY_CHUNK = 2**64 - 1
"""Offset and length of a chunk the shard does not hold (the Zarr sharding codec's marker)."""
_INDEX_DTYPE = np.dtype("<u8")


def index_nbytes(chunks: int) -> int:
    """Bytes of the index of a shard of `chunks` chunks: (offset, length) uint64 + CRC32C."""
    return 16 * chunks + 4


def index_range(object_size: int, chunks: int, key: str) -> tuple[int, int]:
    """[start, end) of the index in the shard object: it ends the object."""
    start = object_size - index_nbytes(chunks)
    if start < 0:
        raise CorruptSlide(f"{key} is too short ({object_size} bytes) for a {chunks}-chunk index")
    return start, object_size


def empty_index(chunks: int) -> np.ndarray:
    """(chunks, 2) offsets and lengths, every chunk absent."""
    return np.full((chunks, 2), EMPTY_CHUNK, dtype=_INDEX_DTYPE)


def encode_index(index: np.ndarray) -> bytes:
    """The stored index: little-endian uint64 (offset, length) pairs, then their CRC32C."""
    raw = np.ascontiguousarray(index, dtype=_INDEX_DTYPE).tobytes()
    return raw + struct.pack("<I", google_crc32c.value(raw))


def decode_index(raw: bytes, chunks: int, key: str) -> np.ndarray:
    """The stored index -> read-only (chunks, 2) array; CorruptSlide when the CRC disagrees."""
    if len(raw) != index_nbytes(chunks):
        raise CorruptSlide(f"shard index of {key}: {len(raw)} bytes, expected {chunks} entries")
    (crc,) = struct.unpack("<I", raw[-4:])
    if google_crc32c.value(raw[:-4]) != crc:
        raise CorruptSlide(f"shard index of {key} is corrupt (CRC32C mismatch)")
    return np.frombuffer(raw[:-4], _INDEX_DTYPE).reshape(chunks, 2)


def stored_chunks(index: np.ndarray) -> np.ndarray:
    """Row-major numbers of the chunks a shard holds (int64, ascending): the frames of its
    DICOM instance, in order (a TILED_SPARSE instance has no frame for an absent chunk)."""
    absent = (index[:, 0] == EMPTY_CHUNK) & (index[:, 1] == EMPTY_CHUNK)
    return np.flatnonzero(~absent)


def chunk_span(index: np.ndarray, chunk: int, data_end: int, key: str) -> tuple[int, int] | None:
    """[start, end) of chunk `chunk` (row-major), or None when the shard does not hold it."""
    offset, nbytes = index[chunk].tolist()
    if offset == EMPTY_CHUNK and nbytes == EMPTY_CHUNK:
        return None
    if offset + nbytes > data_end:
        raise CorruptSlide(f"shard index of {key} points past the chunk data")
    return offset, offset + nbytes


# -- the wsistore attributes ----------------------------------------------------------------------
Flavor: TypeAlias = Literal["VOLUME", "LABEL", "OVERVIEW", "THUMBNAIL"]
VOLUME: Flavor = "VOLUME"
ASSOCIATED_FLAVOR: Mapping[str, Flavor] = MappingProxyType(
    {"label": "LABEL", "macro": "OVERVIEW", "thumbnail": "THUMBNAIL"}
)
"""DICOM image flavor of each associated image we carry."""
_FLAVORS: tuple[Flavor, ...] = ("VOLUME", "LABEL", "OVERVIEW", "THUMBNAIL")


def instance_name(flavor: Flavor, level: int) -> str:
    """Per-slide name of an instance: `level-<k>`, `label`, `overview` or `thumbnail`."""
    return f"level-{level}" if flavor == VOLUME else flavor.lower()


@dataclass(frozen=True)
class LevelEntry:
    """One pyramid level as the attributes describe it (pixels of that level)."""

    path: str
    width: int
    height: int
    tile_width: int
    tile_height: int
    downsample: float
    """Level-0 pixels per pixel of this level."""
    codec: CodecId

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> LevelEntry:
        what = "level attributes"
        width, height, tile_width, tile_height = ints = [
            _field(doc, n, int, what) for n in ("width", "height", "tile_width", "tile_height")
        ]
        if min(ints) <= 0:
            raise CorruptSlide(f"{what}: sizes must be positive")
        downsample = float(_field(doc, "downsample", (int, float), what))
        if not downsample >= 1.0:
            raise CorruptSlide(f"{what}: downsample {downsample} is below 1")
        codec = doc.get("codec")
        if codec not in CODEC_IDS:
            raise CorruptSlide(f"{what}: unknown chunk codec {codec!r}")
        path = _field(doc, "path", str, what)
        return cls(path, width, height, tile_width, tile_height, downsample, cast(CodecId, codec))


@dataclass(frozen=True)
class AssociatedEntry:
    """An associated image (label, macro, thumbnail): its array path and size in pixels."""

    name: str
    path: str
    width: int
    height: int

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> AssociatedEntry:
        what = "associated image attributes"
        width, height = _field(doc, "width", int, what), _field(doc, "height", int, what)
        if min(width, height) <= 0:
            raise CorruptSlide(f"{what}: sizes must be positive")
        return cls(_field(doc, "name", str, what), _field(doc, "path", str, what), width, height)


@dataclass(frozen=True)
class DicomInstanceEntry:
    """One DICOM instance: a stored object that is also a Part 10 file."""

    key: str
    """The object's key relative to the slide (`slide.zarr/<k>/c/0/0/0`)."""
    sop_instance_uid: str
    flavor: Flavor
    level: int | None
    """The pyramid level of a VOLUME instance; None for label, overview and thumbnail."""

    @property
    def associated(self) -> str | None:
        """The associated image this instance holds, if it is not a level."""
        return next((n for n, f in ASSOCIATED_FLAVOR.items() if f == self.flavor), None)

    @property
    def name(self) -> str:
        return instance_name(self.flavor, self.level or 0)

    def to_json(self, slide_id: str | None = None) -> dict[str, Any]:
        """With `slide_id`, the key relative to the store root (the attributes' form)."""
        doc = asdict(self)
        if slide_id:
            doc["key"] = f"{slide_id}/{self.key}"
        return doc

    @classmethod
    def from_json(cls, doc: Mapping[str, Any], slide_id: str) -> DicomInstanceEntry:
        what = "DICOM instance entry"
        key = _field(doc, "key", str, what)
        if key.startswith(f"{slide_id}/"):
            key = key[len(slide_id) + 1 :]
        flavor = doc.get("flavor")
        if flavor not in _FLAVORS:
            raise CorruptSlide(f"{what}: unknown flavor {flavor!r}")
        level = doc.get("level")
        if (flavor == VOLUME) != isinstance(level, int) or isinstance(level, bool):
            raise CorruptSlide(f"{what}: level {level!r} does not fit flavor {flavor}")
        return cls(key, _field(doc, "sop_instance_uid", str, what), flavor, level)


@dataclass(frozen=True)
class DicomEntry:
    """The DICOM view of a slide: one series of one study."""

    study_instance_uid: str
    series_instance_uid: str
    instances: tuple[DicomInstanceEntry, ...]

    def to_json(self, slide_id: str) -> dict[str, Any]:
        return {
            "study_instance_uid": self.study_instance_uid,
            "series_instance_uid": self.series_instance_uid,
            "instances": [i.to_json(slide_id) for i in self.instances],
        }

    @classmethod
    def from_json(cls, doc: Mapping[str, Any], slide_id: str) -> DicomEntry:
        what = "DICOM attributes"
        instances = _field(doc, "instances", list, what)
        return cls(
            _field(doc, "study_instance_uid", str, what),
            _field(doc, "series_instance_uid", str, what),
            tuple(DicomInstanceEntry.from_json(i, slide_id) for i in instances),
        )


@dataclass(frozen=True)
class SlideAttributes:
    """The `wsistore` attributes of the root group: what the slide is, level by level."""

    slide_id: str
    source_backend: str
    levels: tuple[LevelEntry, ...]
    associated_images: tuple[AssociatedEntry, ...] = ()
    vendor: str | None = None
    mpp_x: float | None = None
    """Microns per level-0 pixel."""
    mpp_y: float | None = None
    objective_power: float | None = None
    vendor_properties: Mapping[str, str] = field(default_factory=dict)
    icc_profile: bytes | None = None
    dicom: DicomEntry | None = None
    format_version: int = FORMAT_VERSION
    fill: int = FILL_VALUE
    """Grey level v of the fill colour (v, v, v): what every level's missing tiles hold."""
    background_delta_e76: float | None = None
    """The tolerance within which tiles were found blank and not stored (CIELab Delta-E 76 of
    every pixel from the fill); None when blank tiles were kept (`--keep-background`)."""

    def __post_init__(self) -> None:
        props = MappingProxyType(dict(self.vendor_properties))
        object.__setattr__(self, "vendor_properties", props)

    @property
    def properties(self) -> SlideProperties:
        return SlideProperties(
            vendor=self.vendor,
            mpp_x=self.mpp_x,
            mpp_y=self.mpp_y,
            objective_power=self.objective_power,
            vendor_properties=self.vendor_properties,
            icc_profile=self.icc_profile,
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "format_version": self.format_version,
            "slide_id": self.slide_id,
            "source_backend": self.source_backend,
            "vendor": self.vendor,
            "mpp_x": self.mpp_x,
            "mpp_y": self.mpp_y,
            "objective_power": self.objective_power,
            "levels": [lv.to_json() for lv in self.levels],
            "associated_images": [a.to_json() for a in self.associated_images],
            "vendor_properties": dict(self.vendor_properties),
            "icc_profile": base64.b64encode(self.icc_profile).decode()
            if self.icc_profile
            else None,
            "dicom": self.dicom.to_json(self.slide_id) if self.dicom else None,
            "fill": self.fill,
            "background_delta_e76": self.background_delta_e76,
        }

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> SlideAttributes:
        what = f"{ATTRIBUTES} attributes"
        version = _field(doc, "format_version", int, what)
        if version != FORMAT_VERSION:
            raise CorruptSlide(f"{what}: format_version {version} is not {FORMAT_VERSION}")
        slide_id = check_slide_id(_field(doc, "slide_id", str, what))
        levels = tuple(LevelEntry.from_json(lv) for lv in _field(doc, "levels", list, what))
        if not levels:
            raise CorruptSlide(f"{what}: no levels")
        props = _field(doc, "vendor_properties", dict, what)
        icc = _optional(doc, "icc_profile", str, what)
        try:
            icc_profile = base64.b64decode(icc, validate=True) if icc else None
        except ValueError as exc:
            raise CorruptSlide(f"{what}: icc_profile is not base64") from exc
        dicom = _optional(doc, "dicom", dict, what)
        return cls(
            slide_id=slide_id,
            source_backend=str(doc.get("source_backend") or ""),
            levels=levels,
            associated_images=tuple(
                AssociatedEntry.from_json(a) for a in _field(doc, "associated_images", list, what)
            ),
            vendor=_optional(doc, "vendor", str, what),
            mpp_x=_optional(doc, "mpp_x", (int, float), what),
            mpp_y=_optional(doc, "mpp_y", (int, float), what),
            objective_power=_optional(doc, "objective_power", (int, float), what),
            vendor_properties={str(k): str(v) for k, v in props.items()},
            icc_profile=icc_profile,
            dicom=DicomEntry.from_json(dicom, slide_id) if dicom is not None else None,
            **_background_fields(doc, what),
        )

    @classmethod
    def from_root_metadata(cls, data: bytes, what: str) -> SlideAttributes:
        """Our attributes from the bytes of the root group's zarr.json."""
        group = load_json(data, what).get("attributes")
        attrs = group.get(ATTRIBUTES) if isinstance(group, dict) else None
        if not isinstance(attrs, dict):
            raise CorruptSlide(f"{what} has no {ATTRIBUTES} attributes")
        return cls.from_json(attrs)


def _optional(doc: Mapping[str, Any], name: str, kind: type | tuple[type, ...], what: str) -> Any:
    return None if doc.get(name) is None else _field(doc, name, kind, what)


def _background_fields(doc: Mapping[str, Any], what: str) -> dict[str, Any]:
    """`fill` and `background_delta_e76` of the attributes (white and None when absent: slides
    published before blank glass was detected)."""
    fill = _optional(doc, "fill", int, what)
    if fill is not None and not 0 <= fill <= 255:
        raise CorruptSlide(f"{what}: fill {fill} is not 0..255")
    return {
        "fill": FILL_VALUE if fill is None else fill,
        "background_delta_e76": _optional(doc, "background_delta_e76", (int, float), what),
    }


# -- the manifest ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class StoredObject:
    """One object written to the store, as listed in the manifest."""

    key: str
    """Relative to the store root."""
    size: int
    crc32c: str
    """Hex digest (8 characters)."""


@dataclass(frozen=True)
class ObjectEntry:
    """Size (bytes) and CRC32C (hex) of one object of a published slide."""

    size: int
    crc32c: str


def crc32c_hex(data: bytes) -> str:
    return f"{google_crc32c.value(data):08x}"


class Crc32c:
    """The CRC32C of an object read or written in parts, in the manifest's form (`hex`): what
    `crc32c_hex` gives for the whole object, without ever holding it whole."""

    def __init__(self) -> None:
        self._value = 0

    def update(self, data: bytes) -> None:
        self._value = google_crc32c.extend(self._value, data)

    @property
    def hex(self) -> str:
        return f"{self._value:08x}"


MADE_HERE = ("decoded+encoded", "dct-half", "wavelet-half", "mean2x2")
"""How a conversion makes a level's tiles itself: 'decoded+encoded' (the source level's pixels
decoded and encoded again), 'dct-half' (the level above's JPEG tiles decoded at 1/2 scale in
the DCT domain), 'wavelet-half' (the level above's JPEG 2000 codestreams decoded at 1/2
resolution, without their finest wavelet level), 'mean2x2' (2x2 means of the level above's
pixels). Any other method names a copy of a source
level's compressed tiles: 'copied' (as stored), or how a backend cut them out of larger streams
('cut at restart markers', ...)."""


@dataclass(frozen=True)
class LevelOrigin:
    """Where one published level's tiles come from: what a conversion kept of the source."""

    level: int
    """The published level."""
    method: str
    """A copy method, or one of `MADE_HERE`."""
    source_level: int | None = None
    """The source level copied, or decoded for 'decoded+encoded'."""
    from_level: int | None = None
    """The published level this one is derived from ('dct-half', 'mean2x2')."""

    @property
    def copied(self) -> bool:
        return self.method not in MADE_HERE

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> LevelOrigin:
        what = "level origin"
        if not isinstance(doc, Mapping):
            raise CorruptSlide(f"{what} is not an object")
        level, method = _field(doc, "level", int, what), _field(doc, "method", str, what)
        source = _optional(doc, "source_level", int, what)
        parent = _optional(doc, "from_level", int, what)
        if level < 0 or not method or min(source or 0, parent or 0) < 0:
            raise CorruptSlide(f"{what}: level {level} method {method!r} is not well formed")
        return cls(level, method, source, parent)


def manifest_version(data: bytes) -> str:
    """The version of a published slide: the CRC32C of its manifest's bytes. It changes whenever
    the slide is published again with other bytes (the base of strong ETags)."""
    return crc32c_hex(data)


@dataclass(frozen=True)
class Manifest:
    """The commit record of a published slide: every object with its size and CRC32C."""

    slide_id: str
    width: int
    """Level-0 size in pixels."""
    height: int
    settings: Mapping[str, Any]
    """The conversion settings that decided the bytes (opaque here; compared on re-conversion)."""
    objects: Mapping[str, ObjectEntry]
    """Keys relative to the slide."""
    dicom: tuple[DicomInstanceEntry, ...] = ()
    stored_bytes: int = 0
    name: str | None = None
    """What people call the slide (`wsi.metadata.slide_name`, or under de-identification
    `neutral_name`); None in manifests written before names existed: shown as the slide id."""
    case: str | None = None
    """The case (accession number or study id) it belongs to, when known; never set on a
    de-identified slide."""
    source_bytes: int | None = None
    """Bytes of the source slide's files (companion files of multi-file slides included), the
    base of storage ratios (`wsi du`); None in manifests written before it was recorded."""
    archived: Mapping[str, ObjectEntry] = field(default_factory=dict)
    levels: tuple[LevelOrigin, ...] = ()
    """Where each published level's tiles come from (copied from which source level and how, or
    derived from which level and how); empty (and absent from the JSON) in manifests written
    before it was recorded."""
    """The archive tier (`wsi.published.archive`): size and CRC32C of each object as it was
    before JPEG XL recompression replaced it, which `wsi restore` must give back exactly. Empty
    (and absent from the JSON) for a slide in its JPEG form."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "settings", MappingProxyType(dict(self.settings)))
        object.__setattr__(self, "objects", MappingProxyType(dict(self.objects)))
        object.__setattr__(self, "archived", MappingProxyType(dict(self.archived)))

    @classmethod
    def build(
        cls,
        slide_id: str,
        base: Level,
        settings: Mapping[str, Any],
        objects: Iterable[StoredObject],
        dicom: Iterable[DicomInstanceEntry] = (),
        keys: SlideKeys | None = None,
        name: str | None = None,
        case: str | None = None,
        *,
        source_bytes: int | None = None,
        levels: Iterable[LevelOrigin] = (),
    ) -> Manifest:
        """The manifest of `objects`, written under `keys` (the slide's folder by default, or
        the staging folder a new version was built in: the listed keys are the same)."""
        keys = keys or SlideKeys(slide_id)
        listed = sorted(objects, key=lambda o: o.key)
        return cls(
            slide_id,
            base.width,
            base.height,
            settings,
            {keys.in_slide(o.key): ObjectEntry(o.size, o.crc32c) for o in listed},
            tuple(dicom),
            sum(o.size for o in listed),
            name,
            case,
            source_bytes=source_bytes,
            levels=tuple(levels),
        )

    def object(self, key_in_slide: str) -> ObjectEntry:
        """The entry of an object of this slide (CorruptSlide when the manifest lacks it)."""
        entry = self.objects.get(key_in_slide)
        if entry is None:
            raise CorruptSlide(f"the manifest of {self.slide_id} does not list {key_in_slide}")
        return entry

    def to_json(self) -> dict[str, Any]:
        return {
            "format": MANIFEST_FORMAT,
            "slide_id": self.slide_id,
            "zarr": ZARR_ROOT,
            "width": self.width,
            "height": self.height,
            "settings": dict(self.settings),
            "stored_bytes": self.stored_bytes,
            "objects": {k: asdict(o) for k, o in self.objects.items()},
            "dicom": [i.to_json() for i in self.dicom],
            **_naming_json(self.name, self.case),
            **({} if self.source_bytes is None else {"source_bytes": self.source_bytes}),
            **_archived_json(self.archived),
            **({"levels": [o.to_json() for o in self.levels]} if self.levels else {}),
        }

    def to_bytes(self) -> bytes:
        return dump_json(self.to_json())

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> Manifest:
        what = "manifest"
        if doc.get("format") != MANIFEST_FORMAT:
            raise CorruptSlide(f"{what}: format {doc.get('format')!r} is not {MANIFEST_FORMAT}")
        slide_id = check_slide_id(_field(doc, "slide_id", str, what))
        objects = _object_entries(_field(doc, "objects", dict, what), what)
        archived = _object_entries(_optional(doc, "archived", dict, what) or {}, what)
        return cls(
            slide_id,
            _field(doc, "width", int, what),
            _field(doc, "height", int, what),
            _field(doc, "settings", dict, what),
            objects,
            tuple(DicomInstanceEntry.from_json(i, slide_id) for i in doc.get("dicom") or []),
            _field(doc, "stored_bytes", int, what),
            _optional(doc, "name", str, what),
            _optional(doc, "case", str, what),
            source_bytes=_optional(doc, "source_bytes", int, what),
            archived=archived,
            levels=tuple(
                LevelOrigin.from_json(o) for o in _optional(doc, "levels", list, what) or []
            ),
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> Manifest:
        return cls.from_json(load_json(data, "manifest"))


def _naming_json(name: str | None, case: str | None) -> dict[str, str]:
    """The manifest's optional `name` and `case` keys: absent when unknown, so the manifest of a
    slide without them keeps the bytes it had before names existed."""
    return {k: v for k, v in (("name", name), ("case", case)) if v is not None}


def _object_entries(doc: Mapping[str, Any], what: str) -> dict[str, ObjectEntry]:
    """Key -> (size, CRC32C) entries of a manifest (its objects, or their pre-archive form)."""
    entries = {}
    for key, entry in doc.items():
        if not isinstance(entry, dict):
            raise CorruptSlide(f"{what}: entry of {key} is not an object")
        size, crc = _field(entry, "size", int, key), _field(entry, "crc32c", str, key)
        entries[key] = ObjectEntry(size, crc)
    return entries


def _archived_json(archived: Mapping[str, ObjectEntry]) -> dict[str, Any]:
    """The manifest's optional `archived` key: absent for a slide in its JPEG form, so restoring
    it gives back the manifest's bytes from before the archive."""
    return {"archived": {k: asdict(o) for k, o in sorted(archived.items())}} if archived else {}
