"""Dedup stage: `semantic_duplicates` per cluster bucket, then `keep_lists` for every eps.

The work is core.dedup.buckets.dedup_bucket and core.dedup.keep.build_keep_lists, run by the engine (here or on Ray);
these assets read the partition keys, hand them to it and report metadata and checks.
"""

from collections.abc import Callable

import dagster as dg
from dagster_ray import RayResource

from semdedup_assets.assets.cluster import registered_stage_files
from semdedup_assets.assets.common import (
    EAGER,
    GPU_OP_TAGS,
    ProgressLog,
    add_partition_metadata,
    beta_parameters,
    core_failures,
    metered,
    settings_resource,
    table_metadata,
    timed,
    worker_resources,
)
from semdedup_assets.core.checks.layout import bucket_files_on_disk, layout_problems, prune_buckets, prune_keep_lists
from semdedup_assets.core.cluster.centroids import load_centroids
from semdedup_assets.core.config import Settings
from semdedup_assets.core.dedup.boundary import boundary_markdown, boundary_pairs, image_thumbnails
from semdedup_assets.core.dedup.buckets import TOP_PAIRS, DedupBucketResult, Pair
from semdedup_assets.core.dedup.groups import group_counts, top_groups
from semdedup_assets.core.dedup.keep import MAX_SIM_BINS, NEAR_EXACT, KeepListsResult, payload_texts
from semdedup_assets.core.embed.encoders import resolve_device
from semdedup_assets.core.io import storage as st
from semdedup_assets.core.plots import eps_curve_markdown, histogram_markdown
from semdedup_assets.core.run.engines import Worker
from semdedup_assets.names import GraphNames
from semdedup_assets.partitions import bucket_partitions
from semdedup_assets.ray_resource import engine_for_step

FILES_CHECK = "files_match_partitions"


def build_semantic_duplicates(names: GraphNames, buckets: int) -> dg.AssetsDefinition:
    """The per-bucket pairwise asset (static: its names and the bucket count, its partitions)."""

    with beta_parameters():
        decorator = dg.asset(
            key=names.key("semantic_duplicates"),
            partitions_def=bucket_partitions(buckets),
            deps=[dg.AssetDep(names.key("cluster_assignments"), partition_mapping=dg.AllPartitionMapping())],
            backfill_policy=dg.BackfillPolicy.multi_run(max_partitions_per_run=8),
            pool=names.pool,
            op_tags=GPU_OP_TAGS,
            required_resource_keys={names.resource, names.ray_resource},
            group_name=names.definition("dedup"),
            kinds={"pytorch", "parquet"},
            check_specs=[
                dg.AssetCheckSpec(
                    "bucket_items_exactly_once",
                    asset=names.key("semantic_duplicates"),
                    blocking=True,
                    description="Every assigned item of the bucket's clusters appears once.",
                )
            ],
        )

    @decorator
    @metered
    def semantic_duplicates(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
        """Per cluster bucket: max_sim (M) and duplicate_of for every member, in cluster order."""
        semdedup = settings_resource(context, names)
        ray: RayResource = getattr(context.resources, names.ray_resource)
        settings = semdedup.settings()
        storage = semdedup.storage_root()
        if settings.bucket_partitions != buckets:
            raise dg.Failure(
                f"the resource says {settings.bucket_partitions} buckets but the partitions have {buckets}"
            )
        with core_failures():
            k = len(load_centroids(storage))
        files = list(registered_stage_files(context.instance, names, storage, st.CLUSTER_ASSIGNMENTS).values())
        device = str(resolve_device(settings.device))
        if settings.precision != "fp32" and device == "cpu":
            context.log.warning(f"precision {settings.precision} on a CPU: the tiles run slower than fp32 there")
        progress = ProgressLog(
            context.log, len(context.partition_keys), settings.progress_interval, label="pairwise", unit="buckets"
        )
        keys = sorted(context.partition_keys)
        results: dict[str, DedupBucketResult] = {}
        workers: dict[str, Worker] = {}
        with timed() as t:
            # The engine runs the buckets here or as Ray tasks; each writes its own file atomically.
            with core_failures(), engine_for_step(settings, ray, context.log.info) as engine:
                for d in engine.dedup_buckets(settings, keys, k, files):
                    results[d.unit] = r = d.result
                    workers[d.unit] = d.worker
                    progress.step(
                        f"bucket {d.unit}: clusters [{r.first_cluster}, {r.end_cluster}), {r.rows} items, "
                        f"{r.seconds} s" + (f" on {d.worker}" if engine.name != "local" else "")
                    )
        per_bucket, meta, problems = pairwise_metadata(
            settings, [(key, results[key]) for key in keys], device, t["seconds"]
        )
        for key, row in per_bucket.items():
            if settings.engine != "local":
                row["worker"] = str(workers[key])
                if workers[key].peak_rss_mib is not None:  # this bucket's own peak in its worker
                    row["worker_peak_rss_mib"] = workers[key].peak_rss_mib
        # Each bucket's own figures on its own event (a range run's metadata is copied onto every bucket).
        add_partition_metadata(context, per_bucket)
        stale = prune_buckets(storage, buckets)  # results of an earlier, larger bucket count
        if stale:
            context.log.info(f"removed {len(stale)} bucket result(s) beyond the {buckets} buckets: {stale[:5]}")
        check = dg.AssetCheckResult(
            check_name="bucket_items_exactly_once", passed=not problems, description="; ".join(problems[:10]) or None
        )
        return dg.MaterializeResult(metadata={**meta, **worker_resources(workers.values())}, check_results=[check])

    return semantic_duplicates


def pairwise_metadata(
    settings: Settings, results: list[tuple[str, DedupBucketResult]], device: str, seconds: float
) -> tuple[dict[str, dict[str, object]], dict[str, object], list[str]]:
    """The pairwise stage's metadata: (each bucket's own figures, the run's totals, check problems)."""
    per_bucket: dict[str, dict[str, object]] = {}
    problems: list[str] = []
    pairs: list[Pair] = []
    for key, r in results:
        problems += r.problems
        pairs += r.top_pairs
        per_bucket[key] = {
            "rows": r.rows,
            "clusters": f"[{r.first_cluster}, {r.end_cluster})",
            "non_empty_clusters": len(r.cluster_sizes),
            "largest_cluster": max(r.cluster_sizes, default=0),
            "pairwise_seconds": r.seconds,
            "reads": r.groups,
            "clusters_from_disk": ",".join(map(str, r.clusters_from_disk)) or "none",
            "path": dg.MetadataValue.path(r.path),
        }
    pairs = sorted(pairs, key=lambda x: (-x[0], x[1]))[:TOP_PAIRS]
    # Run totals (each bucket's own figures are partition-scoped).
    meta: dict[str, object] = {
        "run_rows": sum(r.rows for _, r in results),
        "buckets_in_run": len(results),
        "run_seconds": seconds,
        "device": device,
        "keep": settings.keep,
        "precision": settings.precision,
        "probes": settings.probes,
        "rechecked_rows": sum(r.rechecked_rows for _, r in results),
        "error_bound": max([0.0] + [r.error_bound for _, r in results]),
        "engine": settings.engine,
        "memory_budget_mib": round(settings.memory_budget_bytes / 2**20, 1),
        "top_pairs": dg.MetadataValue.md(
            "\n".join(f"- {s:.5f}: `{a}` duplicates `{b}`" for s, a, b in pairs) or "none"
        ),
    }
    return per_bucket, meta, problems


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


def build_keep_lists_asset(names: GraphNames) -> dg.AssetsDefinition:
    """The keep-lists asset, downstream of every bucket."""

    @dg.asset(
        key=names.key("keep_lists"),
        deps=[dg.AssetDep(names.key("semantic_duplicates"), partition_mapping=dg.AllPartitionMapping())],
        automation_condition=EAGER,
        required_resource_keys={names.resource, names.ray_resource},
        group_name=names.definition("dedup"),
        kinds={"duckdb", "parquet"},
        check_specs=[
            dg.AssetCheckSpec(
                "kept_fraction_monotone",
                asset=names.key("keep_lists"),
                blocking=True,
                description="Monotone in eps: as eps grows the threshold 1 - eps falls, so the kept fraction never rises.",
            ),
            dg.AssetCheckSpec(
                "every_item_in_one_bucket",
                asset=names.key("keep_lists"),
                blocking=True,
                description="Every assigned item is in exactly one bucket result file on disk.",
            ),
            dg.AssetCheckSpec(
                FILES_CHECK,
                asset=names.key("keep_lists"),
                blocking=True,
                description="The files on disk are exactly those the registered shards, the bucket "
                "partitions and the configured eps imply.",
            ),
        ],
    )
    @metered
    def keep_lists(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
        """One keep-list per configured eps, the eps curve, and the catalog views."""
        semdedup = settings_resource(context, names)
        ray: RayResource = getattr(context.resources, names.ray_resource)
        storage = semdedup.storage_root()
        settings = semdedup.settings()
        bucket_files = [
            storage.bucket_file(b) for b in bucket_partitions(settings.bucket_partitions).get_partition_keys()
        ]
        missing = [str(p) for p in bucket_files if not p.exists()]
        if missing:
            raise dg.Failure(
                f"{len(missing)} bucket result(s) missing (e.g. {missing[:3]}): materialize semantic_duplicates"
            )
        assignment_files = registered_stage_files(context.instance, names, storage, st.CLUSTER_ASSIGNMENTS)
        assigned = sum(st.parquet_num_rows(p) for p in assignment_files.values())
        progress = ProgressLog(
            context.log, len(bucket_files), settings.progress_interval, label="keep-lists", unit="buckets"
        )
        # Here or in a Ray task; bucket order either way: byte-identical run to run.
        with core_failures(), engine_for_step(settings, ray, context.log.info) as engine:
            d = engine.build_keep_lists(settings, bucket_files, log=progress.step)
        r: KeepListsResult = d.result
        fractions = [row["kept_fraction"] for row in r.eps_curve]
        # zip, not itertools.pairwise: asset modules import only what they adapt (test_asset_modules_only_adapt).
        monotone = all(a >= b for a, b in zip(fractions, fractions[1:]))  # noqa: RUF007
        stale = prune_keep_lists(storage, settings.eps)  # eps no longer configured
        if stale:
            context.log.info(f"removed {len(stale)} keep-list(s) of eps no longer configured: {stale}")
        # Every bucket file on disk counts, not only the configured ones: a leftover file double-counts items.
        on_disk = sum(st.parquet_num_rows(p) for p in bucket_files_on_disk(storage).values())
        one_bucket = r.items == assigned and r.distinct_ids == assigned and on_disk == assigned
        layout = layout_problems(storage, list(assignment_files), settings.bucket_partitions, settings.eps)
        checks = [
            dg.AssetCheckResult(
                check_name="kept_fraction_monotone",
                passed=monotone,
                metadata={"kept_fraction": str([round(f, 6) for f in fractions])},
            ),
            dg.AssetCheckResult(
                check_name="every_item_in_one_bucket",
                passed=one_bucket,
                description=None
                if one_bucket
                else f"{on_disk} rows in the bucket files on disk, "
                f"{r.distinct_ids} distinct ids, {assigned} assigned items",
                metadata={
                    "assigned": assigned,
                    "bucket_rows": r.items,
                    "distinct_ids": r.distinct_ids,
                    "bucket_rows_on_disk": on_disk,
                },
            ),
            dg.AssetCheckResult(check_name=FILES_CHECK, passed=not layout, description="; ".join(layout) or None),
        ]
        meta = {
            **keep_lists_metadata(storage, settings, r),
            "ran_on": d.worker.role,
            "worker": str(d.worker),
            **worker_resources([d.worker]),
        }
        return dg.MaterializeResult(metadata=meta, check_results=checks)

    return keep_lists


def keep_lists_metadata(storage: st.Storage, settings: Settings, r: KeepListsResult) -> dict[str, object]:
    """The keep-lists' metadata: the eps curve (table and plot), histograms, top and boundary pairs."""
    fractions = [row["kept_fraction"] for row in r.eps_curve]
    eps_table = table_metadata(
        [
            {
                "eps": float(row["eps"]),
                "kept": int(row["kept"]),
                "removed": int(row["removed"]),
                "kept_fraction": float(row["kept_fraction"]),
            }
            for row in r.eps_curve
        ]
    )
    meta: dict[str, object] = {
        "items": r.items,
        "clusters": len(r.cluster_sizes),
        "seconds": r.seconds,
        "eps_curve": eps_table,
        "eps_curve_plot": dg.MetadataValue.md(eps_curve_markdown([row["eps"] for row in r.eps_curve], fractions)),
        "cluster_sizes": dg.MetadataValue.md(histogram_markdown(r.cluster_sizes, "cluster sizes", "members")),
        "max_sim_histogram": dg.MetadataValue.md(
            histogram_markdown(r.max_sim_counts, "max_sim (non-first members)", "max_sim", edges=MAX_SIM_BINS)
        ),
        "top_pairs": dg.MetadataValue.md(pairs_markdown(r.top_pairs, r.texts)),
        f"top_pairs_below_{NEAR_EXACT}": dg.MetadataValue.md(pairs_markdown(r.near_pairs, r.texts)),
        "catalog": dg.MetadataValue.path(str(storage.catalog_file)),
    }
    for row in r.eps_curve:
        meta[f"kept@eps={st.format_eps(row['eps'])}"] = int(row["kept"])
    meta.update(boundary_metadata(storage, settings))
    meta.update(groups_metadata(storage, settings))
    return meta


TOP_GROUPS, GROUP_EXAMPLES = 5, 4


def groups_metadata(storage: st.Storage, settings: Settings) -> dict[str, object]:
    """Per configured eps, how many duplicate groups there are and the largest ones with example members:
    the start of their texts, or thumbnails for images."""
    tops = {eps: top_groups(storage, eps, TOP_GROUPS, GROUP_EXAMPLES) for eps in settings.eps}
    cell = example_cells(
        storage, settings, {i for groups in tops.values() for _, _, members in groups for i in members}
    )
    meta: dict[str, object] = {}
    for eps, groups in tops.items():
        label = st.format_eps(eps)
        count, members = group_counts(storage, eps)
        meta[f"groups@eps={label}"] = count
        meta[f"items_in_groups@eps={label}"] = members
        lines = [
            f"{count} groups of two or more items at eps={label} ({members} items); the largest, "
            f"kept item first (`semdedup groups --eps {label}`):",
            "",
            "| size | group_id (kept) | members |",
            "|---|---|---|",
        ]
        lines += [f"| {size} | `{g}` | {'<br>'.join(cell(i) for i in members)} |" for g, size, members in groups]
        meta[f"largest_groups@eps={label}"] = dg.MetadataValue.md("\n".join(lines) if groups else "no groups")
    return meta


def example_cells(storage: st.Storage, settings: Settings, ids: set[str]) -> Callable[[str], str]:
    """A markdown table cell per id: the id with a thumbnail of its image (image modality), else with the start
    of its text (ids only for other modalities). The payloads of all `ids` are read at once."""
    wanted = sorted(ids)
    if settings.modality == "image" and settings.input:
        thumbs = image_thumbnails(storage, settings.input, wanted, settings.payload_column)
        return lambda i: f"`{i}` ![{i}]({thumbs[i]})" if i in thumbs else f"`{i}`"
    texts = payload_texts(storage, wanted, settings.modality)
    return lambda i: text_cell(texts, i)


def boundary_metadata(storage: st.Storage, settings: Settings) -> dict[str, dg.MetadataValue]:
    """Per configured eps, the pairs just above and just below 1 - eps, with text or thumbnails (core/dedup/boundary.py)."""
    sides = {eps: boundary_pairs(storage, eps) for eps in settings.eps}
    cell = example_cells(
        storage, settings, {i for above, below in sides.values() for _, a, b in above + below for i in (a, b)}
    )
    return {
        f"pairs_at_eps={st.format_eps(eps)}": dg.MetadataValue.md(boundary_markdown(eps, *sides[eps], cell))
        for eps in settings.eps
    }
