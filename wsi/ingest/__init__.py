"""Ingest: watch folders scanned for complete slides, a durable job queue, workers that run
conversions in supervised processes, and `s3://` sources staged into a spool.

`settings` holds the one `IngestSettings` every entry point reads (`wsi serve`, `wsi watch`,
`wsi worker`); `protocol` is the contract between a worker and the `wsi convert` process it runs.
"""
