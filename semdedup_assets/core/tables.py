"""Arrow <-> numpy for embedding columns (zero-copy where Arrow allows) and stage schemas."""

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


def embedding_array(vectors: np.ndarray, dtype: str = "float32") -> pa.FixedSizeListArray:
    """An (n, d) matrix as a fixed-size-list Arrow array of float32 (FLOAT[d] in DuckDB) or float16."""
    if np.ndim(vectors) != 2:
        raise ValueError(f"expected an (n, d) matrix, got shape {np.shape(vectors)}")
    type_ = embedding_type(np.shape(vectors)[1], dtype)
    x = np.ascontiguousarray(vectors, dtype=np.dtype(dtype))
    return pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), type=type_)


def stored_dtype(field: pa.Field) -> str:
    """The element dtype ("float32" or "float16") of a stored embedding column."""
    return "float16" if pa.types.is_float16(field.type.value_type) else "float32"


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


def assignments_schema(dim: int, dtype: str = "float32") -> pa.Schema:
    """cluster_assignments files: one row per item, sorted by (cluster, id)."""
    return pa.schema([
        ("id", pa.string()), ("shard", pa.string()), ("cluster", pa.int32()),
        ("sim_to_centroid", pa.float32()), embedding_field("embedding", dim, dtype),
    ])


SEMANTIC_DUPLICATES_SCHEMA = pa.schema([
    ("id", pa.string()), ("shard", pa.string()), ("cluster", pa.int32()), ("rank", pa.int64()),
    ("sim_to_centroid", pa.float64()), ("max_sim", pa.float64()), ("duplicate_of", pa.string()),
])
