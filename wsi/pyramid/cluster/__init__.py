"""One slide's pyramid built across the processes of a Dask cluster, byte for byte as
`PyramidBuilder` builds it in one: bands of base tile rows on the workers
(`wsi.pyramid.cluster.bands`), objects written in parts (`wsi.pyramid.cluster.parts`), joined by
the coordinator (`wsi.pyramid.cluster.coordinator`). `distributed` is imported only when a
cluster is used."""

from wsi.pyramid.cluster.bands import BandResult
from wsi.pyramid.cluster.coordinator import (
    ClusterOptions,
    ClusterWriter,
    build_on_cluster,
    check_address,
    cluster_address,
)

__all__ = [
    "BandResult",
    "ClusterOptions",
    "ClusterWriter",
    "build_on_cluster",
    "check_address",
    "cluster_address",
]
