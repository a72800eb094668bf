"""Assets grouped by pipeline stage, as core/ is: ingest, embed, cluster, dedup, and select (export, pruning,
decontamination, robustness)."""

from __future__ import annotations

import dagster as dg

from semdedup_assets.assets.cluster import build_centroids, build_cluster_assignments
from semdedup_assets.assets.dedup import build_keep_lists_asset, build_semantic_duplicates
from semdedup_assets.assets.embed import build_embeddings
from semdedup_assets.assets.ingest import build_ids_unique_check, build_raw_shards
from semdedup_assets.assets.select.decontaminate import build_contaminated
from semdedup_assets.assets.select.export import build_deduplicated
from semdedup_assets.assets.select.prune import build_pruned_assets
from semdedup_assets.assets.select.robustness import build_robustness_asset
from semdedup_assets.names import GraphNames


def build_assets(names: GraphNames, *, buckets: int, backfill_batch: int) -> list[dg.AssetsDefinition]:
    """Every asset of the graph under `names`. Only what shapes the graph is fixed here (the bucket
    partitions, the backfill batch); every other knob comes from the settings resource at run time."""
    return [
        build_raw_shards(names, backfill_batch),
        build_embeddings(names, backfill_batch),
        build_centroids(names),
        build_cluster_assignments(names, backfill_batch),
        build_semantic_duplicates(names, buckets),
        build_keep_lists_asset(names),
        build_contaminated(names),
        build_deduplicated(names, backfill_batch),
        *build_pruned_assets(names),
        build_robustness_asset(names),
    ]


def build_asset_checks(names: GraphNames) -> list[dg.AssetChecksDefinition]:
    """The checks defined apart from their asset (the others are the assets' check_specs)."""
    return [build_ids_unique_check(names)]
