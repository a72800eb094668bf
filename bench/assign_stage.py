"""Benchmark: two choices of the assignment stage (issue 9, "a leaner data path").

Usage:
    .venv/bin/python bench/assign_stage.py [--n 262144] [--d 384] [--clusters 1000] [--buckets 16]
                                           [--shard-rows 10000] [--out bench/results/assign_stage.md]
    .venv/bin/python bench/assign_stage.py --smoke     # small sizes; prints only

1. sim_to_centroid kernels on n rows: what each costs next to the faiss search itself, and
   in how many rows its float32 value differs from the float64-accumulated one the
   pipeline writes (any difference can reorder near-ties inside a cluster, so keep-lists).
2. Layout of cluster_assignments, per shard of `--shard-rows` rows: today each bucket reads
   its own row group of a cluster-sorted file that holds the embeddings; the alternative
   writes the sorted file without embeddings, and each bucket takes its rows from the
   shard's (unsorted) embeddings file.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import add_output_options, best_of, command_line, emit, machine_lines, output_path

DEFAULT_OUT = "bench/results/assign_stage.md"


def unit_rows(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    """n random unit vectors (float32)."""
    x = rng.standard_normal((n, d), dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def sim_kernels(n: int, d: int, k: int, repeats: int) -> list[str]:
    """Time each sim_to_centroid kernel and count the rows whose value differs from the pipeline's."""
    import faiss

    from semdedup_assets.core.cluster.assign import SIM_BLOCK, sim_to_centroid

    rng = np.random.default_rng(0)
    x, c = unit_rows(rng, n, d), unit_rows(rng, k, d)
    index = faiss.IndexFlatIP(d)
    index.add(c)
    i = index.search(x, 1)[1][:, 0]
    c64 = c.astype(np.float64)

    def blocked(fn: Callable[[np.ndarray, np.ndarray], np.ndarray]) -> np.ndarray:
        out = np.empty(n, dtype=np.float32)
        for s in range(0, n, SIM_BLOCK):
            out[s : s + SIM_BLOCK] = fn(x[s : s + SIM_BLOCK], i[s : s + SIM_BLOCK])
        return out

    def per_cluster_sgemv() -> np.ndarray:
        out = np.empty(n, dtype=np.float32)
        order = np.argsort(i, kind="stable")
        bounds = np.searchsorted(i[order], np.arange(k + 1))
        xs = x[order]
        for cl in range(k):
            out[order[bounds[cl] : bounds[cl + 1]]] = xs[bounds[cl] : bounds[cl + 1]] @ c[cl]
        return out

    kernels: list[tuple[str, Callable[[], np.ndarray]]] = [
        (
            "pipeline: float64 einsum of float32 rows and gathered float32 centroids (`sim_to_centroid`)",
            lambda: blocked(lambda r, ii: sim_to_centroid(r, c[ii])),
        ),
        (
            "base commit: float64 einsum with gathered float64 centroids",
            lambda: blocked(lambda r, ii: np.einsum("ij,ij->i", r, c64[ii], dtype=np.float64)),
        ),
        (
            "float32 einsum (one row-wise kernel, batch-independent)",
            lambda: blocked(lambda r, ii: np.einsum("ij,ij->i", r, c[ii])),
        ),
        ("float32 BLAS matrix-vector product per cluster", per_cluster_sgemv),
    ]
    ref = kernels[0][1]()
    search = best_of(lambda: index.search(x, 1), repeats)
    lines = [
        "## 1. sim_to_centroid kernels",
        "",
        f"n = {n:,} rows x {d}, k = {k:,}; faiss `IndexFlatIP.search(x, 1)` on the same rows: {search:.3f} s"
        f" (best of {repeats})",
        "",
        "| kernel | seconds | vs the faiss search | rows whose float32 sim differs from the pipeline's |",
        "|---|---|---|---|",
    ]
    for name, fn in kernels:
        sec = best_of(fn, repeats)
        lines.append(f"| {name} | {sec:.3f} | {sec / search:.1%} | {int((fn() != ref).sum()):,} of {n:,} |")
    return [*lines, ""]


def bucket_layouts(rows: int, d: int, k: int, buckets: int, repeats: int) -> list[str]:
    """Per shard: today's row-group reads vs reading the unsorted embeddings file once per bucket."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from semdedup_assets.core.cluster.assign import assign, bucket_row_slices
    from semdedup_assets.core.io.storage import parquet_options
    from semdedup_assets.core.io.tables import embedding_array

    rng = np.random.default_rng(1)
    x, c = unit_rows(rng, rows, d), unit_rows(rng, k, d)
    clusters, sims = assign(x, c)
    emb = pa.table({"id": pa.array([f"s-{r:06d}" for r in range(rows)]), "embedding": embedding_array(x, "float32")})
    index = pa.table(
        {
            "id": emb.column("id"),
            "row": pa.array(np.arange(rows)),
            "cluster": pa.array(clusters),
            "sim_to_centroid": pa.array(sims),
        }
    )
    by = [("cluster", "ascending"), ("id", "ascending")]
    with_emb = index.append_column("embedding", emb.column("embedding")).sort_by(by)
    without = index.sort_by(by)

    with tempfile.TemporaryDirectory() as tmp:

        def write(table: pa.Table, name: str, per_bucket: bool = True) -> str:
            path = f"{tmp}/{name}.parquet"
            with pq.ParquetWriter(path, table.schema, **parquet_options(table.schema)) as w:
                slices = (
                    bucket_row_slices(table.column("cluster").to_numpy(), k, buckets) if per_bucket else [(0, rows)]
                )
                for offset, length in slices:
                    w.write_table(table.slice(offset, length))
            return path

        e_path = write(emb.append_column("cluster", pa.array(clusters)), "embeddings", per_bucket=False)
        a_full, a_small = write(with_emb, "with"), write(without, "without")
        groups = pq.ParquetFile(a_full).num_row_groups

        def read_today() -> None:
            for b in range(groups):
                pq.ParquetFile(a_full).read_row_group(b)

        def read_alternative() -> None:
            for b in range(groups):
                part = pq.ParquetFile(a_small).read_row_group(b)
                pq.read_table(e_path, columns=["embedding"]).column("embedding").take(part.column("row"))

        figures = [
            (
                "today, assignment stage: write the sorted file with embeddings",
                best_of(lambda: write(with_emb, "w"), repeats),
            ),
            (
                "alternative, assignment stage: write the sorted file without embeddings",
                best_of(lambda: write(without, "w"), repeats),
            ),
            (f"today, bucket stage: {groups} buckets each read their row group", best_of(read_today, repeats)),
            (
                f"alternative, bucket stage: {groups} buckets each read their small row group and take their rows"
                " from the whole embeddings file",
                best_of(read_alternative, repeats),
            ),
        ]
    today = figures[0][1] + figures[2][1]
    alt = figures[1][1] + figures[3][1]
    return [
        "## 2. Does cluster_assignments need the embeddings?",
        "",
        f"One shard of {rows:,} rows x {d}, k = {k:,}, {buckets} buckets (best of {repeats}):",
        "",
        "| step | ms per shard |",
        "|---|---|",
        *[f"| {name} | {sec * 1000:.0f} |" for name, sec in figures],
        f"| **total today / alternative** | **{today * 1000:.0f} / {alt * 1000:.0f}** |",
        "",
        f"Verdict: dropping the embeddings from the assignments {'pays' if alt < today else 'does not pay'}"
        f" (the alternative takes {alt / today:.2f}x today's time). A shard's embeddings file is in input order, so every row group of it holds rows of"
        " every bucket: each bucket has to read the whole file, and the reads grow with the bucket count, while the"
        " write it saves is one sequential pass.",
        "",
    ]


def main(argv: list[str] | None = None) -> int:
    """Run both measurements, print the markdown report and write it where asked."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=262_144)
    ap.add_argument("--d", type=int, default=384)
    ap.add_argument("--clusters", type=int, default=1000)
    ap.add_argument("--buckets", type=int, default=16)
    ap.add_argument("--shard-rows", type=int, default=10_000)
    ap.add_argument("--repeats", type=int, default=3)
    add_output_options(ap, DEFAULT_OUT, "n=8192, 2,000-row shard: checks the script works")
    args = ap.parse_args(argv)
    if args.smoke:
        args.n, args.shard_rows, args.clusters, args.repeats = 8192, 2000, 50, 1
    out = output_path(args, DEFAULT_OUT)
    start = time.perf_counter()
    lines = [
        "# The assignment stage: sim_to_centroid kernel and the assignments' layout",
        "",
        f"Command: `{command_line('bench/assign_stage.py', argv)}`",
        "",
        *machine_lines(),
        *sim_kernels(args.n, args.d, args.clusters, args.repeats),
        *bucket_layouts(args.shard_rows, args.d, args.clusters, args.buckets, args.repeats),
        f"Ran in {time.perf_counter() - start:.0f} s.",
        "",
    ]
    emit(lines, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
