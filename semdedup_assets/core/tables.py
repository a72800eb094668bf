"""Arrow <-> numpy for embedding columns (zero-copy where Arrow allows) and stage schemas."""

from __future__ import annotations

import numpy as np
import pyarrow as pa


def embedding_array(vectors: np.ndarray) -> pa.FixedSizeListArray:
    """An (n, d) float32 matrix as a fixed-size-list Arrow array (FLOAT[d] in DuckDB)."""
    x = np.ascontiguousarray(vectors, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"expected an (n, d) matrix, got shape {x.shape}")
    return pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1), type=pa.float32()), x.shape[1])


def embedding_matrix(column: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """A fixed-size-list (or list) float column as an (n, d) float32 matrix."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
    if len(column) == 0:
        d = column.type.list_size if pa.types.is_fixed_size_list(column.type) else 0
        return np.empty((0, d), dtype=np.float32)
    if pa.types.is_fixed_size_list(column.type):
        d = column.type.list_size
        flat = column.flatten()  # honours the array offset (slices)
    else:
        flat = column.flatten()
        d = len(flat) // len(column)
    values = flat.to_numpy(zero_copy_only=False)
    return values.astype(np.float32, copy=False).reshape(len(column), d)


def assignments_schema(dim: int) -> pa.Schema:
    """cluster_assignments files: one row per item, sorted by (cluster, id)."""
    return pa.schema([
        ("id", pa.string()), ("shard", pa.string()), ("cluster", pa.int32()),
        ("sim_to_centroid", pa.float32()), ("embedding", pa.list_(pa.float32(), dim)),
    ])


SEMANTIC_DUPLICATES_SCHEMA = pa.schema([
    ("id", pa.string()), ("shard", pa.string()), ("cluster", pa.int32()), ("rank", pa.int64()),
    ("sim_to_centroid", pa.float64()), ("max_sim", pa.float64()), ("duplicate_of", pa.string()),
])
