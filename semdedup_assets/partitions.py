"""Partitions: one dynamic partition per input shard, a static set of cluster buckets."""

from __future__ import annotations

import dagster as dg

from semdedup_assets.core.cluster.assign import bucket_keys

SHARDS_PARTITIONS_NAME = "shards"

# Registered by the shard sensor and by `semdedup run`; key = shard path without extension.
shard_partitions = dg.DynamicPartitionsDefinition(name=SHARDS_PARTITIONS_NAME)


def bucket_partitions(buckets: int) -> dg.StaticPartitionsDefinition:
    """Cluster buckets '000'..: each holds a contiguous range of clusters (hundreds, not k)."""
    return dg.StaticPartitionsDefinition(bucket_keys(buckets))
