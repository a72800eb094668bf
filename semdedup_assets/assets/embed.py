"""Embed stage: `embeddings`, unit-norm float32 vectors per shard."""


import hashlib

import dagster as dg
import numpy as np
import pyarrow as pa

from semdedup_assets.assets.common import GPU_OP_TAGS, GPU_POOL, SHARD_BACKFILL_POLICY, run_metadata, run_partition_keys, timed
from semdedup_assets.assets.ingest import raw_shards
from semdedup_assets.core import storage as st
from semdedup_assets.core.encoders import l2_normalize
from semdedup_assets.core.tables import embedding_array, embedding_matrix
from semdedup_assets.partitions import shard_partitions
from semdedup_assets.resources import SemDedupConfig

# Encode in chunks so progress shows in the run log and memory stays bounded.
ENCODE_CHUNK = 4096
UNIT_NORM_TOLERANCE = 1e-3
CACHE_KEY = b"semdedup.cache_key"


def embed_table(raw: pa.Table, semdedup: SemDedupConfig, log: dg.DagsterLogManager | None = None) -> tuple[np.ndarray, int]:
    """Embeddings of one raw shard table, and how many rows had to be re-normalised."""
    if semdedup.modality == "embedding":
        vectors = embedding_matrix(raw.column("embedding"))
        norms = np.linalg.norm(vectors.astype(np.float64), axis=1)
        off = int((np.abs(norms - 1.0) > UNIT_NORM_TOLERANCE).sum())
        return l2_normalize(vectors), off
    encoder = semdedup.encoder()
    items = raw.column(semdedup.modality).to_pylist()
    parts = []
    for start in range(0, len(items), ENCODE_CHUNK):
        parts.append(encoder.encode(items[start : start + ENCODE_CHUNK]))
        if log is not None:
            log.debug(f"encoded {min(start + ENCODE_CHUNK, len(items))}/{len(items)}")
    return np.concatenate(parts), 0


def embedding_cache_key(raw_path: st.UPath, semdedup: SemDedupConfig) -> str:
    """What an embeddings file depends on: the raw shard's bytes and the encoder settings."""
    h = hashlib.blake2b(digest_size=16)
    with raw_path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    h.update(repr((semdedup.modality, semdedup.model, semdedup.pooling, semdedup.max_length)).encode())
    return h.hexdigest()


def cached_key(path: st.UPath) -> str | None:
    """The cache key stored in an existing embeddings file, if any."""
    if not path.exists():
        return None
    meta = st.read_schema(path).metadata or {}
    return meta.get(CACHE_KEY, b"").decode() or None


def embedding_problems(vectors: np.ndarray, expected_rows: int) -> list[str]:
    """What is wrong with an embedding matrix (empty list when it is valid)."""
    problems = []
    if len(vectors) != expected_rows:
        problems.append(f"{len(vectors)} rows, expected {expected_rows} (the raw shard)")
    finite = np.isfinite(vectors).all(axis=1)
    if not finite.all():
        problems.append(f"{int((~finite).sum())} rows with non-finite values")
    norms = np.linalg.norm(vectors[finite].astype(np.float64), axis=1)
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
    per_shard: list[dict[str, object]] = []
    problems: list[str] = []
    dim = 0
    with timed() as t:
        for key in run_partition_keys(context):
            raw_path, out_path = storage.shard_file(st.RAW, key), storage.shard_file(st.EMBEDDINGS, key)
            cache_key = embedding_cache_key(raw_path, semdedup)
            cached = cached_key(out_path) == cache_key
            with timed() as te:
                if cached:  # same raw bytes and encoder settings: the file is already right
                    table = st.read_table(out_path)
                    vectors, renormalised = embedding_matrix(table.column("embedding")), 0
                    expected = st.parquet_num_rows(raw_path)
                else:
                    raw = st.read_table(raw_path, columns=["id", semdedup.modality])
                    vectors, renormalised = embed_table(raw, semdedup, context.log)
                    expected = raw.num_rows
                    table = pa.table({"id": raw.column("id"), "embedding": embedding_array(vectors)})
                    table = table.replace_schema_metadata({CACHE_KEY: cache_key.encode()})
                    st.atomic_write_table(table, out_path)
            dim = int(vectors.shape[1])
            problems += [f"shard {key!r}: {p}" for p in embedding_problems(vectors, expected)]
            per_shard.append({"shard": key, "rows": expected, "seconds": te["seconds"], "cached": cached,
                              "items_per_second": round(expected / max(te["seconds"], 1e-9), 1),
                              "renormalised_rows": renormalised})
            context.log.info(f"embedded shard {key!r}: {expected} rows in {te['seconds']} s" + (" (cached)" if cached else ""))
    rows = sum(int(r["rows"]) for r in per_shard)
    extra: dict[str, object] = {"rows": rows, "dim": dim, "seconds": t["seconds"],
                                "model": semdedup.model or "default", "modality": semdedup.modality}
    if len(per_shard) == 1:
        extra["path"] = dg.MetadataValue.path(str(storage.shard_file(st.EMBEDDINGS, per_shard[0]["shard"])))
    check = dg.AssetCheckResult(check_name="embeddings_finite_unit_norm", passed=not problems,
                                description="; ".join(problems[:10]) or None, metadata={"rows_checked": rows})
    return dg.MaterializeResult(metadata=run_metadata(per_shard, extra), check_results=[check])
