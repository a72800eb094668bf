"""Benchmark: memory and time of `semdedup run --modality embedding` as N grows at a fixed k.

Planted data: 384-d unit vectors around shared centres, in shards of 10,000 items, each
shard generated on its own (seeded by its index), with 5% near-copies and 1% exact copies
of items of the same shard, so generation needs O(shard) memory whatever N. Every point
runs in its own subprocess (`semdedup run`, float16 storage); the peak RSS of the process
tree is sampled, and each stage's own peak RSS, rows and seconds are read back from the
stages' materialization metadata (`resources/*`). Runs at different `--memory-budget`
values on the same input report the keep-list hashes, which must agree.

    .venv/bin/python bench/scale.py --sizes 250000,1000000 --clusters 500 --budgets 4GB,256MB
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import shutil
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, add_output_options, command_line, emit, load_average, machine_lines, output_path, run_tree

DEFAULT_OUT = "bench/results/scale.md"
SHARD_ROWS = 10_000
DIM = 384
CENTERS = 2_000


def write_planted(folder: Path, n: int, d: int = DIM, seed: int = 0) -> float:
    """N planted unit vectors in shards of SHARD_ROWS (float32 input), O(shard) memory."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    start = time.perf_counter()
    centres = np.random.default_rng(seed).standard_normal((CENTERS, d), dtype=np.float32)
    folder.mkdir(parents=True, exist_ok=True)
    for s, a in enumerate(range(0, n, SHARD_ROWS)):
        rows = min(SHARD_ROWS, n - a)
        rng = np.random.default_rng([seed, s])
        x = centres[rng.integers(0, CENTERS, rows)] + rng.standard_normal((rows, d), dtype=np.float32) * np.float32(0.6)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        n_near, n_exact = int(0.05 * rows), int(0.01 * rows)
        dst = rng.choice(rows, n_near + n_exact, replace=False)
        src = rng.integers(0, rows, n_near + n_exact)
        x[dst[:n_near]] = x[src[:n_near]] + rng.standard_normal((n_near, d), dtype=np.float32) * np.float32(
            np.sqrt(0.002 / d)
        )
        x[dst[n_near:]] = x[src[n_near:]]
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        emb = pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), d)
        ids = pa.array([f"s{s:05d}-{i}" for i in range(rows)])
        pq.write_table(pa.table({"id": ids, "embedding": emb}), folder / f"part-{s:05d}.parquet")
    return time.perf_counter() - start


def keep_list_hashes(storage: Path) -> str:
    """sha256 over every keep-list file's bytes, in name order (12 hex digits)."""
    h = hashlib.sha256()
    for path in sorted((storage / "keep_lists").glob("*.parquet")):
        h.update(path.name.encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:12]


def stage_resources(storage: Path) -> dict[str, dict]:
    """Per-stage peak RSS / rows / seconds from the runs' materialization metadata (max over partitions)."""
    import dagster as dg

    instance = dg.DagsterInstance.from_config(str(storage / "dagster_home"))
    out: dict[str, dict] = {}
    for key in ("raw_shards", "embeddings", "centroids", "cluster_assignments", "semantic_duplicates", "keep_lists"):
        records = instance.fetch_materializations(dg.AssetKey(key), limit=10_000).records
        stage = out.setdefault(
            key, {"peak_rss_mib": 0.0, "worker_peak_rss_mib": 0.0, "rows": 0, "seconds": 0.0, "runs": 0}
        )
        runs = {}  # a range run's metadata is on each of its partitions' events: count each run once
        for rec in records:
            md = rec.asset_materialization.metadata if rec.asset_materialization else {}
            if "resources/peak_rss_mib" in md:
                runs[rec.run_id] = md
        for md in runs.values():
            stage["peak_rss_mib"] = max(stage["peak_rss_mib"], float(md["resources/peak_rss_mib"].value))
            if "resources/worker_peak_rss_mib" in md:  # --engine ray: the largest unit's peak in its Ray worker
                stage["worker_peak_rss_mib"] = max(
                    stage["worker_peak_rss_mib"], float(md["resources/worker_peak_rss_mib"].value)
                )
            stage["rows"] += int(md["resources/rows"].value)
            stage["seconds"] += float(md["resources/seconds"].value)
        stage["runs"] = len(runs)
    return out


def run_point(
    inp: Path, storage: Path, clusters: int, buckets: str, budget: str | None, dtype: str, cluster: object = None
) -> dict:
    """One `semdedup run` in a subprocess: wall, tree peak RSS, stage seconds, removed count, hashes.

    With `cluster` (a RayCluster of semdedup_assets_tests.raycluster) the run is `--engine ray` on
    it, inside its loopback-only network namespace.
    """
    if storage.exists():
        shutil.rmtree(storage)
    cli = [
        sys.executable,
        "-m",
        "semdedup_assets.cli",
        "run",
        "--input",
        str(inp),
        "--storage",
        str(storage),
        "--modality",
        "embedding",
        "--clusters",
        str(clusters),
        "--buckets",
        buckets,
        "--embedding-dtype",
        dtype,
        "--eps",
        "0.01,0.05",
    ]
    if budget:
        cli += ["--memory-budget", budget]
    env = {"PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    if cluster is not None:
        from semdedup_assets_tests.raycluster import ray_env

        cli = cluster.ns.command([*cli, "--engine", "ray", "--ray-address", cluster.address])
        env = {**ray_env(), **env}
    out = run_tree(cli, env=env)
    if out["rc"] != 0:
        print(out["stdout"][-3000:], out["stderr"][-3000:], sep="\n")
        raise SystemExit(f"semdedup run failed (rc {out['rc']})")
    m = re.search(r"stages \(s\): (.*?)  total: ([\d.]+) s", out["stdout"])
    from semdedup_assets.core.io.catalog import query
    from semdedup_assets.core.settings_store import load_settings

    root = load_settings(str(storage)).storage_root()
    _, rows = query(root, "SELECT eps, removed FROM eps_curve ORDER BY eps")
    try:
        resources = stage_resources(storage)
    except Exception as err:  # an older main without resources metadata
        resources = {"error": str(err)}
    return {
        "seconds": out["seconds"],
        "peak_mib": out["peak_mib"],
        "stages": m.group(1) if m else "",
        "removed": {float(e): int(r) for e, r in rows},
        "hash": keep_list_hashes(storage),
        "storage_bytes": sum(f.stat().st_size for f in storage.rglob("*.parquet")),
        "resources": resources,
        "warnings": [line for line in out["stderr"].splitlines() if "sample" in line][:3],
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="250000,1000000")
    ap.add_argument("--clusters", type=int, default=500)
    ap.add_argument("--buckets", default="16")
    ap.add_argument("--budgets", default="", help="comma-separated --memory-budget values ('' = the default)")
    ap.add_argument(
        "--points",
        default="",
        help="instead of sizes x budgets: N:BUCKETS:BUDGET[:ENGINE],... "
        "(BUDGET '' = the default; ENGINE local, or ray: two local Ray nodes of 2 CPUs each in a "
        "loopback-only network namespace, as root), run in this order",
    )
    ap.add_argument("--dtype", default="float16")
    ap.add_argument("--root", default="/tmp/semdedup-scale")
    ap.add_argument("--json", default=None, help="also write the raw results here")
    add_output_options(ap, DEFAULT_OUT, "N = 20,000 only, no report")
    args = ap.parse_args(argv)
    sizes = [20_000] if args.smoke else [int(s) for s in args.sizes.split(",")]
    budgets = [b or None for b in args.budgets.split(",")] if args.budgets else [None]
    root = Path(args.root)
    load_start = load_average()
    results = []
    points = [(n, args.buckets, b, "local") for n in sizes for b in budgets]
    if args.points and not args.smoke:
        points = [
            (int(n), b, bud or None, (rest or ["local"])[0])
            for n, b, bud, *rest in (p.split(":") for p in args.points.split(","))
        ]
    cluster = None
    try:
        for n, buckets, budget, engine in points:
            inp = root / f"input-{n}"
            if not inp.exists():
                print(f"writing {n} items: {write_planted(inp, n):.1f} s", flush=True)
            if engine == "ray" and cluster is None:
                from semdedup_assets_tests.raycluster import NetNamespace, RayCluster, namespaces_available

                if reason := namespaces_available():
                    raise SystemExit(f"a ray point runs Ray in a loopback-only network namespace and {reason}")
                # 2 CPUs a node, as the machine has: a pairwise task then runs as many torch threads as a local run,
                # so the bucket files can be byte-identical (docs/scale-out.md).
                cluster = RayCluster(NetNamespace(), [{"num_cpus": 2}, {"num_cpus": 2}])
            r = run_point(
                inp, root / "storage", args.clusters, buckets, budget, args.dtype, cluster if engine == "ray" else None
            )
            r.update(n=n, budget=budget or "default", buckets=buckets, engine=engine, load=load_average())
            print(json.dumps({k: v for k, v in r.items() if k != "resources"}), flush=True)
            print(json.dumps(r["resources"]), flush=True)
            results.append(r)
            if args.json:  # after every point: a long series stopped part way keeps what it measured
                Path(args.json).write_text(json.dumps(results, indent=1))
    finally:
        if cluster is not None:
            cluster.stop()
    lines = [
        "# Scale: memory and time of `semdedup run` as N grows (fixed k)",
        "",
        f"Command: `{command_line('bench/scale.py', argv)}`",
        "",
        *machine_lines([f"- load average at the end: {load_average()} (start: {load_start})"]),
        "## Whole runs",
        "",
        "| N | engine | buckets | budget | wall (s) | peak RSS, process tree (MiB) | storage (MiB) |"
        " removed at eps 0.01 / 0.05 | keep-lists sha256 | load after |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        rem = r["removed"]
        lines.append(
            f"| {r['n']:,} | {r['engine']} | {r['buckets']} | {r['budget']} | {r['seconds']:.1f} | "
            f"{r['peak_mib']:,.0f} | "
            f"{r['storage_bytes'] / 2**20:,.0f} | {rem.get(0.01, '?')} / {rem.get(0.05, '?')} | "
            f"`{r['hash']}` | {r['load']} |"
        )
    lines += [
        "",
        "## Peak RSS per stage (MiB; max over the stage's partitions, from materialization metadata)",
        "",
        "| N | engine | buckets | budget | raw_shards | embeddings | centroids | cluster_assignments |"
        " semantic_duplicates | keep_lists |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    stages = ("raw_shards", "embeddings", "centroids", "cluster_assignments", "semantic_duplicates", "keep_lists")
    for r in results:
        res = r["resources"]
        # --engine ray: the run's process / the largest Ray unit's worker
        cells = [
            (
                f"{res[s]['peak_rss_mib']:,.0f}"
                + (f" / {res[s]['worker_peak_rss_mib']:,.0f}" if res[s].get("worker_peak_rss_mib") else "")
            )
            if s in res and res[s].get("peak_rss_mib")
            else "n/a"
            for s in stages
        ]
        lines.append(f"| {r['n']:,} | {r['engine']} | {r['buckets']} | {r['budget']} | " + " | ".join(cells) + " |")
    lines += ["", "Stage seconds (Dagster run time, from the CLI):", ""]
    lines += [
        f"- N = {r['n']:,}, --engine {r['engine']}, {r['buckets']} buckets, budget {r['budget']}: {r['stages']}"
        for r in results
    ]
    emit(lines, output_path(args, DEFAULT_OUT))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
