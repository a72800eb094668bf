"""The `semdedup` command line: run, demo, sql, forget."""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence

from semdedup_assets.core.config import (AUTO, Settings, allowed_values, base_type, changed_settings, default_of,
                                         knobs, load_settings)

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
    add_settings_options(run)
    _add_storage(run)

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
    return parser


def add_settings_options(parser: argparse.ArgumentParser) -> None:
    """One option per Settings knob that has a flag: name, type, choices, help and default from Settings."""
    for f in knobs():
        flag = f.metadata.get("flag", "")
        if flag is None:
            continue
        flag = flag or "--" + f.name.replace("_", "-")
        kind, allowed, default = base_type(f.name), allowed_values(f), default_of(f)
        shown = ",".join(map(str, default)) if isinstance(default, tuple) else (AUTO if f.name == "clusters" else default)
        help_text = f"{f.metadata['help']} (default: {shown})" if shown is not None else f.metadata["help"]
        options: dict[str, object] = {"dest": f.name, "default": None, "help": help_text}
        if kind is bool:
            options["action"] = argparse.BooleanOptionalAction  # --strict / --no-strict
        elif allowed:
            options["choices"] = allowed
        elif kind in (int, float) and f.name not in ("clusters", "eps"):
            options["type"] = kind  # clusters also takes `auto` and eps a list; Settings coerces them
        if f.metadata.get("metavar"):
            options["metavar"] = f.metadata["metavar"]
        if f.name == "input":
            options["required"] = True
        parser.add_argument(flag, **options)


def _settings_from_args(args: argparse.Namespace) -> Settings:
    """A run's settings: defaults, SEMDEDUP_* variables, then the flags given (never the stored run's)."""
    overrides = {f.name: getattr(args, f.name, None) for f in knobs() if f.name != "storage"}
    return load_settings(args.storage, use_stored=False, **overrides)


def describe_settings(settings: Settings) -> str:
    """The effective settings of a run, one `name=value` per knob that a run uses."""
    parts = []
    for f in knobs():
        if f.metadata.get("flag", "") is None and f.name != "storage":
            continue
        value = getattr(settings, f.name)
        if f.name == "clusters" and value is None:
            value = AUTO
        parts.append(f"{f.name}={','.join(map(str, value)) if isinstance(value, tuple) else value}")
    return " ".join(parts)


def warn_changed_settings(settings: Settings) -> None:
    """Warn about every knob that differs from the run stored in the same storage."""
    changed = changed_settings(settings)
    for name, (before, now) in sorted(changed.items()):
        print(f"semdedup: warning: {name} is {now!r}, the previous run on this storage used {before!r}",
              file=sys.stderr)


def default_dagster_home(settings: Settings) -> str:
    """DAGSTER_HOME: the environment's, else a folder inside a local storage root."""
    from semdedup_assets.pipeline import PipelineError

    if os.environ.get("DAGSTER_HOME"):
        return os.environ["DAGSTER_HOME"]
    storage = settings.storage_root()
    if not storage.local:
        raise PipelineError("set DAGSTER_HOME when the storage root is not a local folder")
    return str(storage.root / "dagster_home")


def _instance(settings: Settings):
    import dagster as dg

    from semdedup_assets.pipeline import ensure_instance_config

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

    warn_changed_settings(settings)
    print(f"[semdedup] settings: {describe_settings(settings)}", flush=True)
    instance = _instance(settings)
    start = time.perf_counter()
    try:
        result = run_pipeline(settings, instance, log=lambda m: print(m, flush=True))
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
    from semdedup_assets.demo_data import write_demo_shards

    storage = os.path.abspath(storage)
    input_dir = os.path.join(os.path.dirname(storage.rstrip("/")), "input")
    paths = write_demo_shards(input_dir)
    print(f"[semdedup] demo: {len(paths)} shards of Python standard-library docstrings in {input_dir}")
    settings = load_settings(storage, use_stored=False, input=input_dir, modality="text", max_length=128)
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
        result = forget_shard(settings, _instance(settings), shard, log=lambda m: print(m, flush=True))
    except PipelineError as err:
        print(f"semdedup: error: {err}", file=sys.stderr)
        return 1
    print(f"forgot shard {shard!r}: removed {len(result.removed)} file(s), re-ran {len(result.buckets)} bucket(s)"
          + (" and the keep-lists" if result.run_ids and len(result.run_ids) > len(result.buckets) else ""))
    return 0


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
        return cmd_forget(args.storage, args.shard)
    except ValueError as err:  # bad settings
        print(f"semdedup: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
