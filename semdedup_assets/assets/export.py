"""Output stage: `deduplicated`, each input shard written again with only its kept rows."""

import dagster as dg

from semdedup_assets.assets.common import SHARD_BACKFILL_POLICY, run_metadata, run_partition_keys, timed
from semdedup_assets.core.export import ExportError, default_selection, export_shards, parse_selection, selection_dir
from semdedup_assets.partitions import shard_partitions
from semdedup_assets.resources import SemDedupConfig


@dg.asset(
    partitions_def=shard_partitions,
    deps=["keep_lists", "contaminated"],
    backfill_policy=SHARD_BACKFILL_POLICY,
    group_name="dedup",
    kinds={"parquet"},
)
def deduplicated(context: dg.AssetExecutionContext, semdedup: SemDedupConfig) -> dg.MaterializeResult:
    """The shard again, in its own format, holding only the rows kept by the `select` knob."""
    settings = semdedup.settings()
    if not settings.input:
        raise dg.Failure("no input location configured (set `input` on the semdedup resource)")
    storage = settings.storage_root()
    try:
        selection = parse_selection(settings.select or default_selection(settings.eps), settings.eps)
        with timed() as t:
            done = export_shards(storage, settings.input, selection, run_partition_keys(context), settings.eps)
    except ExportError as err:
        raise dg.Failure(description=str(err)) from None
    per_shard = [{"shard": d.shard, "kept": d.kept, "removed": d.removed, "rewritten": str(d.rewritten)}
                 for d in done]
    extra: dict[str, object] = {"selection": selection.label, "seconds": t["seconds"],
                                "kept": sum(d.kept for d in done), "removed": sum(d.removed for d in done),
                                "rewritten_shards": sum(d.rewritten for d in done),
                                "folder": dg.MetadataValue.path(str(selection_dir(storage, selection)))}
    return dg.MaterializeResult(metadata=run_metadata(per_shard, extra))
