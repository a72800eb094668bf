"""Cluster stage: `centroids` (spherical k-means on a sample) and `cluster_assignments` (core.assign.assign_shard)."""


import dagster as dg

from semdedup_assets.assets.common import (EAGER, GPU_OP_TAGS, GPU_POOL, ProgressLog, core_failures, remove_unregistered,
                                           metered, run_metadata, run_partition_keys, shard_backfill_policy, timed)
from semdedup_assets.core import storage as st
from semdedup_assets.core.assign import assign_shard
from semdedup_assets.core.centroids import load_centroids, train_centroids
from semdedup_assets.core.config import Settings
from semdedup_assets.partitions import SHARDS_PARTITIONS_NAME, shard_partitions
from semdedup_assets.resources import SemDedupConfig

BUCKETS_TOUCHED = "buckets_touched"


def registered_stage_files(instance: dg.DagsterInstance, storage: st.Storage, stage: str) -> dict[str, st.UPath]:
    """The stage files of every registered shard; fails naming shards that lack theirs."""
    keys = sorted(instance.get_dynamic_partitions(SHARDS_PARTITIONS_NAME))
    if not keys:
        raise dg.Failure("no shards are registered: run the shard sensor or `semdedup run` first")
    files = {k: storage.shard_file(stage, k) for k in keys}
    missing = [k for k, p in files.items() if not p.exists()]
    if missing:
        raise dg.Failure(f"{len(missing)} registered shard(s) have no {stage} yet (e.g. {missing[:5]}): "
                         f"materialize {stage} for them first")
    return files


@dg.asset(
    deps=[dg.AssetDep("embeddings", partition_mapping=dg.AllPartitionMapping())],
    pool=GPU_POOL,
    op_tags=GPU_OP_TAGS,
    group_name="cluster",
    kinds={"faiss", "parquet"},
)
@metered
def centroids(context: dg.AssetExecutionContext, semdedup: SemDedupConfig) -> dg.MaterializeResult:
    """Spherical k-means centroids, trained on a sample drawn shard by shard."""
    settings = semdedup.settings()
    files = registered_stage_files(context.instance, semdedup.storage_root(), st.EMBEDDINGS)
    r = train_centroids(settings, files, log=context.log.info, warn=context.log.warning)
    return dg.MaterializeResult(metadata={
        "clusters": r.clusters, "dim": r.dim, "items": r.items, "shards": r.shards,
        "sample_rows": r.sample_rows, "train_rows": r.train_rows, "objective": r.objective,
        "iterations": settings.kmeans_iterations, "seed": settings.seed, "gpu": r.gpu,
        "sample_seconds": r.sample_seconds, "train_seconds": r.train_seconds,
        "path": dg.MetadataValue.path(r.path),
    })


def build_cluster_assignments(settings: Settings) -> dg.AssetsDefinition:
    """The per-shard assignment asset (backfill batch from the settings)."""

    @dg.asset(
        partitions_def=shard_partitions,
        deps=["embeddings", "centroids"],
        backfill_policy=shard_backfill_policy(settings),
        automation_condition=EAGER,
        group_name="cluster",
        kinds={"faiss", "parquet"},
        check_specs=[dg.AssetCheckSpec("assigned_exactly_once", asset="cluster_assignments", blocking=True,
                                       description="Every item of the shard is assigned to exactly one cluster.")],
    )
    @metered
    def cluster_assignments(context: dg.AssetExecutionContext, semdedup: SemDedupConfig) -> dg.MaterializeResult:
        """Each item's nearest centroid and cosine similarity to it, sorted by (cluster, id)."""
        config = semdedup.settings()
        with core_failures():
            cents = load_centroids(semdedup.storage_root())
        per_shard: list[dict[str, object]] = []
        problems: list[str] = []
        buckets: set[str] = set()
        keys = run_partition_keys(context)
        progress = ProgressLog(context.log, len(keys), settings.progress_interval, label="assign")
        with timed() as t:
            for key in keys:
                r = assign_shard(config, key, cents, len(cents), warn=context.log.warning)
                problems += [f"shard {key!r}: {p}" for p in r.problems]
                buckets.update(r.buckets_touched)
                per_shard.append({"shard": key, "rows": r.rows, "clusters_touched": r.clusters_touched,
                                  "mean_sim_to_centroid": r.mean_sim_to_centroid})
                progress.step(f"assigned shard {key!r}: {r.rows} items")
        extra = {"rows": sum(int(r["rows"]) for r in per_shard), "clusters": len(cents), "seconds": t["seconds"],
                 # Read by the bucket sensor: only these semantic_duplicates partitions need a re-run.
                 BUCKETS_TOUCHED: ",".join(sorted(buckets))}
        check = dg.AssetCheckResult(check_name="assigned_exactly_once", passed=not problems,
                                    description="; ".join(problems[:10]) or None)
        remove_unregistered(context, semdedup.storage_root(), st.CLUSTER_ASSIGNMENTS)
        return dg.MaterializeResult(metadata=run_metadata(context, per_shard, extra), check_results=[check])

    return cluster_assignments
