"""Orchestration at scale: a sensor tick over thousands of shard files, the whole graph over
them, and catalog queries across every shard's files.

Run: `.venv/bin/python bench/orchestration.py [--shards 10000] [--out bench/results/orchestration.md]`
(`--smoke` for a tiny run that only checks the script works).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import dagster as dg
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from semdedup_assets.core.config import Settings
from semdedup_assets.core.io.catalog import query
from semdedup_assets.core.settings_store import save_settings
from semdedup_assets.definitions import build_definitions
from semdedup_assets.partitions import SHARDS_PARTITIONS_NAME
from semdedup_assets.pipeline import run_pipeline


def write_shards(folder: Path, n: int, rows: int, d: int) -> float:
    """n tiny bring-your-own-embedding shards in 100 sub-folders; returns seconds."""
    start = time.perf_counter()
    rng = np.random.default_rng(0)
    for s in range(n):
        x = rng.normal(size=(rows, d)).astype(np.float32)
        sub = folder / f"{s // 100:03d}"
        sub.mkdir(parents=True, exist_ok=True)
        pq.write_table(
            pa.table({"id": [f"{s}-{i}" for i in range(rows)], "embedding": pa.array(list(x), pa.list_(pa.float32()))}),
            sub / f"part-{s:05d}.parquet",
        )
    return time.perf_counter() - start


def timed(fn):
    """(result, seconds) of a call."""
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def main() -> None:
    """Run the benchmark and write the report."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--shards", type=int, default=10_000)
    ap.add_argument("--rows", type=int, default=10)
    ap.add_argument("--d", type=int, default=16)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.smoke:
        args.shards, args.rows = 30, 5
    out = args.out or (None if args.smoke else "bench/results/orchestration.md")

    lines = [
        "# Orchestration at scale",
        "",
        f"Command: `python bench/orchestration.py --shards {args.shards}`",
        "",
        "## Machine",
        "",
        f"- {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"python {platform.python_version()}, dagster {dg.__version__}",
        f"- load average at start: {' / '.join(f'{x:.2f}' for x in os.getloadavg())}",
        "",
    ]
    with tempfile.TemporaryDirectory() as tmp, dg.instance_for_test() as instance:
        root = Path(tmp)
        write_s = write_shards(root / "landing", args.shards, args.rows, args.d)
        settings = Settings(
            storage=str(root / "storage"),
            input=str(root / "landing"),
            modality="embedding",
            clusters=max(4, round((args.shards * args.rows) ** 0.5)),
            buckets=16,
        )
        save_settings(settings)
        defs = build_definitions(settings)
        sensor = defs.resolve_sensor_def("shard_sensor")

        def tick(cursor):
            ctx = dg.build_sensor_context(
                instance=instance, instance_ref=instance.get_ref(), definitions=defs, cursor=cursor
            )
            return sensor.evaluate_tick(ctx)

        first, tick_s = timed(lambda: tick(None))
        keys = first.dynamic_partitions_requests[0].partition_keys
        _, add_s = timed(lambda: instance.add_dynamic_partitions(SHARDS_PARTITIONS_NAME, keys))
        second, idle_s = timed(lambda: tick(first.cursor))
        assert len(first.run_requests) == args.shards and not second.run_requests

        result, pipe_s = timed(lambda: run_pipeline(settings, instance, log=lambda m: None))
        storage = settings.storage_root()
        queries = {
            "SELECT count(*) FROM items": None,
            "SELECT count(*) FROM items WHERE max_sim > 1 - 0.01": None,
            "SELECT shard, count(*) FROM raw_items GROUP BY shard ORDER BY 2 DESC LIMIT 5": None,
            "SELECT count(*) FROM embeddings": None,
            "SELECT cluster, size FROM centroids ORDER BY size DESC LIMIT 5": None,
        }
        for q in queries:
            _, queries[q] = timed(lambda q=q: query(storage, q))
        _, [(n_items,)] = query(storage, "SELECT count(*) FROM items")
        runs = len(instance.get_run_records())

    lines += [
        "## Sensor tick",
        "",
        "| step | value |",
        "|---|---|",
        f"| shard files | {args.shards:,} ({args.rows} rows, d={args.d}, 100 sub-folders) |",
        f"| writing the files (setup) | {write_s:.1f} s |",
        f"| first tick: discover + fingerprint + {args.shards:,} run requests | **{tick_s:.2f} s** |",
        f"| registering {args.shards:,} partitions (the tick's add request) | {add_s:.2f} s |",
        f"| second tick, nothing changed | {idle_s:.2f} s |",
        "",
        "## Whole graph over every shard (`run_pipeline`, in process)",
        "",
        "| stage | seconds |",
        "|---|---|",
    ]
    lines += [f"| {k} | {v} |" for k, v in result.seconds.items()]
    lines += [
        f"| between runs (planning {args.shards:,}-partition ranges, registering, catalog) | "
        f"{pipe_s - sum(result.seconds.values()):.1f} |",
        f"| total wall | {pipe_s:.1f} |",
        f"| per shard | {1000 * pipe_s / args.shards:.1f} ms |",
        f"| Dagster runs | {runs} |",
        f"| items | {n_items:,} |",
        "",
        f"## Catalog queries over {args.shards:,} shards' files",
        "",
        "| query | seconds |",
        "|---|---|",
    ]
    lines += [f"| `{q}` | {s:.3f} |" for q, s in queries.items()]
    text = "\n".join(lines) + "\n"
    print(text)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text)


if __name__ == "__main__":
    main()
