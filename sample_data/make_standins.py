"""Write small stand-ins for the sample slides whose licence does not let this repository carry
them (see README.md). Each keeps the one property the tests rely on, not the original pixels.

    python -m sample_data.make_standins OUT_DIR [NAME ...]

* `aperio-jp2k.svs` stands in for the TCGA slide `tcga-cr-7395-01a-01-ts1.svs`: an Aperio SVS
  whose tiles are JPEG 2000 codestreams (TIFF compression 33005, APERIO_JP2000_RGB, lossy like
  the scanner's), two tiled levels (1600x1100 and 800x550, 256x256 tiles, edge tiles padded with
  white), a JPEG strip thumbnail between them (Aperio's page order) and no MPP. OpenSlide opens it
  as vendor `aperio` and decodes the tiles with its own OpenJPEG, so its pixels stay an
  independent reference for ours (tifffile + imagecodecs).
* `plain-strip.tif` stands in for `kidney-48-5.tif`: one uncompressed RGB page in a single
  strip, not tiled. No whole-slide reader accepts it.
* `vectra.qptiff` stands in for pathml's `small_vectra.qptiff`: an Akoya (PerkinElmer) Vectra
  QPTIFF, three 8-bit fluorescence channels as LZW strip pages and an RGB thumbnail, each page
  described by `PerkinElmer-QPI` XML. Multiplex fluorescence that OpenSlide does not read.
* `dicom-no-image-type.dcm` stands in for pathml's `small_dicom.dcm`: highdicom's
  `sm_image.dcm` without ImageType (0008,0008), so the object's flavour (VOLUME, LABEL, ...)
  cannot be told and OpenSlide refuses it ("Couldn't get image flavor").

Every stand-in is deterministic and written in well under a second.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

if not __package__:  # run as a script: make `sample_data` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from sample_data.make_mirax import tissue_image

HERE = Path(__file__).resolve().parent
APERIO_JP2000_RGB = 33005
APERIO_SOFTWARE = "Aperio Image Library v11.0.37"
QPI_SOFTWARE = "PerkinElmer-QPI"  # tifffile's `is_qpi` test, and the vendor's own tag
QPI_CHANNELS = (("DAPI", "0,0,255"), ("FITC", "0,255,0"), ("Cy5", "255,0,0"))


def _j2k_tiles(image: np.ndarray, tile: int, psnr: int) -> Iterator[bytes]:
    """Row-major JPEG 2000 codestreams (J2K, not JP2: Aperio stores bare codestreams)."""
    import imagecodecs

    height, width = image.shape[:2]
    for y in range(0, height, tile):
        for x in range(0, width, tile):
            block = np.full((tile, tile, 3), 255, np.uint8)
            part = image[y : y + tile, x : x + tile]
            block[: part.shape[0], : part.shape[1]] = part
            yield bytes(imagecodecs.jpeg2k_encode(block, level=psnr, codecformat="J2K"))


def _half(image: np.ndarray) -> np.ndarray:
    """2x2 mean, sizes rounded down (Aperio's 4443 -> 2221)."""
    h, w = image.shape[0] // 2, image.shape[1] // 2
    blocks = image[: 2 * h, : 2 * w].reshape(h, 2, w, 2, -1).astype(np.float64)
    return np.rint(blocks.mean(axis=(1, 3))).astype(np.uint8)


def write_aperio_jp2k(path: Path, image: np.ndarray, tile: int = 256, psnr: int = 40) -> Path:
    """An Aperio SVS with JPEG 2000 tiles: `image` (RGB) as level 0, its half as level 1.

    `psnr` (dB) is the encoder's quality target: lossy, as scanners write, so the test compares
    two decoders of the irreversible wavelet, not a copy of the input.
    """
    import tifffile

    height, width = image.shape[:2]
    half = _half(image)
    thumb = image[::4, ::4]
    thumb_size = f"{thumb.shape[1]}x{thumb.shape[0]}"
    head = f"{APERIO_SOFTWARE}\r\n{width}x{height} ({tile}x{tile})"

    def level(tw: tifffile.TiffWriter, pixels: np.ndarray, description: str) -> None:
        # metadata=None, software=False: no tags of tifffile's own, whose second
        # ImageDescription would hide the Aperio one from OpenSlide's vendor detection.
        tw.write(
            _j2k_tiles(pixels, tile, psnr),
            shape=pixels.shape,
            dtype=np.uint8,
            photometric="rgb",
            tile=(tile, tile),
            compression=APERIO_JP2000_RGB,
            description=description,
            metadata=None,
            software=False,
        )

    with tifffile.TiffWriter(path) as tw:  # Aperio's page order: base, thumbnail, other levels
        level(tw, image, f"{head} J2K/KDU Q=70")
        tw.write(
            thumb,
            photometric="rgb",
            compression="jpeg",
            rowsperstrip=16,
            description=f"{APERIO_SOFTWARE}\n{width}x{height} -> {thumb_size} - ",
            metadata=None,
            software=False,
        )
        level(tw, half, f"{head} -> {half.shape[1]}x{half.shape[0]} J2K/KDU Q=70")
    return path


def write_plain_strip_tiff(path: Path, image: np.ndarray) -> Path:
    """One uncompressed RGB page in a single strip, no description: a plain image, not a slide."""
    import tifffile

    tifffile.imwrite(
        path, image, photometric="rgb", rowsperstrip=image.shape[0], metadata=None, software=False
    )
    return path


def _qpi_description(image_type: str, name: str = "", color: str = "") -> str:
    lines = [
        '<?xml version="1.0" encoding="utf-8"?>',
        "<PerkinElmer-QPI-ImageDescription>",
        "  <DescriptionVersion>2</DescriptionVersion>",
        "  <AcquisitionSoftware>VectraPolaris 1.0</AcquisitionSoftware>",
        f"  <ImageType>{image_type}</ImageType>",
    ]
    if name:
        lines += [f"  <Name>{name}</Name>", f"  <Color>{color}</Color>"]
    lines.append("</PerkinElmer-QPI-ImageDescription>")
    return "\n".join(lines)


def write_qptiff(path: Path, image: np.ndarray) -> Path:
    """A Vectra QPTIFF: each band of `image` as one fluorescence channel, then a thumbnail."""
    import tifffile

    with tifffile.TiffWriter(path) as tw:
        for band, (name, color) in enumerate(QPI_CHANNELS):
            tw.write(
                np.ascontiguousarray(255 - image[..., band]),  # fluorescence: bright on dark
                photometric="minisblack",
                compression="lzw",
                rowsperstrip=16,
                description=_qpi_description("FullResolution", name, color),
                metadata=None,
                software=QPI_SOFTWARE,
            )
        tw.write(
            image[::4, ::4],
            photometric="rgb",
            compression="lzw",
            rowsperstrip=16,
            description=_qpi_description("Thumbnail"),
            metadata=None,
            software=QPI_SOFTWARE,
        )
    return path


def write_dicom_without_image_type(
    path: Path, source: Path = HERE / "highdicom" / "sm_image.dcm"
) -> Path:
    """`source` (a VL Whole Slide Microscopy object) with its ImageType removed."""
    import pydicom

    ds = pydicom.dcmread(source)
    del ds.ImageType
    ds.save_as(path)
    return path


STANDINS: dict[str, Callable[[Path], Path]] = {
    "aperio-jp2k.svs": lambda p: write_aperio_jp2k(p, tissue_image(1600, 1100, seed=7)),
    "plain-strip.tif": lambda p: write_plain_strip_tiff(p, tissue_image(493, 301, seed=8)),
    "vectra.qptiff": lambda p: write_qptiff(p, tissue_image(640, 480, seed=9)),
    "dicom-no-image-type.dcm": write_dicom_without_image_type,
}
"""Stand-in file name -> writer (given the path to write)."""


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", type=Path, help="folder to write the stand-ins to")
    parser.add_argument("names", nargs="*", help=f"default: all of {', '.join(STANDINS)}")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.names) - set(STANDINS))
    if unknown:
        parser.error(f"unknown stand-in: {', '.join(unknown)}")
    args.out.mkdir(parents=True, exist_ok=True)
    for name in args.names or STANDINS:
        print(STANDINS[name](args.out / name))


if __name__ == "__main__":
    main()
