"""Ingest: watch folders scanned for complete slides, a durable job queue, workers that run
conversions in supervised processes, and `s3://` sources staged into a spool."""
