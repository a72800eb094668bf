"""Ingest: validate input shards and publish their raw index files, all of a batch or none."""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.parquet as pq

from semdedup_assets.core import storage as st
from semdedup_assets.core.export import CONTENT_KEY, FINGERPRINT_KEY
from semdedup_assets.core.catalog import duplicate_ids
from semdedup_assets.core.config import Settings
from semdedup_assets.core.shards import ShardError, ShardFile, keep_by_kind, read_shard

RAW_DIM_KEY = b"semdedup.dim"
RAW_KEEP_BY_KEY = st.RAW_KEEP_BY_KEY  # the embeddings cache ignores these columns (core/embed.py)
PREVIEW_ROWS = 3

DuplicateId = tuple[str, str, int, str, int]  # (id, shard, row, other shard, other row)


class DuplicateIdsError(ValueError):
    """An id appears in more than one place across the dataset."""

    def __init__(self, dups: list[DuplicateId]) -> None:
        super().__init__(duplicate_ids_message(dups))
        self.dups = dups
        self.shard, self.row = dups[0][3], dups[0][4]  # the later place of the first repeated id


@dataclass
class IngestedShard:
    """One published raw index file."""

    key: str
    path: str
    rows: int
    input: str
    fingerprint: str


@dataclass
class IngestResult:
    """What ingesting a batch of shards did; plain values only."""

    shards: list[IngestedShard]
    seconds: float
    preview: list[tuple[str, str]] = field(default_factory=list)  # (id, text) of the last shard's first rows


def duplicate_ids_message(dups: list[DuplicateId]) -> str:
    """Name both places of each repeated id."""
    return "ids must be unique across the dataset: " + "; ".join(
        f"id {i!r} is in shard {s1!r} row {r1} and in shard {s2!r} row {r2}" for i, s1, r1, s2, r2 in dups)


def check_dims(storage: st.Storage, dims: dict[str, int], keys: Sequence[str]) -> None:
    """Bring-your-own embeddings: every shard, new or already ingested, has one dimension."""
    known = dict(dims)
    for path in storage.stage_files(st.RAW):
        shard = storage.shard_of(st.RAW, path)
        if shard not in keys and (meta := st.read_schema(path).metadata) and RAW_DIM_KEY in meta:
            known[shard] = int(meta[RAW_DIM_KEY])
    if len(set(known.values())) > 1:
        first = min(known)
        other = next(k for k in sorted(known) if known[k] != known[first])
        raise ShardError(other, f"embedding dimension {known[other]} differs from shard {first!r} ({known[first]}); "
                                "every shard must have one dimension")


def check_keep_by_kinds(storage: st.Storage, kinds: dict[str, dict[str, str]], keys: Sequence[str]) -> None:
    """Every shard, new or already ingested, orders a keep-by column as the same kind (number or string)."""
    known = dict(kinds)
    names = {n for k in kinds.values() for n in k}
    for path in storage.stage_files(st.RAW):
        shard = storage.shard_of(st.RAW, path)
        if shard not in keys:
            schema = st.read_schema(path)
            known[shard] = {n: keep_by_kind(schema.field(n).type) for n in names if n in schema.names}
    for name in sorted(names):
        seen = {shard: k[name] for shard, k in sorted(known.items()) if k.get(name, "null") != "null"}
        if len(set(seen.values())) > 1:
            first = next(iter(seen))
            other = next(s for s in seen if seen[s] != seen[first])
            raise ShardError(other, f"keep-by column {name!r} holds {seen[other]}s here but {seen[first]}s in shard "
                                    f"{first!r}; a keep-by column must be of one kind in every shard")


def known_digest(storage: st.Storage, key: str, fingerprint: str) -> str | None:
    """The content digest in the shard's existing raw file, when its fingerprint is still `fingerprint`.

    A run does not read an unchanged input twice: the digest is computed when a shard is first
    ingested or its fingerprint changed (an edit that keeps both is for `verify --content`).
    """
    path = storage.shard_file(st.RAW, key)
    if not path.exists():
        return None
    try:
        meta = st.read_schema(path).metadata or {}
    except st.StageFileError:  # damaged: recomputed like the rest of the file
        return None
    if meta.get(FINGERPRINT_KEY, b"").decode() != fingerprint:
        return None
    return meta.get(CONTENT_KEY, b"").decode() or None


def ingest_shards(settings: Settings, shards: Sequence[ShardFile],
                  log: Callable[[str], None] | None = None) -> IngestResult:
    """Validate every shard, then publish `raw/<key>.parquet` for all of them together.

    Raises ShardError (naming the shard and row) or DuplicateIdsError; then nothing is
    published. `log` receives one line per validated shard.
    """
    storage = settings.storage_root()
    keys = [s.key for s in shards]
    pending: list[st.AtomicParquetWriter] = []
    dims: dict[str, int] = {}
    keep_by = tuple(name for name, _ in settings.keep_by_columns)
    kinds: dict[str, dict[str, str]] = {}
    done: list[IngestedShard] = []
    table: pa.Table | None = None
    start = time.perf_counter()
    # The batch's (id, shard, row) go to a scratch Parquet file shard by shard, not to a list in memory: the
    # cross-shard id check reads them back in DuckDB under its memory limit, so ingest stays O(shard).
    with tempfile.TemporaryDirectory(prefix="semdedup-ingest-ids-") as scratch, st.publish_together(pending):
        pending_path = os.path.join(scratch, "pending.parquet")
        pending_ids: pq.ParquetWriter | None = None
        try:
            for shard in shards:
                index = read_shard(shard, settings.modality, settings.payload_column, settings.id_column, keep_by)
                table = index.table.add_column(1, "shard",
                                               pa.array([shard.key] * index.table.num_rows, type=pa.string()))
                # The input as ingested: `semdedup export` refuses a shard that changed since, and
                # `verify --content` compares the input's bytes with the digest.
                fingerprint = shard.fingerprint()
                digest = known_digest(storage, shard.key, fingerprint) or shard.content_digest()
                schema_meta = {FINGERPRINT_KEY: fingerprint.encode(), CONTENT_KEY: digest.encode()}
                if index.dim is not None:
                    dims[shard.key] = index.dim
                    schema_meta[RAW_DIM_KEY] = str(index.dim).encode()
                if keep_by:  # only then: without --keep-by the raw file is byte for byte what it always was
                    schema_meta[RAW_KEEP_BY_KEY] = json.dumps(list(keep_by)).encode()
                    kinds[shard.key] = {n: keep_by_kind(table.schema.field(n).type) for n in keep_by}
                table = table.replace_schema_metadata(schema_meta)
                path = storage.shard_file(st.RAW, shard.key)
                writer = st.AtomicParquetWriter(path, table.schema)
                pending.append(writer)
                writer.write(table)
                ids = table.select(["id", "shard", "row"]).replace_schema_metadata(None)
                if pending_ids is None:
                    pending_ids = pq.ParquetWriter(pending_path, ids.schema)
                pending_ids.write_table(ids.cast(pending_ids.schema))
                done.append(IngestedShard(shard.key, str(path), table.num_rows, str(shard.path), shard.fingerprint()))
                if log is not None:
                    log(f"validated shard {shard.key!r}: {table.num_rows} rows")
        finally:
            if pending_ids is not None:
                pending_ids.close()
        check_dims(storage, dims, keys)
        check_keep_by_kinds(storage, kinds, keys)
        # The id check is the one O(N) aggregate of ingest: DuckDB gets a quarter of the budget, and spills beyond it.
        if pending_ids is not None and (dups := duplicate_ids(storage, pending_path, exclude_shards=keys,
                                                              memory_limit=settings.memory_budget_bytes // 4)):
            raise DuplicateIdsError(dups)
    preview = []
    if table is not None and settings.modality == "text":
        head = table.slice(0, PREVIEW_ROWS)
        preview = list(zip(head.column("id").to_pylist(), head.column("text").to_pylist()))
    return IngestResult(done, round(time.perf_counter() - start, 2), preview)
