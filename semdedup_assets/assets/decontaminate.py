"""Decontamination: `contaminated`, dataset items that are near-copies of a --reference (evaluation) set."""

import dagster as dg
import numpy as np

from semdedup_assets.assets.cluster import registered_stage_files
from semdedup_assets.assets.common import GPU_OP_TAGS, GPU_POOL, timed
from semdedup_assets.assets.embed import embeddings
from semdedup_assets.core import storage as st
from semdedup_assets.core.catalog import refresh_catalog
from semdedup_assets.core.decontaminate import (CONTAMINATED_SCHEMA, ReferenceError, contamination_threshold,
                                                embed_reference, find_contaminated)
from semdedup_assets.core.encoders import l2_normalize, resolve_device
from semdedup_assets.core.tables import embedding_matrix, stored_dtype
from semdedup_assets.resources import SemDedupConfig


@dg.asset(
    deps=[dg.AssetDep(embeddings, partition_mapping=dg.AllPartitionMapping())],
    pool=GPU_POOL,
    op_tags=GPU_OP_TAGS,
    group_name="dedup",
    kinds={"pytorch", "parquet"},
)
def contaminated(context: dg.AssetExecutionContext, semdedup: SemDedupConfig) -> dg.MaterializeResult:
    """Items within 1 - eps of a reference item (the `reference` setting), with the reference id and score."""
    settings = semdedup.settings()
    storage = settings.storage_root()
    if not settings.reference:
        st.remove(storage.contaminated_file)  # no reference: nothing is contaminated
        refresh_catalog(storage)
        return dg.MaterializeResult(metadata={"reference": "none", "flagged": 0})
    files = registered_stage_files(context.instance, storage, st.EMBEDDINGS)

    def encode_images(items: list) -> tuple[np.ndarray, np.ndarray]:
        result = semdedup.encoder().encode_images(items)
        return result.vectors, result.ok_index

    def chunks():
        for key in sorted(files):
            table = st.read_table(files[key])
            x = embedding_matrix(table.column("embedding"))
            if stored_dtype(table.schema.field("embedding")) == "float16":
                x = l2_normalize(x)
            yield key, table.column("id").to_pylist(), x

    with timed() as t:
        try:
            reference = embed_reference(settings.reference, settings.modality, settings.payload_column,
                                        settings.id_column, None if settings.modality != "text" else
                                        semdedup.encoder().encode, encode_images)
            threshold = contamination_threshold(settings.eps)
            device = resolve_device(settings.device)
            writer = st.AtomicParquetWriter(storage.contaminated_file, CONTAMINATED_SCHEMA)
            scores: list[float] = []
            with st.publish_together([writer]):
                for table in find_contaminated(chunks(), reference, threshold, device=device):
                    writer.write(table)
                    scores += table.column("score").to_pylist()
        except ReferenceError as err:
            raise dg.Failure(description=str(err)) from None
    refresh_catalog(storage)
    s = np.asarray(scores, dtype=np.float64)
    meta: dict[str, object] = {"reference": settings.reference, "reference_items": int(len(reference.ids)),
                               "flagged": int(len(s)), "seconds": t["seconds"],
                               "path": dg.MetadataValue.path(str(storage.contaminated_file))}
    for eps in settings.eps:
        meta[f"contaminated@eps={st.format_eps(eps)}"] = int((s > 1.0 - eps).sum())
    return dg.MaterializeResult(metadata=meta)
