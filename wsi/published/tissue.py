"""Where the tissue is: a mask from a low-resolution level, and random patches inside it.

The rule, for stained sections on glass in brightfield (H&E above all): glass is bright and grey,
its red, green and blue nearly equal, while stain is coloured. A pixel of the mask is tissue when
its chroma, max(R, G, B) - min(R, G, B), is at least `TissueRule.min_chroma` (15 of 255). Glass
stays under about 10 (white balance and JPEG noise; 3-5 on the generated slides), faint eosin is
above 25, hematoxylin above 50. A fixed threshold rather than Otsu's: Otsu splits whatever it is
given in two, so on a slide that is nearly all glass (or all tissue) it puts the threshold inside
the glass noise. Grey or black matter (dust, black scanner padding) is not tissue by this rule;
coloured pen marks are, like any stain.

The mask is read from the least detailed level that is still at least `TissueRule.min_side`
pixels on its longer side (1024: one mask pixel is 32 level-0 pixels of a 40,000-pixel slide),
so computing it reads a few dozen tiles.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from wsi.errors import InvalidArgument
from wsi.published.patches import patch_size
from wsi.published.values import PublishedLevel

if TYPE_CHECKING:
    from wsi.published.slide import AsyncPublishedSlide
    from wsi.published.sync import PublishedSlide


@dataclass(frozen=True)
class TissueRule:
    """Which pixels are tissue, and at what resolution the mask is made."""

    min_chroma: int = 15
    """max(R, G, B) - min(R, G, B) from which a pixel is tissue (0-255)."""
    min_side: int = 1024
    """The mask level is the least detailed one at least this long (pixels, longer side)."""

    def __post_init__(self) -> None:
        if not 0 < self.min_chroma <= 255 or self.min_side < 1:
            raise InvalidArgument("min_chroma must be 1-255 and min_side >= 1")

    def mask_level(self, levels: tuple[PublishedLevel, ...]) -> PublishedLevel:
        """The least detailed level at least `min_side` long (level 0 when none is)."""
        chosen = levels[0]
        for level in levels:
            if max(level.width, level.height) >= self.min_side:
                chosen = level if level.downsample > chosen.downsample else chosen
        return chosen

    def is_tissue(self, rgb: np.ndarray) -> np.ndarray:
        """(h, w, 3) uint8 -> (h, w) bool."""
        chroma = rgb.max(axis=2).astype(np.int16) - rgb.min(axis=2)
        return np.asarray(chroma >= self.min_chroma)


@dataclass(frozen=True, eq=False)
class TissueMask:
    """A tissue mask of a slide: `mask[y, x]` covers `downsample` x `downsample` level-0
    pixels from (x * downsample, y * downsample)."""

    mask: np.ndarray
    """(height, width) bool."""
    level: int
    """The level it was computed from."""
    downsample: float
    """Level-0 pixels per mask pixel (the mask level's downsample)."""

    def _footprint(self, level: PublishedLevel, size: tuple[int, int]) -> tuple[float, int, int]:
        """Mask pixels per pixel of `level`, and a patch's width and height in mask pixels."""
        scale = level.downsample / self.downsample
        return scale, max(1, int(np.ceil(size[0] * scale))), max(1, int(np.ceil(size[1] * scale)))

    def fraction(
        self, level: PublishedLevel, coords: np.ndarray, size: int | tuple[int, int]
    ) -> np.ndarray:
        """The tissue fraction (0-1) of patches of `level` at `coords` ((n, 2) top-left corners
        in that level's pixels), by the mask; parts outside the slide count as no tissue."""
        scale, fw, fh = self._footprint(level, patch_size(size))
        points = np.asarray(coords, dtype=np.float64).reshape(-1, 2)
        x0 = np.floor(points[:, 0] * scale).astype(np.int64)
        y0 = np.floor(points[:, 1] * scale).astype(np.int64)
        h, w = self.mask.shape
        integral = self._integral()
        cx0, cy0 = np.clip(x0, 0, w), np.clip(y0, 0, h)
        cx1, cy1 = np.clip(x0 + fw, 0, w), np.clip(y0 + fh, 0, h)
        inside = integral[cy1, cx1] - integral[cy0, cx1] - integral[cy1, cx0] + integral[cy0, cx0]
        return np.asarray(inside / (fw * fh))

    def _integral(self) -> np.ndarray:
        integral = np.zeros((self.mask.shape[0] + 1, self.mask.shape[1] + 1), np.int64)
        integral[1:, 1:] = self.mask.cumsum(axis=0).cumsum(axis=1)
        return integral

    def sample(
        self,
        level: PublishedLevel,
        size: int | tuple[int, int],
        n: int,
        seed: int | None = None,
        min_tissue: float = 0.5,
    ) -> np.ndarray:
        """`n` random top-left corners ((n, 2) int64 (x, y) in pixels of `level`) of patches
        inside the level whose tissue fraction is at least `min_tissue`, uniform over such
        positions. The same `seed` gives the same corners. Distinct mask positions while there
        are at least `n` of them, then repeated ones (jittered inside their mask pixel, so the
        corners still differ). An empty array when no position qualifies."""
        if n < 0 or not 0 <= min_tissue <= 1:
            raise InvalidArgument("n must be >= 0 and min_tissue within 0-1")
        width, height = patch_size(size)
        scale, fw, fh = self._footprint(level, (width, height))
        integral = self._integral()
        fractions = (
            integral[fh:, fw:] - integral[:-fh, fw:] - integral[fh:, :-fw] + integral[:-fh, :-fw]
        ) / (fw * fh)
        # Anchors whose patch would overhang the level are not candidates.
        max_x, max_y = level.width - width, level.height - height
        rows = min(fractions.shape[0], int(np.floor(max_y * scale)) + 1) if max_y >= 0 else 0
        cols = min(fractions.shape[1], int(np.floor(max_x * scale)) + 1) if max_x >= 0 else 0
        if scale > 1:  # a level pixel spans several mask pixels: its corners are the positions
            return _coarse_corners(fractions, scale, max_x, max_y, n, seed, min_tissue)
        candidates = np.argwhere(fractions[:rows, :cols] >= min_tissue)
        if not len(candidates) or n == 0:
            return np.zeros((0, 2), np.int64)
        rng = np.random.default_rng(seed)
        chosen = rng.choice(len(candidates), n, replace=n > len(candidates))
        anchors = candidates[chosen][:, ::-1]  # (x, y) in mask pixels
        # A corner c whose window starts at its anchor a: floor(c * scale) == a, as `fraction`
        # reads it (c drawn among the level pixels of that mask pixel). Drawing c as
        # floor((a + jitter) / scale) could land one mask pixel before a, whose window then
        # held less tissue than asked.
        low = np.ceil(anchors / scale).astype(np.int64)
        high = np.ceil((anchors + 1) / scale).astype(np.int64) - 1
        corners = low + np.floor(rng.random((n, 2)) * (high - low + 1)).astype(np.int64)
        for _ in range(2):  # rounding of c * scale: step back onto the anchor
            start = np.floor(corners * scale).astype(np.int64)
            corners += (start < anchors).astype(np.int64) - (start > anchors).astype(np.int64)
        corners[:, 0] = np.clip(corners[:, 0], 0, max_x)
        corners[:, 1] = np.clip(corners[:, 1], 0, max_y)
        return corners


def _coarse_corners(
    fractions: np.ndarray,
    scale: float,
    max_x: int,
    max_y: int,
    n: int,
    seed: int | None,
    min_tissue: float,
) -> np.ndarray:
    """`TissueMask.sample` on a level coarser than the mask: every corner of the level that
    fits is judged by the window `fraction` reads for it (from mask pixel floor(c * scale)),
    and `n` drawn among those with enough tissue (repeated once they run out: a level pixel has
    nothing finer to jitter into)."""
    if max_x < 0 or max_y < 0 or n == 0:
        return np.zeros((0, 2), np.int64)
    xs = np.arange(max_x + 1)
    ys = np.arange(max_y + 1)
    ax, ay = np.floor(xs * scale).astype(np.int64), np.floor(ys * scale).astype(np.int64)
    keep_x, keep_y = ax < fractions.shape[1], ay < fractions.shape[0]
    xs, ys, ax, ay = xs[keep_x], ys[keep_y], ax[keep_x], ay[keep_y]
    good = np.argwhere(fractions[np.ix_(ay, ax)] >= min_tissue)  # (row, col) into ys, xs
    if not len(good):
        return np.zeros((0, 2), np.int64)
    rng = np.random.default_rng(seed)
    chosen = good[rng.choice(len(good), n, replace=n > len(good))]
    return np.stack([xs[chosen[:, 1]], ys[chosen[:, 0]]], axis=1).astype(np.int64)


def _mask_of(rule: TissueRule, level: PublishedLevel, rgb: np.ndarray) -> TissueMask:
    return TissueMask(rule.is_tissue(rgb), level.index, level.downsample)


def tissue_mask(slide: PublishedSlide, rule: TissueRule | None = None) -> TissueMask:
    """The tissue mask of a slide (see the module docstring for the rule)."""
    rule = rule or TissueRule()
    level = rule.mask_level(slide.levels)
    return _mask_of(rule, level, slide.region(level.index, 0, 0, level.width, level.height))


async def tissue_mask_async(
    slide: AsyncPublishedSlide, rule: TissueRule | None = None
) -> TissueMask:
    """`tissue_mask` for the async slide."""
    rule = rule or TissueRule()
    level = rule.mask_level(slide.levels)
    rgb = await slide.region(level.index, 0, 0, level.width, level.height)
    return _mask_of(rule, level, rgb)


def sample_tissue_patches(
    slide: PublishedSlide,
    level: int,
    size: int | tuple[int, int],
    n: int,
    seed: int | None = None,
    *,
    min_tissue: float = 0.5,
    mask: TissueMask | None = None,
) -> np.ndarray:
    """`n` random top-left corners ((n, 2) (x, y) in pixels of `level`, ready for `patches`) of
    `size` patches at least `min_tissue` tissue by the slide's tissue mask; reproducible with
    `seed`. Pass `mask` (from `tissue_mask`) to sample a slide many times without reading the
    mask level each time. See `TissueMask.sample`."""
    mask = mask or tissue_mask(slide)
    return mask.sample(slide.level(level), size, n, seed, min_tissue)
