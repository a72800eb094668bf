"""Decontamination: `contaminated`, dataset items that are near-copies of a --reference (evaluation) set.

The work is core.decontaminate.decontaminate; this asset reads the registered shards'
embeddings files, calls it and reports metadata.
"""

import dagster as dg

from semdedup_assets.assets.cluster import registered_stage_files
from semdedup_assets.assets.common import GPU_OP_TAGS, GPU_POOL
from semdedup_assets.core import storage as st
from semdedup_assets.core.catalog import refresh_catalog
from semdedup_assets.core.decontaminate import ReferenceError, decontaminate
from semdedup_assets.resources import SemDedupConfig


@dg.asset(
    deps=[dg.AssetDep("embeddings", partition_mapping=dg.AllPartitionMapping())],
    pool=GPU_POOL,
    op_tags=GPU_OP_TAGS,
    group_name="dedup",
    kinds={"pytorch", "parquet"},
)
def contaminated(context: dg.AssetExecutionContext, semdedup: SemDedupConfig) -> dg.MaterializeResult:
    """Items within 1 - eps of a reference item (the `reference` setting), with the reference id and score."""
    settings = semdedup.settings()
    storage = settings.storage_root()
    files = registered_stage_files(context.instance, storage, st.EMBEDDINGS) if settings.reference else {}
    try:
        r = decontaminate(settings, files)
    except ReferenceError as err:
        raise dg.Failure(description=str(err)) from None
    refresh_catalog(storage)
    if r is None:
        return dg.MaterializeResult(metadata={"reference": "none", "flagged": 0})
    meta: dict[str, object] = {"reference": settings.reference, "reference_items": r.reference_items,
                               "flagged": r.flagged, "seconds": r.seconds, "path": dg.MetadataValue.path(r.path)}
    for eps, n in r.per_eps.items():
        meta[f"contaminated@eps={st.format_eps(eps)}"] = n
    return dg.MaterializeResult(metadata=meta)
