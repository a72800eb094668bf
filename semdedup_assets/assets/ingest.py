"""Ingest stage: `raw_shards`, one validated index of each input shard (the work is core.run.loop.ingest_shards)."""

import dagster as dg
from dagster_ray import RayResource

from semdedup_assets.assets.common import (
    ProgressLog,
    beta_parameters,
    core_failures,
    metered,
    remove_unregistered,
    run_metadata,
    run_partition_keys,
    settings_resource,
    shard_backfill_policy,
    worker_resources,
)
from semdedup_assets.core.config import Settings
from semdedup_assets.core.ingest.stage import IngestResult, duplicate_ids_message
from semdedup_assets.core.io import storage as st
from semdedup_assets.core.io.catalog import duplicate_ids
from semdedup_assets.core.io.shards import Shard, discover_shards
from semdedup_assets.core.run.loop import ingest_shards
from semdedup_assets.names import GraphNames
from semdedup_assets.ray_resource import engine_for_step
from semdedup_assets.resources import SemDedupConfig


def input_shards(config: SemDedupConfig) -> dict[str, Shard]:
    """The shards (files, or groups of `files_per_shard` files) under the configured input location, by key."""
    if not config.input:
        raise dg.Failure("no input location configured (set `input` on the semdedup resource or SEMDEDUP_INPUT)")
    return {s.key: s for s in discover_shards(config.input, config.files_per_shard)}


def _preview(rows: list[tuple[str, str]], n_rows: int) -> str:
    if not rows:
        return f"{n_rows} rows"
    return "\n".join(f"- `{i}`: {t[:200]}" for i, t in rows)


def build_raw_shards(names: GraphNames, backfill_batch: int) -> dg.AssetsDefinition:
    """The per-shard ingest asset (static: its names and backfill batch; the rest from the resource at run time)."""

    with beta_parameters():

        @dg.asset(
            key=names.key("raw_shards"),
            partitions_def=names.shard_partitions,
            backfill_policy=shard_backfill_policy(backfill_batch),
            required_resource_keys={names.resource, names.ray_resource},
            group_name=names.definition("ingest"),
            kinds={"parquet"},
        )
        @metered
        def raw_shards(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
            """Validated index of each input shard: id, shard, row (and the text for the text modality)."""
            semdedup = settings_resource(context, names)
            settings = semdedup.settings()
            files = input_shards(semdedup)
            keys = run_partition_keys(context)
            missing = [k for k in keys if k not in files]
            if missing:
                raise dg.Failure(f"shard(s) {missing[:5]} are registered but no longer exist under {semdedup.input}")
            # Files of shards no longer registered would feed the id and dimension checks.
            remove_unregistered(context, names, semdedup.storage_root(), st.RAW)
            progress = ProgressLog(context.log, len(keys), settings.progress_interval, label="ingest")
            ray: RayResource = getattr(context.resources, names.ray_resource)
            # The engine validates and stages the shards here or as Ray tasks; this process publishes them together.
            with core_failures(), engine_for_step(settings, ray, context.log.info) as engine:
                r = ingest_shards(settings, [files[k] for k in keys], log=progress.step, engine=engine)
            return dg.MaterializeResult(
                metadata={
                    **run_metadata(context, *ingest_metadata(settings, r)),
                    **worker_resources(r.workers.values()),
                }
            )

    return raw_shards


def ingest_metadata(settings: Settings, r: IngestResult) -> tuple[list[dict[str, object]], dict[str, object]]:
    """The ingest stage's metadata: (one row per shard, the run's figures)."""
    per_shard: list[dict[str, object]] = [
        {"shard": s.key, "rows": s.rows, "input": s.input, "fingerprint": s.fingerprint} for s in r.shards
    ]
    if settings.engine != "local":
        for row, s in zip(per_shard, r.shards):
            row["worker"] = str(r.workers[s.key])
    extra: dict[str, object] = {"rows": sum(s.rows for s in r.shards), "seconds": r.seconds}
    if len(r.shards) == 1:
        extra["path"] = dg.MetadataValue.path(r.shards[0].path)
        extra["preview"] = dg.MetadataValue.md(_preview(r.preview, r.shards[0].rows))
    return per_shard, extra


def build_ids_unique_check(names: GraphNames) -> dg.AssetChecksDefinition:
    """The blocking check that ids are unique across every shard of the graph."""

    @dg.asset_check(
        asset=names.key("raw_shards"),
        name="ids_unique_across_shards",
        blocking=True,
        required_resource_keys={names.resource},
        description="Every id appears once across all shards.",
    )
    def ids_unique_across_shards(context: dg.AssetCheckExecutionContext) -> dg.AssetCheckResult:
        """Blocking: an id repeated across shards stops the run before embedding."""
        semdedup = settings_resource(context, names)
        # Under the storage's scan memory (a quarter of the budget), as ingest's own check: unbounded, DuckDB's
        # GROUP BY of every id takes what the machine has (80% of its memory), several GB at 10M ids.
        dups = duplicate_ids(semdedup.storage_root())
        if not dups:
            return dg.AssetCheckResult(passed=True)
        return dg.AssetCheckResult(passed=False, description=duplicate_ids_message(dups))

    return ids_unique_across_shards
