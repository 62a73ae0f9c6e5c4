"""Write a synthetic Aperio SVS whose tiles are JPEG 2000 codestreams (what legacy archives hold).

    python sample_data/make_j2k.py OUT.svs [--width 20000 --height 20000 --tile 256
        --psnr 40 --ycbcr --seed 0]

The layout is the one Aperio's ImageScope/ScanScope software writes, which OpenSlide opens as
vendor `aperio`: a TIFF (BigTIFF past 4 GB) whose first directory is the base level, tiled, each
tile one bare J2K codestream (no JP2 boxes) under compression 33005 (R, G, B through the
irreversible colour transform and the 9/7 wavelet, as Kakadu writes it) or, with `--ycbcr`,
33003 (Y, Cb, Cr components, no codestream colour transform); an ImageDescription starting
"Aperio Image Library" with the size, the tile size, the compression and `AppMag`/`MPP`; then a
stripped JPEG thumbnail, then levels at 1/4 and 1/16 (Aperio's steps), tiled and coded like the
base.

Pixels come from `generate.build` (the tissue-like synthetic slide, lazy libvips), fetched one
tile row at a time; tiles are encoded with OpenJPEG (imagecodecs) on a thread pool and written
through tifffile as pre-encoded tiles. Memory holds one tile row plus the 1/4 level (75 MB for a
20,000 x 20,000 base).
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import imagecodecs
import numpy as np
import tifffile

if not __package__:  # run as a script: make `sample_data` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from sample_data.generate import build

APERIO_YCBCR = 33003
APERIO_RGB = 33005
MPP = 0.499
STEPS = (4, 16)
"""Downsamples of the levels below the base, as Aperio scanners write them."""
THUMBNAIL_WIDTH = 1024


def rgb_to_ycbcr(pixels: np.ndarray) -> np.ndarray:
    """RGB -> full-range (JFIF) YCbCr, rounded: the components of a 33003 tile."""
    rgb = pixels.astype(np.float32)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    y = 0.299 * r + 0.587 * g + 0.114 * b
    cb = 128 - 0.168736 * r - 0.331264 * g + 0.5 * b
    cr = 128 + 0.5 * r - 0.418688 * g - 0.081312 * b
    return np.clip(np.rint(np.stack((y, cb, cr), -1)), 0, 255).astype(np.uint8)


def encode_tile(pixels: np.ndarray, psnr: float, ycbcr: bool) -> bytes:
    """One tile as a bare J2K codestream: 9/7 wavelet, PSNR-targeted quality, the ICT for
    RGB (what Aperio's 33005 tiles hold), none for YCbCr components (33003)."""
    data = rgb_to_ycbcr(pixels) if ycbcr else np.ascontiguousarray(pixels)
    return bytes(
        imagecodecs.jpeg2k_encode(
            data,
            level=psnr,  # type: ignore[arg-type]  # stub says int; the encoder takes a float PSNR
            codecformat="J2K",
            reversible=False,
            mct=not ycbcr,
            numthreads=1,
        )
    )


def _pad(block: np.ndarray, height: int, width: int) -> np.ndarray:
    """`block` padded with white to height x width (edge tiles are stored whole)."""
    if block.shape[:2] == (height, width):
        return np.ascontiguousarray(block)
    out = np.full((height, width, 3), 255, np.uint8)
    out[: block.shape[0], : block.shape[1]] = block
    return out


def _mean(pixels: np.ndarray, k: int) -> np.ndarray:
    """k x k area mean (edges rounded down)."""
    h, w = pixels.shape[0] // k * k, pixels.shape[1] // k * k
    blocks = pixels[:h, :w].reshape(h // k, k, w // k, k, 3).astype(np.uint32)
    return ((blocks.sum((1, 3)) + k * k // 2) // (k * k)).astype(np.uint8)


def _tiles(
    rows: Iterator[np.ndarray], width: int, tile: int, psnr: float, ycbcr: bool, pool: cf.Executor
) -> Iterator[bytes]:
    """Encoded tiles, row-major, of a level given as tile rows of pixels."""
    for strip in rows:
        blocks = [_pad(strip[:, x : x + tile], tile, tile) for x in range(0, width, tile)]
        yield from pool.map(lambda b: encode_tile(b, psnr, ycbcr), blocks)


def _description(width: int, height: int, tile: int, level: tuple[int, int] | None) -> str:
    head = "Aperio Image Library v11.0.37\r\n"
    size = f"{width}x{height} [0,0 {width}x{height}] ({tile}x{tile}) J2K/KDU Q=70"
    if level is not None:
        size += f" -> {level[0]}x{level[1]}"
    return head + size + f"|AppMag = 20|MPP = {MPP}"


def write_svs(
    path: Path,
    width: int,
    height: int,
    tile: int = 256,
    psnr: float = 40.0,
    ycbcr: bool = False,
    seed: int = 0,
) -> Path:
    """Write the synthetic J2K SVS to `path` (see the module docstring)."""
    image = build(width, height, seed)
    compression = APERIO_YCBCR if ycbcr else APERIO_RGB
    photometric = "ycbcr" if ycbcr else "rgb"
    quarter: list[np.ndarray] = []

    def base_rows() -> Iterator[np.ndarray]:
        for y in range(0, height, tile):
            strip = image.crop(0, y, width, min(tile, height - y)).numpy()
            quarter.append(_mean(_pad(strip, tile, width), STEPS[0]))
            yield strip

    path.parent.mkdir(parents=True, exist_ok=True)
    bigtiff = width * height * 3 > 2**32 // 2  # J2K at ~0.3 B/px stays far below; be safe
    common = {"dtype": np.uint8, "tile": (tile, tile), "compression": compression, "metadata": None}
    threads = os.cpu_count() or 1
    with cf.ThreadPoolExecutor(threads) as pool, tifffile.TiffWriter(path, bigtiff=bigtiff) as tif:
        tif.write(
            _tiles(base_rows(), width, tile, psnr, ycbcr, pool),
            shape=(height, width, 3),
            photometric=photometric,
            description=_description(width, height, tile, None),
            resolution=(1e4 / MPP, 1e4 / MPP),
            resolutionunit="CENTIMETER",
            **common,  # type: ignore[arg-type]
        )
        level1 = np.concatenate(quarter)[: height // STEPS[0], : width // STEPS[0]]
        quarter.clear()
        step = max(1, level1.shape[1] // THUMBNAIL_WIDTH)
        thumbnail = _mean(level1, step) if step > 1 else level1
        tif.write(
            thumbnail,
            photometric="rgb",
            compression="jpeg",
            metadata=None,
            description=_description(width, height, tile, thumbnail.shape[1::-1]),
        )
        levels = [level1, _mean(level1, STEPS[1] // STEPS[0])]
        for pixels in levels:
            h, w = pixels.shape[:2]
            rows = (pixels[y : y + tile] for y in range(0, h, tile))
            tif.write(
                _tiles(rows, w, tile, psnr, ycbcr, pool),
                shape=(h, w, 3),
                photometric=photometric,
                description=_description(width, height, tile, (w, h)),
                **common,  # type: ignore[arg-type]
            )
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="output .svs path")
    parser.add_argument("--width", type=int, default=20000)
    parser.add_argument("--height", type=int, default=20000)
    parser.add_argument("--tile", type=int, default=256, help="tile size (pixels)")
    parser.add_argument("--psnr", type=float, default=40.0, help="target PSNR of each tile, dB")
    parser.add_argument("--ycbcr", action="store_true", help="33003 (YCbCr) instead of 33005")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.width < 64 or args.height < 64 or args.tile % 16 or args.tile < 16:
        parser.error("width and height must be >= 64 and the tile a multiple of 16")
    start = time.perf_counter()
    out = write_svs(args.out, args.width, args.height, args.tile, args.psnr, args.ycbcr, args.seed)
    size = out.stat().st_size
    elapsed = time.perf_counter() - start
    print(f"{out}: {args.width}x{args.height}, {size:,} bytes, {elapsed:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
