"""Embedding one shard: cache check, encoding (or validating bring-your-own vectors), atomic write."""

from __future__ import annotations

import hashlib
import io
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from semdedup_assets.core.config import Settings
from semdedup_assets.core.embed.copies import collapse, encoder_settings, first_rows, provenance, stored_vectors
from semdedup_assets.core.embed.encoders import Encoder, batch_invariant, encoder_for, l2_normalize, row_norms
from semdedup_assets.core.io import recent
from semdedup_assets.core.io import storage as st
from semdedup_assets.core.io.schemas import REJECTED_SCHEMA, embeddings_schema
from semdedup_assets.core.io.shards import PAYLOAD_HASH, Shard, iter_embedding_chunks, members, read_images
from semdedup_assets.core.io.tables import embedding_array, embedding_matrix

# Encode in chunks so progress shows in the run log and memory stays bounded.
ENCODE_CHUNK = 4096
UNIT_NORM_TOLERANCE = 1e-3
CACHE_KEY = st.EMBEDDING_CACHE_KEY


class EmbedError(RuntimeError):
    """A shard that cannot be embedded (strict mode); the message names the shard and the item."""

    def __init__(self, message: str, shard: str) -> None:
        super().__init__(message)
        self.shard = shard


@dataclass
class EmbedShardResult:
    """What embedding one shard did; plain values only (it crosses process boundaries)."""

    key: str
    path: str
    rows: int
    dim: int
    renormalised: int = 0
    rejected: int = 0
    cached: bool = False
    seconds: float = 0.0
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)  # e.g. a damaged cached file that was recomputed
    encoded: int = 0  # items the encoder embedded (0 when cached or bring-your-own)
    copies: int = 0  # items that got the vector of an exact copy instead (this shard's or a stored one)


@dataclass
class _Written:
    """One written embeddings file."""

    rows: int
    dim: int
    renormalised: int
    problems: list[str]
    encoded: int = 0
    copies: int = 0


def renormalise(chunk: np.ndarray) -> tuple[np.ndarray, int]:
    """Unit-norm rows, and how many rows were off unit norm before."""
    norms = row_norms(chunk)
    return l2_normalize(chunk, norms), int((np.abs(norms - 1.0) > UNIT_NORM_TOLERANCE).sum())


def embedding_problems(vectors: np.ndarray, expected_rows: int) -> list[str]:
    """What is wrong with an embedding matrix (empty list when it is valid)."""
    problems = []
    if len(vectors) != expected_rows:
        problems.append(f"{len(vectors)} rows, expected {expected_rows} (the raw shard)")
    finite = np.isfinite(vectors).all(axis=1)
    if not finite.all():
        problems.append(f"{int((~finite).sum())} rows with non-finite values")
    norms = row_norms(vectors[finite])
    if len(norms) and np.abs(norms - 1.0).max() > UNIT_NORM_TOLERANCE:
        problems.append(f"norms deviate from 1 by up to {np.abs(norms - 1.0).max():.3g}")
    return problems


def embedding_cache_key(raw_path: st.UPath, shard: Shard, settings: Settings) -> str:
    """What an embeddings file depends on: the raw index's bytes, the input files and the encoder settings."""
    h = hashlib.blake2b(digest_size=16)
    for block in _index_bytes(raw_path):
        h.update(block)
    payload = shard.fingerprint() if settings.modality != "text" else ""  # text lives in the raw file itself
    *encoding, dtype = encoder_settings(settings)
    h.update(repr((*encoding, payload, dtype)).encode())  # the input between them: today's keys stay valid
    return h.hexdigest()


def _index_bytes(raw_path: st.UPath) -> Iterator[bytes]:
    """The raw file's bytes, as they would be without its keep-by columns.

    Ordering columns do not change an embedding: a raw file written with --keep-by is
    re-serialised without them (the same writer and options give the very bytes of a raw
    file ingested without --keep-by), so switching --keep-by on or off reuses the cache.
    """
    metadata = st.read_schema(raw_path).metadata or {}
    if st.RAW_KEEP_BY_KEY not in metadata:
        with raw_path.open("rb") as f:
            yield from iter(lambda: f.read(1 << 20), b"")
        return
    table = st.read_table(raw_path).drop_columns(json.loads(metadata[st.RAW_KEEP_BY_KEY]))
    table = table.replace_schema_metadata({k: v for k, v in metadata.items() if k != st.RAW_KEEP_BY_KEY})
    buf = io.BytesIO()
    with pq.ParquetWriter(buf, table.schema, **st.parquet_options(table.schema)) as writer:
        writer.write_table(table)
    yield buf.getvalue()


def cached_key(path: st.UPath, warn: Callable[[str], None] | None = None) -> str | None:
    """The cache key stored in an existing embeddings file, if any (None when missing or damaged)."""
    schema = st.usable(path, st.read_schema, warn)
    if schema is None:
        return None
    return (schema.metadata or {}).get(CACHE_KEY, b"").decode() or None


def _write_chunks(
    path: st.UPath,
    ids: pa.Array,
    chunks: Iterator[np.ndarray],
    cache_key: str,
    dtype: str = "float32",
    metadata: dict[bytes, bytes] | None = None,
    normalise: bool = True,
) -> _Written:
    """Normalise and write embedding chunks as one Parquet file (streamed, atomic).

    `normalise=False` writes rows that are already final (normalised and rounded to `dtype`:
    copied vectors, whose bits must not move).
    """
    writer: st.AtomicParquetWriter | None = None
    start, renormalised, dim, problems = 0, 0, 0, []
    # The float32 matrix as stored, kept for the run's later stages while recent.holding allows (core.io.recent).
    kept: list[np.ndarray] | None = [] if dtype == "float32" else None
    with st.publish_together([]) as writers:
        for chunk in chunks:
            vectors, off = renormalise(chunk) if len(chunk) and normalise else (chunk, 0)
            renormalised += off
            dim = int(vectors.shape[1])
            problems += embedding_problems(vectors, len(chunk))
            if kept is not None and len(vectors):
                kept.append(np.ascontiguousarray(vectors, dtype=np.float32))
                if not recent.accepting(sum(k.nbytes for k in kept)):
                    kept = None
            schema = embeddings_schema(ids.type, dim, dtype)
            table = pa.Table.from_arrays(
                [ids.slice(start, len(vectors)), embedding_array(vectors, dtype)], schema=schema
            )
            if writer is None:
                meta = {CACHE_KEY: cache_key.encode(), **(metadata or {})}
                writer = st.AtomicParquetWriter(path, table.schema.with_metadata(meta))
                writers.append(writer)
            writer.write(table)
            start += len(vectors)
    if start != len(ids):
        problems.append(f"{start} embeddings for {len(ids)} ids")
    if kept and sum(len(k) for k in kept) == start:
        recent.remember(path, kept[0] if len(kept) == 1 else np.concatenate(kept))
    return _Written(rows=start, dim=dim, renormalised=renormalised, problems=problems)


def empty_items(ids: list[str], texts: list[str] | None = None) -> list[tuple[int, str]]:
    """(row, reason) of items that carry nothing to compare: an empty id, or an empty or
    whitespace-only text (which the encoder would embed, so that `""` removed `"   "`)."""
    out = []
    for row, item_id in enumerate(ids):
        if not item_id.strip():
            out.append((row, f"empty id {item_id!r}" if item_id else "empty id"))
        elif texts is not None and not texts[row].strip():
            out.append((row, "whitespace-only text" if texts[row] else "empty text"))
    return out


def _refuse_in_strict_mode(
    settings: Settings, key: str, ids: pa.Array, rejected: list[tuple[int, str]], what: str
) -> None:
    if rejected and settings.strict:
        row, reason = rejected[0]
        raise EmbedError(
            f"shard {key!r}, key {ids[row].as_py()!r} (row {row}): {reason} ({len(rejected)} {what}; strict mode)",
            shard=key,
        )


def _refuse_cached_rejections(settings: Settings, key: str, raw_path: st.UPath, rejected_path: st.UPath) -> None:
    """Strict mode over a reused embeddings file: the rejections an earlier lenient run recorded fail the shard,
    as they would have failed it when embedded (strict is not in the cache key: it changes no embedding)."""
    if not settings.strict or not rejected_path.exists():
        return
    rejected = st.read_table(rejected_path, columns=["id", "reason"])
    if rejected.num_rows == 0:
        return
    first, reason = rejected.column("id")[0].as_py(), rejected.column("reason")[0].as_py()
    raw_ids = st.read_table(raw_path, columns=["id"]).column("id")
    row = pc.index(raw_ids, pa.scalar(first, raw_ids.type)).as_py()
    raise EmbedError(
        f"shard {key!r}, key {first!r} (row {row}): {reason} ({rejected.num_rows} rejected item(s) "
        "recorded when it was embedded; strict mode)",
        shard=key,
    )


def _write_rejected(
    path: st.UPath, files: pa.Array, ids: pa.Array, rejected: list[tuple[int, str]], always: bool
) -> None:
    """The shard's `rejected` file (id, shard: the item's input file key, reason); without rejections only where
    `always`, else removed."""
    if not rejected and not always:
        st.remove(path)  # left by an earlier run of other input
        return
    st.atomic_write_table(
        pa.table(
            {
                "id": [ids[i].as_py() for i, _ in rejected],
                "shard": [files[i].as_py() for i, _ in rejected],
                "reason": [r for _, r in rejected],
            },
            schema=REJECTED_SCHEMA,
        ),
        path,
    )


def file_segments(files: pa.Array) -> list[tuple[int, int]]:
    """The [start, end) row ranges of each input file in a raw index's `shard` column (one for a plain file).

    An encoder's batches never straddle two files: a group embeds each file exactly as one
    file per shard would (batch composition can move a transformer's last bits).
    """
    values = files.to_numpy(zero_copy_only=False)
    if len(values) == 0:
        return []
    starts = [0, *(np.flatnonzero(values[1:] != values[:-1]) + 1).tolist()]
    return list(zip(starts, [*starts[1:], len(values)]))


def _encode_images(encoder: Encoder, shard: Shard, column: str) -> tuple[np.ndarray, np.ndarray, list[tuple[int, str]]]:
    """(vectors, ok positions, rejected (position, reason)) of a shard's images, one file per call."""
    vectors, ok, rejected, offset = [], [], [], 0
    for member in members(shard):
        result = encoder.encode_images(read_images(member, column))
        vectors.append(result.vectors)
        ok.append(np.asarray(result.ok_index, dtype=np.int64) + offset)
        rejected += [(row + offset, reason) for row, reason in result.rejected]
        offset += len(result.ok_index) + len(result.rejected)
    if len(vectors) == 1:
        return vectors[0], np.asarray(result.ok_index), list(result.rejected)
    return np.concatenate(vectors), np.concatenate(ok), rejected


def _without_rows(chunks: Iterator[np.ndarray], drop: np.ndarray) -> Iterator[np.ndarray]:
    """Row chunks with the rows whose positions are in `drop` (sorted) left out."""
    start = 0
    for chunk in chunks:
        lo, hi = np.searchsorted(drop, [start, start + len(chunk)])
        yield np.delete(chunk, drop[lo:hi] - start, axis=0) if hi > lo else chunk
        start += len(chunk)


def _encode_once(
    settings: Settings,
    key: str,
    encoder: Encoder,
    ids: pa.Array,
    texts: list[str],
    hashes: pa.Array,
    out: st.UPath,
    cache_key: str,
    meta: dict[bytes, bytes],
    log: Callable[[str], None] | None,
) -> _Written:
    """Embed each distinct payload of the shard once (core/embed/copies.py) and write every row's vector.

    Vectors another shard stored for the same payload are copied; the rest are encoded once
    each, normalised and rounded to the stored dtype as `_write_chunks` would, then every row
    takes its payload's final bits. Memory: one vector per distinct payload of the shard.
    """
    dtype = settings.embedding_dtype
    collapsed = collapse(hashes)
    found, stored = stored_vectors(settings, key, collapsed.digests)
    todo = first_rows(collapsed, found)
    fresh: list[np.ndarray] = []
    renormalised = 0
    for start in range(0, len(todo), ENCODE_CHUNK):
        firsts = collapsed.first[todo[start : start + ENCODE_CHUNK]]
        vectors, off = renormalise(encoder.encode([texts[r] for r in firsts.tolist()]))
        # Rounded as the file will store them: a copy read back from any shard has these very bits.
        fresh.append(vectors.astype(dtype).astype(np.float32) if dtype != "float32" else vectors)
        renormalised += off
        if log is not None:
            log(f"encoded {min(start + ENCODE_CHUNK, len(todo))}/{len(todo)} distinct payloads of {len(texts)} items")
    dim = fresh[0].shape[1] if fresh else (stored.shape[1] if len(found) else encoder.dim)
    final = np.empty((len(collapsed.digests), dim), dtype=np.float32)
    if len(found):
        final[found] = stored
    if len(todo):
        final[todo] = np.concatenate(fresh)

    def rows() -> Iterator[np.ndarray]:
        for start in range(0, len(texts), ENCODE_CHUNK):
            yield final[collapsed.inverse[start : start + ENCODE_CHUNK]]

    written = _write_chunks(out, ids, rows(), cache_key, dtype, meta, normalise=False)
    written.renormalised, written.encoded, written.copies = renormalised, len(todo), len(texts) - len(todo)
    return written


def _encode_and_write(
    settings: Settings,
    key: str,
    shard: Shard,
    raw: pa.Table,
    out: st.UPath,
    rejected_path: st.UPath,
    cache_key: str,
    encoder: Encoder | None,
    log: Callable[[str], None] | None,
) -> tuple[_Written, int]:
    """Embed the raw shard into `out`; returns the written file and the number of rejected items."""
    ids = raw.column("id").combine_chunks()
    files = raw.column("shard").combine_chunks()
    column = settings.payload_column
    dtype = settings.embedding_dtype
    meta = provenance(settings, settings.storage_root().shard_file(st.RAW, key))
    texts = raw.column("text").to_pylist() if settings.modality == "text" else None
    empty = empty_items(ids.to_pylist(), texts)
    _refuse_in_strict_mode(settings, key, ids, empty, "empty item(s)")
    drop = np.array([row for row, _ in empty], dtype=np.int64)
    kept_ids = ids.filter(pa.array(~np.isin(np.arange(len(ids)), drop))) if len(drop) else ids
    if settings.modality == "embedding":  # bring your own: stream (npy is memory-mapped)
        written = _write_chunks(
            out, kept_ids, _without_rows(iter_embedding_chunks(shard, column), drop), cache_key, dtype, meta
        )
        _write_rejected(rejected_path, files, ids, empty, always=False)
        return written, len(empty)
    encoder = encoder or encoder_for(settings)
    if texts is not None:
        dropped = set(drop.tolist())
        kept_texts = [t for row, t in enumerate(texts) if row not in dropped] if dropped else texts
        kept_files = files.filter(pa.array(~np.isin(np.arange(len(ids)), drop))) if len(drop) else files
        hashes = raw.column(PAYLOAD_HASH).combine_chunks() if PAYLOAD_HASH in raw.column_names else None
        if settings.exact_copies and hashes is not None and batch_invariant(encoder):
            kept_hashes = hashes.filter(pa.array(~np.isin(np.arange(len(ids)), drop))) if len(drop) else hashes
            written = _encode_once(settings, key, encoder, kept_ids, kept_texts, kept_hashes, out, cache_key, meta, log)
            _write_rejected(rejected_path, files, ids, empty, always=False)
            return written, len(empty)

        def text_chunks() -> Iterator[np.ndarray]:
            for first, end in file_segments(kept_files):
                for start in range(first, end, ENCODE_CHUNK):
                    yield encoder.encode(kept_texts[start : min(start + ENCODE_CHUNK, end)])
                    if log is not None:
                        log(f"encoded {min(start + ENCODE_CHUNK, end)}/{len(kept_texts)}")

        written = _write_chunks(out, kept_ids, text_chunks(), cache_key, dtype, meta)
        written.encoded = len(kept_texts)
        _write_rejected(rejected_path, files, ids, empty, always=False)
        return written, len(empty)
    all_vectors, ok_index, undecodable = _encode_images(encoder, shard, column)
    _refuse_in_strict_mode(settings, key, ids, undecodable, "undecodable image(s)")
    empty_rows = set(drop.tolist())
    ok = [(pos, i) for pos, i in enumerate(ok_index) if i not in empty_rows]
    rejected = sorted([*undecodable, *empty], key=lambda r: r[0])
    vectors = all_vectors[[pos for pos, _ in ok]] if len(ok) != len(ok_index) else all_vectors
    written = _write_chunks(
        out, ids.take(pa.array([i for _, i in ok], pa.int64())), iter([vectors]), cache_key, dtype, meta
    )
    written.encoded = len(ok_index)
    _write_rejected(rejected_path, files, ids, rejected, always=True)
    return written, len(rejected)


def embed_shard(
    settings: Settings,
    key: str,
    shard: Shard,
    *,
    encoder: Encoder | None = None,
    log: Callable[[str], None] | None = None,
    warn: Callable[[str], None] | None = None,
) -> EmbedShardResult:
    """Embed one ingested shard into `embeddings/<key>.parquet` (and `rejected/<key>.parquet` for images,
    and for any shard with an empty id or an empty or whitespace-only text, see `empty_items`).

    An existing file written for the same raw index, input files and encoder settings is
    reused (and re-checked); a damaged one is recomputed, and `warn` names it. `encoder`
    defaults to `encoder_for(settings)`; `log` receives progress lines. Raises EmbedError
    on an item that would be rejected, in strict mode.
    """
    storage = settings.storage_root()
    raw_path, out = storage.shard_file(st.RAW, key), storage.shard_file(st.EMBEDDINGS, key)
    rejected_path = storage.shard_file(st.REJECTED, key)
    start = time.perf_counter()
    cache_key = embedding_cache_key(raw_path, shard, settings)
    # Same raw index, input files and encoder settings: the file is already right (unless damaged).
    warnings: list[str] = []

    def note(message: str) -> None:  # kept in the result too: a Ray worker has no driver logger
        warnings.append(message)
        if warn is not None:
            warn(message)

    table = (
        st.usable(out, lambda p: st.read_table(p, columns=["embedding"]), note)
        if cached_key(out, note) == cache_key
        else None
    )
    cached = table is not None
    if table is not None:
        _refuse_cached_rejections(settings, key, raw_path, rejected_path)
        vectors = embedding_matrix(table.column("embedding"))
        n_rejected = st.parquet_num_rows(rejected_path) if rejected_path.exists() else 0
        written = _Written(
            rows=len(vectors),
            dim=int(vectors.shape[1]),
            renormalised=0,
            problems=embedding_problems(vectors, len(vectors)),
        )
    else:
        written, n_rejected = _encode_and_write(
            settings, key, shard, st.read_table(raw_path), out, rejected_path, cache_key, encoder, log
        )
    expected = st.parquet_num_rows(raw_path) - n_rejected
    problems = list(written.problems)
    if written.rows != expected:
        problems.append(f"{written.rows} rows, expected {expected} (raw rows minus rejected)")
    return EmbedShardResult(
        key=key,
        path=str(out),
        rows=written.rows,
        dim=written.dim,
        renormalised=written.renormalised,
        rejected=n_rejected,
        cached=cached,
        seconds=round(time.perf_counter() - start, 2),
        problems=problems,
        warnings=warnings,
        encoded=written.encoded,
        copies=written.copies,
    )
