"""Benchmark: bookkeeping per input file, with `--files-per-shard N` against one file per shard.

Usage:
    .venv/bin/python bench/files_scale.py [--files 1000,10000] [--grouping 1,100] [--opens]
                                          [--out bench/results/files_scale.md]
    .venv/bin/python bench/files_scale.py --smoke        # 20 files, groupings 1 and 10; prints only

For each file count F (Parquet files of 20 planted 32-d vectors each, so the maths is nothing
and every second is per-file cost) and each grouping N, one `semdedup run --modality embedding
--clusters 20 --eps 0.01 --files-per-shard N` from empty storage in a subprocess: wall time,
the stage times it prints, and wall per input file. With `--opens` the same run is repeated
under `strace -f -e trace=openat,write` and the read-only opens of files under the storage
and the input are counted per stage (the stage is the last `[semdedup] <stage> ...` line the
run wrote before the open) and per folder: `semantic_duplicates` opens every assignment file
once per bucket, so O(buckets x partitions) = O(buckets x files / N).
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
PER_FILE, DIM, BUCKETS = 20, 32, 16
STAGES = ("ingest + embed", "centroids", "cluster_assignments", "semantic_duplicates", "keep_lists")


def write_files(folder: Path, n_files: int, seed: int = 0) -> None:
    """n_files Parquet files of PER_FILE unit vectors (every 10th a near-copy of the one before), ids given."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n_files * PER_FILE, DIM), dtype=np.float32)
    x[1::10] = x[0::10][: len(x[1::10])] + np.float32(0.01) * rng.standard_normal(
        (len(x[1::10]), DIM), dtype=np.float32
    )
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    for f in range(n_files):
        part = x[f * PER_FILE : (f + 1) * PER_FILE]
        pq.write_table(
            pa.table(
                {
                    "id": [f"{f:06d}-{i:02d}" for i in range(PER_FILE)],
                    "embedding": pa.array(list(part), type=pa.list_(pa.float32())),
                }
            ),
            folder / f"{f:06d}.parquet",
        )


def run_command(input_location: str, storage: str, files_per_shard: int) -> list[str]:
    """The benchmark's `semdedup run` command line (embedding modality, k = 20, eps 0.01, BUCKETS buckets)."""
    return [
        sys.executable,
        "-m",
        "semdedup_assets.cli",
        "run",
        "--input",
        input_location,
        "--storage",
        storage,
        "--modality",
        "embedding",
        "--clusters",
        "20",
        "--eps",
        "0.01",
        "--buckets",
        str(BUCKETS),
        "--files-per-shard",
        str(files_per_shard),
    ]


def stage_seconds(output: str) -> dict[str, float]:
    """The stage times of a run's closing `stages (s): ...` line."""
    m = re.search(r"stages \(s\): (.*?)  total", output)
    stages = {}
    for part in m.group(1).split(", ") if m else []:
        label, _, seconds = part.rpartition(" ")
        stages[label] = float(seconds)
    return stages


def semdedup_run(
    input_dir: Path, storage: Path, files_per_shard: int, strace_out: Path | None = None, tree: Path = ROOT
) -> tuple[float, dict[str, float], str]:
    """One `semdedup run` from empty storage with the code of `tree` (a source tree): (wall s, stage seconds,
    output)."""
    shutil.rmtree(storage, ignore_errors=True)
    env = {k: v for k, v in os.environ.items() if k != "DAGSTER_HOME" and not k.startswith("SEMDEDUP_")}
    env["PYTHONUNBUFFERED"] = "1"
    cmd = run_command(str(input_dir), str(storage), files_per_shard)
    if strace_out is not None:
        cmd = ["strace", "-f", "-qq", "-s", "120", "-e", f"trace=openat,write,{STATS}", "-o", str(strace_out), *cmd]
    start, cpu = time.perf_counter(), children_cpu()
    # `python -m` puts the working directory first on sys.path: `tree`'s package is the one run.
    proc = subprocess.run(cmd, env=env, cwd=tree, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"semdedup run failed (rc {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    out = proc.stdout + proc.stderr
    stages = stage_seconds(out)
    stages["cpu"] = children_cpu() - cpu
    return wall, stages, out


def children_cpu() -> float:
    """User + system CPU seconds of this process's waited-for children: on a shared machine a run's CPU
    time moves far less with the load than its wall time."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


OPEN = re.compile(r'openat\(AT_FDCWD, "([^"]+)", ([A-Z_|]+)')
STATS = "stat,lstat,newfstatat,statx"  # the path-based stat calls (an fstat of an open file names no path)
STAT = re.compile(r'(?:stat|lstat|newfstatat|statx)\((?:AT_FDCWD, )?"([^"]+)"')
STAGE_LINE = re.compile(r'write\(\d+, "\[semdedup\] (' + "|".join(re.escape(s) for s in STAGES) + r") \.\.\.")


def count_opens(trace: Path, storage: Path, input_dir: Path) -> dict[str, Counter]:
    """Read-only opens of storage and input files, per stage and folder (`input` for input files), and the
    stat calls on input files (`input stat`)."""
    per_stage: dict[str, Counter] = {s: Counter() for s in ("setup", *STAGES)}
    stage = "setup"
    events = []
    for line in trace.read_text(errors="replace").splitlines():
        _pid, _, rest = line.partition(" ")
        events.append(rest)
    for rest in events:
        if (m := STAGE_LINE.search(rest)) is not None:
            stage = m.group(1)
            continue
        if (m := STAT.search(rest)) is not None:
            if m.group(1).startswith(str(input_dir) + "/") and m.group(1).endswith(".parquet"):
                per_stage[stage]["input stat"] += 1
            continue
        m = OPEN.search(rest)
        if m is None or "O_WRONLY" in m.group(2) or "O_RDWR" in m.group(2) or "O_DIRECTORY" in m.group(2):
            continue
        path = m.group(1)
        if path.startswith(str(input_dir) + "/") and path.endswith(".parquet"):
            per_stage[stage]["input"] += 1
        elif path.startswith(str(storage) + "/") and path.endswith(".parquet") and "dagster_home" not in path:
            per_stage[stage][path[len(str(storage)) + 1 :].split("/")[0]] += 1
    return per_stage


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", default="1000,10000")
    parser.add_argument("--grouping", default="1,100", help="--files-per-shard values, comma-separated")
    parser.add_argument("--skip", default="10000:1", help="F:N pairs not to run (too long here), comma-separated")
    parser.add_argument("--opens", action="store_true", help="also count file opens per stage under strace")
    parser.add_argument("--opens-files", type=int, default=1000, help="the file count whose opens are counted")
    parser.add_argument(
        "--baseline",
        type=Path,
        default=None,
        help="a source tree of the code before a change (e.g. `git archive <commit> | tar -x -C DIR`): "
        "each run is made with it ('before') and with this tree ('after'), interleaved",
    )
    parser.add_argument("--pairs", type=int, default=1, help="with --baseline: before/after pairs per configuration")
    parser.add_argument(
        "--out",
        default=None,
        help="also write the tables to this file (bench/results/files_scale.md holds them with notes)",
    )
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args()
    files = [20] if args.smoke else [int(x) for x in args.files.split(",")]
    groupings = [1, 10] if args.smoke else [int(x) for x in args.grouping.split(",")]
    skip = set() if args.smoke else {tuple(map(int, p.split(":"))) for p in args.skip.split(",") if p}
    trees = [("before", args.baseline.resolve()), ("after", ROOT)] if args.baseline else [("", ROOT)]
    code = "code | " if args.baseline else ""
    lines = [
        f"| {code}files | --files-per-shard | partitions | wall s | ingest + embed | centroids | cluster_assignments | "
        "semantic_duplicates | keep_lists | wall per file ms | CPU s | CPU per file ms |",
        "|---|" + "---|" * (11 + bool(args.baseline)),
    ]
    opens_lines: list[str] = []
    ratios: list[str] = []
    with tempfile.TemporaryDirectory(prefix="files_scale_") as tmp:
        tmp_path = Path(tmp)
        for n_files in files:
            input_dir = tmp_path / f"input-{n_files}"
            write_files(input_dir, n_files)
            for n in groupings:
                partitions = -(-n_files // n)
                if (n_files, n) in skip:
                    lines.append(f"| {n_files:,} | {n} | {partitions:,} | not run (see notes) | | | | | | | | |")
                    continue
                walls: dict[str, list[float]] = {label: [] for label, _ in trees}
                cpus: dict[str, list[float]] = {label: [] for label, _ in trees}
                for _pair in range(args.pairs if args.baseline else 1):
                    for label, tree in trees:
                        wall, stages, _ = semdedup_run(input_dir, tmp_path / "storage", n, tree=tree)
                        walls[label].append(wall)
                        cells = " | ".join(f"{stages.get(s, float('nan')):.1f}" for s in STAGES)
                        cpus[label].append(stages["cpu"])
                        lines.append(
                            f"| {label + ' | ' if label else ''}{n_files:,} | {n} | {partitions:,} | {wall:.1f} | "
                            f"{cells} | {1000 * wall / n_files:.1f} | {stages['cpu']:.1f} | "
                            f"{1000 * stages['cpu'] / n_files:.1f} |"
                        )
                        print(lines[-1], flush=True)
                if args.baseline:
                    ratios.append(
                        f"- {n_files:,} files, --files-per-shard {n}: before / after wall "
                        + ", ".join(f"{b / a:.2f}x" for b, a in zip(walls["before"], walls["after"]))
                        + "; CPU "
                        + ", ".join(f"{b / a:.2f}x" for b, a in zip(cpus["before"], cpus["after"]))
                    )
                    print(ratios[-1], flush=True)
                if args.opens and (n_files == args.opens_files or args.smoke):
                    for label, tree in trees:
                        trace = tmp_path / "trace.txt"
                        semdedup_run(input_dir, tmp_path / "storage", n, trace, tree=tree)
                        per_stage = count_opens(trace, tmp_path / "storage", input_dir)
                        for stage, counts in per_stage.items():
                            stats = counts.pop("input stat", 0)
                            if counts or stats:
                                detail = ", ".join(f"{folder} {c:,}" for folder, c in sorted(counts.items()))
                                per_file = counts.get("input", 0) / n_files
                                opens_lines.append(
                                    f"| {label + ' | ' if label else ''}{n_files:,} | {n} | {partitions:,} | {stage} | "
                                    f"{sum(counts.values()):,} | {detail} | {per_file:g} | {stats / n_files:g} |"
                                )
                                print(opens_lines[-1], flush=True)
    text = "\n".join(lines)
    if ratios:
        text += "\n\n" + "\n".join(ratios)
    if opens_lines:
        text += (
            f"\n\n| {code}files | --files-per-shard | partitions | stage | read-only opens of .parquet files | "
            "by folder | opens per input file | stats per input file |\n"
            "|---|" + "---|" * (7 + bool(args.baseline)) + "\n" + "\n".join(opens_lines)
        )
    print(text)
    if args.out and not args.smoke:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
