"""Dedup stage: `semantic_duplicates` per cluster bucket, then `keep_lists` for every eps.

The work is core.dedup.dedup_bucket and core.keep.build_keep_lists; these assets read the
partition keys, call them and report metadata and checks.
"""


import dagster as dg
from dagster_ray import RayResource

from semdedup_assets.assets.cluster import registered_stage_files
from semdedup_assets.assets.common import (EAGER, GPU_OP_TAGS, GPU_POOL, ProgressLog, core_failures, metered, table_metadata,
                                           timed)
from semdedup_assets.core import storage as st
from semdedup_assets.core.boundary import boundary_markdown, boundary_pairs, image_thumbnails
from semdedup_assets.core.centroids import load_centroids
from semdedup_assets.core.config import Settings
from semdedup_assets.core.dedup import TOP_PAIRS, Pair
from semdedup_assets.core.encoders import resolve_device
from semdedup_assets.core.keep import MAX_SIM_BINS, NEAR_EXACT, build_keep_lists, payload_texts
from semdedup_assets.core.layout import bucket_files_on_disk, layout_problems, prune_buckets, prune_keep_lists
from semdedup_assets.core.plots import eps_curve_markdown, histogram_markdown
from semdedup_assets.partitions import bucket_partitions
from semdedup_assets.ray_resource import engine_for_step
from semdedup_assets.resources import SemDedupConfig


FILES_CHECK = "files_match_partitions"


def build_semantic_duplicates(settings: Settings) -> dg.AssetsDefinition:
    """The per-bucket pairwise asset for the settings' bucket count."""
    buckets = settings.buckets

    @dg.asset(
        name="semantic_duplicates",
        partitions_def=bucket_partitions(buckets),
        deps=[dg.AssetDep("cluster_assignments", partition_mapping=dg.AllPartitionMapping())],
        backfill_policy=dg.BackfillPolicy.multi_run(max_partitions_per_run=8),
        pool=GPU_POOL,
        op_tags=GPU_OP_TAGS,
        group_name="dedup",
        kinds={"pytorch", "parquet"},
        check_specs=[dg.AssetCheckSpec("bucket_items_exactly_once", asset="semantic_duplicates", blocking=True,
                                       description="Every assigned item of the bucket's clusters appears once.")],
    )
    @metered
    def semantic_duplicates(context: dg.AssetExecutionContext, semdedup: SemDedupConfig,
                            ray: RayResource) -> dg.MaterializeResult:
        """Per cluster bucket: max_sim (M) and duplicate_of for every member, in cluster order."""
        config = semdedup.settings()
        storage = semdedup.storage_root()
        if config.buckets != buckets:
            raise dg.Failure(f"the resource says {config.buckets} buckets but the partitions have {buckets}")
        with core_failures():
            k = len(load_centroids(storage))
        files = list(registered_stage_files(context.instance, storage, st.CLUSTER_ASSIGNMENTS).values())
        problems: list[str] = []
        rows_total, rechecked, bound = 0, 0, 0.0
        pairs: list[Pair] = []
        device = str(resolve_device(config.device))
        if config.precision != "fp32" and device == "cpu":
            context.log.warning(f"precision {config.precision} on a CPU: the tiles run slower than fp32 there")
        progress = ProgressLog(context.log, len(context.partition_keys), settings.progress_interval,
                               label="pairwise", unit="buckets")
        keys = sorted(context.partition_keys)
        results = {}
        with timed() as t:
            # The engine runs the buckets here or as Ray tasks; each writes its own file atomically.
            with core_failures(), engine_for_step(config, ray, context.log.info) as engine:
                for d in engine.dedup_buckets(config, keys, k, files):
                    results[d.unit] = r = d.result
                    progress.step(f"bucket {d.unit}: clusters [{r.first_cluster}, {r.end_cluster}), {r.rows} items, "
                                  f"{r.seconds} s" + (f" on {d.worker}" if engine.name != "local" else ""))
        for key in keys:
            r = results[key]
            problems += r.problems
            rows_total += r.rows
            rechecked += r.rechecked_rows
            bound = max(bound, r.error_bound)
            pairs += r.top_pairs
            # This bucket's own figures on its own event (a range run's metadata is copied onto every bucket).
            context.add_asset_metadata({
                "rows": r.rows, "clusters": f"[{r.first_cluster}, {r.end_cluster})",
                "non_empty_clusters": len(r.cluster_sizes), "largest_cluster": max(r.cluster_sizes, default=0),
                "pairwise_seconds": r.seconds, "reads": r.groups,
                "clusters_from_disk": ",".join(map(str, r.clusters_from_disk)) or "none",
                "path": dg.MetadataValue.path(r.path)}, partition_key=key)
        stale = prune_buckets(storage, buckets)  # results of an earlier, larger bucket count
        if stale:
            context.log.info(f"removed {len(stale)} bucket result(s) beyond the {buckets} buckets: {stale[:5]}")
        pairs = sorted(pairs, key=lambda x: (-x[0], x[1]))[:TOP_PAIRS]
        # Run totals (each bucket's own figures are partition-scoped above).
        meta: dict[str, object] = {"run_rows": rows_total, "buckets_in_run": len(context.partition_keys),
                                   "run_seconds": t["seconds"], "device": device, "keep": config.keep,
                                   "precision": config.precision, "probes": config.probes, "rechecked_rows": rechecked,
                                   "error_bound": bound, "engine": config.engine,
                                   "memory_budget_mib": round(config.memory_budget_bytes / 2**20, 1),
                                   "top_pairs": dg.MetadataValue.md(
                                       "\n".join(f"- {s:.5f}: `{a}` duplicates `{b}`" for s, a, b in pairs) or "none")}
        check = dg.AssetCheckResult(check_name="bucket_items_exactly_once", passed=not problems,
                                    description="; ".join(problems[:10]) or None)
        return dg.MaterializeResult(metadata=meta, check_results=[check])

    return semantic_duplicates


def text_cell(texts: dict[str, str], i: str) -> str:
    """An id and the start of its text, as one markdown table cell."""
    return f"`{i}` " + texts.get(i, "")[:300].replace("|", "\\|").replace("\n", " ")


def pairs_markdown(pairs: list[Pair], texts: dict[str, str]) -> str:
    """The most similar duplicate pairs as a side-by-side markdown table."""
    def cell(i: str) -> str:
        return text_cell(texts, i)

    lines = ["| max_sim | removed item | earlier member it duplicates |", "|---|---|---|"]
    lines += [f"| {s:.5f} | {cell(a)} | {cell(b)} |" for s, a, b in pairs]
    return "\n".join(lines)


def build_keep_lists_asset(settings: Settings) -> dg.AssetsDefinition:
    """The keep-lists asset, downstream of every bucket."""

    @dg.asset(
        name="keep_lists",
        deps=[dg.AssetDep("semantic_duplicates", partition_mapping=dg.AllPartitionMapping())],
        automation_condition=EAGER,
        group_name="dedup",
        kinds={"duckdb", "parquet"},
        check_specs=[
            dg.AssetCheckSpec("kept_fraction_monotone", asset="keep_lists", blocking=True,
                              description="Monotone in eps: as eps grows the threshold 1 - eps falls, so the kept fraction never rises."),
            dg.AssetCheckSpec("every_item_in_one_bucket", asset="keep_lists", blocking=True,
                              description="Every assigned item is in exactly one bucket result file on disk."),
            dg.AssetCheckSpec(FILES_CHECK, asset="keep_lists", blocking=True,
                              description="The files on disk are exactly those the registered shards, the bucket "
                              "partitions and the configured eps imply."),
        ],
    )
    @metered
    def keep_lists(context: dg.AssetExecutionContext, semdedup: SemDedupConfig) -> dg.MaterializeResult:
        """One keep-list per configured eps, the eps curve, and the catalog views."""
        storage = semdedup.storage_root()
        config = semdedup.settings()
        bucket_files = [storage.bucket_file(b) for b in bucket_partitions(config.buckets).get_partition_keys()]
        missing = [str(p) for p in bucket_files if not p.exists()]
        if missing:
            raise dg.Failure(f"{len(missing)} bucket result(s) missing (e.g. {missing[:3]}): materialize semantic_duplicates")
        assignment_files = registered_stage_files(context.instance, storage, st.CLUSTER_ASSIGNMENTS)
        assigned = sum(st.parquet_num_rows(p) for p in assignment_files.values())
        progress = ProgressLog(context.log, len(bucket_files), settings.progress_interval, label="keep-lists",
                               unit="buckets")
        r = build_keep_lists(config, bucket_files, log=progress.step)  # bucket order: byte-identical run to run
        fractions = [row["kept_fraction"] for row in r.eps_curve]
        monotone = all(a >= b for a, b in zip(fractions, fractions[1:]))
        stale = prune_keep_lists(storage, config.eps)  # eps no longer configured
        if stale:
            context.log.info(f"removed {len(stale)} keep-list(s) of eps no longer configured: {stale}")
        # Every bucket file on disk counts, not only the configured ones: a leftover file double-counts items.
        on_disk = sum(st.parquet_num_rows(p) for p in bucket_files_on_disk(storage).values())
        one_bucket = r.items == assigned and r.distinct_ids == assigned and on_disk == assigned
        layout = layout_problems(storage, list(assignment_files), config.buckets, config.eps)
        eps_table = table_metadata([{"eps": float(row["eps"]), "kept": int(row["kept"]), "removed": int(row["removed"]),
                                     "kept_fraction": float(row["kept_fraction"])} for row in r.eps_curve])
        meta = {
            "items": r.items, "clusters": len(r.cluster_sizes), "seconds": r.seconds, "eps_curve": eps_table,
            "eps_curve_plot": dg.MetadataValue.md(eps_curve_markdown([row["eps"] for row in r.eps_curve], fractions)),
            "cluster_sizes": dg.MetadataValue.md(histogram_markdown(r.cluster_sizes, "cluster sizes", "members")),
            "max_sim_histogram": dg.MetadataValue.md(histogram_markdown(
                r.max_sim_counts, "max_sim (non-first members)", "max_sim", edges=MAX_SIM_BINS)),
            "top_pairs": dg.MetadataValue.md(pairs_markdown(r.top_pairs, r.texts)),
            f"top_pairs_below_{NEAR_EXACT}": dg.MetadataValue.md(pairs_markdown(r.near_pairs, r.texts)),
            "catalog": dg.MetadataValue.path(str(storage.catalog_file)),
        }
        for row in r.eps_curve:
            meta[f"kept@eps={st.format_eps(row['eps'])}"] = int(row["kept"])
        meta.update(boundary_metadata(storage, config))
        checks = [
            dg.AssetCheckResult(check_name="kept_fraction_monotone", passed=monotone,
                                metadata={"kept_fraction": str([round(f, 6) for f in fractions])}),
            dg.AssetCheckResult(check_name="every_item_in_one_bucket", passed=one_bucket,
                                description=None if one_bucket else f"{on_disk} rows in the bucket files on disk, "
                                f"{r.distinct_ids} distinct ids, {assigned} assigned items",
                                metadata={"assigned": assigned, "bucket_rows": r.items, "distinct_ids": r.distinct_ids,
                                          "bucket_rows_on_disk": on_disk}),
            dg.AssetCheckResult(check_name=FILES_CHECK, passed=not layout, description="; ".join(layout) or None),
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
        texts = payload_texts(storage, ids, settings.modality)

        def cell(i: str) -> str:
            return text_cell(texts, i)
    return {f"pairs_at_eps={st.format_eps(eps)}": dg.MetadataValue.md(boundary_markdown(eps, *sides[eps], cell))
            for eps in settings.eps}
