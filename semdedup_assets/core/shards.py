"""Input shards: discovery under an input location, shard keys, reading and validation.

A shard is one Parquet or JSON Lines file. Its key is its path relative to the input
location without the extension (`2024/part-03`). Reading a shard returns a normalised
table `id, row, <payload>`; anything wrong raises `ShardError` naming the shard and,
where known, the row.
"""

from __future__ import annotations

import gzip
import io
import json
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from upath import UPath

from semdedup_assets.core.storage import to_upath
from semdedup_assets.core.tables import embedding_array

SHARD_SUFFIXES = (".jsonl.gz", ".parquet", ".jsonl")


class ShardError(ValueError):
    """A shard that cannot be used, with the shard key and row where known."""

    def __init__(self, shard: str, message: str, row: int | None = None) -> None:
        self.shard = shard
        self.row = row
        self.reason = message
        where = f"shard {shard!r}" + (f", row {row}" if row is not None else "")
        super().__init__(f"{where}: {message}")


@dataclass(frozen=True)
class ShardFile:
    """One input file and its shard key."""

    key: str
    path: UPath

    def fingerprint(self) -> str:
        """Size plus modification time (or ETag): cheap change detection."""
        info = self.path.stat()
        size = getattr(info, "st_size", None)
        mtime = getattr(info, "st_mtime", None)
        if size is None and isinstance(info, dict):  # some fsspec backends
            size, mtime = info.get("size"), info.get("mtime") or info.get("ETag")
        return f"{size}:{mtime}"


def shard_suffix(name: str) -> str | None:
    """The recognised shard extension of a file name, or None."""
    for suffix in SHARD_SUFFIXES:
        if name.endswith(suffix):
            return suffix
    return None


def shard_key(path: UPath, root: UPath) -> str:
    """The key of a shard file: its path relative to the input root, without extension."""
    rel = str(path)[len(str(root).rstrip("/")) + 1 :]
    suffix = shard_suffix(rel)
    if suffix is None:
        raise ValueError(f"not a shard file: {path}")
    return rel[: -len(suffix)]


def discover_shards(location: str | UPath) -> list[ShardFile]:
    """Every shard file under the input location (or the one file it names), sorted by key."""
    root = to_upath(location)
    if root.is_file():
        suffix = shard_suffix(root.name)
        if suffix is None:
            raise ValueError(f"{root}: not a .parquet, .jsonl or .jsonl.gz file")
        return [ShardFile(root.name[: -len(suffix)], root)]
    if not root.exists():
        raise FileNotFoundError(f"input location does not exist: {root}")
    found: dict[str, ShardFile] = {}
    for path in root.rglob("*"):
        if path.name.startswith((".", "_")) or shard_suffix(path.name) is None or not path.is_file():
            continue
        key = shard_key(path, root)
        if key in found:
            raise ValueError(f"two files give shard key {key!r}: {found[key].path} and {path}")
        found[key] = ShardFile(key, path)
    return [found[k] for k in sorted(found)]


def _read_jsonl(shard: str, data: bytes) -> pa.Table:
    rows: list[dict] = []
    for lineno, line in enumerate(data.split(b"\n")):
        if not line.strip():
            continue
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ShardError(shard, f"line is not valid UTF-8 ({exc.reason} at byte {exc.start})", row=len(rows)) from None
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ShardError(shard, f"invalid JSON on line {lineno + 1}: {exc.msg}", row=len(rows)) from None
        if not isinstance(obj, dict):
            raise ShardError(shard, f"line {lineno + 1} is not a JSON object", row=len(rows))
        rows.append(obj)
    if not rows:
        return pa.table({})
    columns = sorted({k for r in rows for k in r})
    return pa.table({c: pa.array([r.get(c) for r in rows], from_pandas=True) if c != "embedding" else
                     pa.array([r.get(c) for r in rows], type=pa.list_(pa.float32())) for c in columns})


def read_raw_table(shard: ShardFile) -> pa.Table:
    """Read a shard file as an Arrow table, turning every decode failure into a ShardError."""
    name = shard.path.name
    try:
        with shard.path.open("rb") as f:
            data = f.read()
    except OSError as exc:
        raise ShardError(shard.key, f"cannot read file: {exc}") from None
    try:
        if name.endswith(".parquet"):
            return pq.read_table(io.BytesIO(data))
        if name.endswith(".gz"):
            data = gzip.decompress(data)
        return _read_jsonl(shard.key, data)
    except ShardError:
        raise
    except (pa.ArrowException, OSError, EOFError, ValueError) as exc:
        raise ShardError(shard.key, f"corrupt or unreadable {name}: {exc}") from None


def _first_bad_utf8(column: pa.ChunkedArray) -> int | None:
    offset = 0
    for chunk in column.chunks:
        try:
            chunk.validate(full=True)
        except pa.ArrowInvalid:
            for i, value in enumerate(chunk.cast(pa.binary()).to_pylist()):
                if value is not None:
                    try:
                        value.decode("utf-8")
                    except UnicodeDecodeError:
                        return offset + i
        offset += len(chunk)
    return None


def _validate_text(shard: str, column: str, values: pa.ChunkedArray) -> pa.Array:
    if pa.types.is_binary(values.type) or pa.types.is_large_binary(values.type):
        for i, v in enumerate(values.to_pylist()):
            if v is None:
                raise ShardError(shard, f"{column!r} is null", row=i)
            try:
                v.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise ShardError(shard, f"{column!r} is not valid UTF-8 ({exc.reason} at byte {exc.start})", row=i) from None
        values = values.cast(pa.string())
    elif pa.types.is_large_string(values.type):
        values = values.cast(pa.string())
    elif not pa.types.is_string(values.type):
        if values.null_count == len(values):
            raise ShardError(shard, f"{column!r} is null", row=0)
        bad = next((i for i, v in enumerate(values.to_pylist()) if not isinstance(v, str)), 0)
        raise ShardError(shard, f"{column!r} must be text, found {type(values[bad].as_py()).__name__} ({values.type})", row=bad)
    if values.null_count:
        raise ShardError(shard, f"{column!r} is null", row=int(np.flatnonzero(values.is_null().to_numpy(zero_copy_only=False))[0]))
    bad_row = _first_bad_utf8(values)
    if bad_row is not None:
        raise ShardError(shard, f"{column!r} is not valid UTF-8", row=bad_row)
    return values.combine_chunks()


def _validate_embedding(shard: str, column: str, values: pa.ChunkedArray) -> pa.Array:
    if not (pa.types.is_list(values.type) or pa.types.is_fixed_size_list(values.type) or pa.types.is_large_list(values.type)):
        raise ShardError(shard, f"{column!r} must be a list of floats, found {values.type}")
    if values.null_count:
        raise ShardError(shard, f"{column!r} is null", row=int(np.flatnonzero(values.is_null().to_numpy(zero_copy_only=False))[0]))
    lengths = pc.list_value_length(values).to_numpy(zero_copy_only=False)
    if len(lengths) and (lengths != lengths[0]).any():
        bad = int(np.flatnonzero(lengths != lengths[0])[0])
        raise ShardError(shard, f"{column!r} has dimension {lengths[bad]}, expected {lengths[0]} (row 0)", row=bad)
    dim = int(lengths[0]) if len(lengths) else 0
    if dim == 0:
        raise ShardError(shard, f"{column!r} has dimension 0")
    flat = pc.list_flatten(values).cast(pa.float32()).to_numpy(zero_copy_only=False).reshape(-1, dim)
    finite = np.isfinite(flat).all(axis=1)
    if not finite.all():
        raise ShardError(shard, f"{column!r} has a non-finite value", row=int(np.flatnonzero(~finite)[0]))
    return embedding_array(flat)


def read_shard(shard: ShardFile, modality: str, column: str, id_column: str = "id") -> pa.Table:
    """Read and validate one shard: returns `id` (str), `row` (int64) and the payload column."""
    if modality == "image":
        raise ShardError(shard.key, "the image modality is not available in this version")
    table = read_raw_table(shard)
    if table.num_rows == 0:
        raise ShardError(shard.key, "the shard is empty (no rows)")
    if column not in table.column_names:
        raise ShardError(shard.key, f"missing payload column {column!r} (columns: {', '.join(table.column_names) or 'none'})")
    n = table.num_rows
    if id_column in table.column_names:
        ids = table.column(id_column)
        if ids.null_count:
            raise ShardError(shard.key, f"id column {id_column!r} is null", row=int(np.flatnonzero(ids.is_null().to_numpy(zero_copy_only=False))[0]))
        ids = ids.cast(pa.string()).combine_chunks()
    else:
        ids = pa.array([f"{shard.key}:{i}" for i in range(n)], type=pa.string())
    counts = pc.value_counts(ids)
    if len(counts) != n:
        dup = counts.filter(pc.greater(counts.field("counts"), 1))[0]["values"].as_py()
        rows = np.flatnonzero(pc.equal(ids, dup).to_numpy(zero_copy_only=False))
        raise ShardError(shard.key, f"id {dup!r} appears twice, at rows {rows[0]} and {rows[1]}", row=int(rows[1]))
    values = table.column(column)
    payload = _validate_embedding(shard.key, column, values) if modality == "embedding" else _validate_text(shard.key, column, values)
    return pa.table({"id": ids, "row": pa.array(np.arange(n, dtype=np.int64)), modality: payload})
