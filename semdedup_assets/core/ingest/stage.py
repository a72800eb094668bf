"""Ingest: validate input shards and publish their raw index files, all of a batch or none."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import pyarrow as pa

from semdedup_assets.core.config import Settings
from semdedup_assets.core.io import storage as st
from semdedup_assets.core.io.catalog import duplicate_ids
from semdedup_assets.core.io.shards import (
    Shard,
    ShardError,
    ShardFile,
    ShardIndex,
    group_digest,
    group_fingerprint,
    keep_by_kind,
    members,
    read_shard,
)

if TYPE_CHECKING:
    from semdedup_assets.core.run.engines import Worker

RAW_DIM_KEY = b"semdedup.dim"
RAW_KEEP_BY_KEY = st.RAW_KEEP_BY_KEY  # the embeddings cache ignores these columns (core/embed/shard.py)
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
    workers: dict[str, Worker] = field(default_factory=dict)  # where each shard was validated and staged


def duplicate_ids_message(dups: list[DuplicateId]) -> str:
    """Name both places of each repeated id."""
    return "ids must be unique across the dataset: " + "; ".join(
        f"id {i!r} is in shard {s1!r} row {r1} and in shard {s2!r} row {r2}" for i, s1, r1, s2, r2 in dups
    )


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
        raise ShardError(
            other,
            f"embedding dimension {known[other]} differs from shard {first!r} ({known[first]}); "
            "every shard must have one dimension",
        )


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
            raise ShardError(
                other,
                f"keep-by column {name!r} holds {seen[other]}s here but {seen[first]}s in shard "
                f"{first!r}; a keep-by column must be of one kind in every shard",
            )


def known_digest(storage: st.Storage, key: str, fingerprint: str) -> str | None:
    """The content digest in the shard's existing raw file, when its fingerprint is still `fingerprint`.

    An unchanged input keeps the digest recorded when it was first ingested (a BLAKE2b digest
    written before SHA-256 stays, and still verifies); a changed fingerprint records the digest of
    the bytes just read (an edit that keeps the fingerprint is for `verify --content`).
    """
    path = storage.shard_file(st.RAW, key)
    if not path.exists():
        return None
    try:
        meta = st.read_schema(path).metadata or {}
    except st.StageFileError:  # damaged: recomputed like the rest of the file
        return None
    if meta.get(st.FINGERPRINT_KEY, b"").decode() != fingerprint:
        return None
    return meta.get(st.CONTENT_KEY, b"").decode() or None


@dataclass
class StagedShard:
    """One validated shard whose raw index file is written but not yet published (plain values: it crosses
    processes)."""

    key: str
    staged_name: str  # the hidden sibling of `raw/<key>.parquet` that holds it until the batch is published
    rows: int
    input: str
    fingerprint: str
    dim: int | None
    kinds: dict[str, str]  # keep-by column -> "number" or "string"
    preview: list[tuple[str, str]]


@dataclass(frozen=True)
class MembersRead:
    """A shard's validated index with the fingerprint and content digest of the bytes that were read."""

    index: ShardIndex
    fingerprint: str  # what `shard.fingerprint()` gives
    digest: str  # what `shard.content_digest()` gives


def read_member(member: ShardFile, settings: Settings, keep_by: tuple[str, ...]) -> tuple[ShardIndex, str, str]:
    """One input file's (index, fingerprint, digest), opening it once (`ShardFile.read_once`; an .npy is memory-
    mapped and hashed apart, as before). O(file) memory: its bytes and its decoded table, released on return."""
    args = (settings.modality, settings.payload_column, settings.id_column, keep_by)
    if member.kind == "npy":
        return read_shard(member, *args), member.fingerprint(), member.content_digest()
    data, fingerprint, digest = member.read_once()
    return read_shard(member, *args, data=data), fingerprint, digest


def read_members(shard: Shard, settings: Settings, keep_by: tuple[str, ...]) -> MembersRead:
    """Validate every file of a shard and return one index: id, shard (the file's key), row (in that file), ...

    A group's files are read one by one, as one file per shard would read them (default ids
    `<file key>:<row>`, errors naming the file), then put one after the other; each file is
    opened once, for its index, fingerprint and digest together. Raises ShardError naming the
    file when one differs from the group's first in dimension or in the kind of a keep-by column.
    """
    tables, dims, fingerprints, digests = [], [], [], []
    for member in members(shard):
        index, fingerprint, digest = read_member(member, settings, keep_by)
        fingerprints.append((member.key, fingerprint))
        digests.append((member.key, digest))
        tables.append(
            index.table.add_column(1, "shard", pa.array([member.key] * index.table.num_rows, type=pa.string()))
        )
        dims.append(index.dim)
        first = tables[0].schema
        if dims[-1] != dims[0]:
            raise ShardError(
                member.key,
                f"embedding dimension {dims[-1]} differs from file {members(shard)[0].key!r} "
                f"({dims[0]}) of the same shard {shard.key!r}",
            )
        for name in keep_by:
            kinds = {keep_by_kind(first.field(name).type), keep_by_kind(tables[-1].schema.field(name).type)} - {"null"}
            if len(kinds) > 1:
                raise ShardError(
                    member.key,
                    f"keep-by column {name!r} holds {keep_by_kind(tables[-1].schema.field(name).type)}s "
                    f"here but {keep_by_kind(first.field(name).type)}s in file "
                    f"{members(shard)[0].key!r} of the same shard {shard.key!r}",
                )
    if isinstance(shard, ShardFile):
        return MembersRead(ShardIndex(tables[0], dims[0]), fingerprints[0][1], digests[0][1])
    return MembersRead(
        ShardIndex(pa.concat_tables(tables, promote_options="default"), dims[0]),
        group_fingerprint(fingerprints),
        group_digest(digests),
    )


def stage_shard(settings: Settings, shard: Shard) -> StagedShard:
    """Validate one shard and write its raw index beside `raw/<key>.parquet`, unpublished (O(shard) memory).

    Raises ShardError naming the shard (the file, in a group) and row. Any engine runs this: in
    the run's process or as a Ray task; `publish_shards` then checks the batch and publishes it.
    """
    storage = settings.storage_root()
    keep_by = tuple(name for name, _ in settings.keep_by_columns)
    read = read_members(shard, settings, keep_by)
    index, table, fingerprint = read.index, read.index.table, read.fingerprint
    # The input as ingested: `semdedup export` refuses a shard that changed since, and
    # `verify --content` compares the input's bytes with the digest. Both are of the bytes just
    # validated (one open per file); a digest already recorded for this fingerprint is kept
    # (one computed before SHA-256 stays what it was).
    digest = known_digest(storage, shard.key, fingerprint) or read.digest
    schema_meta = {st.FINGERPRINT_KEY: fingerprint.encode(), st.CONTENT_KEY: digest.encode()}
    if index.dim is not None:
        schema_meta[RAW_DIM_KEY] = str(index.dim).encode()
    kinds: dict[str, str] = {}
    if keep_by:  # only then: without --keep-by the raw file is byte for byte what it always was
        schema_meta[RAW_KEEP_BY_KEY] = json.dumps(list(keep_by)).encode()
        kinds = {n: keep_by_kind(table.schema.field(n).type) for n in keep_by}
    table = table.replace_schema_metadata(schema_meta)
    writer = st.AtomicParquetWriter(storage.shard_file(st.RAW, shard.key), table.schema)
    try:
        writer.write(table)
    except BaseException:
        writer.abort()
        raise
    staged = writer.stage()
    preview = []
    if settings.modality == "text":
        head = table.slice(0, PREVIEW_ROWS)
        preview = list(zip(head.column("id").to_pylist(), head.column("text").to_pylist()))
    return StagedShard(shard.key, staged.name, table.num_rows, str(shard.path), fingerprint, index.dim, kinds, preview)


def discard_staged(settings: Settings, keys: Sequence[str], staged: Sequence[StagedShard] = ()) -> None:
    """Delete the `staged` raw files and what a killed writer of these shards left; published files stay.

    A file another running command is staging for the same shards stays (`st.live_writer`): two
    runs on one storage must not delete each other's files.
    """
    storage = settings.storage_root()
    for s in staged:
        st.drop_staged(storage.shard_file(st.RAW, s.key).with_name(s.staged_name))
    st.remove_temporaries(storage.shard_file(st.RAW, key) for key in keys)


def publish_shards(
    settings: Settings, staged: Sequence[StagedShard], seconds: float = 0.0, workers: dict[str, Worker] | None = None
) -> IngestResult:
    """Check a batch of staged shards together and publish all of them, or none.

    Raises ShardError (a dimension or keep-by kind that differs from another shard's) or
    DuplicateIdsError; then every staged file is deleted and nothing is published.
    """
    start = time.perf_counter()
    storage = settings.storage_root()
    keys = [s.key for s in staged]
    paths = {s.key: storage.shard_file(st.RAW, s.key) for s in staged}
    files = {s.key: paths[s.key].with_name(s.staged_name) for s in staged}
    try:
        for key, f in list(files.items()):
            files[key] = st.track_staged(f)
        check_dims(storage, {s.key: s.dim for s in staged if s.dim is not None}, keys)
        check_keep_by_kinds(storage, {s.key: s.kinds for s in staged if s.kinds}, keys)
        # The id check is the one O(N) aggregate of ingest: DuckDB reads the staged files' (id, shard, row) under
        # the storage's scan memory (a quarter of the budget), and spills beyond it.
        if staged and (dups := duplicate_ids(storage, [str(f) for f in files.values()], exclude_shards=keys)):
            raise DuplicateIdsError(dups)
        for key in keys:
            st.publish_staged(files[key], paths[key])
    except BaseException:
        for f in files.values():
            st.drop_staged(f)
        discard_staged(settings, keys, staged)
        raise
    discard_staged(settings, keys)  # what a Ray task killed mid-write left before its retry staged the shard
    done = [IngestedShard(s.key, str(paths[s.key]), s.rows, s.input, s.fingerprint) for s in staged]
    preview = staged[-1].preview if staged else []
    return IngestResult(done, round(seconds + time.perf_counter() - start, 2), preview, dict(workers or {}))
