"""Offline runs on an existing engine, outside the HTTP service: ``ray_data`` embeds a FASTA file
on a Ray cluster (Ray Data ``map_batches`` over a GPU actor pool) into resumable shards."""
