"""Jobs: one per partitioning of the graph (a run covers one partition set)."""

from __future__ import annotations

import dagster as dg

from semdedup_assets.names import DEFAULT_NAMES, GraphNames

# name -> (assets, description). Per-shard work that needs no global state comes first.
JOBS: dict[str, tuple[tuple[str, ...], str]] = {
    "ingest_job": (("raw_shards", "embeddings"), "Validate and embed shards (one partition per shard)."),
    "centroids_job": (("centroids",), "Re-train the spherical k-means centroids on a fresh sample."),
    "assign_job": (("cluster_assignments",), "Assign shards' items to the current centroids."),
    "dedup_job": (("semantic_duplicates",), "Run the pairwise rule per cluster bucket."),
    "keep_lists_job": (
        ("keep_lists", "contaminated"),
        "Write the keep-lists and eps curve, flag items near the --reference set, refresh the catalog.",
    ),
    "export_job": (
        ("deduplicated",),
        "Write the deduplicated dataset for the `select` knob (one partition per shard).",
    ),
    "prune_job": (
        ("pruned_prototypes", "pruned_d4", "pruned_dbp", "pruned_outliers", "pruned_representatives"),
        "Compute the pruning selections of the `prune` knob (SSL prototypes, D4, DBP, outliers, representatives).",
    ),
    "robustness_job": (
        ("robustness",),
        "Compare this storage's removals with the `compare_with` storages (semdedup sweep runs it).",
    ),
}


def build_job(names: GraphNames, job: str) -> dg.UnresolvedAssetJobDefinition:
    """One of the graph's jobs (`JOBS`), named and selecting under `names`."""
    assets, description = JOBS[job]
    return dg.define_asset_job(
        names.definition(job), selection=dg.AssetSelection.assets(*map(names.key, assets)), description=description
    )


def build_jobs(names: GraphNames = DEFAULT_NAMES) -> list[dg.UnresolvedAssetJobDefinition]:
    """Every job of the graph under `names`."""
    return [build_job(names, job) for job in JOBS]
