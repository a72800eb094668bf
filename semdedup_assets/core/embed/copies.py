"""Exact copies embedded once: one vector per distinct payload, reused by every copy.

Ingest records a digest of each item's payload in the raw index (`payload_hash`,
core/io/shards.py). With `exact_copies` on and an encoder whose vectors do not depend on
the batch (`batch_invariant`), the embed stage of a shard

1. collapses the shard's items to their distinct digests;
2. looks the digests up in the embeddings other shards already wrote with the same encoder
   settings (in this run, or an earlier one): those vectors are copied bit for bit;
3. encodes the rest once each, and gives every copy the same bits.

Because the encoder is batch-invariant, the vector of a payload is the encoding of the
payload itself: whichever shard encodes it first, and whatever order or engine runs the
shards, every copy gets the bits that embedding it on its own would give. That is why the
keep-lists equal those of a run that embeds every copy (test_exact_copies).

Memory: the lookup runs in DuckDB under the storage's scan memory (it spills beyond it);
its answer holds at most one vector per distinct digest of the shard, and the shard's
digests are one shard's worth: never a set of every digest of the dataset.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from semdedup_assets.core.config import Settings
from semdedup_assets.core.io import storage as st
from semdedup_assets.core.io.catalog import scan_table, sql_quote
from semdedup_assets.core.io.shards import PAYLOAD_HASH
from semdedup_assets.core.io.tables import embedding_matrix

# Embeddings file metadata: what a later shard needs to trust a file's vectors for its copies.
ENCODER_KEY = b"semdedup.encoder"  # the encoder settings the vectors were made with
RAW_INPUT_KEY = b"semdedup.raw_input"  # which raw index they were made from (`raw_identity`)


def encoder_settings(settings: Settings) -> tuple[object, ...]:
    """Every setting that changes an embedding's bits, the stored dtype last (the embeddings cache key's parts)."""
    return (
        settings.modality,
        settings.column,
        settings.model,
        settings.pretrained,
        settings.pooling,
        settings.max_length,
        settings.embedding_dtype,
    )


def encoder_key(settings: Settings) -> str:
    """A digest of `encoder_settings`: the cache key less the shard's own input."""
    return hashlib.blake2b(repr(encoder_settings(settings)).encode(), digest_size=16).hexdigest()


def raw_identity(schema: pa.Schema, id_column: str) -> str:
    """What fixes a raw index's (id, payload digest) pairs: the content digest of its input and the id column.

    Not the raw file's own bytes or time: a run that ingests an unchanged input again rewrites the
    file with the same pairs, and its shard's vectors stay reusable. A raw index without a
    recorded digest has no identity (""): its vectors are not reused.
    """
    digest = (schema.metadata or {}).get(st.CONTENT_KEY, b"").decode()
    return f"{digest}|{id_column}" if digest else ""


def provenance(settings: Settings, raw_path: st.UPath) -> dict[bytes, bytes]:
    """The metadata an embeddings file records so other shards may reuse its vectors."""
    identity = raw_identity(st.read_schema(raw_path), settings.id_column)
    return {ENCODER_KEY: encoder_key(settings).encode(), RAW_INPUT_KEY: identity.encode()}


@dataclass
class Collapsed:
    """A shard's rows collapsed to distinct payloads: `first[u]` is the first row of payload u, `inverse[r]`
    the payload of row r (rows of the kept items, in order)."""

    digests: np.ndarray  # (U,) S16, sorted
    first: np.ndarray  # (U,) int64
    inverse: np.ndarray  # (n,) int64


def collapse(hashes: pa.Array) -> Collapsed:
    """Distinct digests of `hashes` (no nulls): O(shard) memory, in numpy."""
    raw = np.frombuffer(hashes.buffers()[1], dtype="S16", count=len(hashes) + hashes.offset)[hashes.offset :]
    digests, first, inverse = np.unique(raw, return_index=True, return_inverse=True)
    return Collapsed(digests, first.astype(np.int64), inverse.reshape(-1).astype(np.int64))


def reusable_files(settings: Settings, key: str) -> list[tuple[str, str]]:
    """(raw file, embeddings file) of every other shard whose vectors this run may copy.

    Only files written with the same encoder settings from the raw index now published (the
    same input, `raw_identity`), and only raw indexes that record payload digests. Two footer
    reads per shard.
    """
    storage = settings.storage_root()
    want = encoder_key(settings).encode()
    out = []
    for emb in storage.stage_files(st.EMBEDDINGS):
        other = storage.shard_of(st.EMBEDDINGS, emb)
        raw = storage.shard_file(st.RAW, other)
        if other == key or not raw.exists():
            continue
        try:
            meta = st.read_schema(emb).metadata or {}
            if meta.get(ENCODER_KEY) != want:
                continue
            raw_schema = st.read_schema(raw)
            identity = raw_identity(raw_schema, settings.id_column)
            if (
                PAYLOAD_HASH not in raw_schema.names
                or not identity
                or meta.get(RAW_INPUT_KEY, b"").decode() != identity
            ):
                continue
        except (st.StageFileError, OSError):  # damaged or gone meanwhile: not a source of vectors
            continue
        out.append((str(raw), str(emb)))
    return out


def stored_vectors(settings: Settings, key: str, digests: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The vectors other shards stored for any of `digests`: (positions in `digests` found, (m, d) float32).

    Every copy of a payload has the same bits (a batch-invariant encoder), so any stored one
    will do; the one of the smallest id is taken, so the answer never depends on file order.
    """
    files = reusable_files(settings, key) if len(digests) else []
    if not files:
        return np.empty(0, dtype=np.int64), np.empty((0, 0), dtype=np.float32)
    # From the buffer: numpy's tolist() would strip a digest's trailing zero bytes.
    h = pa.FixedSizeBinaryArray.from_buffers(pa.binary(16), len(digests), [None, pa.py_buffer(digests.tobytes())])
    wanted = pa.table({"h": h, "pos": np.arange(len(digests))})
    raws = ", ".join(sql_quote(r) for r, _ in files)
    embs = ", ".join(sql_quote(e) for _, e in files)
    found = scan_table(
        settings.storage_root(),
        # The smallest embedded id of each digest first (digests and ids only: a rejected item, say an empty
        # id, has none), then only those rows' vectors.
        f"SELECT m.pos, e.embedding FROM (SELECT w.pos, min(r.id) AS id FROM wanted w "
        f"JOIN read_parquet([{raws}], union_by_name=true) r ON r.{PAYLOAD_HASH} = w.h "
        f"SEMI JOIN (SELECT id FROM read_parquet([{embs}])) k ON k.id = r.id GROUP BY w.pos) m "
        f"JOIN read_parquet([{embs}]) e ON e.id = m.id ORDER BY m.pos",
        tables={"wanted": wanted},
    )
    if found.num_rows == 0:
        return np.empty(0, dtype=np.int64), np.empty((0, 0), dtype=np.float32)
    positions = found.column("pos").to_numpy().astype(np.int64)
    return positions, embedding_matrix(found.column("embedding"))


def first_rows(collapsed: Collapsed, found: Sequence[int] | np.ndarray) -> np.ndarray:
    """The first row of each distinct payload not in `found`, in row order: the rows to encode."""
    todo = np.ones(len(collapsed.digests), dtype=bool)
    todo[np.asarray(found, dtype=np.int64)] = False
    positions = np.flatnonzero(todo)
    return positions[np.argsort(collapsed.first[positions], kind="stable")]
