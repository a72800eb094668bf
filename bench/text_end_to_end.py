"""Benchmark: the whole graph with a static text model against SemHash 0.5, same model, same machine, same run.

Usage:
    .venv/bin/python bench/text_end_to_end.py [--n 200000] [--dup-fraction 0.1] [--shards 8]
                                              [--static PATH] [--probes-too P] [--exact-too]
                                              [--out bench/results/text_end_to_end.md]
    .venv/bin/python bench/text_end_to_end.py --smoke     # 1,000 paragraphs, a tiny static model; prints only

Data: `--n` distinct real English paragraphs (docstrings and comment blocks of the Python standard
library, then of the installed packages, read with `ast` as the demo corpus is, exact repeats
dropped), plus `--dup-fraction * n` injected copies of randomly chosen paragraphs, each with one
variation: exact, typos, boilerplate added, truncated, sentence order changed, case and
punctuation stripped. Parquet shards with `id` and `text`.

1. Ours: `semdedup run --model model2vec:PATH --max-length 512` (a fresh process: imports, model load,
   Dagster runs and every stage file written are inside the time), from empty storage. With
   `--probes-too P`, then `semdedup run ... --probes P` on the same storage (a fresh process again; the
   embeddings are reused, so its time is the clustering and the rule): its quality gets its own columns.
   With `--exact-too`, likewise with `--clusters 1`: the paper's rule over all items with no pair split
   by the clustering, the ceiling of what any k or `--probes` can reach.
2. SemHash: a fresh process that reads the same shards, loads the same static model
   (`StaticModel.from_pretrained`) and runs `SemHash.from_records(records, columns=["text"], model=...)`
   then `self_deduplicate()` at its default threshold 0.9; only then (untimed) `self_deduplicate` at
   the other thresholds of the table.
For every threshold t (similarity; ours removes max_sim > t, i.e. eps = 1 - t): recall = injected
pairs with at least one of the two removed / injected pairs; outside removals = removed items that
belong to no injected pair (near-duplicates the corpus has by itself, or false positives).
"Calibrated" threshold of each: the one of the grid with the most (pairs caught - outside removals).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import random
import re
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import add_output_options, command_line, emit, load_average, machine_lines, output_path, run_tree, verdict

DEFAULT_OUT = "bench/results/text_end_to_end.md"
THRESHOLDS = (0.8, 0.85, 0.9, 0.93, 0.95, 0.97, 0.99)
SEMHASH_DEFAULT = 0.9
VARIANTS = ("exact", "typos", "boilerplate", "truncated", "reordered", "case_punct")
BOILERPLATE = (
    "See the documentation for more details.",
    "This text is reproduced from the original source.",
    "Note:",
    "Copyright notice: all rights reserved.",
    "Updated in the latest release.",
)


def collect_paragraphs(n: int) -> list[str]:
    """The first `n` distinct prose paragraphs of the stdlib, then site-packages, in sorted file order."""
    from semdedup_assets.demo_data import _iter_file_items, _iter_topic_items, _stdlib_root

    stdlib, purelib = pathlib.Path(_stdlib_root()), pathlib.Path(sysconfig.get_paths()["purelib"])
    seen: dict[str, None] = {}
    for text, _ in _iter_topic_items():
        seen.setdefault(text)
    for root in (stdlib, purelib):
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(
                d
                for d in dirnames
                if d not in ("__pycache__", "site-packages", "dist-packages") and not d.startswith(".")
            )
            for name in sorted(filenames):
                if not name.endswith(".py"):
                    continue
                for text, _, _ in _iter_file_items(pathlib.Path(dirpath) / name, name):
                    seen.setdefault(text)
                if len(seen) >= n:
                    return list(seen)[:n]
    if len(seen) < n:
        raise SystemExit(f"only {len(seen):,} distinct paragraphs on this machine; pass --n {len(seen)} or less")
    return list(seen)[:n]


def corpus(n: int) -> list[str]:
    """collect_paragraphs(n), cached in the temp folder (reading every package with ast takes minutes)."""
    cache = Path(tempfile.gettempdir()) / f"semdedup-bench-paragraphs-{n}.json"
    if cache.exists():
        return json.loads(cache.read_text())
    # The first n distinct paragraphs are a prefix of any larger collection: reuse one.
    for other in sorted(Path(tempfile.gettempdir()).glob("semdedup-bench-paragraphs-*.json")):
        size = other.stem.rsplit("-", 1)[-1]
        if size.isdigit() and int(size) >= n:
            return json.loads(other.read_text())[:n]
    texts = collect_paragraphs(n)
    cache.write_text(json.dumps(texts))
    return texts


def vary(text: str, kind: str, rng: random.Random) -> str:
    """One injected near-duplicate of `text`."""
    words = text.split()
    if kind == "exact":
        return text
    if kind == "typos":
        chars = list(text)
        for _ in range(rng.randint(2, 4)):
            i = rng.randrange(1, len(chars) - 1)
            chars[i], chars[i + 1] = chars[i + 1], chars[i]
        return "".join(chars)
    if kind == "boilerplate":
        extra = rng.choice(BOILERPLATE)
        return f"{extra} {text}" if extra.endswith(":") else f"{text} {extra}"
    if kind == "truncated":
        keep = max(5, int(len(words) * 0.8))
        return " ".join(words[:keep])
    if kind == "reordered":
        sentences = re.split(r"(?<=[.!?])\s+", text)
        if len(sentences) > 1:
            return " ".join(sentences[1:] + sentences[:1])
        half = len(words) // 2
        return " ".join(words[half:] + words[:half])
    if kind == "case_punct":
        return re.sub(r"[^\w\s]", "", text).lower()
    raise ValueError(kind)


def build_dataset(folder: Path, n: int, dup_fraction: float, shards: int, seed: int = 0) -> list[tuple[str, str]]:
    """Write the shards; return the injected (original id, copy id) pairs."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = random.Random(seed)
    texts = corpus(n)
    rows = [(f"p{i:07d}", t) for i, t in enumerate(texts)]
    originals = rng.sample(range(len(texts)), int(len(texts) * dup_fraction))
    pairs = []
    for k, i in enumerate(originals):
        copy_id = f"d{k:07d}"
        rows.append((copy_id, vary(texts[i], VARIANTS[k % len(VARIANTS)], rng)))
        pairs.append((f"p{i:07d}", copy_id))
    rng.shuffle(rows)  # copies land in any shard, before or after their original
    folder.mkdir(parents=True, exist_ok=True)
    bounds = [round(s * len(rows) / shards) for s in range(shards + 1)]
    for s in range(shards):
        part = rows[bounds[s] : bounds[s + 1]]
        pq.write_table(
            pa.table({"id": [r[0] for r in part], "text": [r[1] for r in part]}), folder / f"part-{s:02d}.parquet"
        )
    return pairs


def semhash_child(args: argparse.Namespace) -> int:
    """In a fresh process: SemHash from_records + self_deduplicate at 0.9 (timed), then the other thresholds."""
    start = time.perf_counter()
    import pyarrow.parquet as pq
    from model2vec import StaticModel
    from semhash import SemHash

    records = []
    for path in sorted(Path(args.child_input).glob("*.parquet")):
        records += pq.read_table(path).to_pylist()
    import semhash.semhash as semhash_module
    from semhash.index import Index

    model = StaticModel.from_pretrained(args.child_model, force_download=False)
    # Where its time goes: the embedding (featurize) and the index build inside from_records, timed by
    # wrapping the two functions it calls (a perf_counter pair each; nothing else changes).
    phases = {"read + imports + model load": time.perf_counter() - start}
    featurize, build = semhash_module.featurize, Index.from_vectors_and_items.__func__

    def timed_featurize(*a, **kw):
        t = time.perf_counter()
        out = featurize(*a, **kw)
        phases["embed (model2vec encode)"] = time.perf_counter() - t
        return out

    def timed_build(cls, *a, **kw):
        t = time.perf_counter()
        out = build(cls, *a, **kw)
        phases["ANN index build (usearch HNSW)"] = time.perf_counter() - t
        return out

    semhash_module.featurize, Index.from_vectors_and_items = timed_featurize, classmethod(timed_build)
    t0 = time.perf_counter()
    semhash = SemHash.from_records(records, columns=["text"], model=model)
    phases["from_records, the rest (exact-copy grouping)"] = (
        time.perf_counter()
        - t0
        - sum(phases.get(k, 0.0) for k in ("embed (model2vec encode)", "ANN index build (usearch HNSW)"))
    )
    t0 = time.perf_counter()
    result = semhash.self_deduplicate(threshold=SEMHASH_DEFAULT)
    phases[f"self_deduplicate({SEMHASH_DEFAULT}): threshold queries + selection"] = time.perf_counter() - t0
    seconds = time.perf_counter() - start
    removed = {str(SEMHASH_DEFAULT): sorted(d.record["id"] for d in result.filtered)}
    out = {"seconds": seconds, "phases": phases, "removed": removed}
    Path(args.child_out).write_text(json.dumps(out))  # the timed part first
    for t in map(float, args.child_thresholds.split(",")) if args.child_thresholds else THRESHOLDS:
        if t != SEMHASH_DEFAULT:
            removed[str(t)] = sorted(d.record["id"] for d in semhash.self_deduplicate(threshold=t).filtered)
            Path(args.child_out).write_text(json.dumps(out))
    return 0


def read_max_sim(storage: Path) -> dict[str, float]:
    """id -> max_sim of a storage's semantic_duplicates."""
    import duckdb

    return dict(
        duckdb.sql(f"SELECT id, max_sim FROM read_parquet('{storage}/semantic_duplicates/**/*.parquet')").fetchall()
    )


def score(removed: set[str], pairs: list[tuple[str, str]]) -> tuple[float, int, int]:
    """(recall of the injected pairs, pairs caught, removals outside every injected pair)."""
    in_pairs = {x for p in pairs for x in p}
    caught = sum(1 for a, b in pairs if a in removed or b in removed)
    return caught / len(pairs), caught, len(removed - in_pairs)


def main(argv: list[str] | None = None) -> int:
    """Run both, print the markdown report and write it where asked."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=200_000, help="distinct real paragraphs (injected copies come on top)")
    ap.add_argument("--dup-fraction", type=float, default=0.1)
    ap.add_argument("--shards", type=int, default=8)
    ap.add_argument(
        "--static",
        default=None,
        metavar="PATH",
        help="static model folder (default: this machine's `--model static`, distilled if missing)",
    )
    ap.add_argument("--work", default=None, help="working folder (default: a temporary one)")
    ap.add_argument(
        "--semhash-thresholds",
        default=None,
        metavar="T1,T2,...",
        help="the untimed SemHash thresholds besides 0.9 (default: every threshold of the table; each is "
        "one more self_deduplicate, minutes at 200k on 2 cores)",
    )
    ap.add_argument(
        "--probes-too",
        type=int,
        default=0,
        metavar="P",
        help="after the timed run, run ours again with --probes P on the same storage (embeddings "
        "reused) and report its quality and time too (0: no)",
    )
    ap.add_argument(
        "--exact-too",
        action="store_true",
        help="then run ours again with --clusters 1 (every item against every earlier one: no pair is "
        "split by k-means) and report its quality too; O(N^2), ~15 min at 220k on 2 busy cores",
    )
    ap.add_argument("--child-thresholds", default="", help=argparse.SUPPRESS)
    ap.add_argument("--child-semhash", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--child-input", help=argparse.SUPPRESS)
    ap.add_argument("--child-model", help=argparse.SUPPRESS)
    ap.add_argument("--child-out", help=argparse.SUPPRESS)
    add_output_options(ap, DEFAULT_OUT, "1,000 paragraphs, a static model distilled from a tiny BERT; prints only")
    args = ap.parse_args(argv)
    if args.child_semhash:
        return semhash_child(args)
    if args.smoke:
        args.n, args.shards = 1000, 2
    out = output_path(args, DEFAULT_OUT)
    load_at_start = load_average()

    from importlib.metadata import version

    from text_embedding import bench_static_model

    static = bench_static_model(args.static, args.smoke)
    work = Path(args.work or tempfile.mkdtemp(prefix="semdedup-text-e2e-"))
    pairs = build_dataset(work / "input", args.n, args.dup_fraction, args.shards)
    items = args.n + len(pairs)
    eps = ",".join(f"{1 - t:.4g}" for t in THRESHOLDS)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    ours_cmd = [
        sys.executable,
        "-m",
        "semdedup_assets.cli",
        "run",
        "--input",
        str(work / "input"),
        "--storage",
        str(work / "storage"),
        "--model",
        f"model2vec:{static}",
        "--max-length",
        "512",
        "--eps",
        eps,
    ]
    print(f"[bench] ours: {' '.join(ours_cmd)}", flush=True)
    ours = run_tree(ours_cmd, env=env)
    if ours["rc"] != 0:
        raise SystemExit(f"semdedup run failed:\n{ours['stdout'][-3000:]}\n{ours['stderr'][-3000:]}")
    stages = re.search(r"stages \(s\): (.*?)  total", ours["stdout"])
    max_sim = read_max_sim(work / "storage")
    # Further runs of ours on the same storage (embeddings reused): more probes, and the rule with no clustering
    # at all (k = 1: every item compared with every earlier one, the ceiling of what any k or P can find).
    extras = ([(f"P={args.probes_too}", ["--probes", str(args.probes_too)])] if args.probes_too > 1 else []) + (
        [("exact (k=1)", ["--clusters", "1"])] if args.exact_too else []
    )
    again = []
    for name, extra in extras:
        print(f"[bench] ours again with {' '.join(extra)} ...", flush=True)
        run = run_tree(ours_cmd + extra, env=env)
        if run["rc"] != 0:
            raise SystemExit(
                f"semdedup run {' '.join(extra)} failed:\n{run['stdout'][-3000:]}\n{run['stderr'][-3000:]}"
            )
        run.update(name=name, args=" ".join(extra), stages=re.search(r"stages \(s\): (.*?)  total", run["stdout"]))
        run_max_sim = read_max_sim(work / "storage")
        run["score"] = {t: score({i for i, m in run_max_sim.items() if m > t}, pairs) for t in THRESHOLDS}
        again.append(run)
    child_out = work / "semhash.json"
    theirs_cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--child-semhash",
        "--child-input",
        str(work / "input"),
        "--child-model",
        static,
        "--child-out",
        str(child_out),
        "--child-thresholds",
        args.semhash_thresholds or "",
    ]
    print("[bench] semhash ...", flush=True)
    theirs = run_tree(theirs_cmd, env=env)
    if theirs["rc"] != 0 and not child_out.exists():
        raise SystemExit(f"semhash failed:\n{theirs['stdout'][-3000:]}\n{theirs['stderr'][-3000:]}")
    sh = json.loads(child_out.read_text())

    ours_removed = {t: {i for i, m in max_sim.items() if m > t} for t in THRESHOLDS}
    sh_removed = {t: set(sh["removed"][str(t)]) for t in THRESHOLDS if str(t) in sh["removed"]}
    ours_score = {t: score(ours_removed[t], pairs) for t in THRESHOLDS}
    sh_score = {t: score(sh_removed[t], pairs) for t in sh_removed}
    best_ours = max(THRESHOLDS, key=lambda t: (ours_score[t][1] - ours_score[t][2], t))
    best_sh = max(sh_score, key=lambda t: (sh_score[t][1] - sh_score[t][2], t))
    # SemHash's time from its first line of work to the end of self_deduplicate (its process start and the
    # untimed thresholds after it left out): the conservative side for our ratio.
    speedup = sh["seconds"] / ours["seconds"]
    d = SEMHASH_DEFAULT

    lines = [
        "# Text end to end: the whole graph with a static model against SemHash, same model",
        "",
        f"Command: `{command_line('bench/text_end_to_end.py', argv)}`",
        "",
        *machine_lines(
            [
                f"- model2vec {version('model2vec')}, semhash {version('semhash')}",
                f"- load average just before the timed runs: {load_at_start}",
            ]
        ),
        "## Input",
        "",
        f"- {args.n:,} distinct real paragraphs (stdlib, then installed packages: docstrings and comment blocks)"
        f" + {len(pairs):,} injected copies ({', '.join(VARIANTS)}, in turn) = {items:,} items in"
        f" {args.shards} Parquet shards",
        f"- static model: {static}",
        "",
        "## Time (fresh process each: imports, model load, everything written)",
        "",
        "| system | wall time | peak RSS (tree) | items/s |",
        "|---|---|---|---|",
        f"| ours: `semdedup run --model model2vec:PATH` (whole graph, {len(THRESHOLDS)} eps) | "
        f"{ours['seconds']:.1f} s | {ours['peak_mib']:,.0f} MiB | {items / ours['seconds']:,.0f} |",
        f"| SemHash `from_records` + `self_deduplicate({d})` | {sh['seconds']:.1f} s (reading the shards, loading"
        f" the model, indexing, querying) | {theirs['peak_mib']:,.0f} MiB | {items / sh['seconds']:,.0f} |",
        "",
        f"Our stages (s): {stages.group(1) if stages else '?'}",
        "",
        "SemHash's phases (s): " + ", ".join(f"{k} {v:.2f}" for k, v in sh.get("phases", {}).items()),
        "",
    ]
    for run in again:
        lines += [
            f"Ours again with `{run['args']}` on the same storage (a fresh process; embeddings "
            f"reused, so not an end-to-end time): {run['seconds']:.1f} s; stages (s): "
            f"{run['stages'].group(1) if run['stages'] else '?'}",
            "",
        ]
    p_head = "".join(f" ours {r['name']} recall | ours {r['name']} outside removals |" for r in again)
    lines += [
        "## Quality at each threshold t (ours: eps = 1 - t)",
        "",
        "| t | ours recall | ours outside removals |" + p_head + " SemHash recall | SemHash outside removals |",
        "|---|---|---|" + "---|---|" * len(again) + "---|---|",
    ]
    for t in THRESHOLDS:
        (ro, _, oo) = ours_score[t]
        mark = (
            (" (SemHash default)" if t == d else "")
            + (" (ours calibrated)" if t == best_ours else "")
            + (" (SemHash calibrated)" if t == best_sh else "")
        )
        theirs_cells = f"{sh_score[t][0]:.4f} | {sh_score[t][2]:,}" if t in sh_score else "not measured | -"
        p_cells = "".join(f" {r['score'][t][0]:.4f} | {r['score'][t][2]:,} |" for r in again)
        lines.append(f"| {t}{mark} | {ro:.4f} | {oo:,} |{p_cells} {theirs_cells} |")
    cal_ok = ours_score[best_ours][0] >= sh_score[d][0] and ours_score[best_ours][2] <= sh_score[d][2]
    eq_ok = ours_score[d][0] >= sh_score[d][0] and ours_score[d][2] <= sh_score[d][2]
    lines += [
        "",
        "## Goals",
        "",
        f"- ours >= 3x faster end to end: **{verdict(speedup >= 3)}** ({speedup:.2f}x)",
        f"- at equal threshold {d}: ours recall {ours_score[d][0]:.4f} vs {sh_score[d][0]:.4f}, outside removals"
        f" {ours_score[d][2]:,} vs {sh_score[d][2]:,}: **{verdict(eq_ok)}**",
        f"- ours at its calibrated t = {best_ours} (eps {1 - best_ours:.3g}) against SemHash at its default"
        f" {d}: recall {ours_score[best_ours][0]:.4f} vs {sh_score[d][0]:.4f}, outside removals"
        f" {ours_score[best_ours][2]:,} vs {sh_score[d][2]:,}: **{verdict(cal_ok)}**",
        f"- SemHash's own calibrated t = {best_sh}: recall {sh_score[best_sh][0]:.4f}, outside removals"
        f" {sh_score[best_sh][2]:,}",
    ]
    # Any threshold of ours (any of the runs) that is at least as good on both counts as SemHash's default.
    runs = [("P=1", ours_score)] + [(r["name"], r["score"]) for r in again]
    dominating = [
        f"{name} t={t}"
        for name, sc in runs
        for t in THRESHOLDS
        if sc[t][0] >= sh_score[d][0] and sc[t][2] <= sh_score[d][2]
    ]
    lines += [
        f"- a threshold of ours with recall >= {sh_score[d][0]:.4f} and outside removals <= {sh_score[d][2]:,}"
        f" (SemHash at {d}): **{', '.join(dominating) if dominating else 'none, MISSED'}**"
    ]
    for r in again:
        pd_ = r["score"][d]
        lines += [
            f"- `{r['args']}` at {d}: recall {pd_[0]:.4f} vs {sh_score[d][0]:.4f}, outside removals"
            f" {pd_[2]:,} vs {sh_score[d][2]:,}: **{verdict(pd_[0] >= sh_score[d][0] and pd_[2] <= sh_score[d][2])}**"
        ]
    lines += [""]
    emit(lines, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
