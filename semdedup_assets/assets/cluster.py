"""Cluster stage: `centroids` (spherical k-means on a sample) and `cluster_assignments` (core.cluster.assign.assign_shard).

The engine runs both: in this process, or with `--engine ray` k-means on a GPU worker
(where the cluster has one) and one Ray task per shard's assignment.
"""

import dagster as dg
from dagster_ray import RayResource

from semdedup_assets.assets.common import (
    EAGER,
    GPU_OP_TAGS,
    ProgressLog,
    beta_parameters,
    core_failures,
    metered,
    remove_unregistered,
    run_metadata,
    run_partition_keys,
    settings_resource,
    shard_backfill_policy,
    timed,
    worker_resources,
)
from semdedup_assets.core.cluster.centroids import CentroidsResult, centroids_count
from semdedup_assets.core.config import Settings
from semdedup_assets.core.io import storage as st
from semdedup_assets.core.run.engines import Done, Worker
from semdedup_assets.names import GraphNames
from semdedup_assets.ray_resource import engine_for_step

BUCKETS_TOUCHED = "buckets_touched"


def registered_stage_files(
    instance: dg.DagsterInstance, names: GraphNames, storage: st.Storage, stage: str
) -> dict[str, st.UPath]:
    """The stage files of every registered shard; fails naming shards that lack theirs."""
    keys = sorted(instance.get_dynamic_partitions(names.partitions))
    if not keys:
        raise dg.Failure("no shards are registered: run the shard sensor or `semdedup run` first")
    files = {k: storage.shard_file(stage, k) for k in keys}
    missing = [k for k, p in files.items() if not p.exists()]
    if missing:
        raise dg.Failure(
            f"{len(missing)} registered shard(s) have no {stage} yet (e.g. {missing[:5]}): "
            f"materialize {stage} for them first"
        )
    return files


def build_centroids(names: GraphNames) -> dg.AssetsDefinition:
    """The centroids asset (one for the whole dataset)."""

    @dg.asset(
        key=names.key("centroids"),
        deps=[dg.AssetDep(names.key("embeddings"), partition_mapping=dg.AllPartitionMapping())],
        pool=names.pool,
        op_tags=GPU_OP_TAGS,
        required_resource_keys={names.resource, names.ray_resource},
        group_name=names.definition("cluster"),
        kinds={"faiss", "parquet"},
    )
    @metered
    def centroids(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
        """Spherical k-means centroids, trained on a sample drawn shard by shard."""
        semdedup = settings_resource(context, names)
        ray: RayResource = getattr(context.resources, names.ray_resource)
        settings = semdedup.settings()
        files = registered_stage_files(context.instance, names, semdedup.storage_root(), st.EMBEDDINGS)
        with core_failures(), engine_for_step(settings, ray, context.log.info) as engine:
            d = engine.train_centroids(settings, files, log=context.log.info, warn=context.log.warning)
        return dg.MaterializeResult(
            metadata={**centroids_metadata(settings, d.result, d.worker), **worker_resources([d.worker])}
        )

    return centroids


def centroids_metadata(settings: Settings, r: CentroidsResult, worker: Worker) -> dict[str, object]:
    """The centroids' metadata, with where k-means ran (driver or Ray worker, node, process, device)."""
    return {
        "clusters": r.clusters,
        "dim": r.dim,
        "items": r.items,
        "shards": r.shards,
        "sample_rows": r.sample_rows,
        "train_rows": r.train_rows,
        "objective": r.objective,
        "iterations": settings.kmeans_iterations,
        "seed": settings.seed,
        "gpu": r.gpu,
        "sample_seconds": r.sample_seconds,
        "train_seconds": r.train_seconds,
        "ran_on": worker.role,
        "worker": str(worker),
        "device": r.device,
        "device_note": r.device_note,
        "path": dg.MetadataValue.path(r.path),
    }


def build_cluster_assignments(names: GraphNames, backfill_batch: int) -> dg.AssetsDefinition:
    """The per-shard assignment asset (static: its names and backfill batch; the rest from the resource at run time)."""

    with beta_parameters():

        @dg.asset(
            key=names.key("cluster_assignments"),
            partitions_def=names.shard_partitions,
            deps=[names.key("embeddings"), names.key("centroids")],
            backfill_policy=shard_backfill_policy(backfill_batch),
            automation_condition=EAGER,
            required_resource_keys={names.resource, names.ray_resource},
            group_name=names.definition("cluster"),
            kinds={"faiss", "parquet"},
            check_specs=[
                dg.AssetCheckSpec(
                    "assigned_exactly_once",
                    asset=names.key("cluster_assignments"),
                    blocking=True,
                    description="Every item of the shard is assigned to exactly one cluster.",
                )
            ],
        )
        @metered
        def cluster_assignments(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
            """Each item's nearest centroid and cosine similarity to it, sorted by (cluster, id)."""
            semdedup = settings_resource(context, names)
            ray: RayResource = getattr(context.resources, names.ray_resource)
            settings = semdedup.settings()
            with core_failures():
                k = centroids_count(semdedup.storage_root())
            done: dict[str, Done] = {}
            keys = run_partition_keys(context)
            progress = ProgressLog(context.log, len(keys), settings.progress_interval, label="assign")
            with timed() as t:
                # The engine runs the shards here or as Ray tasks; each writes its own file atomically.
                with core_failures(), engine_for_step(settings, ray, context.log.info) as engine:
                    for d in engine.assign_shards(settings, keys):
                        done[d.unit], r = d, d.result
                        for warning in r.warnings:  # a damaged earlier file, replaced
                            context.log.warning(warning)
                        progress.step(
                            f"assigned shard {d.unit!r}: {r.rows} items"
                            + (f" on {d.worker}" if engine.name != "local" else "")
                        )
            per_shard, extra, problems = assign_metadata(settings, [done[key] for key in keys], k, t["seconds"])
            check = dg.AssetCheckResult(
                check_name="assigned_exactly_once", passed=not problems, description="; ".join(problems[:10]) or None
            )
            remove_unregistered(context, names, semdedup.storage_root(), st.CLUSTER_ASSIGNMENTS)
            return dg.MaterializeResult(
                metadata={
                    **run_metadata(context, per_shard, extra),
                    **worker_resources(d.worker for d in done.values()),
                },
                check_results=[check],
            )

    return cluster_assignments


def assign_metadata(
    settings: Settings, done: list[Done], clusters: int, seconds: float
) -> tuple[list[dict[str, object]], dict[str, object], list[str]]:
    """The assign stage's metadata, in shard order: (one row per shard, the run's figures, check problems)."""
    per_shard: list[dict[str, object]] = []
    problems: list[str] = []
    buckets: set[str] = set()
    for d in done:
        key, r = d.unit, d.result
        problems += [f"shard {key!r}: {p}" for p in r.problems]
        buckets.update(r.buckets_touched)
        row: dict[str, object] = {
            "shard": key,
            "rows": r.rows,
            "clusters_touched": r.clusters_touched,
            "mean_sim_to_centroid": r.mean_sim_to_centroid,
            "device": r.device,
        }
        if settings.engine != "local":
            row["worker"] = str(d.worker)
        per_shard.append(row)
    extra: dict[str, object] = {
        "rows": sum(int(r["rows"]) for r in per_shard),
        "clusters": clusters,
        "seconds": seconds,
        # Read by the bucket sensor: only these semantic_duplicates partitions need a re-run.
        BUCKETS_TOUCHED: ",".join(sorted(buckets)),
    }
    return per_shard, extra, problems
