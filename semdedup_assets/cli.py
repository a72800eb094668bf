"""The `semdedup` command line: run, demo, sql, forget, verify."""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence

from semdedup_assets.core.config import MODALITIES, Settings, load_settings

DEMO_STORAGE = ".demo/storage"


def _add_storage(p: argparse.ArgumentParser, default: str | None = None) -> None:
    p.add_argument("--storage", default=default, help="storage root: local folder or fsspec URL "
                   f"(default: $SEMDEDUP_STORAGE or {default or '.storage'})")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    parser = argparse.ArgumentParser(
        prog="semdedup",
        description="SemDeDup (semantic deduplication, Abbas et al. 2023) as a Dagster asset graph. "
        "Results land as Parquet under the storage root, with a DuckDB catalog at <storage>/catalog.duckdb.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="register every shard under --input and materialize the whole asset graph",
                         description="Register every shard file under --input as a `shards` partition and "
                         "materialize the whole asset graph through Dagster (runs are recorded in $DAGSTER_HOME, "
                         "default <storage>/dagster_home, so they show in `make ui`).")
    run.add_argument("--input", required=True, help="folder (or fsspec URL) of .parquet/.jsonl/.jsonl.gz/.tar/.npy "
                     "shards, or one file")
    _add_storage(run)
    run.add_argument("--modality", choices=MODALITIES, help="payload kind (default text)")
    run.add_argument("--column", help="payload column (default: the modality's name: text, image or embedding)")
    run.add_argument("--id-column", help="id column (default id; if absent ids are <shard>:<row>)")
    run.add_argument("--model", help="text: HF model name or local path (default: the offline all-MiniLM-L6-v2), "
                     "or open_clip:ARCH for CLIP's text tower; image: open_clip ARCH, local-dir:PATH or hf-hub:ORG/REPO")
    run.add_argument("--pretrained", help="open_clip: pretrained tag (online) or local checkpoint file")
    run.add_argument("--workers", type=int, dest="num_workers", help="image decoding worker processes (default 2)")
    run.add_argument("--strict", action="store_true", default=None,
                     help="image modality: fail on an undecodable image instead of recording it in `rejected`")
    run.add_argument("--pooling", choices=("mean", "cls", "last_token"), help="text pooling (default mean)")
    run.add_argument("--max-length", type=int, help="max tokens per text (default 256)")
    run.add_argument("--batch-size", type=int, help="encoder batch size (default 64)")
    run.add_argument("--device", help="auto (default), cpu, cuda, cuda:N")
    run.add_argument("--clusters", type=int, help="k for spherical k-means (default round(sqrt(items)))")
    run.add_argument("--iterations", type=int, dest="kmeans_iterations", help="k-means iterations (default 20)")
    run.add_argument("--max-points-per-centroid", type=int, help="k-means training sample per centroid (default 256)")
    run.add_argument("--buckets", type=int, help="cluster buckets = partitions of semantic_duplicates (default 16)")
    run.add_argument("--eps", help="comma-separated eps values (default 0.0001,0.001,0.005,0.01,0.02,0.05,0.1,0.2,0.3)")
    run.add_argument("--keep", choices=("hard", "easy", "random"), help="cluster order: hard (default), easy, random")
    run.add_argument("--embedding-dtype", choices=("float32", "float16"),
                     help="stored embeddings: float32 (default) or float16 (half the I/O; compute stays fp32)")
    run.add_argument("--precision", choices=("fp32", "fp16", "bf16"),
                     help="pairwise tiles: fp32 (default), or fp16/bf16 on a GPU with an exact fp32 re-check of "
                     "every item near a threshold 1 - eps")
    run.add_argument("--seed", type=int, help="seed for k-means sampling/training and the random order (default 0)")

    demo = sub.add_parser("demo", help="the embedded demo: Python's own docstrings, deduplicated end to end",
                          description="Write the embedded demo shards (real English text from this Python's "
                          "standard-library docstrings) and run the whole graph on them, as `make demo`.")
    _add_storage(demo, DEMO_STORAGE)

    sql = sub.add_parser("sql", help="query the DuckDB catalog (views items, embeddings, centroids, eps_curve, ...)",
                         description="Run one SQL statement against <storage>/catalog.duckdb. Views: items, "
                         "embeddings, centroids, eps_curve, raw_items, cluster_assignments. The keep-list at "
                         "any eps is `SELECT id FROM items WHERE max_sim <= 1 - eps`.")
    sql.add_argument("query", help='e.g. "SELECT * FROM eps_curve"')
    _add_storage(sql)

    forget = sub.add_parser("forget", help="remove one shard's results and its partition",
                            description="Delete a shard's raw, rejected, embeddings and cluster_assignments files "
                            "and its `shards` partition, then re-run (through Dagster) the cluster buckets its items "
                            "were in and the keep-lists, so the catalog no longer shows it.")
    forget.add_argument("shard", help="shard key, e.g. part-03 or 2024/part-03")
    _add_storage(forget)

    verify = sub.add_parser("verify", help="check that every stage file is whole and consistent; --repair deletes bad ones",
                            description="Read every stage file back and check it against its upstream (row counts, ids, "
                            "embedding cache keys, cluster ranges, keep-list counts). Exits 1 and lists each bad file; "
                            "with --repair, deletes them (and leftover temporary files) so that the next "
                            "`semdedup run` recomputes them.")
    verify.add_argument("--repair", action="store_true", help="delete every damaged or inconsistent file")
    _add_storage(verify)
    return parser


def _settings_from_args(args: argparse.Namespace) -> Settings:
    overrides = {k: getattr(args, k, None) for k in (
        "input", "modality", "column", "id_column", "model", "pretrained", "num_workers", "strict", "pooling", "max_length", "batch_size", "device",
        "clusters", "kmeans_iterations", "max_points_per_centroid", "buckets", "keep", "seed",
        "embedding_dtype", "precision")}
    if getattr(args, "eps", None):
        overrides["eps"] = args.eps
    return load_settings(args.storage, **overrides)


def _instance(settings: Settings):
    import dagster as dg

    from semdedup_assets.pipeline import default_dagster_home, ensure_instance_config

    home = default_dagster_home(settings)
    os.environ["DAGSTER_HOME"] = os.path.abspath(home) if "://" not in home else home
    ensure_instance_config(os.environ["DAGSTER_HOME"])
    return dg.DagsterInstance.get()


def summary(settings: Settings) -> str:
    """Items, clusters and kept/removed per eps, from the catalog."""
    from semdedup_assets.core.catalog import format_table, query

    storage = settings.storage_root()
    _, [(items, clusters)] = query(storage, "SELECT count(*), count(DISTINCT cluster) FROM items")
    cols, rows = query(storage, "SELECT eps, kept, removed, round(kept_fraction, 4) AS kept_fraction FROM eps_curve ORDER BY eps")
    return (f"items: {items}\nclusters: {clusters}\n"
            f"{format_table(cols, rows)}\ncatalog: {storage.catalog_file}")


def cmd_run(settings: Settings) -> int:
    """Materialize the whole graph and print the summary."""
    from semdedup_assets.core.shards import ShardError
    from semdedup_assets.pipeline import PipelineError, run_pipeline

    instance = _instance(settings)
    start = time.perf_counter()
    try:
        result = run_pipeline(settings, instance, log=lambda m: print(m, flush=True), stop_on_signals=True)
    except (PipelineError, ShardError, FileNotFoundError, ValueError) as err:
        print(f"semdedup: error: {err}", file=sys.stderr)
        return 1
    print(f"\nshards: {len(result.shards)}  stages (s): "
          + ", ".join(f"{k} {v}" for k, v in result.seconds.items())
          + f"  total: {time.perf_counter() - start:.1f} s")
    print(summary(settings))
    print(f"dagster runs recorded in {os.environ['DAGSTER_HOME']} (open them with `make ui`)")
    return 0


def cmd_demo(storage: str) -> int:
    """Write the demo shards and run the graph on them."""
    from semdedup_assets.core.demo_data import write_demo_shards

    storage = os.path.abspath(storage)
    input_dir = os.path.join(os.path.dirname(storage.rstrip("/")), "input")
    paths = write_demo_shards(input_dir)
    print(f"[semdedup] demo: {len(paths)} shards of Python standard-library docstrings in {input_dir}")
    settings = load_settings(storage, input=input_dir, modality="text", max_length=128)
    return cmd_run(settings)


def cmd_sql(storage: str | None, sql: str) -> int:
    """Print a query's result as a table."""
    import duckdb

    from semdedup_assets.core.catalog import format_table, query

    settings = load_settings(storage)
    try:
        cols, rows = query(settings.storage_root(), sql)
    except duckdb.Error as err:
        print(f"semdedup: SQL error: {err}", file=sys.stderr)
        return 1
    print(format_table(cols, rows))
    return 0


def cmd_forget(storage: str | None, shard: str) -> int:
    """Remove one shard's results; the buckets it touched and the keep-lists are recomputed."""
    from semdedup_assets.pipeline import PipelineError, forget_shard

    settings = load_settings(storage)
    try:
        result = forget_shard(settings, _instance(settings), shard, log=lambda m: print(m, flush=True),
                              stop_on_signals=True)
    except PipelineError as err:
        print(f"semdedup: error: {err}", file=sys.stderr)
        return 1
    print(f"forgot shard {shard!r}: removed {len(result.removed)} file(s), re-ran {len(result.buckets)} bucket(s)"
          + (" and the keep-lists" if result.run_ids and len(result.run_ids) > len(result.buckets) else ""))
    return 0


def cmd_verify(storage: str | None, repair: bool) -> int:
    """List damaged or inconsistent stage files; with repair, delete them."""
    from semdedup_assets.core.verify import repair as delete, verify_storage

    settings = load_settings(storage)
    problems = verify_storage(settings.storage_root(), settings, _cache_keys(settings))
    for problem in problems:
        print(f"BAD {problem}")
    if not problems:
        print(f"every stage file under {settings.storage_root().root} is whole and consistent")
        return 0
    if not repair:
        print(f"{len(problems)} bad file(s); `semdedup verify --repair` deletes them so the next run recomputes them",
              file=sys.stderr)
        return 1
    removed = delete(problems)
    print(f"deleted {len(removed)} file(s); `semdedup run` recomputes them")
    return 0


def _cache_keys(settings: Settings):
    """The embeddings cache key each shard should carry now (None when the input is not reachable)."""
    from semdedup_assets.assets.embed import embedding_cache_key
    from semdedup_assets.core import storage as st
    from semdedup_assets.core.shards import discover_shards
    from semdedup_assets.resources import SemDedupConfig

    try:
        files = {s.key: s for s in discover_shards(settings.input)} if settings.input else {}
    except (OSError, ValueError):
        files = {}
    config, raw = SemDedupConfig.from_settings(settings), settings.storage_root()

    def key_of(shard: str) -> str | None:
        path = raw.shard_file(st.RAW, shard)
        return embedding_cache_key(path, files[shard], config) if shard in files and path.exists() else None

    return key_of


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `semdedup` console script."""
    args = build_parser().parse_args(argv)
    try:
        if args.command == "run":
            return cmd_run(_settings_from_args(args))
        if args.command == "demo":
            return cmd_demo(args.storage)
        if args.command == "sql":
            return cmd_sql(args.storage, args.query)
        if args.command == "verify":
            return cmd_verify(args.storage, args.repair)
        return cmd_forget(args.storage, args.shard)
    except ValueError as err:  # bad settings
        print(f"semdedup: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
