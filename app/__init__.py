"""The rdserve service: HTTP API, worker, cache, metrics.  Calls into ``models`` for all math."""
