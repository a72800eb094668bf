"""Stage 1, ingest: validate each input shard and publish a batch of shards together.

Reads: the input shards (through `io.shards`). Writes: each shard's raw index
(`raw/<shard>.parquet`: id, shard, row), published for a batch of shards together.
"""
