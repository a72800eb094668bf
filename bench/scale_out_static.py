"""Benchmark: static (model2vec) text embedding on Ray CPU actors against in-process, same run.

Usage (as root: every Ray process runs in a network namespace that holds only `lo`):
    .venv/bin/python bench/scale_out_static.py [--texts 100000] [--text-shards 8] [--static PATH]
                                               [--out bench/results/scale_out_static.md]
    .venv/bin/python bench/scale_out_static.py --smoke     # 2,000 texts, a tiny static model; prints only

The text part of bench/scale_out.py (the embedding stage's unit of work over every shard:
in-process, then 1 and 2 Ray CPU actors, each loading the model once; Ray's start-up timed
apart; embeddings files compared byte for byte), with `--model model2vec:PATH` and real
paragraphs (the corpus of bench/text_end_to_end.py). On a machine with C cores the goal is that
C actors reach >= 0.8 C times one actor; this machine has 2 cores shared with other work.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import add_output_options, command_line, emit, load_average, machine_lines, output_path, verdict

DEFAULT_OUT = "bench/results/scale_out_static.md"


def write_paragraph_shards(folder: Path, n: int, shards: int) -> None:
    """`n` real paragraphs (text_end_to_end's corpus) in `shards` Parquet files."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from text_end_to_end import corpus

    texts = corpus(n)
    folder.mkdir(parents=True, exist_ok=True)
    bounds = [round(i * n / shards) for i in range(shards + 1)]
    for s in range(shards):
        a, b = bounds[s], bounds[s + 1]
        pq.write_table(
            pa.table({"id": [f"t{i:07d}" for i in range(a, b)], "text": texts[a:b]}), folder / f"texts-{s:02d}.parquet"
        )


def main(argv: list[str] | None = None) -> int:
    """Run in-process, 1 and 2 actors; print the markdown report and write it where asked."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--texts", type=int, default=100_000)
    ap.add_argument("--text-shards", type=int, default=8)
    ap.add_argument(
        "--static",
        default=None,
        metavar="PATH",
        help="static model folder (default: this machine's `--model static`, distilled if missing)",
    )
    add_output_options(ap, DEFAULT_OUT, "2,000 texts in 2 shards, a tiny static model; prints only")
    args = ap.parse_args(argv)
    if args.smoke:
        args.texts, args.text_shards = 2000, 2
    from scale_out import run_text

    from semdedup_assets_tests.raycluster import NetNamespace, namespaces_available

    reason = namespaces_available()
    if reason:
        raise SystemExit(f"scale_out_static.py runs Ray in a loopback-only network namespace and {reason}")
    from text_embedding import bench_static_model

    static = bench_static_model(args.static, args.smoke)
    machine = machine_lines(["- every Ray process ran in a network namespace holding only `lo`"])
    work = Path(tempfile.mkdtemp(prefix="scale-out-static-"))
    ns = NetNamespace()
    try:
        write_paragraph_shards(work / "text", args.texts, args.text_shards)
        text = {a: run_text(ns, work / "text", work / f"text-{a}", a, model=f"model2vec:{static}") for a in (0, 1, 2)}
    finally:
        survivors = ns.stop()
        shutil.rmtree(work, ignore_errors=True)
    rate = {a: t["rows"] / t["seconds"] for a, t in text.items()}
    steady = {a: t["rows"] / t["steady"] for a, t in text.items()}
    same = len({t["digest"] for t in text.values()}) == 1
    lines = [
        "# Scale-out: static text embedding on Ray CPU actors",
        "",
        f"Command: `{command_line('bench/scale_out_static.py', argv)}`",
        "",
        *machine[:-1],
        f"- load average (1/5/15 min) at the end: {load_average()}",
        "",
        f"## {text[0]['rows']:,} real paragraphs in {args.text_shards} shards, static model {static}, max_length 128",
        "",
        "| engine | embed time (all in) | texts/s | vs in-process | steady texts/s | vs in-process | workers used "
        "| Ray start-up (apart) |",
        "|---|---|---|---|---|---|---|---|",
        *[
            f"| {'in-process' if a == 0 else f'Ray, {a} CPU actor(s)'} | {t['seconds']:.1f} s | {rate[a]:,.0f} | "
            f"{rate[a] / rate[0]:.2f}x | {steady[a]:,.0f} | {steady[a] / steady[0]:.2f}x | {t['workers']} | "
            f"{t['startup']:.1f} s |"
            for a, t in text.items()
        ],
        "",
        "- *all in*: from the call to the last shard, with model loading; *steady*: rows over the busiest worker's "
        "time inside `embed_shard` (reading the raw shard, tokenising, summing, writing the embeddings file)",
        f"- 2 actors against in-process, steady: **{steady[2] / steady[0]:.2f}x** (no loss counted within 3%: "
        f"{verdict(steady[2] >= 0.97 * steady[0])})",
        f"- 1 -> 2 actors, steady: **{steady[2] / steady[1]:.2f}x** (efficiency {steady[2] / steady[1] / 2:.2f} per "
        "actor; both share this machine's 2 cores)",
        f"- embeddings files byte-identical across the three: {same}",
        f"- processes left in the namespace after the run: {len(survivors)}",
    ]
    emit(lines, output_path(args, DEFAULT_OUT))
    return 0 if same and not survivors else 1


if __name__ == "__main__":
    sys.exit(main())
