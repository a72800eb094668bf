"""Benchmark: the `outliers` and `representatives` selections against SemHash 0.5, on the same embeddings.

Usage:
    .venv/bin/python bench/selections.py [--planted 4000] [--texts 8000] [--memory-n 10000]
                                         [--out bench/results/selections.md]
    .venv/bin/python bench/selections.py --smoke     # tiny corpora, no static model; prints only

Corpora (each run once through the library, `SemDeDup(...).run`, into a kept storage; the
comparisons read the embeddings *stored by that run*, so both sides see the same vectors):
1. planted: `--planted` unit vectors in 64 dimensions, 20 Gaussian clusters of unequal size, plus 2%
   random directions (the planted outliers).
2. texts: the first `--texts` distinct paragraphs of the standard library and installed packages
   (bench/text_end_to_end.py's corpus), embedded with `--model static` (model2vec, 256 dimensions).

SemHash is built with `SemHash.from_embeddings(stored embeddings, records=ids)` and its default ANN
backend (usearch), then:
(a) outliers: our `outliers:fraction=F` removed set against `self_filter_outliers(outlier_percentage=F)`'s
    filtered set: both remove ceil(F * n); the overlap is |ours & theirs| / ceil(F * n). On the
    planted corpus, also the share of the planted outliers each one finds at F = 2%.
(b) representatives: coverage = mean over all items of the largest cosine similarity to a chosen
    item, for our `representatives:size=N` (diversity 0.5), SemHash's
    `self_find_representative(selection_size=N)` (MMR, diversity 0.5, candidate_limit "auto") and a
    uniform random choice of N (mean of 5 draws).
(c) memory, N vs 4N: planted corpora of `--memory-n` and 4x as many items with the same cluster size
    (4x the clusters) and `--memory-budget 8MB`; each selection computed in this process: its peak
    of traced allocations (tracemalloc: NumPy's arrays, Python objects; not Arrow's or DuckDB's
    pools) and its extra peak RSS (VmHWM reset before the call, minus the RSS before it; Arrow and
    DuckDB included, noisy: memory the allocator already holds does not show).
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from common import add_output_options, command_line, emit, machine_lines, measure, output_path

from semdedup_assets import SemDeDup, SemDeDupResult
from semdedup_assets.core.select.prune import compute_pruning, parse_pruning

DEFAULT_OUT = "bench/results/selections.md"
DIM = 64


def planted(n: int, clusters: int, seed: int = 0, outlier_share: float = 0.02) -> tuple[np.ndarray, np.ndarray]:
    """Unit rows: `clusters` Gaussian clusters of unequal size and outlier_share random directions (True there)."""
    rng = np.random.default_rng(seed)
    n_out = round(n * outlier_share)
    weights = rng.uniform(0.5, 2.0, size=clusters)
    sizes = np.floor(weights / weights.sum() * (n - n_out)).astype(int)
    sizes[: (n - n_out) - sizes.sum()] += 1
    centers = rng.normal(size=(clusters, DIM))
    rows = [c + 0.12 * np.linalg.norm(c) * rng.normal(size=(m, DIM)) for c, m in zip(centers, sizes)]
    rows.append(rng.normal(size=(n_out, DIM)))
    x = np.concatenate(rows).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    order = rng.permutation(n)
    return x[order], (np.arange(n) >= n - n_out)[order]


def stored(storage: Path) -> tuple[list[str], np.ndarray]:
    """The ids and embeddings the run stored (float32 unit rows), in id order."""
    tables = [pq.read_table(p, columns=["id", "embedding"]) for p in sorted((storage / "embeddings").glob("*.parquet"))]
    ids = [i for t in tables for i in t.column("id").to_pylist()]
    x = np.array([v for t in tables for v in t.column("embedding").to_pylist()], dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    order = np.argsort(np.array(ids))
    return [ids[i] for i in order], x[order]


def coverage(x: np.ndarray, chosen: np.ndarray) -> float:
    """Mean over all rows of the largest cosine similarity to a chosen row (blocks of 4,096 rows)."""
    c = x[chosen]
    best = [np.max(x[s : s + 4096] @ c.T, axis=1) for s in range(0, len(x), 4096)]
    return float(np.concatenate(best).astype(np.float64).mean())


class Stored:
    """SemHash needs an encoder object; every record here is already embedded, so it is never called."""

    def encode(self, sentences: list[str], **kwargs: object) -> np.ndarray:
        """Never used by the self_* methods."""
        raise RuntimeError("the comparison passes stored embeddings only")


def compare(
    name: str,
    result: SemDeDupResult,
    ids: list[str],
    x: np.ndarray,
    fractions: Sequence[float],
    sizes: Sequence[int],
    truth: np.ndarray | None = None,
) -> list[str]:
    """Sections (a) and (b) for one corpus, as markdown lines."""
    from semhash import SemHash

    n = len(ids)
    index = {i: r for r, i in enumerate(ids)}
    start = time.perf_counter()
    sh = SemHash.from_embeddings(x, records=ids, model=Stored())
    sh_build = time.perf_counter() - start
    lines = [
        f"### {name}: {n:,} items, {x.shape[1]} dimensions",
        "",
        f"SemHash index (usearch) built in {sh_build:.1f} s.",
        "",
        "**(a) outliers**",
        "",
        "| F | removed ceil(F n) | ours (s) | SemHash (s) | overlap | planted found, ours | planted found, SemHash |",
        "|---|---|---|---|---|---|---|",
    ]
    for f in fractions:
        start = time.perf_counter()
        ours = set(ids) - set(result.pruned_ids(f"outliers:fraction={f}"))
        ours_s = time.perf_counter() - start
        start = time.perf_counter()
        theirs = set(sh.self_filter_outliers(outlier_percentage=f).filtered)
        theirs_s = time.perf_counter() - start
        target = math.ceil(f * n)
        found = ("", "")
        if truth is not None:
            planted_ids = {ids[r] for r in np.flatnonzero(truth)}
            found = (
                f"{len(ours & planted_ids) / len(planted_ids):.1%}",
                f"{len(theirs & planted_ids) / len(planted_ids):.1%}",
            )
        assert len(ours) == target, (len(ours), target)
        lines.append(
            f"| {f} | {target:,} (theirs {len(theirs):,}) | {ours_s:.1f} | {theirs_s:.1f} | "
            f"{len(ours & theirs) / target:.1%} | {found[0]} | {found[1]} |"
        )
    lines += [
        "",
        "**(b) representatives: coverage (mean max cosine similarity of every item to the chosen set)**",
        "",
        "| N | ours | ours (s) | SemHash | SemHash picked | SemHash (s) | random (mean of 5) |",
        "|---|---|---|---|---|---|---|",
    ]
    rng = np.random.default_rng(0)
    for size in sizes:
        start = time.perf_counter()
        ours_ids = result.pruned_ids(f"representatives:size={size}")
        ours_s = time.perf_counter() - start
        start = time.perf_counter()
        theirs_ids = list(sh.self_find_representative(selection_size=size).selected)
        theirs_s = time.perf_counter() - start
        ours_cov = coverage(x, np.array([index[i] for i in ours_ids]))
        theirs_cov = coverage(x, np.array([index[i] for i in theirs_ids]))
        rand = np.mean([coverage(x, rng.choice(n, size, replace=False)) for _ in range(5)])
        lines.append(
            f"| {size:,} | {ours_cov:.4f} | {ours_s:.1f} | {theirs_cov:.4f} | {len(theirs_ids):,} | "
            f"{theirs_s:.1f} | {rand:.4f} |"
        )
    return [*lines, ""]


def run_planted(work: Path, n: int, clusters: int, **knobs: object) -> tuple[SemDeDupResult, np.ndarray]:
    """The library run of a planted corpus in a kept storage; returns (result, outlier mask by row)."""
    x, truth = planted(n, clusters)
    result = SemDeDup(clusters=clusters, eps=[0.01], progress=False, **knobs).run(x, storage=str(work))
    return result, truth


def memory_rows(work: Path, n: int, per_cluster: int) -> list[str]:
    """Section (c): extra peak RSS of each selection at n and 4n items (same cluster size, budget 8MB)."""
    lines = [
        "| items | clusters | largest cluster | selection | traced peak (MiB) | extra peak RSS (MiB) | seconds |",
        "|---|---|---|---|---|---|---|",
    ]
    for m in (n, 4 * n):
        result, _ = run_planted(work / f"mem-{m}", m, m // per_cluster, memory_budget="8MB")
        largest = result.sql("SELECT max(n) AS n FROM (SELECT count(*) AS n FROM items GROUP BY cluster)")
        biggest = int(largest.column("n")[0].as_py())
        for text in ("outliers:fraction=0.05", f"representatives:size={m // 100}"):
            p = parse_pruning(text, result.settings.eps)
            compute_pruning(result.settings, p)  # warm: imports and first-use allocations are not the stage's
            got = measure(compute_pruning, result.settings, p)
            tracemalloc.start()
            compute_pruning(result.settings, p)
            traced = tracemalloc.get_traced_memory()[1] / 2**20
            tracemalloc.stop()
            lines.append(
                f"| {m:,} | {m // per_cluster} | {biggest:,} | `{p.label}` | {traced:.1f} | {got['extra_mib']:.1f} | "
                f"{got['seconds']:.1f} |"
            )
        result.close()
    return lines


def main(argv: list[str] | None = None) -> int:
    """Run the comparisons, print the markdown report and write it where asked."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--planted", type=int, default=4000)
    ap.add_argument("--texts", type=int, default=8000)
    ap.add_argument("--memory-n", type=int, default=10_000)
    add_output_options(ap, DEFAULT_OUT, "800 planted vectors, no texts, memory at 1,000 vs 4,000; prints only")
    args = ap.parse_args(argv)
    if args.smoke:
        args.planted, args.texts, args.memory_n = 800, 0, 1000
    out = output_path(args, DEFAULT_OUT)
    work = Path(tempfile.mkdtemp(prefix="semdedup-bench-selections-"))
    lines = [
        "# Outlier and representative selections against SemHash",
        "",
        f"Command: `{command_line('bench/selections.py', argv)}`",
        "",
        *machine_lines(),
        "## (a), (b): the same embeddings on both sides",
        "",
    ]
    result, truth = run_planted(work / "planted", args.planted, 20)
    ids, x = stored(work / "planted")
    # The library's ids are the row numbers: the planted mask follows them.
    truth_by_id = np.array([truth[int(i)] for i in ids])
    lines += compare(
        "planted", result, ids, x, (0.01, 0.02, 0.05, 0.1), (10, 100, min(1000, args.planted)), truth_by_id
    )
    result.close()
    if args.texts:
        sys.path.insert(0, str(Path(__file__).parent))
        from text_end_to_end import corpus

        texts = corpus(args.texts)
        result = SemDeDup(model="static", clusters=max(2, args.texts // 200), eps=[0.01], progress=False).run(
            texts, storage=str(work / "texts")
        )
        ids, x = stored(work / "texts")
        lines += compare("texts, static model", result, ids, x, (0.01, 0.05, 0.1), (10, 100, 1000))
        result.close()
    lines += ["## (c) memory at N and 4N items", "", *memory_rows(work, args.memory_n, 500), ""]
    emit(lines, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
