"""Assets grouped by pipeline stage: ingest, embed, cluster, dedup."""

from __future__ import annotations

import dagster as dg

from semdedup_assets.assets.cluster import centroids, cluster_assignments
from semdedup_assets.assets.dedup import build_keep_lists, build_semantic_duplicates
from semdedup_assets.assets.decontaminate import contaminated
from semdedup_assets.assets.embed import embeddings
from semdedup_assets.assets.export import deduplicated
from semdedup_assets.assets.ingest import ids_unique_across_shards, raw_shards


def build_assets(buckets: int) -> list[dg.AssetsDefinition]:
    """Every asset of the graph, for a given number of cluster buckets."""
    semantic_duplicates = build_semantic_duplicates(buckets)
    return [raw_shards, embeddings, centroids, cluster_assignments, semantic_duplicates, build_keep_lists(semantic_duplicates),
            contaminated, deduplicated]


ASSET_CHECKS = [ids_unique_across_shards]
