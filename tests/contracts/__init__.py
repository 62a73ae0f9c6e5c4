"""Reusable test suites, one per extension point, written once against the interface.

Each contract is a plain class (not collected by pytest on its own) whose test methods use only
the extension point's public interface and one or two fixtures that a subclass provides: how to
open a slide source, a store, a job queue or a pyramid writer. A test module per implementation
subclasses the contract as `Test<Implementation>` and defines those fixtures; a new backend gets
the whole suite by doing the same (zarr-python's `StoreTests` is the model).

- `sources.SourceContract`: `SlideSource` backends (`wsi.sources`).
- `stores.StoreContract`: `Store` over a local folder or S3 (`wsi.store`).
- `queues.JobQueueContract`: `JobQueue` backends (`wsi.ingest.queue`).
- `writers.WriterContract`: `PyramidWriter`s (`wsi.writers`).

`processes` runs job queue clients in other OS processes for the queue contract.
"""
