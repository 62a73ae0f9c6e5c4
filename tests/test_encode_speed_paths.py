"""The fast paths of a conversion give the output the slow ones gave.

Tiles we encode are written with optimal Huffman tables in one libjpeg call
(`jpeg.encode_optimized`) instead of an encode and an optimising transcode: the stream must be
byte for byte what libjpeg's own `optimize_coding` makes of the encoder's output (the same
quantised coefficients and tables), hence the same pixels in every decoder. The reference is
libjpeg's two-pass path of the C extension (`libjpeg_tables`), the pixels come from Pillow.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import openslide
import pytest
import tifffile
from PIL import Image

import wsi
from sample_data.generate import generate
from wsi.codecs import _jpeglib, jpeg, jpegtran
from wsi.errors import InvalidArgument
from wsi.model import pyramid_levels

from .conftest import sample
from .test_convert import shard_chunks

CMU = sample("CMU-1-Small-Region.svs")


def libjpeg_optimised(stream: bytes) -> bytes:
    """libjpeg's own optimize_coding (two passes) over the coefficients of `stream`."""
    out = _jpeglib.transcode(stream, True, True)[3]
    assert isinstance(out, bytes)
    return out


def pillow(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


@pytest.fixture(scope="module")
def tissue() -> np.ndarray:
    """Dense tissue edge to edge (the hardest case for the entropy coder)."""
    with openslide.OpenSlide(str(CMU)) as slide:
        return np.asarray(slide.read_region((0, 0), 0, (1024, 768)).convert("RGB"))


def cases(tissue: np.ndarray) -> list[np.ndarray]:
    rng = np.random.default_rng(14)
    return [
        tissue[:256, :256],
        tissue[256:512, 512:768],
        tissue[3:250, 5:200],  # a strided view, sides not multiples of the MCU
        tissue[:1, :1],
        tissue[:17, :1024],
        rng.integers(0, 256, (256, 256, 3), dtype=np.uint8),  # noise: long codes, big values
        np.full((256, 256, 3), 243, np.uint8),  # flat glass: DC only
    ]


@pytest.mark.parametrize("subsample_420", [True, False])
@pytest.mark.parametrize("quality", [1, 50, 90, 96, 100])
def test_optimised_encode_is_libjpegs_optimised_stream(
    tissue: np.ndarray, quality: int, subsample_420: bool
) -> None:
    for pixels in cases(tissue):
        plain = jpeg.encode(pixels, quality, subsample_420)
        ours = jpeg.encode_optimized(pixels, quality, subsample_420)
        assert ours == libjpeg_optimised(plain)
        assert np.array_equal(pillow(ours), pillow(plain))
        assert ours[2:4] == (b"\xff\xe0" if subsample_420 else b"\xff\xee")  # JFIF / Adobe


def test_optimised_encode_refuses_what_it_cannot_encode() -> None:
    for bad in (
        np.zeros((0, 16, 3), np.uint8),
        np.zeros((16, 16, 4), np.uint8),
        np.zeros((16, 16), np.uint8),
    ):
        with pytest.raises((InvalidArgument, ValueError)):
            jpeg.encode_optimized(bad, 90)
    with pytest.raises(InvalidArgument):
        _jpeglib.encode(np.zeros((16, 16, 3), np.uint8), 0, True)
    with pytest.raises(InvalidArgument):  # pixels not packed: the binding refuses, no copy
        _jpeglib.encode(np.zeros((16, 16, 6), np.uint8)[:, :, ::2], 90, True)


def convert(path: Path, root: Path, **pyramid: Any) -> Path:
    store = wsi.Store(wsi.StoreSettings(str(root)))
    settings = wsi.ConvertSettings(wsi.PyramidSettings(keep_background=True, **pyramid))
    result = wsi.convert_slide(path, store, settings)
    return root / result.slide_id / "slide.zarr"


@pytest.mark.parametrize("subsample_420", [True, False])
def test_derived_levels_are_the_transcoded_tiles_of_an_unoptimised_conversion(
    synthetic_jpeg_tiff: Path, tmp_path: Path, subsample_420: bool
) -> None:
    """Every tile of every derived level, through the whole builder (DCT-scaled halves, 2x2
    means, the cascade), is byte for byte the optimising transcode of the tile the same
    conversion stores without optimisation: what it stored before tiles were encoded
    optimised in one pass."""
    common = {"reuse_levels": False, "subsample_420": subsample_420}
    fast = convert(synthetic_jpeg_tiff, tmp_path / "fast", **common)
    plain = convert(synthetic_jpeg_tiff, tmp_path / "plain", optimize_huffman=False, **common)
    levels = sorted(int(p.name) for p in fast.iterdir() if p.name.isdigit())
    assert len(levels) >= 3
    for k in levels[1:]:
        ours = shard_chunks(fast / f"{k}/c/0/0/0")
        before = shard_chunks(plain / f"{k}/c/0/0/0")
        assert len(ours) == len(before) > 0
        assert ours == [jpegtran.transcode(tile).data for tile in before]


def test_base_only_generated_slide_has_one_level_and_converts_to_a_full_pyramid(
    tmp_path: Path,
) -> None:
    """The bench's base-only source (`sample_data/generate.py --base-only`)."""
    path = generate(tmp_path / "base.tif", 1100, 700, seed=3, base_only=True)
    with tifffile.TiffFile(path) as tif:
        assert len(tif.series[0].levels) == 1
        assert tif.series[0].levels[0].shape == (700, 1100, 3)
    out = convert(path, tmp_path / "store")
    made = sorted(int(p.name) for p in out.iterdir() if p.name.isdigit())
    assert made == list(range(len(pyramid_levels(1100, 700, 256, 256))))
    assert len(made) == 4


@pytest.mark.parametrize("shape", [(1, jpeg.MAX_SIDE + 1), (jpeg.MAX_SIDE + 1, 1), (0, 8)])
def test_a_size_jpeg_cannot_hold_is_a_bad_argument(shape: tuple[int, int]) -> None:
    """Not the CorruptSlide (HTTP 422: a damaged slide) libjpeg's refusal used to become."""
    with pytest.raises(InvalidArgument, match="pixels a side"):
        jpeg.encode(np.zeros((*shape, 3), np.uint8), 90)
    widest = jpeg.encode(np.zeros((1, jpeg.MAX_SIDE, 3), np.uint8), 90)
    assert jpeg.decoded_size(widest) == (1, jpeg.MAX_SIDE)
