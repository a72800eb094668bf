"""Embed stage: `embeddings`, unit-norm float32 vectors per shard."""


import hashlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import dagster as dg
import numpy as np
import pyarrow as pa

from semdedup_assets.assets.common import GPU_OP_TAGS, GPU_POOL, SHARD_BACKFILL_POLICY, ProgressLog, run_metadata, run_partition_keys, timed
from semdedup_assets.assets.ingest import input_shards, raw_shards
from semdedup_assets.core import storage as st
from semdedup_assets.core.encoders import l2_normalize, row_norms
from semdedup_assets.core.shards import ShardFile, iter_embedding_chunks, read_images
from semdedup_assets.core.tables import embedding_array, embedding_field, embedding_matrix
from semdedup_assets.partitions import shard_partitions
from semdedup_assets.resources import SemDedupConfig

# Encode in chunks so progress shows in the run log and memory stays bounded.
ENCODE_CHUNK = 4096
UNIT_NORM_TOLERANCE = 1e-3
CACHE_KEY = st.EMBEDDING_CACHE_KEY


def renormalise(chunk: np.ndarray) -> tuple[np.ndarray, int]:
    """Unit-norm rows, and how many rows were off unit norm before."""
    norms = row_norms(chunk)
    return l2_normalize(chunk, norms), int((np.abs(norms - 1.0) > UNIT_NORM_TOLERANCE).sum())


@dataclass
class EmbedOutcome:
    """One shard's embedding result."""

    rows: int
    dim: int
    renormalised: int = 0
    rejected: list[tuple[str, str]] = field(default_factory=list)  # (id, reason)
    problems: list[str] = field(default_factory=list)


def _write_chunks(path: st.UPath, ids: pa.Array, chunks: Iterator[np.ndarray], cache_key: str,
                  dtype: str = "float32") -> EmbedOutcome:
    """Normalise and write embedding chunks as one Parquet file (streamed, atomic)."""
    writer: st.AtomicParquetWriter | None = None
    start, renormalised, dim, problems = 0, 0, 0, []
    with st.publish_together([]) as writers:
        for chunk in chunks:
            vectors, off = renormalise(chunk) if len(chunk) else (chunk, 0)
            renormalised += off
            dim = int(vectors.shape[1])
            problems += embedding_problems(vectors, len(chunk))
            schema = pa.schema([pa.field("id", ids.type), embedding_field("embedding", dim, dtype)])
            table = pa.Table.from_arrays([ids.slice(start, len(vectors)), embedding_array(vectors, dtype)], schema=schema)
            if writer is None:
                writer = st.AtomicParquetWriter(path, table.schema.with_metadata({CACHE_KEY: cache_key.encode()}))
                writers.append(writer)
            writer.write(table)
            start += len(vectors)
    if start != len(ids):
        problems.append(f"{start} embeddings for {len(ids)} ids")
    return EmbedOutcome(rows=start, dim=dim, renormalised=renormalised, problems=problems)


def embed_shard(raw: pa.Table, shard: ShardFile, semdedup: SemDedupConfig, out: st.UPath, cache_key: str,
                log: dg.DagsterLogManager | None = None) -> EmbedOutcome:
    """Embed one validated shard and write its embeddings file."""
    ids = raw.column("id").combine_chunks()
    column = semdedup.column or semdedup.modality
    if semdedup.modality == "embedding":  # bring your own: stream (npy is memory-mapped)
        return _write_chunks(out, ids, iter_embedding_chunks(shard, column), cache_key, semdedup.embedding_dtype)
    encoder = semdedup.encoder()
    if semdedup.modality == "text":
        texts = raw.column("text").to_pylist()

        def text_chunks() -> Iterator[np.ndarray]:
            for start in range(0, len(texts), ENCODE_CHUNK):
                yield encoder.encode(texts[start : start + ENCODE_CHUNK])
                if log is not None:
                    log.debug(f"encoded {min(start + ENCODE_CHUNK, len(texts))}/{len(texts)}")

        return _write_chunks(out, ids, text_chunks(), cache_key, semdedup.embedding_dtype)
    result = encoder.encode_images(read_images(shard, column))
    rejected = [(ids[i].as_py(), reason) for i, reason in result.rejected]
    if rejected and semdedup.strict:
        raise dg.Failure(description=f"shard {shard.key!r}, key {rejected[0][0]!r}: {rejected[0][1]} "
                         f"({len(rejected)} undecodable image(s); strict mode)", metadata={"shard": shard.key})
    outcome = _write_chunks(out, ids.take(pa.array(result.ok_index)), iter([result.vectors]), cache_key,
                             semdedup.embedding_dtype)
    outcome.rejected = rejected
    return outcome


def embedding_cache_key(raw_path: st.UPath, shard: ShardFile, semdedup: SemDedupConfig) -> str:
    """What an embeddings file depends on: the raw index's bytes, the input files and the encoder settings."""
    h = hashlib.blake2b(digest_size=16)
    with raw_path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    payload = shard.fingerprint() if semdedup.modality != "text" else ""  # text lives in the raw file itself
    h.update(repr((semdedup.modality, semdedup.column, semdedup.model, semdedup.pretrained, semdedup.pooling,
                   semdedup.max_length, payload, semdedup.embedding_dtype)).encode())
    return h.hexdigest()


def cached_key(path: st.UPath, warn: Callable[[str], None] | None = None) -> str | None:
    """The cache key stored in an existing embeddings file, if any (None when missing or damaged)."""
    schema = st.usable(path, st.read_schema, warn)
    if schema is None:
        return None
    return (schema.metadata or {}).get(CACHE_KEY, b"").decode() or None


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


@dg.asset(
    partitions_def=shard_partitions,
    deps=[raw_shards],
    backfill_policy=SHARD_BACKFILL_POLICY,
    pool=GPU_POOL,
    op_tags=GPU_OP_TAGS,
    group_name="embed",
    kinds={"pytorch", "parquet"},
    check_specs=[dg.AssetCheckSpec("embeddings_finite_unit_norm", asset="embeddings", blocking=True,
                                   description="Finite, unit-norm rows; row count equals the raw shard's.")],
)
def embeddings(context: dg.AssetExecutionContext, semdedup: SemDedupConfig) -> dg.MaterializeResult:
    """L2-normalised float32 embeddings per shard: id, embedding (FLOAT[d])."""
    storage = semdedup.storage_root()
    files = input_shards(semdedup)
    per_shard: list[dict[str, object]] = []
    problems: list[str] = []
    rejected_total = 0
    dim = 0
    with timed() as t:
        keys = run_partition_keys(context)
        progress = ProgressLog(context.log, len(keys))
        for key in keys:
            raw_path, out_path = storage.shard_file(st.RAW, key), storage.shard_file(st.EMBEDDINGS, key)
            rejected_path = storage.shard_file(st.REJECTED, key)
            if key not in files:
                raise dg.Failure(f"shard {key!r} no longer exists under {semdedup.input}")
            cache_key = embedding_cache_key(raw_path, files[key], semdedup)
            cached = cached_key(out_path, context.log.warning) == cache_key
            with timed() as te:
                # Same raw index, input files and encoder settings: the file is already right (unless damaged).
                cached = cached and (table := st.usable(out_path, lambda p: st.read_table(p, columns=["embedding"]),
                                                        context.log.warning)) is not None
                if cached:
                    vectors = embedding_matrix(table.column("embedding"))
                    n_rejected = st.parquet_num_rows(rejected_path) if rejected_path.exists() else 0
                    outcome = EmbedOutcome(rows=len(vectors), dim=int(vectors.shape[1]),
                                           problems=embedding_problems(vectors, len(vectors)))
                else:
                    raw = st.read_table(raw_path)
                    outcome = embed_shard(raw, files[key], semdedup, out_path, cache_key, context.log)
                    n_rejected = len(outcome.rejected)
                    if semdedup.modality == "image":
                        st.atomic_write_table(pa.table({
                            "id": pa.array([r[0] for r in outcome.rejected], pa.string()),
                            "shard": pa.array([key] * n_rejected, pa.string()),
                            "reason": pa.array([r[1] for r in outcome.rejected], pa.string())}), rejected_path)
            expected = st.parquet_num_rows(raw_path) - n_rejected
            if outcome.rows != expected:
                outcome.problems.append(f"{outcome.rows} rows, expected {expected} (raw rows minus rejected)")
            dim = outcome.dim
            rejected_total += n_rejected
            problems += [f"shard {key!r}: {p}" for p in outcome.problems]
            per_shard.append({"shard": key, "rows": outcome.rows, "seconds": te["seconds"], "cached": str(cached),
                              "items_per_second": round(outcome.rows / max(te["seconds"], 1e-9), 1),
                              "renormalised_rows": outcome.renormalised, "rejected": n_rejected})
            progress.step(f"embedded shard {key!r}: {outcome.rows} rows in {te['seconds']} s"
                             + (" (cached)" if cached else "") + (f", {n_rejected} rejected" if n_rejected else ""))
    rows = sum(int(r["rows"]) for r in per_shard)
    extra: dict[str, object] = {"rows": rows, "dim": dim, "seconds": t["seconds"], "rejected": rejected_total,
                                "renormalised_rows": sum(int(r["renormalised_rows"]) for r in per_shard),
                                "model": semdedup.model or "default", "modality": semdedup.modality}
    if len(per_shard) == 1:
        extra["path"] = dg.MetadataValue.path(str(storage.shard_file(st.EMBEDDINGS, per_shard[0]["shard"])))
    check = dg.AssetCheckResult(check_name="embeddings_finite_unit_norm", passed=not problems,
                                description="; ".join(problems[:10]) or None, metadata={"rows_checked": rows})
    return dg.MaterializeResult(metadata=run_metadata(per_shard, extra), check_results=[check])
