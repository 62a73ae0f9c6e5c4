"""A render (a region scaled and encoded: IIIF, DeepZoom levels below the stored ones, DICOMweb
rendered) holds its render slot until its answer is made, so the memory of renders is bounded by
the slots, whatever the number of clients."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import wsi
from server.catalog import Catalog
from server.render import region
from wsi.published.store import PublishedStore

from .conftest import sample

WAIT = 60.0
"""A bound on waits that end as soon as what they wait for happens (never a timing guess)."""


class Reads:
    """A published slide whose region reads are counted (the slide itself does the reading)."""

    def __init__(self, slide: Any) -> None:
        self.slide = slide
        self.count = 0

    def best_level(self, downsample: float) -> Any:
        return self.slide.best_level(downsample)

    async def region(self, *args: int) -> np.ndarray:
        self.count += 1
        return await self.slide.region(*args)


@pytest.fixture(scope="module")
def published(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    root = tmp_path_factory.mktemp("renders")
    src = sample("CMU-1-Small-Region.svs")
    return root, wsi.convert_slide(src, wsi.Store(wsi.StoreSettings(str(root)))).slide_id


def test_the_answer_is_made_inside_the_render_slot(published: tuple[Path, str]) -> None:
    """With one slot, a second render does not read its pixels while the first one's answer is
    still being made (the first holds the slot), and both answers are made in full after.
    Before, `region` gave the pixels back and released the slot: every client's render could
    read and keep its pixels while waiting for the pool to encode them."""
    root, sid = published

    async def main() -> None:
        async with PublishedStore(str(root)) as store:
            catalog = Catalog(store, render_slots=1)
            slide = Reads(await store.slide(sid))
            making, go_on = threading.Event(), threading.Event()

            def first_answer(pixels: np.ndarray) -> tuple[int, ...]:
                making.set()
                assert go_on.wait(WAIT)
                return pixels.shape

            def second_answer(pixels: np.ndarray) -> tuple[int, ...]:
                return pixels.shape

            whole = (0, 0, slide.slide.width, slide.slide.height)
            first = asyncio.ensure_future(
                region(catalog, slide, *whole, 400, 300, 10**6, first_answer)  # type: ignore[arg-type]
            )
            second = asyncio.ensure_future(
                region(catalog, slide, *whole, 200, 150, 10**6, second_answer)  # type: ignore[arg-type]
            )
            loop = asyncio.get_running_loop()
            assert await loop.run_in_executor(None, making.wait, WAIT)
            # The first answer is being made on the pool; the loop is free to run the second
            # render as far as it may go, and it may not read before the slot is free.
            for _ in range(100):
                await asyncio.sleep(0)
            assert catalog.renders.locked()
            assert slide.count == 1 and not second.done()
            go_on.set()
            assert await first == (300, 400, 3)
            assert await second == (150, 200, 3)
            assert slide.count == 2

    asyncio.run(main())
