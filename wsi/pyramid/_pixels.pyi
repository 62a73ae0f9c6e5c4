"""Types of the C extension `wsi.pyramid._pixels` (see _pixels.c, tiles.mean2x2 and
background.Background.accepts_pixels)."""

import numpy as np

def mean2x2_into(src: np.ndarray, dst: np.ndarray, /) -> None: ...
def within(pixels: np.ndarray, blues: np.ndarray, /) -> bool: ...
