"""Benchmark: the library path (`SemDeDup(model="static").run(texts)`) against SemHash, same static model, texts in memory.

Usage:
    .venv/bin/python bench/library_semhash.py [--sizes 55000,220000] [--threshold 0.9] [--repeats 3]
                                              [--before PATH] [--static PATH] [--work DIR]
                                              [--out bench/results/library_semhash.md]
    .venv/bin/python bench/library_semhash.py --smoke     # 2,000 texts, one repeat; prints only

Data: for each size N, N / 1.1 distinct real English paragraphs (bench/text_end_to_end.py's corpus:
docstrings and comment blocks of the standard library, then of the installed packages) plus 10% injected
near-duplicates of random paragraphs (exact, typos, boilerplate, truncated, reordered, case and
punctuation stripped, in turn), shuffled: a Python list of N strings.

Each run is a fresh process that reads the list (untimed), then is timed from there to the result, imports
and model load included:
- ours: `SemDeDup(model=..., max_length=512, eps=[1 - t]).run(texts).keep_mask(1 - t)` (a temporary
  storage, every stage file written; max_length 512 is the static model's own, which SemHash uses);
- SemHash: `StaticModel.from_pretrained(PATH)`, `SemHash.from_records(texts, model=model)`,
  `self_deduplicate(threshold=t)`;
- with `--before PATH`: ours again from another source tree (its `semdedup_assets` imported first, e.g. a `git archive` of an
  earlier commit), to compare before and after a change in the same run.
Both encode with the same model2vec model: `model="static"` resolves to this machine's cached static model
and SemHash loads that folder. SemHash removes similarity >= t; ours removes max_sim > 1 - eps, eps = 1 - t.
The kinds are interleaved `--repeats` times (a busy spell of the shared machine hits each alike); medians.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

BEFORE_TREE = "SEMDEDUP_BENCH_BEFORE_TREE"  # a --before child: the package from that source tree
if os.environ.get(BEFORE_TREE):  # bound first: common.py puts this checkout on sys.path and imports the package
    sys.path.insert(0, os.environ[BEFORE_TREE])
    import semdedup_assets  # noqa: F401

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import add_output_options, command_line, emit, load_average, machine_lines, output_path, run_tree, verdict  # noqa: E402
from end_to_end import parse_result  # noqa: E402

DEFAULT_OUT = "bench/results/library_semhash.md"
GOALS = {55_000: 3.0, 220_000: 4.0}  # issue 33: >= 3x SemHash at 55,000 texts, >= 4x at 220,000


def make_texts(n: int, dup_fraction: float, seed: int = 0) -> tuple[list[str], int]:
    """N texts: distinct paragraphs plus injected near-duplicates, shuffled; returns (texts, injected copies)."""
    from text_end_to_end import VARIANTS, corpus, vary

    rng = random.Random(seed)
    distinct = round(n / (1 + dup_fraction))
    texts = corpus(distinct)
    copies = [
        vary(texts[i], VARIANTS[k % len(VARIANTS)], rng)
        for k, i in enumerate(rng.choices(range(distinct), k=n - distinct))
    ]
    out = texts + copies
    rng.shuffle(out)
    return out, n - distinct


def digest(text: str) -> str:
    """A short stable key of a text (to compare the two tools' removed texts in the parent)."""
    return hashlib.blake2b(text.encode(), digest_size=8).hexdigest()


def ours_child(args: argparse.Namespace) -> dict:
    """The library on the list of texts, from the list to the mask."""
    texts = json.loads(Path(args.child_texts).read_text())
    eps = round(1.0 - args.threshold, 10)
    start = time.perf_counter()
    import semdedup_assets
    from semdedup_assets import SemDeDup

    with SemDeDup(model=args.child_model, max_length=512, eps=[eps], progress=False).run(texts) as result:
        mask = result.keep_mask(eps)
    seconds = time.perf_counter() - start
    removed = [digest(texts[i]) for i in (~mask).nonzero()[0]]
    return {"total": seconds, "removed": removed, "module": semdedup_assets.__file__}


def semhash_child(args: argparse.Namespace) -> dict:
    """SemHash on the same list with the same static model, from the list to the deduplication result."""
    texts = json.loads(Path(args.child_texts).read_text())
    start = time.perf_counter()
    from model2vec import StaticModel
    from semhash import SemHash

    model = StaticModel.from_pretrained(args.child_model, force_download=False)
    result = SemHash.from_records(texts, model=model).self_deduplicate(threshold=args.threshold)
    seconds = time.perf_counter() - start
    return {"total": seconds, "removed": [digest(d.record) for d in result.filtered]}


def run_child(kind: str, texts_file: Path, model: str, args: argparse.Namespace) -> dict:
    """One timed run in a fresh process; its RESULT with the process's wall time and peak RSS."""
    cmd = [sys.executable, __file__, "--child", kind, "--child-texts", str(texts_file)]
    cmd += ["--child-model", model, "--threshold", str(args.threshold)]
    env = dict(os.environ)
    if kind == "before":
        env[BEFORE_TREE] = str(Path(args.before).resolve())
    out = run_tree(cmd, env=env)
    if out["rc"] != 0:
        raise SystemExit(f"{kind} failed:\n{out['stdout'][-2000:]}\n{out['stderr'][-3000:]}")
    result = parse_result(out["stdout"])
    if kind == "before" and not result["module"].startswith(str(Path(args.before).resolve())):
        raise SystemExit(f"--before {args.before}: the child imported {result['module']} instead")
    result.update(wall=out["seconds"], peak_mib=out["peak_mib"])
    print(f"  {kind}: {result['total']:.2f} s in process, {out['seconds']:.2f} s wall", flush=True)
    return result


def overlap(a: list[str], b: list[str]) -> float:
    """Jaccard of two removed multisets of texts."""
    ca, cb = collections.Counter(a), collections.Counter(b)
    union = sum((ca | cb).values())
    return 1.0 if union == 0 else sum((ca & cb).values()) / union


def main(argv: list[str] | None = None) -> int:
    """Build the texts, run the kinds interleaved, write the report."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="55000,220000", help="comma-separated numbers of texts")
    ap.add_argument("--dup-fraction", type=float, default=0.1)
    ap.add_argument("--threshold", type=float, default=0.9, help="SemHash's threshold t; ours runs eps = 1 - t")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--before", default=None, metavar="PATH", help="also time ours from this source tree")
    ap.add_argument("--static", default=None, metavar="PATH", help="static model folder (default: `model=static`)")
    ap.add_argument("--work", default=None, help="folder for the text lists (default: a temporary one)")
    ap.add_argument("--child", choices=("ours", "before", "semhash"), help=argparse.SUPPRESS)
    ap.add_argument("--child-texts", help=argparse.SUPPRESS)
    ap.add_argument("--child-model", help=argparse.SUPPRESS)
    add_output_options(ap, DEFAULT_OUT, "2,000 texts, one repeat, a tiny static model; prints only")
    args = ap.parse_args(argv)
    if args.child:
        fn = semhash_child if args.child == "semhash" else ours_child
        print("RESULT " + json.dumps(fn(args)))
        return 0
    if args.smoke:
        args.sizes, args.repeats = "2000", 1
    from text_embedding import bench_static_model

    from semdedup_assets.core.embed.encoders.static import resolve_static_model

    folder = bench_static_model(args.static, args.smoke)  # `static` (this machine's cached model) unless given
    ours_model = "static" if args.static is None and not args.smoke else f"model2vec:{folder}"
    if resolve_static_model(ours_model) != folder:
        raise SystemExit(f"model={ours_model!r} resolves to {resolve_static_model(ours_model)}, not {folder}")
    work = Path(args.work or tempfile.mkdtemp(prefix="semdedup-bench-libsemhash-"))
    work.mkdir(parents=True, exist_ok=True)
    kinds = ["ours", "semhash"] + (["before"] if args.before else [])
    load = load_average()
    sections, goals = [], []
    for n in (int(s) for s in args.sizes.split(",")):
        texts, injected = make_texts(n, args.dup_fraction)
        texts_file = work / f"texts-{n}.json"
        texts_file.write_text(json.dumps(texts))
        del texts
        print(f"[bench] {n:,} texts", flush=True)
        runs: dict[str, list[dict]] = {k: [] for k in kinds}
        for _ in range(args.repeats):
            for kind in kinds:
                runs[kind].append(run_child(kind, texts_file, folder if kind == "semhash" else ours_model, args))

        def med(kind: str, key: str = "total") -> float:
            return statistics.median(r[key] for r in runs[kind])  # noqa: B023 (runs of this size)

        ratio = med("semhash") / med("ours")
        label = {
            "ours": f"ours: `SemDeDup(model={ours_model!r}, max_length=512, eps=[{round(1 - args.threshold, 10)}])"
            f".run(texts).keep_mask(...)`",
            "before": f"ours before the change (`--before {args.before}`)",
            "semhash": f"SemHash: `SemHash.from_records(texts, model=StaticModel.from_pretrained(...))"
            f".self_deduplicate({args.threshold})`",
        }
        rows = [
            f"| {label[k]} | {med(k):.2f} | {med(k, 'wall'):.2f} | {med(k, 'peak_mib'):,.0f} | "
            f"{len(runs[k][0]['removed']):,} | {med('semhash') / med(k):.2f}x |"
            for k in kinds
        ]
        sections += [
            f"## {n:,} texts ({n - injected:,} distinct paragraphs + {injected:,} injected near-duplicates)",
            "",
            "| run | s in process (median) | s wall (median) | peak RSS (MiB) | removed | SemHash / run |",
            "|---|---|---|---|---|---|",
            *rows,
            "",
            "Runs (s, in process): "
            + "; ".join(f"{k} " + ", ".join(f"{r['total']:.2f}" for r in runs[k]) for k in kinds),
            "",
            f"Agreement of the removed texts, ours vs SemHash (Jaccard): "
            f"{overlap(runs['ours'][0]['removed'], runs['semhash'][0]['removed']):.3f}",
            "",
        ]
        if args.before:
            same = all(r["removed"] == runs["ours"][0]["removed"] for r in runs["ours"] + runs["before"])
            sections += [
                f"Before -> after: {med('before'):.2f} s -> {med('ours'):.2f} s "
                f"({med('before') / med('ours'):.2f}x); same removed texts in every run: {same}",
                "",
            ]
        goal = GOALS.get(n)
        if goal is not None:
            goals.append(
                f"- >= {goal:.0f}x SemHash end to end at {n:,} texts: **{verdict(ratio >= goal)}** ({ratio:.2f}x)"
            )
    lines = [
        "# The library path against SemHash: texts in memory, the same static model",
        "",
        f"Command: `{command_line('bench/library_semhash.py', argv)}`",
        "",
        *machine_lines([f"load average at start: {load}", f"static model: {folder}"]),
        "",
        "Each run a fresh process, timed from the list of texts in memory to the result, imports and model load",
        "included. Medians of interleaved runs; the machine is shared: the ratios within one run are what count.",
        f"SemHash removes similarity >= {args.threshold}; ours removes max_sim > 1 - eps with eps = "
        f"{round(1 - args.threshold, 10)}.",
        "",
        *sections,
        "## Goals",
        "",
        *goals,
    ]
    emit(lines, output_path(args, DEFAULT_OUT))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
