"""Jobs: one per partitioning of the graph (a run covers one partition set)."""

from __future__ import annotations

import dagster as dg


# Per-shard work that needs no global state: validate and embed new shards.
ingest_job = dg.define_asset_job(
    "ingest_job", selection=dg.AssetSelection.assets("raw_shards", "embeddings"),
    description="Validate and embed shards (one partition per shard).",
)
centroids_job = dg.define_asset_job(
    "centroids_job", selection=dg.AssetSelection.assets("centroids"),
    description="Re-train the spherical k-means centroids on a fresh sample.",
)
assign_job = dg.define_asset_job(
    "assign_job", selection=dg.AssetSelection.assets("cluster_assignments"),
    description="Assign shards' items to the current centroids.",
)
dedup_job = dg.define_asset_job(
    "dedup_job", selection=dg.AssetSelection.assets("semantic_duplicates"),
    description="Run the pairwise rule per cluster bucket.",
)
keep_lists_job = dg.define_asset_job(
    "keep_lists_job", selection=dg.AssetSelection.assets("keep_lists", "contaminated"),
    description="Write the keep-lists and eps curve, flag items near the --reference set, refresh the catalog.",
)

export_job = dg.define_asset_job(
    "export_job", selection=dg.AssetSelection.assets("deduplicated"),
    description="Write the deduplicated dataset for the `select` knob (one partition per shard).",
)

prune_job = dg.define_asset_job(
    "prune_job", selection=dg.AssetSelection.assets("pruned_prototypes", "pruned_d4", "pruned_dbp"),
    description="Compute the pruning selections of the `prune` knob (SSL prototypes, D4, DBP).",
)

robustness_job = dg.define_asset_job(
    "robustness_job", selection=dg.AssetSelection.assets("robustness"),
    description="Compare this storage's removals with the `compare_with` storages (semdedup sweep runs it).",
)

ALL_JOBS = [ingest_job, centroids_job, assign_job, dedup_job, keep_lists_job, export_job, prune_job,
            robustness_job]
