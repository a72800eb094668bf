"""Benchmark: the library path (`from semdedup_assets import SemDeDup`), fixed cost and bring-your-own embeddings.

Usage:
    .venv/bin/python bench/library.py [--n 50000] [--d 384] [--clusters 100] [--eps 0.01] [--repeats 3]
                                      [--out bench/results/library.md]
    .venv/bin/python bench/library.py --smoke     # n=3000, d=32, one repeat; prints only

1. Fixed cost (goal: <= 2 s): a fresh process imports `semdedup_assets.SemDeDup`, sets it up and runs it on
   100 embeddings (32-d) to the first keep mask. Measured inside the process (import, set-up, first result)
   and as the whole process's wall time; beside it, a fresh process that only imports torch (the pairwise
   tiles' library, which the first result needs): the floor of this machine.
2. Bring-your-own embeddings in memory (goal: <= 1.0x): N x d planted embeddings (bench/end_to_end.py's
   generator) made in the process, then timed from there to the masks out: the library
   (`SemDeDup(...).run(x).keep_mask(eps)`, a temporary storage) against the reference-style script
   (bench/end_to_end.py's: faiss spherical k-means on all rows, assign, per cluster the dense similarity
   matrix, triu, column max), both in fresh processes, imports included, interleaved `--repeats` times.
   The machine is shared: only the ratios within one run count.
3. With `--before PATH`: the fixed cost and the library run again from another source tree (its `semdedup_assets` imported first,
   e.g. `git archive` of an earlier commit into PATH), interleaved with the others: before and after a
   change, in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

BEFORE_TREE = "SEMDEDUP_BENCH_BEFORE_TREE"  # a --before child: the package from that source tree
if os.environ.get(BEFORE_TREE):  # bound first: common.py puts this checkout on sys.path and imports the package
    sys.path.insert(0, os.environ[BEFORE_TREE])
    import semdedup_assets  # noqa: F401

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import add_output_options, command_line, emit, load_average, machine_lines, output_path, run_tree, verdict  # noqa: E402
from end_to_end import cluster_rows, parse_result, planted_embeddings  # noqa: E402

DEFAULT_OUT = "bench/results/library.md"
FIXED_N, FIXED_D = 100, 32
CENTERS = 1000


def fixed_cost_child() -> dict:
    """Import, set-up and first result on 100 items, timed inside this process."""
    start = time.perf_counter()
    from semdedup_assets import SemDeDup

    _ = SemDeDup.__name__  # the lazy attribute resolves the library module here
    imported = time.perf_counter()
    x = planted_embeddings(FIXED_N, FIXED_D, 10)
    sd = SemDeDup(progress=False)
    ready = time.perf_counter()
    with sd.run(x) as result:
        mask = result.keep_mask(0.01)
    done = time.perf_counter()
    return {
        "import": imported - start,
        "setup": ready - imported,
        "first result": done - ready,
        "total": done - start,
        "kept": int(mask.sum()),
        "module": sys.modules["semdedup_assets"].__file__,
    }


def torch_child() -> dict:
    """Only `import torch`: the floor of a first result that runs pairwise tiles."""
    start = time.perf_counter()
    import torch  # noqa: F401

    return {"total": time.perf_counter() - start}


def library_child(n: int, d: int, k: int, eps: float) -> dict:
    """The library on an in-memory array: timed from the array to the mask."""
    x = planted_embeddings(n, d, CENTERS)
    start = time.perf_counter()
    from semdedup_assets import SemDeDup

    with SemDeDup(clusters=k, eps=[eps], progress=False).run(x) as result:
        mask = result.keep_mask(eps)
    seconds = time.perf_counter() - start
    module = sys.modules["semdedup_assets"].__file__
    return {"total": seconds, "removed": int((~mask).sum()), "mask": mask_digest(mask), "module": module}


def reference_child(n: int, d: int, k: int, eps: float) -> dict:
    """The reference-style script on the same in-memory array: faiss k-means, assign, dense per cluster."""
    x = planted_embeddings(n, d, CENTERS)
    start = time.perf_counter()
    import faiss
    import torch

    km = faiss.Kmeans(d, k, niter=20, seed=0, spherical=True, verbose=False)
    km.train(x)
    sims, nearest = km.index.search(x, 1)
    nearest, sims = nearest[:, 0], sims[:, 0]
    mask = np.ones(n, dtype=bool)
    for rows in cluster_rows(nearest, k):
        rows = rows[np.argsort(sims[rows], kind="stable")]  # hard: farthest from the centroid first (kept)
        reps = torch.from_numpy(x[rows])
        m, _ = torch.max(torch.triu(reps @ reps.T, diagonal=1), dim=0)
        mask[rows[m.numpy() > 1 - eps]] = False
    return {"total": time.perf_counter() - start, "removed": int((~mask).sum()), "mask": mask_digest(mask)}


def mask_digest(mask: np.ndarray) -> str:
    """The mask's removed rows, packed (to compare the two methods' decisions in the parent)."""
    return np.packbits(~mask).tobytes().hex()


def run_child(kind: str, args: argparse.Namespace) -> dict:
    """One measurement in a fresh process: its RESULT, with the process's wall time and peak RSS."""
    cmd = [
        sys.executable,
        __file__,
        "--child",
        kind,
        "--n",
        str(args.n),
        "--d",
        str(args.d),
        "--clusters",
        str(args.clusters),
        "--eps",
        str(args.eps),
    ]
    env = dict(os.environ)
    if kind.endswith("-before"):
        cmd[cmd.index(kind)] = kind.removesuffix("-before")
        env[BEFORE_TREE] = str(Path(args.before).resolve())
    out = run_tree(cmd, env=env)
    if out["rc"] != 0:
        raise SystemExit(f"{kind} failed:\n{out['stderr'][-3000:]}")
    result = parse_result(out["stdout"])
    if kind.endswith("-before") and not str(result["module"]).startswith(str(Path(args.before).resolve())):
        raise SystemExit(f"--before {args.before}: the child imported {result['module']} instead")
    result.update(wall=out["seconds"], peak_mib=out["peak_mib"])
    print(f"{kind}: {result['total']:.2f} s in process, {out['seconds']:.2f} s wall", flush=True)
    return result


def agreement(a: str, b: str, n: int) -> float:
    """Jaccard of two removed sets given as packed masks."""
    ra = np.unpackbits(np.frombuffer(bytes.fromhex(a), np.uint8))[:n].astype(bool)
    rb = np.unpackbits(np.frombuffer(bytes.fromhex(b), np.uint8))[:n].astype(bool)
    union = int((ra | rb).sum())
    return 1.0 if union == 0 else int((ra & rb).sum()) / union


def runs_line(runs: dict[str, list[dict]], labels: dict[str, str]) -> str:
    """'Runs (s): <label> t1, t2, ...; <label> ...' for the kinds named (label -> kind)."""
    return "Runs (s): " + "; ".join(
        f"{label} " + ", ".join(f"{r['total']:.2f}" for r in runs[kind]) for label, kind in labels.items()
    )


def before_lines(runs: dict[str, list[dict]], args: argparse.Namespace) -> list[str]:
    """The before/after table of a run with --before (none without)."""
    if not args.before:
        return []

    def med(kind: str) -> float:
        return statistics.median(r["total"] for r in runs[kind])

    same = all(r["mask"] == runs["library"][0]["mask"] for r in runs["library"] + runs["library-before"])
    return [
        f"## Before and after the change (`--before {args.before}`), same run",
        "",
        "| measure | before (s) | after (s) | before / after |",
        "|---|---|---|---|",
        *[
            f"| {name} | {med(b):.2f} | {med(a):.2f} | {med(b) / med(a):.2f}x |"
            for name, a, b in (
                ("fixed cost (100 x 32)", "fixed", "fixed-before"),
                (f"library, {args.n:,} x {args.d}", "library", "library-before"),
            )
        ],
        "",
        runs_line(runs, {"fixed before": "fixed-before", "library before": "library-before"}),
        "",
        f"Same keep mask before and after, in every run: {same}",
        "",
    ]


def main(argv: list[str] | None = None) -> int:
    """Run the measurements and write the report."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=50_000)
    ap.add_argument("--d", type=int, default=384)
    ap.add_argument("--clusters", type=int, default=100)
    ap.add_argument("--eps", type=float, default=0.01)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--before", default=None, metavar="PATH", help="also time the library from this source tree")
    ap.add_argument("--child", choices=("fixed", "torch", "library", "reference"), help=argparse.SUPPRESS)
    add_output_options(ap, DEFAULT_OUT, "n=3000, d=32, 10 clusters, one repeat; prints only")
    args = ap.parse_args(argv)
    if args.child:
        out = {"fixed": fixed_cost_child, "torch": torch_child}.get(args.child)
        result = (
            out()
            if out
            else (library_child if args.child == "library" else reference_child)(
                args.n, args.d, args.clusters, args.eps
            )
        )
        print("RESULT " + json.dumps(result))
        return 0
    if args.smoke:
        args.n, args.d, args.clusters, args.repeats = 3000, 32, 10, 1
    load = load_average()
    kinds = ["fixed", "torch", "library", "reference"] + (["fixed-before", "library-before"] if args.before else [])
    runs: dict[str, list[dict]] = {k: [] for k in kinds}
    for _ in range(args.repeats):  # interleaved: a busy spell of the shared machine hits every kind alike
        for kind in runs:
            runs[kind].append(run_child(kind, args))

    def med(kind: str, key: str = "total") -> float:
        return statistics.median(r[key] for r in runs[kind])

    fixed, torch_floor = med("fixed"), med("torch")
    fixed_wall = med("fixed", "wall")
    lib, ref = med("library"), med("reference")
    ratio = lib / ref
    parts = {p: statistics.median(r[p] for r in runs["fixed"]) for p in ("import", "setup", "first result")}
    jac = statistics.median(agreement(a["mask"], b["mask"], args.n) for a, b in zip(runs["library"], runs["reference"]))
    lines = [
        "# The library path: fixed cost and bring-your-own embeddings in memory",
        "",
        f"Command: `{command_line('bench/library.py', argv)}`",
        "",
        *machine_lines([f"load average at start: {load}"]),
        "",
        "Medians of interleaved fresh processes. The machine is shared and noisy: the absolute seconds move",
        "from run to run, the ratios within one run are what count.",
        "",
        "## Fixed cost: import + set-up + first result on 100 embeddings (32-d)",
        "",
        "| part | s (median) |",
        "|---|---|",
        *[f"| {p} | {v:.2f} |" for p, v in parts.items()],
        f"| **total, in process** | **{fixed:.2f}** |",
        f"| whole process, wall (interpreter start and exit included) | {fixed_wall:.2f} |",
        f"| `import torch` alone, in process (the floor: the pairwise tiles run on torch) | {torch_floor:.2f} |",
        f"| library fixed cost / `import torch` | {fixed / torch_floor:.2f}x |",
        "",
        runs_line(runs, {"library": "fixed", "import torch": "torch"}),
        "",
        f"## Bring-your-own embeddings in memory: {args.n:,} x {args.d}, k = {args.clusters}, eps = {args.eps}",
        "",
        "Both from the numpy array in the process to the keep mask out, imports included.",
        "",
        "| run | s (median) | peak RSS (MiB) | removed | vs reference-style |",
        "|---|---|---|---|---|",
        f"| `SemDeDup(clusters={args.clusters}, eps=[{args.eps}]).run(x).keep_mask({args.eps})` | {lib:.2f} | "
        f"{med('library', 'peak_mib'):,.0f} | {runs['library'][0]['removed']:,} | {ratio:.2f}x |",
        f"| reference-style script (faiss k-means on all rows, dense per cluster) | {ref:.2f} | "
        f"{med('reference', 'peak_mib'):,.0f} | {runs['reference'][0]['removed']:,} | 1.00x |",
        "",
        runs_line(runs, {"library": "library", "reference-style": "reference"}),
        "",
        f"Agreement of the removed sets (Jaccard; other k-means samples give other clusters): {jac:.3f}",
        "",
        *before_lines(runs, args),
        "## Goals",
        "",
        f"- fixed cost (import + set-up + first result on 100 items) <= 2 s: **{verdict(fixed <= 2.0)}** "
        f"({fixed:.2f} s in process; `import torch` alone takes {torch_floor:.2f} s here)",
        f"- <= 1.0x the reference-style script on bring-your-own embeddings in memory: **{verdict(ratio <= 1.0)}** "
        f"({ratio:.2f}x at {args.n:,} x {args.d}; the goal names 1M x 384, not run here)",
    ]
    emit(lines, output_path(args, DEFAULT_OUT))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
