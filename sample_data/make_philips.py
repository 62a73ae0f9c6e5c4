"""Write a small, genuine Philips TIFF slide (OpenSlide vendor `philips`) from an RGB array.

    python sample_data/make_philips.py OUT.tiff [--width 1500 --height 1100 --tile 256]

A Philips TIFF (what the IntelliSite scanners export) is a tiled JPEG TIFF whose first page's
`Software` starts with "Philips" and whose `ImageDescription` is a DPUfsImport XML document: the
slide's DICOM-like attributes, and in `PIM_DP_SCANNED_IMAGES` one `WSI` image whose
`PIIM_PIXEL_DATA_REPRESENTATION_SEQUENCE` gives every level's pixel spacing (in millimetres,
"row" "column"), plus the label and macro as base64 JPEGs. The levels are the tiled pages, each a
2x reduction of the one before (`NewSubfileType` = reduced image), all padded with white to whole
tiles, as the scanner writes them. OpenSlide takes level 0's size from its page (so it is whole
tiles) and each lower level's as level 0's divided by its downsample, smaller than its page.

Tiles that are blank glass (every pixel white) are not stored (TileByteCounts 0), as the scanner
leaves tiles outside the scanned area: OpenSlide shows them transparent. The tiles are baseline
JPEGs (YCbCr 4:2:0) with their own tables.
"""

from __future__ import annotations

import argparse
import base64
import io
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image

if not __package__:  # run as a script: make `sample_data` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from sample_data.make_mirax import add_image_arguments, image_from

SOFTWARE = "Philips DP v1.0"
WHITE = 255


def jpeg(pixels: np.ndarray, quality: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buf, "JPEG", quality=quality, subsampling=2)
    return buf.getvalue()


def _attribute(name: str, value: str, kind: str = "IString") -> str:
    return f'<Attribute Name="{name}" PMSVR="{kind}">{value}</Attribute>'


def _spacing(mm: float) -> str:
    return f"&quot;{mm:.9g}&quot; &quot;{mm:.9g}&quot;"


def description(levels: int, mpp: float, magnification: int, label: bytes, macro: bytes) -> str:
    """The DPUfsImport XML: one WSI image with `levels` pixel representations (2^k x `mpp`
    micrometres a pixel), a label and a macro image."""
    representations = "".join(
        '<DataObject ObjectType="PixelDataRepresentation">'
        + _attribute("DICOM_PIXEL_SPACING", _spacing(mpp * 2**k / 1000), "IDoubleArray")
        + _attribute("PIIM_PIXEL_DATA_REPRESENTATION_NUMBER", str(k), "IUInt16")
        + "</DataObject>"
        for k in range(levels)
    )
    wsi = (
        '<DataObject ObjectType="DPScannedImage">'
        + _attribute("PIM_DP_IMAGE_TYPE", "WSI")
        + _attribute("DICOM_PIXEL_SPACING", _spacing(mpp / 1000), "IDoubleArray")
        + _attribute(
            "DICOM_DERIVATION_DESCRIPTION",
            f"tiff-useBigTIFF=0-levels={magnification},10-processing=synthetic",
        )
        + '<Attribute Name="PIIM_PIXEL_DATA_REPRESENTATION_SEQUENCE" PMSVR="IDataObjectArray">'
        + f"<Array>{representations}</Array></Attribute></DataObject>"
    )
    associated = "".join(
        '<DataObject ObjectType="DPScannedImage">'
        + _attribute("PIM_DP_IMAGE_TYPE", kind)
        + _attribute("PIM_DP_IMAGE_DATA", base64.b64encode(data).decode("ascii"), "IString")
        + "</DataObject>"
        for kind, data in (("LABELIMAGE", label), ("MACROIMAGE", macro))
    )
    return (
        '<?xml version="1.0" encoding="UTF-8" ?>\n<DataObject ObjectType="DPUfsImport">'
        + _attribute("DICOM_MANUFACTURER", "PHILIPS")
        + _attribute("DICOM_DEVICE_SERIAL_NUMBER", "SYNTHETIC-0001")
        + '<Attribute Name="PIM_DP_SCANNED_IMAGES" PMSVR="IDataObjectArray"><Array>'
        + wsi
        + associated
        + "</Array></Attribute></DataObject>"
    )


def halve(pixels: np.ndarray) -> np.ndarray:
    """2x2 area mean, rounded (odd edges dropped)."""
    h, w = pixels.shape[0] // 2 * 2, pixels.shape[1] // 2 * 2
    p = pixels[:h, :w].astype(np.uint16)
    total = p[0::2, 0::2] + p[0::2, 1::2] + p[1::2, 0::2] + p[1::2, 1::2]
    return ((total + 2) // 4).astype(np.uint8)


def jpeg_tiles(page: np.ndarray, tile: int, quality: int, sparse: bool = True) -> Iterator[bytes]:
    """The page's tiles in row-major order, edge tiles padded with white: JPEG, or (`sparse`)
    nothing for an all-white tile."""
    for y in range(0, page.shape[0], tile):
        for x in range(0, page.shape[1], tile):
            block = np.full((tile, tile, 3), WHITE, np.uint8)
            part = page[y : y + tile, x : x + tile]
            block[: part.shape[0], : part.shape[1]] = part
            yield b"" if sparse and (block == WHITE).all() else jpeg(block, quality)


def write_philips(
    path: Path,
    image: np.ndarray,
    tile: int = 256,
    levels: int = 3,
    quality: int = 90,
    *,
    mpp: float = 0.25,
    magnification: int = 40,
) -> Path:
    """Write `image` (H x W x 3 uint8) as the Philips TIFF `path`; level k is the 2^k area mean
    of level 0 (which is `image` padded with white to whole tiles). Returns `path`."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be H x W x 3 uint8, not {image.shape} {image.dtype}")
    if levels < 1 or tile < 16 or tile % 16:
        raise ValueError("levels must be >= 1 and tile a multiple of 16")
    label = jpeg(np.full((64, 96, 3), (230, 230, 200), np.uint8), 90)
    macro = jpeg(np.full((96, 256, 3), (200, 200, 230), np.uint8), 90)
    xml = description(levels, mpp, magnification, label, macro)
    current = image
    with tifffile.TiffWriter(path, bigtiff=False) as tif:
        for k in range(levels):
            if k:
                current = halve(current)
            ph, pw = -(-current.shape[0] // tile) * tile, -(-current.shape[1] // tile) * tile
            page = np.full((ph, pw, 3), WHITE, np.uint8)
            page[: current.shape[0], : current.shape[1]] = current
            tif.write(
                jpeg_tiles(page, tile, quality),
                shape=page.shape,
                dtype=np.uint8,
                tile=(tile, tile),
                compression="jpeg",
                photometric="ycbcr",
                subsampling=(2, 2),
                subfiletype=1 if k else 0,
                description=xml if k == 0 else None,
                software=SOFTWARE if k == 0 else None,
                metadata=None,
            )
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", type=Path, help="the .tiff to write")
    add_image_arguments(parser, 1500, 1100)
    args = parser.parse_args(argv)
    image = image_from(args)
    print(write_philips(args.out, image, args.tile, args.levels, args.quality))


if __name__ == "__main__":
    main()
