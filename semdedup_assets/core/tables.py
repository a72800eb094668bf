"""Arrow <-> numpy for embedding columns (zero-copy where Arrow allows) and stage schemas."""

from __future__ import annotations

import numpy as np
import pyarrow as pa


EMBEDDING_DTYPES: tuple[str, ...] = ("float32", "float16")
# Field metadata of a packed (fixed-size binary) embedding column: the element dtype.
PACKED_DTYPE_KEY = b"semdedup.packed_dtype"


def embedding_array(vectors: np.ndarray, dtype: str = "float32") -> pa.FixedSizeListArray:
    """An (n, d) matrix as a fixed-size-list Arrow array of float32 (FLOAT[d] in DuckDB) or float16."""
    if dtype not in EMBEDDING_DTYPES:
        raise ValueError(f"embedding dtype must be one of {', '.join(EMBEDDING_DTYPES)}, got {dtype!r}")
    x = np.ascontiguousarray(vectors, dtype=np.dtype(dtype))
    if x.ndim != 2:
        raise ValueError(f"expected an (n, d) matrix, got shape {x.shape}")
    return pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), x.shape[1])


def packed_embedding_field(name: str, dim: int, dtype: str) -> pa.Field:
    """A fixed-size binary field holding d little-endian floats per row (internal stage files only)."""
    return pa.field(name, pa.binary(dim * np.dtype(dtype).itemsize), metadata={PACKED_DTYPE_KEY: dtype.encode()})


def packed_embedding_array(vectors: np.ndarray, dtype: str) -> pa.FixedSizeBinaryArray:
    """An (n, d) matrix as fixed-size binary rows.

    Parquet stores a fixed-size list with a repetition level per float; one binary value
    per row reads and writes several times faster (see bench/results/end_to_end.md).
    """
    x = np.ascontiguousarray(vectors, dtype=np.dtype(dtype).newbyteorder("<"))
    if x.ndim != 2:
        raise ValueError(f"expected an (n, d) matrix, got shape {x.shape}")
    return pa.FixedSizeBinaryArray.from_buffers(pa.binary(x.shape[1] * x.itemsize), len(x), [None, pa.py_buffer(x.tobytes())])


def stored_dtype(field: pa.Field) -> str:
    """The element dtype ("float32" or "float16") of a stored embedding column."""
    if pa.types.is_fixed_size_binary(field.type):
        return (field.metadata or {}).get(PACKED_DTYPE_KEY, b"float32").decode()
    return "float16" if pa.types.is_float16(field.type.value_type) else "float32"


def table_embeddings(table: pa.Table, name: str = "embedding") -> np.ndarray:
    """A table's embedding column (fixed-size list, list, or packed binary) as an (n, d) float32 matrix."""
    field = table.schema.field(name)
    if not pa.types.is_fixed_size_binary(field.type):
        return embedding_matrix(table.column(name))
    dtype = np.dtype((field.metadata or {}).get(PACKED_DTYPE_KEY, b"float32").decode()).newbyteorder("<")
    column = table.column(name)
    column = column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
    width = field.type.byte_width
    flat = np.frombuffer(column.buffers()[1], dtype=dtype, count=len(column) * width // dtype.itemsize,
                         offset=column.offset * width)
    return flat.reshape(len(column), width // dtype.itemsize).astype(np.float32)


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
    """cluster_assignments files: one row per item, sorted by (cluster, id), embedding packed."""
    return pa.schema([
        ("id", pa.string()), ("shard", pa.string()), ("cluster", pa.int32()),
        ("sim_to_centroid", pa.float32()), packed_embedding_field("embedding", dim, dtype),
    ])


SEMANTIC_DUPLICATES_SCHEMA = pa.schema([
    ("id", pa.string()), ("shard", pa.string()), ("cluster", pa.int32()), ("rank", pa.int64()),
    ("sim_to_centroid", pa.float64()), ("max_sim", pa.float64()), ("duplicate_of", pa.string()),
])
