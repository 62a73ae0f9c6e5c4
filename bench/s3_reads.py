"""The read measurements of `bench/s3.py`, s3fs (before) against obstore (now) on the same
SeaweedFS and the same slide: tile-sized range reads one at a time (async and blocking) and 64 at
once, every level's shard index, and a source slide's content id (66 sampled ranges); and their
part of the report. Also where the slide's stored tiles are (`tile_spans`), which the cold tiles
read too.
"""

from __future__ import annotations

import asyncio
import random
import statistics
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from wsi.store.objects import Store, StoreSettings

if TYPE_CHECKING:
    from tests.s3server import SeaweedFS

RangeRead = Callable[[int, int], Awaitable[Any]]
"""An async read of bytes [start, end) of the level-0 shard, by one client."""
BlockingRead = Callable[[str, int, int], Any]
"""A blocking read of bytes [start, end) of an object (`Store.get_range`)."""


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def summary_ms(values: Sequence[float]) -> dict[str, float]:
    """p50, p90 and p99 of `values` (seconds), in milliseconds."""
    return {f"p{q}_ms": percentile(values, q) * 1000 for q in (50, 90, 99)}


def tile_spans(store: Store, slide_id: str) -> tuple[str, dict[int, tuple[int, int]], list[Any]]:
    """The level-0 shard's key, its stored tiles' [start, end) spans by chunk number (blank
    glass is not stored, nor read), and every level's (key, index range)."""
    from wsi.published import layout
    from wsi.published.layout import SlideAttributes, SlideKeys

    keys = SlideKeys(slide_id)
    manifest = store.manifest(slide_id)
    attrs = SlideAttributes.from_root_metadata(store.get(keys.root_metadata), "root")
    indexes = []
    spans: dict[int, tuple[int, int]] = {}
    for number, entry in enumerate(attrs.levels):
        key = keys.shard(entry.path)
        size = manifest.object(keys.in_slide(key)).size
        tiles = -(-entry.width // entry.tile_width) * -(-entry.height // entry.tile_height)
        start, end = layout.index_range(size, tiles, key)
        indexes.append((key, start, end))
        if number == 0:
            index = layout.decode_index(store.get_range(key, start, end), tiles, key)
            spans = {
                chunk: (int(o), int(o + n))
                for chunk, (o, n) in enumerate(index)
                if n != layout.EMPTY_CHUNK
            }
    return indexes[0][0], spans, indexes


async def _timed(make: Callable[[], Awaitable[Any]]) -> float:
    t0 = time.perf_counter()
    await make()
    return time.perf_counter() - t0


async def one_at_a_time(
    clients: dict[str, RangeRead],
    blocking: dict[str, BlockingRead],
    key: str,
    picks: Sequence[tuple[int, int]],
) -> dict[str, dict[str, float]]:
    """`range`: every pick read by each client in turn, the async clients first, then the
    blocking ones (each client's connection opened by a first read, not counted)."""
    for client in clients.values():  # connections open
        await client(*picks[0])
    one: dict[str, list[float]] = {c: [] for c in clients}
    for s, e in picks:
        for name, client in clients.items():
            one[name].append(
                await _timed(cast(Callable[[], Awaitable[Any]], lambda c=client, s=s, e=e: c(s, e)))
            )
    for name, fn in blocking.items():
        fn(key, *picks[0])
        one[name] = []
    for s, e in picks:
        for name, fn in blocking.items():
            t0 = time.perf_counter()
            fn(key, s, e)
            one[name].append(time.perf_counter() - t0)
    return {n: summary_ms(v) for n, v in one.items()}


async def sixty_four_at_once(
    clients: dict[str, RangeRead], picks: list[tuple[int, int]], requests: int
) -> dict[str, dict[str, float]]:
    """`range64`: the picks four times over, 64 in flight, twice per client: the faster pass's
    requests/s and MB/s."""
    conc: dict[str, list[float]] = {c: [] for c in clients}
    total = 4 * requests
    nbytes = sum(e - s for s, e in (picks * 4))
    for _ in range(2):
        for name, client in clients.items():
            gate = asyncio.Semaphore(64)

            async def limited(s: int, e: int, c: Any = client, g: asyncio.Semaphore = gate) -> None:
                async with g:
                    await c(s, e)

            t0 = time.perf_counter()
            await asyncio.gather(*(limited(s, e) for s, e in picks * 4))
            conc[name].append(time.perf_counter() - t0)
    return {
        n: {"req_per_s": total / min(v), "mb_per_s": nbytes / min(v) / 1e6} for n, v in conc.items()
    }


async def shard_indexes(
    fs: Any, fast: Any, store: Store, indexes: Sequence[Any], requests: int
) -> dict[str, dict[str, float]]:
    """`index`: every level's shard index (the tail of its shard), s3fs and obstore in turn."""
    idx: dict[str, list[float]] = {"s3fs async": [], "obstore async": []}
    for _ in range(max(1, requests // (2 * len(indexes)))):
        for k, s, e in indexes:
            p = store.path(k)
            idx["s3fs async"].append(
                await _timed(
                    cast(
                        Callable[[], Awaitable[Any]],
                        lambda p=p, s=s, e=e: fs._cat_file(p, start=s, end=e),
                    )
                )
            )
            idx["obstore async"].append(
                await _timed(
                    cast(
                        Callable[[], Awaitable[Any]],
                        lambda k=k, s=s, e=e: fast.get_range_async(k, s, e),
                    )
                )
            )
    return {n: summary_ms(v) for n, v in idx.items()}


def bench_reads(store: Store, slide_id: str, requests: int) -> dict[str, Any]:
    """`range`, `range64` and `index` on the slide's level-0 shard: `requests` tile spans drawn
    with a fixed seed, read by s3fs and by obstore, async and blocking."""
    import s3fs

    key, by_chunk, indexes = tile_spans(store, slide_id)
    spans = list(by_chunk.values())
    path = store.path(key)
    rng = random.Random(5)
    picks = [rng.choice(spans) for _ in range(requests)]
    fast = store.obstore_client()
    assert fast is not None
    slow = Store(store.settings)
    slow._obstore = None  # the s3fs path of the same store: before
    result: dict[str, Any] = {
        "tiles": len(spans),
        "mean_tile_bytes": statistics.mean(e - s for s, e in spans),
    }

    async def go() -> None:
        fs = s3fs.S3FileSystem(asynchronous=True, skip_instance_cache=True, **store.storage_options)
        session = await fs.set_session()
        try:
            clients: dict[str, RangeRead] = {
                "s3fs async": lambda s, e: fs._cat_file(path, start=s, end=e),
                "obstore async": lambda s, e: fast.get_range_async(key, s, e),
            }
            blocking: dict[str, BlockingRead] = {
                "s3fs blocking": slow.get_range,
                "obstore blocking": fast.get_range,
            }
            result["range"] = await one_at_a_time(clients, blocking, key, picks)
            result["range64"] = await sixty_four_at_once(clients, picks, requests)
            result["index"] = await shard_indexes(fs, fast, store, indexes, requests)
        finally:
            await session.close()

    asyncio.run(go())
    return result


def bench_sample(src: Path, server: SeaweedFS, rounds: int) -> dict[str, Any]:
    """`sample`: the content id of `src` uploaded into the bucket, its ranges read one by one by
    s3fs and in one `get_ranges` call by obstore, `rounds` times each: median milliseconds."""
    from wsi.ingest import staging
    from wsi.slide_id import content_slide_id, hash_slide_files
    from wsi.store.obstore_s3 import bucket_range_reader

    store = Store(StoreSettings(server.url("sources")))
    with src.open("rb") as f:
        store.put("slide.tif", f.read())
    url = server.url("sources/slide.tif")
    bucket, key = staging.parse_s3_url(url)
    fs = staging._filesystem(None)
    files = staging._remote_slide_files(fs, bucket, key, staging.StagingLimits())
    expected = content_slide_id(src)
    times: dict[str, list[float]] = {"s3fs (before)": [], "obstore get_ranges": []}
    for _ in range(rounds):
        t0 = time.perf_counter()
        assert hash_slide_files(fs, files) == expected
        times["s3fs (before)"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        assert hash_slide_files(fs, files, bucket_range_reader(None)) == expected
        times["obstore get_ranges"].append(time.perf_counter() - t0)
    store.delete("slide.tif")
    return {n: {"median_ms": statistics.median(v) * 1000} for n, v in times.items()}


def report_reads(results: dict[str, Any]) -> None:
    """The reads' table: range one at a time and 64 at once, shard indexes, content id."""
    reads = results["reads"]
    print(
        f"\n== reads ({reads['tiles']} stored level-0 tiles, mean {reads['mean_tile_bytes']:.0f} B)"
    )
    for name, s in reads["range"].items():
        print(
            f"  range one at a time  {name:17s} p50 {s['p50_ms']:6.2f}  p90 {s['p90_ms']:6.2f}"
            f"  p99 {s['p99_ms']:6.2f} ms"
        )
    for name, s in reads["range64"].items():
        print(
            f"  range 64 concurrent  {name:17s} {s['req_per_s']:8.0f} req/s  "
            f"{s['mb_per_s']:7.1f} MB/s"
        )
    for name, s in reads["index"].items():
        print(
            f"  shard index          {name:17s} p50 {s['p50_ms']:6.2f}  p99 {s['p99_ms']:6.2f} ms"
        )
    for name, s in results["sample"].items():
        print(f"  content id (66 ranges) {name:19s} {s['median_ms']:7.1f} ms")
