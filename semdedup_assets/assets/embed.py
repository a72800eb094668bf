"""Embed stage: `embeddings`, unit-norm float32 vectors per shard (the work is core.embed.shard.embed_shard)."""

import dagster as dg
from dagster_ray import RayResource

from semdedup_assets.assets.common import (
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
from semdedup_assets.assets.ingest import input_shards
from semdedup_assets.core.config import Settings
from semdedup_assets.core.io import storage as st
from semdedup_assets.core.io.catalog import exact_copy_count
from semdedup_assets.core.run.engines import Done
from semdedup_assets.names import GraphNames
from semdedup_assets.ray_resource import engine_for_step


def build_embeddings(names: GraphNames, backfill_batch: int) -> dg.AssetsDefinition:
    """The per-shard embedding asset (static: its names and backfill batch; the rest from the resource at run time)."""

    with beta_parameters():

        @dg.asset(
            key=names.key("embeddings"),
            partitions_def=names.shard_partitions,
            deps=[names.key("raw_shards")],
            backfill_policy=shard_backfill_policy(backfill_batch),
            pool=names.pool,
            op_tags=GPU_OP_TAGS,
            required_resource_keys={names.resource, names.ray_resource},
            group_name=names.definition("embed"),
            kinds={"pytorch", "parquet"},
            check_specs=[
                dg.AssetCheckSpec(
                    "embeddings_finite_unit_norm",
                    asset=names.key("embeddings"),
                    blocking=True,
                    description="Finite, unit-norm rows; row count equals the raw shard's.",
                )
            ],
        )
        @metered
        def embeddings(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
            """L2-normalised float32 embeddings per shard: id, embedding (FLOAT[d])."""
            semdedup = settings_resource(context, names)
            ray: RayResource = getattr(context.resources, names.ray_resource)
            settings = semdedup.settings()
            files = input_shards(semdedup)
            keys = run_partition_keys(context)
            for key in keys:
                if key not in files:
                    raise dg.Failure(f"shard {key!r} no longer exists under {semdedup.input}")
            done: dict[str, Done] = {}
            with timed() as t:
                progress = ProgressLog(context.log, len(keys), settings.progress_interval, label="embed")
                # The engine runs the shards here or on Ray; each unit writes its own files atomically.
                with core_failures(), engine_for_step(settings, ray, context.log.info) as engine:
                    for d in engine.embed_shards(settings, [files[k] for k in keys], log=context.log.debug):
                        done[d.unit], r = d, d.result
                        for warning in r.warnings:  # a damaged cached file, recomputed
                            context.log.warning(warning)
                        progress.step(
                            f"embedded shard {d.unit!r}: {r.rows} rows in {r.seconds} s"
                            + (" (cached)" if r.cached else "")
                            + (f", {r.rejected} rejected" if r.rejected else "")
                            + (f" on {d.worker}" if engine.name != "local" else "")
                        )
            per_shard, extra, problems = embed_metadata(settings, [done[k] for k in keys], t["seconds"])
            check = dg.AssetCheckResult(
                check_name="embeddings_finite_unit_norm",
                passed=not problems,
                description="; ".join(problems[:10]) or None,
                metadata={"rows_checked": extra["rows"]},
            )
            remove_unregistered(context, names, semdedup.storage_root(), st.EMBEDDINGS, st.REJECTED)
            return dg.MaterializeResult(
                metadata={
                    **run_metadata(context, per_shard, extra),
                    **worker_resources(d.worker for d in done.values()),
                },
                check_results=[check],
            )

    return embeddings


def embed_metadata(
    settings: Settings, done: list[Done], seconds: float
) -> tuple[list[dict[str, object]], dict[str, object], list[str]]:
    """The embed stage's metadata, in shard order: (one row per shard, the run's figures, check problems)."""
    per_shard: list[dict[str, object]] = []
    problems: list[str] = []
    paths: list[str] = []
    for d in done:
        r = d.result
        paths.append(r.path)
        problems += [f"shard {d.unit!r}: {p}" for p in r.problems]
        row: dict[str, object] = {
            "shard": d.unit,
            "rows": r.rows,
            "seconds": r.seconds,
            "cached": str(r.cached),
            "items_per_second": round(r.rows / max(r.seconds, 1e-9), 1),
            "renormalised_rows": r.renormalised,
            "rejected": r.rejected,
            "encoded": r.encoded,
            "copied": r.copies,
        }
        if settings.engine != "local":
            row["worker"] = str(d.worker)
        per_shard.append(row)
    extra: dict[str, object] = {
        "rows": sum(int(r["rows"]) for r in per_shard),
        "dim": done[-1].result.dim if done else 0,
        "seconds": seconds,
        "rejected": sum(d.result.rejected for d in done),
        "renormalised_rows": sum(d.result.renormalised for d in done),
        # Exact copies: items of the dataset repeating an earlier payload; `copied_rows`: this run's rows whose
        # vector came from a copy instead of the encoder (core/embed/copies.py).
        "exact_copies": exact_copy_count(settings.storage_root()),
        "copied_rows": sum(d.result.copies for d in done),
        "encoded_items": sum(d.result.encoded for d in done),
        "model": settings.model or "default",
        "modality": settings.modality,
    }
    if len(paths) == 1:
        extra["path"] = dg.MetadataValue.path(paths[0])
    return per_shard, extra, problems
