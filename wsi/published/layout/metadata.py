"""The zarr.json documents of a published slide: each array's (one shard over the level, the
chunk codec chain), the root group's (OME-Zarr 0.5 multiscales and our attributes), and the
archive tier's recoding of both between JPEG and JPEG XL."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from types import MappingProxyType
from typing import Any

from wsi.codecs import jxl
from wsi.errors import CorruptSlide, InvalidArgument
from wsi.model import JPEG_CODEC_NAME, Level
from wsi.published.layout.attributes import ATTRIBUTES, SlideAttributes
from wsi.published.layout.chunks import (
    FILL_VALUE,
    JPEG,
    JPEGXL,
    ChunkFormat,
    CodecId,
    chunk_codecs,
    codec_of_array,
)
from wsi.published.layout.documents import dump_json, load_json


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
