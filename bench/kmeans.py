"""Benchmark: faiss spherical k-means training and assignment through our core functions.

Usage:
    .venv/bin/python bench/kmeans.py [--n 1000000] [--d 384] [--k 1000] [--max-points-per-centroid 256]
                                     [--iterations 20] [--out bench/results/kmeans.md]
    .venv/bin/python bench/kmeans.py --smoke     # n=20k, k=50; prints only

Trains `train_spherical_kmeans` on the default-size sample (k * max_points_per_centroid
rows drawn from the n x d set, as the pipeline does) and assigns all n rows with
`assign`. Baseline in the same run: the same-run GEMM peak, against which the flop
count of training (2 * n_train * k * d per iteration) and assignment (2 * n * k * d) is
set. With CUDA and a faiss-gpu build, 10M x 512 with k = 10,000 runs on the GPU.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import add_output_options, command_line, emit, gemm_peak_gflops, machine_lines, output_path

from semdedup_assets.core.cluster.assign import assign
from semdedup_assets.core.cluster.kmeans import faiss_gpu_count, sample_target, train_spherical_kmeans

DEFAULT_OUT = "bench/results/kmeans.md"


def make_data(n: int, d: int, centers: int, seed: int = 0) -> np.ndarray:
    """(n, d) unit-norm float32 rows around `centers` random directions (clustered, like real embeddings)."""
    rng = np.random.default_rng(seed)
    c = rng.standard_normal((centers, d), dtype=np.float32)
    x = np.empty((n, d), dtype=np.float32)
    step = 100_000
    for s in range(0, n, step):  # chunked: no second n x d temporary
        e = min(s + step, n)
        x[s:e] = c[rng.integers(0, centers, e - s)] + rng.standard_normal((e - s, d), dtype=np.float32) * np.float32(
            0.6
        )
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def run_case(n: int, d: int, k: int, mppc: int, iters: int, use_gpu: bool) -> dict:
    """Sample, train, assign; return timings and flop rates."""
    x = make_data(n, d, centers=2 * k)
    target = min(n, sample_target(k, mppc))
    start = time.perf_counter()
    sample = x[np.sort(np.random.default_rng(1).choice(n, target, replace=False))]
    sample_s = time.perf_counter() - start
    km = train_spherical_kmeans(sample, k, niter=iters, seed=0, max_points_per_centroid=mppc, use_gpu=use_gpu)
    start = time.perf_counter()
    clusters, sims = assign(x, km.centroids)
    assign_s = time.perf_counter() - start
    sizes = np.bincount(clusters, minlength=k)
    return {
        "n": n,
        "d": d,
        "k": k,
        "n_train": km.n_train,
        "iters": iters,
        "sample_s": sample_s,
        "train_s": km.seconds,
        "assign_s": assign_s,
        "objective": km.objective,
        "gpu": km.gpu,
        "train_gflops": 2.0 * km.n_train * k * d * iters / km.seconds / 1e9,
        "assign_gflops": 2.0 * n * k * d / assign_s / 1e9,
        "empty": int((sizes == 0).sum()),
        "largest": int(sizes.max()),
        "mean_sim": float(sims.mean()),
    }


def table(r: dict, peak: float | None) -> list[str]:
    """Markdown rows of one case."""
    rel = (lambda g: f" ({g / peak:.0%} of GEMM peak)") if peak else (lambda g: "")
    return [
        "| metric | value |",
        "|---|---|",
        f"| data | {r['n']:,} x {r['d']} float32, k = {r['k']:,}, {'GPU' if r['gpu'] else 'CPU'} |",
        f"| training sample (k x max_points_per_centroid) | {r['n_train']:,} rows ({r['sample_s']:.2f} s to draw) |",
        f"| **training** ({r['iters']} iterations) | **{r['train_s']:.2f} s** = {r['train_s'] / r['iters']:.2f} s/iteration,"
        f" {r['train_gflops']:,.1f} GFLOP/s{rel(r['train_gflops'])} |",
        f"| **assignment** of all {r['n']:,} rows | **{r['assign_s']:.2f} s** = {r['n'] / r['assign_s']:,.0f} rows/s,"
        f" {r['assign_gflops']:,.1f} GFLOP/s{rel(r['assign_gflops'])} |",
        f"| training + assignment | {r['train_s'] + r['assign_s']:.2f} s |",
        f"| final objective (sum of cosines) / empty clusters / largest cluster | {r['objective']:,.1f} / {r['empty']} / {r['largest']:,} |",
        "",
    ]


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark, print the markdown report and write it where asked."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--d", type=int, default=384)
    ap.add_argument("--k", type=int, default=1000)
    ap.add_argument("--max-points-per-centroid", type=int, default=256)
    ap.add_argument("--iterations", type=int, default=20)
    add_output_options(ap, DEFAULT_OUT, "n=20k, k=50: checks the script works")
    args = ap.parse_args(argv)
    if args.smoke:
        args.n, args.k, args.iterations = 20_000, 50, 5
    out = output_path(args, DEFAULT_OUT)

    import faiss

    lines = [
        "# Spherical k-means (faiss) through `train_spherical_kmeans` and `assign`",
        "",
        f"Command: `{command_line('bench/kmeans.py', argv)}`",
        "",
        *machine_lines(
            [
                f"- faiss {faiss.__version__}, OpenMP threads: {faiss.omp_get_max_threads()},"
                f" GPUs visible to faiss: {faiss_gpu_count()}"
            ]
        ),
    ]
    peak = gemm_peak_gflops(args.d)
    lines += [
        f"Same-run GEMM peak (torch fp32 (4096 x {args.d}) @ ({args.d} x 4096), best of 5): {peak:,.1f} GFLOP/s"
        " (faiss uses its own BLAS; the ratio shows how close k-means runs to dense matmul speed).",
        "",
        "## CPU",
        "",
    ]
    r = run_case(args.n, args.d, args.k, args.max_points_per_centroid, args.iterations, use_gpu=False)
    lines += table(r, peak)
    print("\n".join(lines[-10:]), flush=True)

    lines += ["## GPU (faiss-gpu, 10M x 512, k = 10,000)", ""]
    if faiss_gpu_count() > 0:
        n, d, k = (200_000, 128, 200) if args.smoke else (10_000_000, 512, 10_000)
        lines += table(run_case(n, d, k, args.max_points_per_centroid, args.iterations, use_gpu=True), None)
    else:
        lines += ["skipped: no CUDA (or faiss has no GPU support: install faiss-gpu)", ""]
    emit(lines, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
