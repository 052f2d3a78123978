"""Storage mechanics below every layer that keeps an append-only log on disk (the time-series
write-ahead log, the edge's outbox): see :mod:`twin.storage.segments`."""
