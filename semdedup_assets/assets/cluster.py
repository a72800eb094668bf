"""Cluster stage: `centroids` (spherical k-means on a sample) and `cluster_assignments`."""


import dagster as dg
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from semdedup_assets.assets.common import EAGER, GPU_OP_TAGS, GPU_POOL, SHARD_BACKFILL_POLICY, run_metadata, run_partition_keys, timed
from semdedup_assets.assets.embed import embeddings
from semdedup_assets.core import storage as st
from semdedup_assets.core.assign import assign, bucket_row_slices, touched_buckets
from semdedup_assets.core.kmeans import collect_sample, sample_target, train_spherical_kmeans
from semdedup_assets.core.tables import assignments_schema, embedding_array, embedding_field, embedding_matrix, stored_dtype
from semdedup_assets.partitions import SHARDS_PARTITIONS_NAME, shard_partitions
from semdedup_assets.resources import SemDedupConfig

BUCKETS_TOUCHED = "buckets_touched"


def registered_stage_files(instance: dg.DagsterInstance, storage: st.Storage, stage: str) -> dict[str, st.UPath]:
    """The stage files of every registered shard; fails naming shards that lack theirs."""
    keys = sorted(instance.get_dynamic_partitions(SHARDS_PARTITIONS_NAME))
    if not keys:
        raise dg.Failure("no shards are registered: run the shard sensor or `semdedup run` first")
    files = {k: storage.shard_file(stage, k) for k in keys}
    missing = [k for k, p in files.items() if not p.exists()]
    if missing:
        raise dg.Failure(f"{len(missing)} registered shard(s) have no {stage} yet (e.g. {missing[:5]}): "
                         f"materialize {stage} for them first")
    return files


def load_centroids(storage: st.Storage) -> np.ndarray:
    """The trained centroids as a (k, d) float32 matrix."""
    path = storage.centroids_file
    if not path.exists():
        raise dg.Failure("no centroids yet: materialize `centroids` first")
    table = st.read_table(path)
    return embedding_matrix(table.sort_by("cluster").column("centroid"))


@dg.asset(
    deps=[dg.AssetDep(embeddings, partition_mapping=dg.AllPartitionMapping())],
    pool=GPU_POOL,
    op_tags=GPU_OP_TAGS,
    group_name="cluster",
    kinds={"faiss", "parquet"},
)
def centroids(context: dg.AssetExecutionContext, semdedup: SemDedupConfig) -> dg.MaterializeResult:
    """Spherical k-means centroids, trained on a sample drawn shard by shard."""
    storage = semdedup.storage_root()
    settings = semdedup.settings()
    files = registered_stage_files(context.instance, storage, st.EMBEDDINGS)
    counts = {k: st.parquet_num_rows(p) for k, p in files.items()}
    total = sum(counts.values())
    k = settings.n_clusters(total)
    target = sample_target(k, settings.max_points_per_centroid)

    def read_rows(key: str, rows: np.ndarray) -> np.ndarray:
        table = st.read_table(files[key], columns=["embedding"])
        return embedding_matrix(table.take(pa.array(rows, type=pa.int64())).column("embedding"))

    with timed() as ts:
        sample = collect_sample(counts.items(), read_rows, target, settings.seed)
    context.log.info(f"training k={k} on a sample of {len(sample)} of {total} items")
    result = train_spherical_kmeans(sample, k, settings.kmeans_iterations, settings.seed, settings.max_points_per_centroid)
    dim = int(result.centroids.shape[1])
    table = pa.Table.from_arrays([pa.array(np.arange(k, dtype=np.int32)), embedding_array(result.centroids)],
                                 schema=pa.schema([pa.field("cluster", pa.int32()), embedding_field("centroid", dim)]))
    st.atomic_write_table(table, storage.centroids_file)
    return dg.MaterializeResult(metadata={
        "clusters": k, "dim": int(result.centroids.shape[1]), "items": total, "shards": len(files),
        "sample_rows": int(len(sample)), "train_rows": result.n_train, "objective": result.objective,
        "iterations": settings.kmeans_iterations, "seed": settings.seed, "gpu": result.gpu,
        "sample_seconds": ts["seconds"], "train_seconds": round(result.seconds, 3),
        "path": dg.MetadataValue.path(str(storage.centroids_file)),
    })


def assignment_problems(table: pa.Table, expected_rows: int, k: int) -> list[str]:
    """What is wrong with one shard's assignments (empty when every item is assigned once)."""
    problems = []
    if table.num_rows != expected_rows:
        problems.append(f"{table.num_rows} rows, expected {expected_rows}")
    if pc.count_distinct(table.column("id")).as_py() != table.num_rows:
        problems.append("an id is assigned more than once")
    clusters = table.column("cluster")
    if table.num_rows and (pc.min(clusters).as_py() < 0 or pc.max(clusters).as_py() >= k):
        problems.append(f"cluster outside [0, {k})")
    return problems


@dg.asset(
    partitions_def=shard_partitions,
    deps=[embeddings, centroids],
    backfill_policy=SHARD_BACKFILL_POLICY,
    automation_condition=EAGER,
    group_name="cluster",
    kinds={"faiss", "parquet"},
    check_specs=[dg.AssetCheckSpec("assigned_exactly_once", asset="cluster_assignments", blocking=True,
                                   description="Every item of the shard is assigned to exactly one cluster.")],
)
def cluster_assignments(context: dg.AssetExecutionContext, semdedup: SemDedupConfig) -> dg.MaterializeResult:
    """Each item's nearest centroid and cosine similarity to it, sorted by (cluster, id)."""
    storage = semdedup.storage_root()
    cents = load_centroids(storage)
    k = len(cents)
    per_shard: list[dict[str, object]] = []
    problems: list[str] = []
    buckets: set[str] = set()
    with timed() as t:
        for key in run_partition_keys(context):
            out = storage.shard_file(st.CLUSTER_ASSIGNMENTS, key)
            # A re-run: the buckets its items leave are touched too (a damaged old file is just replaced).
            old = st.usable(out, lambda p: st.read_table(p, columns=["cluster"]), context.log.warning)
            if old is not None and old.num_rows and (old := old.column("cluster").to_numpy()).max() < k:
                buckets |= touched_buckets(old, k, semdedup.buckets)
            emb = st.read_table(storage.shard_file(st.EMBEDDINGS, key))
            vectors = embedding_matrix(emb.column("embedding"))
            dtype = stored_dtype(emb.schema.field("embedding"))
            clusters, sims = assign(vectors, cents)
            table = pa.table({
                "id": emb.column("id"), "shard": pa.array([key] * emb.num_rows, type=pa.string()),
                "cluster": pa.array(clusters), "sim_to_centroid": pa.array(sims),
                "embedding": emb.column("embedding").cast(embedding_field("embedding", vectors.shape[1], dtype).type),
            }, schema=assignments_schema(vectors.shape[1], dtype))
            table = table.sort_by([("cluster", "ascending"), ("id", "ascending")])
            problems += [f"shard {key!r}: {p}" for p in assignment_problems(table, emb.num_rows, k)]
            # One row group per bucket: a bucket's read skips every other bucket's rows by footer stats.
            with st.publish_together([st.AtomicParquetWriter(out, table.schema)]) as (writer,):
                for offset, length in bucket_row_slices(table.column("cluster").to_numpy(), k, semdedup.buckets):
                    writer.write(table.slice(offset, length))
            buckets |= touched_buckets(clusters, k, semdedup.buckets)
            per_shard.append({"shard": key, "rows": emb.num_rows, "clusters_touched": int(len(np.unique(clusters))),
                              "mean_sim_to_centroid": round(float(sims.mean()), 4)})
    extra = {"rows": sum(int(r["rows"]) for r in per_shard), "clusters": k, "seconds": t["seconds"],
             # Read by the bucket sensor: only these semantic_duplicates partitions need a re-run.
             BUCKETS_TOUCHED: ",".join(sorted(buckets))}
    check = dg.AssetCheckResult(check_name="assigned_exactly_once", passed=not problems,
                                description="; ".join(problems[:10]) or None)
    return dg.MaterializeResult(metadata=run_metadata(per_shard, extra), check_results=[check])
