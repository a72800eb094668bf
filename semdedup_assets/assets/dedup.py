"""Dedup stage: `semantic_duplicates` per cluster bucket, then `keep_lists` for every eps."""


import heapq

import dagster as dg
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds

from semdedup_assets.assets.cluster import cluster_assignments, load_centroids, registered_stage_files
from semdedup_assets.assets.common import EAGER, GPU_OP_TAGS, GPU_POOL, ProgressLog, timed
from semdedup_assets.core import storage as st
from semdedup_assets.core.assign import bucket_cluster_range
from semdedup_assets.core.boundary import boundary_markdown, boundary_pairs, image_thumbnails
from semdedup_assets.core.config import Settings
from semdedup_assets.core.catalog import BUCKET_GLOB, refresh_catalog, scan, stage_source
from semdedup_assets.core.encoders import l2_normalize, resolve_device
from semdedup_assets.core.keep import EpsCurveAccumulator, keep_mask
from semdedup_assets.core.multiprobe import multiprobe_bucket
from semdedup_assets.core.pairwise import cluster_semantic_duplicates
from semdedup_assets.core.plots import eps_curve_markdown, histogram_markdown
from semdedup_assets.core.tables import SEMANTIC_DUPLICATES_SCHEMA, embedding_matrix, stored_dtype
from semdedup_assets.partitions import bucket_partitions
from semdedup_assets.resources import SemDedupConfig

TOP_PAIRS = 10
# Pairs below this are near-duplicates rather than exact copies (shown separately).
NEAR_EXACT = 0.9999
MAX_SIM_BINS = np.linspace(-1.0, 1.0, 81)


def read_bucket_rows(files: list[st.UPath], first: int, end: int, clusters: list[int] | None = None) -> pa.Table:
    """The assignments of clusters [first, end) (or of `clusters`) from every shard file (row groups skipped by stats)."""
    if not files:
        return pa.table({})
    local = st.is_local(files[0])
    dataset = ds.dataset([str(p) if local else p.path for p in files], format="parquet",
                         filesystem=None if local else files[0].fs)
    flt = (pc.field("cluster") >= first) & (pc.field("cluster") < end) if clusters is None else \
        pc.field("cluster").isin(clusters)
    table = dataset.to_table(filter=flt, columns=["id", "shard", "cluster", "sim_to_centroid", "embedding"])
    return table.sort_by([("cluster", "ascending"), ("id", "ascending")])


def dedup_bucket(table: pa.Table, strategy: str, seed: int, block_size: int, device: str, precision: str = "fp32",
                 thresholds: tuple[float, ...] = (), stats: dict[str, float] | None = None) -> tuple[pa.Table, list[int]]:
    """Run the pairwise rule on every cluster of a bucket; returns the result and cluster sizes.

    `stats`, if given, accumulates the low-precision kernel's re-checked rows and bound.
    """
    if table.num_rows == 0:
        return SEMANTIC_DUPLICATES_SCHEMA.empty_table(), []
    clusters = table.column("cluster").to_numpy()
    ids = np.asarray(table.column("id").to_pylist(), dtype=object)
    sims = table.column("sim_to_centroid").to_numpy()
    vectors = embedding_matrix(table.column("embedding"))
    if stored_dtype(table.schema.field("embedding")) == "float16":
        vectors = l2_normalize(vectors)  # rounding to float16 moved norms by up to ~5e-4: cosines need unit rows
    bounds = np.flatnonzero(np.diff(clusters)) + 1
    starts = np.concatenate([[0], bounds])
    ends = np.concatenate([bounds, [len(clusters)]])
    order_parts, rank_parts, max_parts, dup_parts = [], [], [], []
    for s, e in zip(starts, ends):
        r = cluster_semantic_duplicates(ids[s:e], vectors[s:e], sims[s:e], strategy, seed, block_size, device,
                                        precision, thresholds, stats)
        order_parts.append(r["order"] + s)
        rank_parts.append(r["rank"])
        max_parts.append(r["max_sim"])
        dup_parts.append(np.where(r["duplicate_of"] >= 0, r["duplicate_of"] + s, -1))
    order = np.concatenate(order_parts)
    dup = np.concatenate(dup_parts)
    dup_ids = pa.array([ids[i] if i >= 0 else None for i in dup], type=pa.string())
    result = pa.table({
        "id": pa.array(ids[order], type=pa.string()),
        "shard": table.column("shard").take(pa.array(order)),
        "cluster": pa.array(clusters[order], type=pa.int32()),
        "rank": pa.array(np.concatenate(rank_parts)),
        "sim_to_centroid": pa.array(sims[order].astype(np.float64)),
        "max_sim": pa.array(np.concatenate(max_parts)),
        "duplicate_of": dup_ids,
    }, schema=SEMANTIC_DUPLICATES_SCHEMA)
    return result, [int(e - s) for s, e in zip(starts, ends)]


def top_pairs(table: pa.Table, n: int = TOP_PAIRS, below: float | None = None) -> list[tuple[float, str, str]]:
    """The n most similar (max_sim, id, duplicate_of) pairs of a result table (max_sim < below, if given)."""
    dups = table.filter(pc.is_valid(table.column("duplicate_of")))
    if below is not None:
        dups = dups.filter(pc.less(dups.column("max_sim"), below))
    if dups.num_rows == 0:
        return []
    idx = pc.select_k_unstable(dups, n, [("max_sim", "descending")])
    dups = dups.take(idx)
    return sorted(zip(dups.column("max_sim").to_pylist(), dups.column("id").to_pylist(),
                      dups.column("duplicate_of").to_pylist()), key=lambda x: (-x[0], x[1]))


def build_semantic_duplicates(buckets: int) -> dg.AssetsDefinition:
    """The per-bucket pairwise asset for a given bucket count."""

    @dg.asset(
        name="semantic_duplicates",
        partitions_def=bucket_partitions(buckets),
        deps=[dg.AssetDep(cluster_assignments, partition_mapping=dg.AllPartitionMapping())],
        backfill_policy=dg.BackfillPolicy.multi_run(max_partitions_per_run=8),
        pool=GPU_POOL,
        op_tags=GPU_OP_TAGS,
        group_name="dedup",
        kinds={"pytorch", "parquet"},
        check_specs=[dg.AssetCheckSpec("bucket_items_exactly_once", asset="semantic_duplicates", blocking=True,
                                       description="Every assigned item of the bucket's clusters appears once.")],
    )
    def semantic_duplicates(context: dg.AssetExecutionContext, semdedup: SemDedupConfig) -> dg.MaterializeResult:
        """Per cluster bucket: max_sim (M) and duplicate_of for every member, in cluster order."""
        storage = semdedup.storage_root()
        cents = load_centroids(storage)
        k = len(cents)
        files = sorted(registered_stage_files(context.instance, storage, st.CLUSTER_ASSIGNMENTS).values(), key=str)
        device = str(resolve_device(semdedup.device))
        n_buckets = len(bucket_partitions(semdedup.buckets).get_partition_keys())
        if n_buckets != buckets:
            raise dg.Failure(f"the resource says {semdedup.buckets} buckets but the partitions have {buckets}")
        problems: list[str] = []
        summary: dict[str, object] = {}
        rows_total, pairs = 0, []
        kernel: dict[str, float] = {"rechecked_rows": 0, "error_bound": 0.0}
        thresholds = semdedup.settings().thresholds
        if semdedup.precision != "fp32" and device == "cpu":
            context.log.warning(f"precision {semdedup.precision} on a CPU: the tiles run slower than fp32 there")
        progress = ProgressLog(context.log, len(context.partition_keys))
        with timed() as t:
            for key in sorted(context.partition_keys):
                first, end = bucket_cluster_range(int(key), k, buckets)
                table = read_bucket_rows(files, first, end)
                with timed() as tp:
                    if semdedup.probes > 1:  # exact fp32 tiles over the probed clusters (core/multiprobe.py)
                        result, sizes = multiprobe_bucket(table, lambda cs: read_bucket_rows(files, 0, 0, cs), cents,
                                                          semdedup.probes, semdedup.keep, semdedup.seed,
                                                          semdedup.block_size, device)
                    else:
                        result, sizes = dedup_bucket(table, semdedup.keep, semdedup.seed, semdedup.block_size, device,
                                                     semdedup.precision, thresholds, kernel)
                if result.num_rows != table.num_rows or pc.count_distinct(result.column("id")).as_py() != result.num_rows:
                    problems.append(f"bucket {key}: {result.num_rows} result rows for {table.num_rows} assigned items")
                st.atomic_write_table(result, storage.bucket_file(key))
                rows_total += result.num_rows
                pairs += top_pairs(result)
                progress.step(f"bucket {key}: clusters [{first}, {end}), {result.num_rows} items, {tp['seconds']} s")
                summary = {"clusters": f"[{first}, {end})", "non_empty_clusters": len(sizes),
                           "largest_cluster": max(sizes, default=0), "pairwise_seconds": tp["seconds"],
                           "path": dg.MetadataValue.path(str(storage.bucket_file(key)))}
        pairs = sorted(pairs, key=lambda x: (-x[0], x[1]))[:TOP_PAIRS]
        meta: dict[str, object] = {"rows": rows_total, "seconds": t["seconds"], "device": device, "keep": semdedup.keep,
                                   "precision": semdedup.precision, "probes": semdedup.probes, "rechecked_rows": int(kernel["rechecked_rows"]),
                                   "error_bound": float(kernel["error_bound"]),
                                   "top_pairs": dg.MetadataValue.md(
                                       "\n".join(f"- {s:.5f}: `{a}` duplicates `{b}`" for s, a, b in pairs) or "none")}
        if len(context.partition_keys) == 1:
            meta.update(summary)
        check = dg.AssetCheckResult(check_name="bucket_items_exactly_once", passed=not problems,
                                    description="; ".join(problems[:10]) or None)
        return dg.MaterializeResult(metadata=meta, check_results=[check])

    return semantic_duplicates


def _texts(storage: st.Storage, ids: list[str], modality: str) -> dict[str, str]:
    """Payload text of a few ids, for showing duplicate pairs side by side."""
    if modality != "text" or not ids or not storage.stage_files(st.RAW):
        return {}
    return dict(scan(storage, f"SELECT id, text FROM {stage_source(storage, st.RAW)} WHERE id IN (SELECT unnest(?))", [ids]))


def text_cell(texts: dict[str, str], i: str) -> str:
    """An id and the start of its text, as one markdown table cell."""
    return f"`{i}` " + texts.get(i, "")[:300].replace("|", "\\|").replace("\n", " ")


def pairs_markdown(pairs: list[tuple[float, str, str]], texts: dict[str, str]) -> str:
    """The most similar duplicate pairs as a side-by-side markdown table."""
    def cell(i: str) -> str:
        return text_cell(texts, i)

    lines = ["| max_sim | removed item | earlier member it duplicates |", "|---|---|---|"]
    lines += [f"| {s:.5f} | {cell(a)} | {cell(b)} |" for s, a, b in pairs]
    return "\n".join(lines)


def build_keep_lists(semantic_duplicates: dg.AssetsDefinition) -> dg.AssetsDefinition:
    """The keep-lists asset, downstream of every bucket."""

    @dg.asset(
        deps=[dg.AssetDep(semantic_duplicates, partition_mapping=dg.AllPartitionMapping())],
        automation_condition=EAGER,
        group_name="dedup",
        kinds={"duckdb", "parquet"},
        check_specs=[
            dg.AssetCheckSpec("kept_fraction_monotone", asset="keep_lists", blocking=True,
                              description="Monotone in eps: as eps grows the threshold 1 - eps falls, so the kept fraction never rises."),
            dg.AssetCheckSpec("every_item_in_one_bucket", asset="keep_lists", blocking=True,
                              description="Every assigned item is in exactly one bucket result."),
        ],
    )
    def keep_lists(context: dg.AssetExecutionContext, semdedup: SemDedupConfig) -> dg.MaterializeResult:
        """One keep-list per configured eps, the eps curve, and the catalog views."""
        storage = semdedup.storage_root()
        settings = semdedup.settings()
        bucket_files = [storage.bucket_file(b) for b in bucket_partitions(settings.buckets).get_partition_keys()]
        missing = [str(p) for p in bucket_files if not p.exists()]
        if missing:
            raise dg.Failure(f"{len(missing)} bucket result(s) missing (e.g. {missing[:3]}): materialize semantic_duplicates")
        assigned = sum(st.parquet_num_rows(p) for p in registered_stage_files(
            context.instance, storage, st.CLUSTER_ASSIGNMENTS).values())
        curve = EpsCurveAccumulator(settings.eps)
        keep_schema = pa.schema([("id", pa.string()), ("shard", pa.string()), ("cluster", pa.int32())])
        writers = [st.AtomicParquetWriter(storage.keep_list_file(e), keep_schema) for e in settings.eps]
        pairs: list[tuple[float, str, str]] = []
        near_pairs: list[tuple[float, str, str]] = []
        max_sim_counts = np.zeros(len(MAX_SIM_BINS) - 1, dtype=np.int64)  # streamed: no per-item array
        with st.publish_together(writers), timed() as t:
            for path in bucket_files:  # bucket order: the keep-lists are byte-identical run to run
                table = st.read_table(path)
                max_sim = table.column("max_sim").to_numpy()
                curve.update(max_sim)
                max_sim_counts += np.histogram(max_sim[table.column("rank").to_numpy() > 0], bins=MAX_SIM_BINS)[0]
                for eps, writer in zip(settings.eps, writers):
                    writer.write(table.filter(pa.array(keep_mask(max_sim, eps))).select(["id", "shard", "cluster"]))
                pairs = heapq.nsmallest(TOP_PAIRS, pairs + top_pairs(table), key=lambda x: (-x[0], x[1]))
                near_pairs = heapq.nsmallest(TOP_PAIRS, near_pairs + top_pairs(table, below=NEAR_EXACT),
                                             key=lambda x: (-x[0], x[1]))
        rows = curve.rows()
        st.atomic_write_table(pa.Table.from_pylist(rows, schema=pa.schema([
            ("eps", pa.float64()), ("kept", pa.int64()), ("removed", pa.int64()), ("kept_fraction", pa.float64())])),
            storage.eps_curve_file)
        refresh_catalog(storage)

        fractions = [r["kept_fraction"] for r in rows]
        monotone = all(a >= b for a, b in zip(fractions, fractions[1:]))
        distinct = _distinct_ids(storage)
        one_bucket = curve.total == assigned and distinct == assigned
        sizes = _cluster_sizes(storage)
        texts = _texts(storage, sorted({i for _, a, b in pairs + near_pairs for i in (a, b)}), semdedup.modality)
        eps_table = dg.MetadataValue.table(
            records=[dg.TableRecord({k: (float(v) if isinstance(v, float) else int(v)) for k, v in r.items()}) for r in rows],
            schema=dg.TableSchema(columns=[dg.TableColumn("eps", "float"), dg.TableColumn("kept", "int"),
                                           dg.TableColumn("removed", "int"), dg.TableColumn("kept_fraction", "float")]))
        meta = {
            "items": curve.total, "clusters": len(sizes), "seconds": t["seconds"], "eps_curve": eps_table,
            "eps_curve_plot": dg.MetadataValue.md(eps_curve_markdown([r["eps"] for r in rows], fractions)),
            "cluster_sizes": dg.MetadataValue.md(histogram_markdown(np.asarray(sizes), "cluster sizes", "members")),
            "max_sim_histogram": dg.MetadataValue.md(histogram_markdown(
                max_sim_counts, "max_sim (non-first members)", "max_sim", edges=MAX_SIM_BINS)),
            "top_pairs": dg.MetadataValue.md(pairs_markdown(pairs, texts)),
            f"top_pairs_below_{NEAR_EXACT}": dg.MetadataValue.md(pairs_markdown(near_pairs, texts)),
            "catalog": dg.MetadataValue.path(str(storage.catalog_file)),
        }
        for r in rows:
            meta[f"kept@eps={st.format_eps(r['eps'])}"] = int(r["kept"])
        meta.update(boundary_metadata(storage, settings))
        checks = [
            dg.AssetCheckResult(check_name="kept_fraction_monotone", passed=monotone,
                                metadata={"kept_fraction": str([round(f, 6) for f in fractions])}),
            dg.AssetCheckResult(check_name="every_item_in_one_bucket", passed=one_bucket,
                                metadata={"assigned": assigned, "bucket_rows": curve.total, "distinct_ids": distinct}),
        ]
        return dg.MaterializeResult(metadata=meta, check_results=checks)

    return keep_lists


def boundary_metadata(storage: st.Storage, settings: Settings) -> dict[str, dg.MetadataValue]:
    """Per configured eps, the pairs just above and just below 1 - eps, with text or thumbnails (core/boundary.py)."""
    sides = {eps: boundary_pairs(storage, eps) for eps in settings.eps}
    ids = sorted({i for above, below in sides.values() for _, a, b in above + below for i in (a, b)})
    if settings.modality == "image" and settings.input:
        thumbs = image_thumbnails(storage, settings.input, ids, settings.payload_column)

        def cell(i: str) -> str:
            return f"`{i}` ![{i}]({thumbs[i]})" if i in thumbs else f"`{i}`"
    else:
        texts = _texts(storage, ids, settings.modality)

        def cell(i: str) -> str:
            return text_cell(texts, i)
    return {f"pairs_at_eps={st.format_eps(eps)}": dg.MetadataValue.md(boundary_markdown(eps, *sides[eps], cell))
            for eps in settings.eps}


def _distinct_ids(storage: st.Storage) -> int:
    return int(scan(storage, f"SELECT count(DISTINCT id) FROM {stage_source(storage, st.SEMANTIC_DUPLICATES, BUCKET_GLOB)}")[0][0])


def _cluster_sizes(storage: st.Storage) -> list[int]:
    sql = f"SELECT count(*) FROM {stage_source(storage, st.SEMANTIC_DUPLICATES, BUCKET_GLOB)} GROUP BY cluster ORDER BY cluster"
    return [int(r[0]) for r in scan(storage, sql)]
