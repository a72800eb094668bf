"""Decontamination: `contaminated`, dataset items that are near-copies of a --reference (evaluation) set.

The work is core.select.decontaminate.decontaminate; this asset reads the registered shards'
embeddings files, calls it and reports metadata.
"""

import dagster as dg

from semdedup_assets.assets.cluster import registered_stage_files
from semdedup_assets.assets.common import GPU_OP_TAGS, settings_resource
from semdedup_assets.core.io import storage as st
from semdedup_assets.core.io.catalog import refresh_catalog
from semdedup_assets.core.select.decontaminate import DecontaminationResult, ReferenceError, decontaminate
from semdedup_assets.names import GraphNames


def build_contaminated(names: GraphNames) -> dg.AssetsDefinition:
    """The decontamination asset (one for the whole dataset)."""

    @dg.asset(
        key=names.key("contaminated"),
        deps=[dg.AssetDep(names.key("embeddings"), partition_mapping=dg.AllPartitionMapping())],
        pool=names.pool,
        op_tags=GPU_OP_TAGS,
        required_resource_keys={names.resource},
        group_name=names.definition("dedup"),
        kinds={"pytorch", "parquet"},
    )
    def contaminated(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
        """Items within 1 - eps of a reference item (the `reference` setting), with the reference id and score."""
        settings = settings_resource(context, names).settings()
        storage = settings.storage_root()
        files = registered_stage_files(context.instance, names, storage, st.EMBEDDINGS) if settings.reference else {}
        try:
            r = decontaminate(settings, files)
        except ReferenceError as err:
            raise dg.Failure(description=str(err)) from None
        if r is not None and r.reference_skipped:
            context.log.warning(
                f"reference {settings.reference}: {r.reference_skipped} item(s) with an empty id or "
                "an empty or whitespace-only text were not compared"
            )
        refresh_catalog(storage)
        return dg.MaterializeResult(metadata=contaminated_metadata(settings.reference, r))

    return contaminated


def contaminated_metadata(reference: str | None, r: DecontaminationResult | None) -> dict[str, object]:
    """The decontamination's metadata (`reference: none` when no reference set is configured)."""
    if r is None:
        return {"reference": "none", "flagged": 0}
    meta: dict[str, object] = {
        "reference": reference,
        "reference_items": r.reference_items,
        "reference_skipped_empty": r.reference_skipped,
        "flagged": r.flagged,
        "seconds": r.seconds,
        "path": dg.MetadataValue.path(r.path),
    }
    for eps, n in r.per_eps.items():
        meta[f"contaminated@eps={st.format_eps(eps)}"] = n
    return meta
