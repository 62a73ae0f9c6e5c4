"""The published layout of a slide: the one definition that the writers and the reader share.

A published slide is, relative to the store root:

    <slide-id>/manifest.json                   the commit point: every object, its size and CRC32C
    <slide-id>/slide.zarr/zarr.json            OME-Zarr 0.5 group; `wsistore` attributes
    <slide-id>/slide.zarr/<k>/zarr.json        level k: one array, one shard over the whole level
    <slide-id>/slide.zarr/<k>/c/0/0/0          the shard (and, with the DICOM view, an instance)
    <slide-id>/slide.zarr/associated/<name>/   label, macro, thumbnail: single-chunk arrays

Keys, the attribute schema, the chunk codecs, the shard index and the manifest are defined in
this package and nowhere else, so a change in the writer cannot silently break a reader.
Changing anything here changes the stored bytes: existing stores must stay readable.

One module per part, each importing only the ones before it, never this one:

    keys.py          slide ids and the object keys of a slide (`SlideKeys`)
    documents.py     the byte form of every stored JSON document and the checked reading of it
    chunks.py        chunk codec ids, their Zarr codec chains, one chunk encoded and decoded
    shard_index.py   the index that ends every shard
    attributes.py    the `wsistore` attributes of the root group (`SlideAttributes`)
    metadata.py      the arrays' and the root group's zarr.json; the archive tier's recoding
    manifest.py      the manifest, the commit point (`Manifest`), and CRC32C

Every public name is imported here: `from wsi.published import layout; layout.SlideKeys`.
"""

from __future__ import annotations

from wsi.published.layout.attributes import (
    ASSOCIATED_FLAVOR,
    ATTRIBUTES,
    FORMAT_VERSION,
    VOLUME,
    AssociatedEntry,
    DicomEntry,
    DicomInstanceEntry,
    Flavor,
    LevelEntry,
    SlideAttributes,
    instance_name,
)
from wsi.published.layout.chunks import (
    CODEC_IDS,
    FILL_VALUE,
    JPEG,
    JPEG2000,
    JPEG2000_SERVED_QUALITY,
    JPEGXL,
    ZSTD,
    ChunkFormat,
    CodecId,
    background_chunk,
    chunk_codecs,
    codec_of_array,
    decode_chunk,
    encode_chunk_zstd,
    served_codec,
)
from wsi.published.layout.documents import dump_json, load_json
from wsi.published.layout.keys import (
    ASSOCIATED_GROUP,
    MANIFEST,
    METADATA,
    SHARD,
    SLIDE_ID,
    STAGING,
    ZARR_ROOT,
    SlideKeys,
    associated_path,
    check_slide_id,
    level_path,
)
from wsi.published.layout.manifest import (
    MADE_HERE,
    MANIFEST_FORMAT,
    Crc32c,
    LevelOrigin,
    Manifest,
    ObjectEntry,
    StoredObject,
    crc32c_hex,
    manifest_version,
)
from wsi.published.layout.metadata import (
    ARCHIVE_CODECS,
    ASSOCIATED_GROUP_METADATA,
    associated_array_metadata,
    level_array_metadata,
    recode_array_metadata,
    recode_root_metadata,
    root_metadata,
)
from wsi.published.layout.shard_index import (
    EMPTY_CHUNK,
    chunk_span,
    decode_index,
    empty_index,
    encode_index,
    index_nbytes,
    index_range,
    stored_chunks,
)

__all__ = [
    "ARCHIVE_CODECS",
    "ASSOCIATED_FLAVOR",
    "ASSOCIATED_GROUP",
    "ASSOCIATED_GROUP_METADATA",
    "ATTRIBUTES",
    "CODEC_IDS",
    "EMPTY_CHUNK",
    "FILL_VALUE",
    "FORMAT_VERSION",
    "JPEG",
    "JPEG2000",
    "JPEG2000_SERVED_QUALITY",
    "JPEGXL",
    "MADE_HERE",
    "MANIFEST",
    "MANIFEST_FORMAT",
    "METADATA",
    "SHARD",
    "SLIDE_ID",
    "STAGING",
    "VOLUME",
    "ZARR_ROOT",
    "ZSTD",
    "AssociatedEntry",
    "ChunkFormat",
    "CodecId",
    "Crc32c",
    "DicomEntry",
    "DicomInstanceEntry",
    "Flavor",
    "LevelEntry",
    "LevelOrigin",
    "Manifest",
    "ObjectEntry",
    "SlideAttributes",
    "SlideKeys",
    "StoredObject",
    "associated_array_metadata",
    "associated_path",
    "background_chunk",
    "check_slide_id",
    "chunk_codecs",
    "chunk_span",
    "codec_of_array",
    "crc32c_hex",
    "decode_chunk",
    "decode_index",
    "dump_json",
    "empty_index",
    "encode_chunk_zstd",
    "encode_index",
    "index_nbytes",
    "index_range",
    "instance_name",
    "level_array_metadata",
    "level_path",
    "load_json",
    "manifest_version",
    "recode_array_metadata",
    "recode_root_metadata",
    "root_metadata",
    "served_codec",
    "stored_chunks",
]
