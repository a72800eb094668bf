"""Assets grouped by pipeline stage: ingest, embed, cluster, dedup."""

from __future__ import annotations

import dagster as dg

from semdedup_assets.assets.cluster import build_cluster_assignments, centroids
from semdedup_assets.assets.decontaminate import contaminated
from semdedup_assets.assets.dedup import build_keep_lists_asset, build_semantic_duplicates
from semdedup_assets.assets.embed import build_embeddings
from semdedup_assets.assets.export import build_deduplicated
from semdedup_assets.assets.ingest import build_raw_shards, ids_unique_across_shards
from semdedup_assets.assets.prune import build_pruned_assets
from semdedup_assets.assets.robustness import robustness
from semdedup_assets.core.config import Settings


def build_assets(settings: Settings) -> list[dg.AssetsDefinition]:
    """Every asset of the graph, for the settings' bucket count, backfill batch and progress interval."""
    return [build_raw_shards(settings), build_embeddings(settings), centroids, build_cluster_assignments(settings),
            build_semantic_duplicates(settings), build_keep_lists_asset(settings), contaminated,
            build_deduplicated(settings), *build_pruned_assets(), robustness]


ASSET_CHECKS = [ids_unique_across_shards]
