"""Time the semantic_duplicates stage (core `dedup_bucket`, no Dagster) and hash what it writes.

Usage: python bench/multiprobe_speed.py --storage DIR --work DIR --config PROBES:BUCKETS:BUDGET[:KEEP] ... [--profile]

`--storage` is a finished `semdedup run --modality embedding` storage (its centroids and
cluster assignments are reused); each config copies it to `--work/<config>`, runs every
bucket and the keep-lists there, and prints the stage's seconds and one sha256 over the
bucket files and one over the keep-lists (to compare the bytes before and after a change).
BUDGET is a --memory-budget value or `none`; KEEP a --keep strategy (default hard).
"""

from __future__ import annotations

import argparse
import cProfile
import hashlib
import pstats
import shutil
import time
from pathlib import Path

from semdedup_assets.core.cluster.assign import bucket_keys
from semdedup_assets.core.cluster.centroids import load_centroids
from semdedup_assets.core.dedup.buckets import dedup_bucket
from semdedup_assets.core.dedup.keep import build_keep_lists
from semdedup_assets.core.io import storage as st
from semdedup_assets.core.settings_store import load_settings


def digest(folder: Path) -> str:
    """sha256 over the (name, bytes) of every file in `folder`, in name order."""
    h = hashlib.sha256()
    for path in sorted(folder.iterdir()):
        h.update(path.name.encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def run_config(
    source: Path, work: Path, probes: int, buckets: int, budget: str | None, profile: bool, keep: str = "hard"
) -> tuple[float, str, str]:
    """(stage seconds, bucket-files sha256, keep-lists sha256) of one configuration."""
    target = work / f"p{probes}-b{buckets}-m{budget or 'none'}-{keep}"
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("semantic_duplicates", "keep_lists", "dagster_home"))
    settings = load_settings(str(target), probes=probes, buckets=buckets, memory_budget=budget, keep=keep)
    storage = settings.storage_root()
    k = len(load_centroids(storage))
    files = [st.to_upath(str(p)) for p in sorted((target / st.CLUSTER_ASSIGNMENTS).glob("*.parquet"))]
    keys = bucket_keys(settings.bucket_partitions)
    profiler = cProfile.Profile() if profile else None
    start = time.perf_counter()
    if profiler:
        profiler.enable()
    for b in keys:
        dedup_bucket(settings, b, k, files)
    if profiler:
        profiler.disable()
    seconds = time.perf_counter() - start
    build_keep_lists(settings, [storage.bucket_file(b) for b in keys])
    if profiler:
        pstats.Stats(profiler).sort_stats("cumulative").print_stats(35)
    return seconds, digest(target / "semantic_duplicates"), digest(target / "keep_lists")


def main() -> None:
    """Run each --config and print one line per configuration."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--storage", required=True, type=Path)
    parser.add_argument("--work", required=True, type=Path)
    parser.add_argument(
        "--config", nargs="+", required=True, help="PROBES:BUCKETS:BUDGET[:KEEP], e.g. 2:16:none 2:4:8MB:easy"
    )
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    for config in args.config:
        probes, buckets, budget, *keep = config.split(":")
        seconds, buckets_sha, keep_sha = run_config(
            args.storage,
            args.work,
            int(probes),
            int(buckets),
            None if budget == "none" else budget,
            args.profile,
            *keep,
        )
        print(f"{config}  {seconds:8.2f} s  buckets {buckets_sha[:16]}  keep-lists {keep_sha[:16]}", flush=True)


if __name__ == "__main__":
    main()
