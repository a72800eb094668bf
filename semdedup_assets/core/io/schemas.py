"""The Arrow schemas of every stage's files, in one place.

The catalog's DuckDB views (catalog.py) select from these columns; a change here is a
change of the on-disk format, so the byte-identity tests guard it.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

EMBEDDING_DTYPES: tuple[str, ...] = ("float32", "float16")


def embedding_type(dim: int, dtype: str = "float32") -> pa.DataType:
    """FLOAT[d] with non-null elements.

    Parquet writes a definition level per float of a nullable list; without nulls the
    column reads about 6x and writes about 1.5x faster (bench/results/end_to_end.md).
    """
    if dtype not in EMBEDDING_DTYPES:
        raise ValueError(f"embedding dtype must be one of {', '.join(EMBEDDING_DTYPES)}, got {dtype!r}")
    return pa.list_(pa.field("element", pa.from_numpy_dtype(np.dtype(dtype)), nullable=False), dim)


def embedding_field(name: str, dim: int, dtype: str = "float32") -> pa.Field:
    """A non-null embedding column of the stage files."""
    return pa.field(name, embedding_type(dim, dtype), nullable=False)


def embeddings_schema(id_type: pa.DataType, dim: int, dtype: str = "float32") -> pa.Schema:
    """embeddings files: id (the raw index's type), embedding FLOAT[d]."""
    return pa.schema([pa.field("id", id_type), embedding_field("embedding", dim, dtype)])


# raw files: these columns, plus the payload for the text modality.
# The raw index's columns every storage has (+ the payload digest ingest records, core/ingest/stage.py; a text
# shard's text and --keep-by columns are added per storage): the `raw_items` view's typed placeholder.
RAW_INDEX_SCHEMA = pa.schema(
    [("id", pa.string()), ("shard", pa.string()), ("row", pa.int64()), ("payload_hash", pa.binary())]
)

REJECTED_SCHEMA = pa.schema([("id", pa.string()), ("shard", pa.string()), ("reason", pa.string())])


def centroids_schema(dim: int) -> pa.Schema:
    """The centroids file: cluster, centroid FLOAT[d]."""
    return pa.schema([pa.field("cluster", pa.int32()), embedding_field("centroid", dim)])


def assignments_schema(dim: int, dtype: str = "float32") -> pa.Schema:
    """cluster_assignments files: one row per item, sorted by (cluster, id)."""
    return pa.schema(
        [
            ("id", pa.string()),
            ("shard", pa.string()),
            ("cluster", pa.int32()),
            ("sim_to_centroid", pa.float32()),
            embedding_field("embedding", dim, dtype),
        ]
    )


SEMANTIC_DUPLICATES_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("shard", pa.string()),
        ("cluster", pa.int32()),
        ("rank", pa.int64()),
        ("sim_to_centroid", pa.float64()),
        ("max_sim", pa.float64()),
        ("duplicate_of", pa.string()),
    ]
)

KEEP_LIST_SCHEMA = pa.schema([("id", pa.string()), ("shard", pa.string()), ("cluster", pa.int32())])

EPS_CURVE_SCHEMA = pa.schema(
    [
        ("eps", pa.float64()),
        ("kept", pa.int64()),
        ("removed", pa.int64()),
        ("kept_fraction", pa.float64()),
    ]
)

# Duplicate groups (core/dedup/groups.py): one row per member of a connected component of two or more items;
# group_id is the id of the component's one kept item (its first member in the rule's order).
GROUPS_SCHEMA = pa.schema([("eps", pa.float64()), ("group_id", pa.string()), ("id", pa.string()), ("size", pa.int64())])

# `contaminated`: dataset items within 1 - max(eps) of a reference item (core/select/decontaminate.py).
CONTAMINATED_SCHEMA = pa.schema(
    [("id", pa.string()), ("shard", pa.string()), ("reference_id", pa.string()), ("score", pa.float64())]
)


# Pruning selections (core/select/prune.py): the kept items and the per-cluster budget of each.
KEPT_SCHEMA = pa.schema(
    [
        ("selection", pa.string()),
        ("id", pa.string()),
        ("shard", pa.string()),
        ("cluster", pa.int32()),
        ("sim_to_centroid", pa.float64()),
    ]
)
BUDGET_SCHEMA = pa.schema(
    [
        ("selection", pa.string()),
        ("cluster", pa.int32()),
        ("members", pa.int64()),
        ("kept", pa.int64()),
        ("d_intra", pa.float64()),
        ("d_inter", pa.float64()),
        ("complexity", pa.float64()),
        ("share", pa.float64()),
        ("target", pa.float64()),
    ]
)
# D4's per-bucket scores against the re-clustered centroids.
PRUNE_SCORES_SCHEMA = pa.schema(
    [("id", pa.string()), ("shard", pa.string()), ("cluster", pa.int32()), ("sim_to_centroid", pa.float64())]
)
# pruned/outliers:.../scores/bucket-*.parquet: each item's typicality (mean similarity to its K nearest in its cluster).
TYPICALITY_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("shard", pa.string()),
        ("cluster", pa.int32()),
        ("sim_to_centroid", pa.float64()),
        ("typicality", pa.float64()),
    ]
)
# Schema metadata of contaminated.parquet: the --reference it was computed against ("" for none),
# so an export never applies the results of another reference than the recorded settings name.
CONTAMINATED_REFERENCE_KEY = b"semdedup.reference"
