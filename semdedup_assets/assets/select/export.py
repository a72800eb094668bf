"""Output stage: `deduplicated`, each input shard written again with only its kept rows."""

import dagster as dg

from semdedup_assets.assets.common import (
    beta_parameters,
    run_metadata,
    run_partition_keys,
    settings_resource,
    shard_backfill_policy,
    timed,
)
from semdedup_assets.core.select.export import (
    ExportError,
    default_selection,
    export_shards,
    parse_selection,
    selection_dir,
    tidy_exports,
)
from semdedup_assets.names import GraphNames


def build_deduplicated(names: GraphNames, backfill_batch: int) -> dg.AssetsDefinition:
    """The per-shard deduplicated-dataset asset (static: its names and backfill batch)."""

    with beta_parameters():
        decorator = dg.asset(
            key=names.key("deduplicated"),
            partitions_def=names.shard_partitions,
            deps=[
                names.key(k)
                for k in (
                    "keep_lists",
                    "contaminated",
                    "pruned_prototypes",
                    "pruned_d4",
                    "pruned_dbp",
                    "pruned_outliers",
                    "pruned_representatives",
                )
            ],
            backfill_policy=shard_backfill_policy(backfill_batch),
            required_resource_keys={names.resource},
            group_name=names.definition("dedup"),
            kinds={"parquet"},
        )

    @decorator
    def deduplicated(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
        """The shard again, in its own format, holding only the rows kept by the `select` knob."""
        config = settings_resource(context, names).settings()
        if not config.input:
            raise dg.Failure("no input location configured (set `input` on the semdedup resource)")
        storage = config.storage_root()
        try:
            selection = parse_selection(config.select or default_selection(config.eps), config.eps)
            with timed() as t:
                done = export_shards(
                    storage,
                    config.input,
                    selection,
                    run_partition_keys(context),
                    config.eps,
                    reference=config.reference,
                    files_per_shard=config.files_per_shard,
                )
                tidied = tidy_exports(storage, config.input, selection, config.eps, config.files_per_shard)
        except ExportError as err:
            raise dg.Failure(description=str(err)) from None
        if tidied.stale_files or tidied.unproducible:
            context.log.info(
                f"removed {len(tidied.stale_files)} file(s) the selection no longer implies and the "
                f"folders of selections no longer configured: {tidied.unproducible}"
            )
        per_shard = [
            {"shard": d.shard, "kept": d.kept, "removed": d.removed, "rewritten": str(d.rewritten)} for d in done
        ]
        extra: dict[str, object] = {
            "selection": selection.label,
            "seconds": t["seconds"],
            "kept": sum(d.kept for d in done),
            "removed": sum(d.removed for d in done),
            "rewritten_shards": sum(d.rewritten for d in done),
            "folder": dg.MetadataValue.path(str(selection_dir(storage, selection))),
        }
        return dg.MaterializeResult(metadata=run_metadata(context, per_shard, extra))

    return deduplicated
