"""Arrow <-> numpy for embedding columns (zero-copy where Arrow allows); the schemas live in schemas.py."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from semdedup_assets.core.embed.encoders.base import l2_normalize
from semdedup_assets.core.io.schemas import embedding_type


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


def unit_embeddings(table: pa.Table, column: str = "embedding") -> np.ndarray:
    """A table's stored embeddings as unit-norm rows for cosine scores.

    float16 storage rounds every value, which moves norms by up to ~5e-4, so those rows
    are re-normalised in fp32; float32 rows are stored unit-norm and come back as they are.
    """
    x = embedding_matrix(table.column(column))
    return l2_normalize(x) if stored_dtype(table.schema.field(column)) == "float16" else x
