"""Embed stage: `embeddings`, unit-norm float32 vectors per shard (the work is core.embed.embed_shard)."""


import dagster as dg
from dagster_ray import RayResource

from semdedup_assets.assets.common import (GPU_OP_TAGS, GPU_POOL, ProgressLog, core_failures, remove_unregistered,
                                           metered, run_metadata, run_partition_keys, shard_backfill_policy, timed)
from semdedup_assets.assets.ingest import input_shards
from semdedup_assets.core import storage as st
from semdedup_assets.core.config import Settings
from semdedup_assets.core.engines import Done
from semdedup_assets.partitions import shard_partitions
from semdedup_assets.ray_resource import engine_for_step
from semdedup_assets.resources import SemDedupConfig


def build_embeddings(settings: Settings) -> dg.AssetsDefinition:
    """The per-shard embedding asset (backfill batch and progress interval from the settings)."""

    @dg.asset(
        partitions_def=shard_partitions,
        deps=["raw_shards"],
        backfill_policy=shard_backfill_policy(settings),
        pool=GPU_POOL,
        op_tags=GPU_OP_TAGS,
        group_name="embed",
        kinds={"pytorch", "parquet"},
        check_specs=[dg.AssetCheckSpec("embeddings_finite_unit_norm", asset="embeddings", blocking=True,
                                       description="Finite, unit-norm rows; row count equals the raw shard's.")],
    )
    @metered
    def embeddings(context: dg.AssetExecutionContext, semdedup: SemDedupConfig, ray: RayResource) -> dg.MaterializeResult:
        """L2-normalised float32 embeddings per shard: id, embedding (FLOAT[d])."""
        config = semdedup.settings()
        files = input_shards(semdedup)
        per_shard: list[dict[str, object]] = []
        problems: list[str] = []
        rejected_total, renormalised_total, dim = 0, 0, 0
        paths: list[str] = []
        keys = run_partition_keys(context)
        for key in keys:
            if key not in files:
                raise dg.Failure(f"shard {key!r} no longer exists under {semdedup.input}")
        done: dict[str, Done] = {}
        with timed() as t:
            progress = ProgressLog(context.log, len(keys), settings.progress_interval, label="embed")
            # The engine runs the shards here or on Ray; each unit writes its own files atomically.
            with core_failures(), engine_for_step(config, ray, context.log.info) as engine:
                for d in engine.embed_shards(config, [files[k] for k in keys], log=context.log.debug):
                    done[d.unit], r = d, d.result
                    for warning in r.warnings:  # a damaged cached file, recomputed
                        context.log.warning(warning)
                    progress.step(f"embedded shard {d.unit!r}: {r.rows} rows in {r.seconds} s"
                                  + (" (cached)" if r.cached else "") + (f", {r.rejected} rejected" if r.rejected else "")
                                  + (f" on {d.worker}" if engine.name != "local" else ""))
        for key in keys:
            r = done[key].result
            dim = r.dim
            rejected_total += r.rejected
            renormalised_total += r.renormalised
            paths.append(r.path)
            problems += [f"shard {key!r}: {p}" for p in r.problems]
            row = {"shard": key, "rows": r.rows, "seconds": r.seconds, "cached": str(r.cached),
                   "items_per_second": round(r.rows / max(r.seconds, 1e-9), 1),
                   "renormalised_rows": r.renormalised, "rejected": r.rejected}
            if config.engine != "local":
                row["worker"] = str(done[key].worker)
            per_shard.append(row)
        rows = sum(int(r["rows"]) for r in per_shard)
        extra: dict[str, object] = {"rows": rows, "dim": dim, "seconds": t["seconds"], "rejected": rejected_total,
                                    "renormalised_rows": renormalised_total,
                                    "model": semdedup.model or "default", "modality": semdedup.modality}
        if len(paths) == 1:
            extra["path"] = dg.MetadataValue.path(paths[0])
        check = dg.AssetCheckResult(check_name="embeddings_finite_unit_norm", passed=not problems,
                                    description="; ".join(problems[:10]) or None, metadata={"rows_checked": rows})
        remove_unregistered(context, semdedup.storage_root(), st.EMBEDDINGS, st.REJECTED)
        return dg.MaterializeResult(metadata=run_metadata(context, per_shard, extra), check_results=[check])

    return embeddings
