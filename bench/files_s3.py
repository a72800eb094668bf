"""Benchmark: object-store requests per stage, input and storage on S3 (moto's server), against a local folder.

Usage:
    .venv/bin/python bench/files_s3.py [--files 2000] [--files-per-shard 100] [--baseline TREE]
    .venv/bin/python bench/files_s3.py --smoke        # 20 files, --files-per-shard 10

Issue 32, point 3: F Parquet files of 20 planted 32-d vectors (bench/files_scale.py's data) are
uploaded to one bucket of a moto S3 server on 127.0.0.1 (`semdedup_assets_tests.servers`, as the
deploy tests run it); `semdedup run --input s3://in/... --storage s3://store/...` then runs in a
subprocess. Every request the server logs is counted by HTTP method, bucket (input or storage)
and stage: the stage is the last `[semdedup] <stage> ...` line the run printed before the server
logged the request (the log is read by offset, so a request at a stage boundary may land one
stage early or late). The same run on local folders gives the stage walls to compare, and its
keep-lists must be byte-identical to the S3 run's. `--baseline TREE` also runs the code of a
source tree (before a change) on S3, for request counts before and after.
"""

from __future__ import annotations

import argparse
import itertools
import os
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from files_scale import STAGES, run_command, semdedup_run, stage_seconds, write_files  # noqa: E402

from semdedup_assets_tests.servers import moto_missing, s3_server  # noqa: E402

REQUEST = re.compile(r"(?<![A-Z])(GET|HEAD|PUT|POST|DELETE) /([^/ ?]+)/?([^ ]*) HTTP")
STAGE_LINE = re.compile(r"\[semdedup\] (" + "|".join(re.escape(s) for s in STAGES) + r") \.\.\.")


def run_on_s3(
    server, input_url: str, storage_url: str, n: int, home: Path, tree: Path
) -> tuple[float, dict[str, float], list[tuple[str, int]], str]:
    """One `semdedup run` on S3: (wall, stage seconds, [(stage, server log offset when it began)], output)."""
    env = {k: v for k, v in os.environ.items() if k != "DAGSTER_HOME" and not k.startswith(("SEMDEDUP_", "AWS_"))}
    env.update(server.env(), PYTHONUNBUFFERED="1", DAGSTER_HOME=str(home), SEMDEDUP_CATALOG=str(home / "c.duckdb"))
    home.mkdir(parents=True, exist_ok=True)
    cmd = run_command(input_url, storage_url, n)
    marks = [("setup", server.log_path.stat().st_size)]
    out: list[str] = []
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, cwd=tree, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    for line in proc.stdout:
        out.append(line)
        if (m := STAGE_LINE.search(line)) is not None:
            marks.append((m.group(1), server.log_path.stat().st_size))
    rc = proc.wait()
    wall = time.perf_counter() - start
    text = "".join(out)
    if rc != 0:
        raise SystemExit(f"semdedup run on S3 failed (rc {rc}):\n{text[-4000:]}")
    time.sleep(0.5)  # the server's last log lines
    marks.append(("end", server.log_path.stat().st_size))
    return wall, stage_seconds(text), marks, text


def count_requests(log: bytes, marks: list[tuple[str, int]], input_bucket: str) -> dict[str, Counter]:
    """Requests per stage: by method, and `input` / `storage` by bucket."""
    per_stage: dict[str, Counter] = {}
    for (stage, lo), (_, hi) in itertools.pairwise(marks):
        counts = per_stage.setdefault(stage, Counter())
        for line in log[lo:hi].decode(errors="replace").splitlines():
            if (m := REQUEST.search(line)) is None:
                continue
            method, bucket, rest = m.groups()
            kind = "LIST" if method == "GET" and (not rest or "list-type" in line or "prefix=" in line) else method
            counts[kind] += 1
            counts["input" if bucket == input_bucket else "storage"] += 1
    return per_stage


def keep_list_bytes(fs, url: str) -> dict[str, bytes]:
    """name -> bytes of every keep-list under a storage on S3."""
    return {p.rsplit("/", 1)[1]: fs.cat_file(p) for p in sorted(fs.glob(f"{url.removeprefix('s3://')}/keep_lists/*"))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=2000)
    parser.add_argument("--files-per-shard", type=int, default=100)
    parser.add_argument("--baseline", type=Path, default=None, help="a source tree of the code before a change")
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args()
    if (why := moto_missing()) is not None:
        raise SystemExit(why)
    n_files, n = (20, 10) if args.smoke else (args.files, args.files_per_shard)
    trees = [("before", args.baseline.resolve()), ("after", ROOT)] if args.baseline else [("", ROOT)]
    os.environ["PYTHONUNBUFFERED"] = "1"  # the server's request log line by line (it inherits this)
    rows, walls = [], []
    with tempfile.TemporaryDirectory(prefix="files_s3_") as tmp:
        tmp_path = Path(tmp)
        input_dir = tmp_path / "input"
        write_files(input_dir, n_files)
        local_wall, local_stages, _ = semdedup_run(input_dir, tmp_path / "local", n)
        local_keep = {p.name: p.read_bytes() for p in sorted((tmp_path / "local" / "keep_lists").glob("*"))}
        with s3_server(tmp_path / "moto.log") as server:
            server.create_bucket("files-in")
            fs = server.filesystem()
            fs.put(str(input_dir) + "/", "files-in/data/", recursive=True)
            for i, (label, tree) in enumerate(trees):
                server.create_bucket(f"files-store{i}")
                storage = f"s3://files-store{i}/semdedup"
                wall, stages, marks, _ = run_on_s3(
                    server, "s3://files-in/data", storage, n, tmp_path / f"home{i}", tree
                )
                if keep_list_bytes(fs, storage) != local_keep:
                    raise SystemExit(f"{label or 'this'} run's keep-lists on S3 differ from the local run's")
                per_stage = count_requests(server.log_path.read_bytes(), marks, "files-in")
                walls.append(
                    f"| {label + ' | ' if label else ''}{n_files:,} | {n} | S3 (moto) | {wall:.1f} | "
                    + " | ".join(f"{stages.get(s, float('nan')):.1f}" for s in STAGES)
                    + " |"
                )
                for stage in ("setup", *STAGES):
                    c = per_stage.get(stage, Counter())
                    methods = ", ".join(
                        f"{k} {c[k]:,}" for k in ("GET", "LIST", "HEAD", "PUT", "POST", "DELETE") if c[k]
                    )
                    rows.append(
                        f"| {label + ' | ' if label else ''}{n_files:,} | {n} | {stage} | "
                        f"{c['input'] + c['storage']:,} | {c['input']:,} | {c['storage']:,} | "
                        f"{c['input'] / n_files:.2f} | {methods} |"
                    )
                    print(rows[-1], flush=True)
    code = "code | " if args.baseline else ""
    text = (
        f"| {code}files | --files-per-shard | storage | wall s | "
        + " | ".join(STAGES)
        + " |\n|---|"
        + "---|" * (8 + bool(args.baseline))
        + "\n"
        + f"| {'local | ' if args.baseline else ''}{n_files:,} | {n} | local folder | {local_wall:.1f} | "
        + " | ".join(f"{local_stages.get(s, float('nan')):.1f}" for s in STAGES)
        + " |\n"
        + "\n".join(walls)
        + f"\n\n| {code}files | --files-per-shard | stage | requests | input bucket | storage bucket | "
        "input requests per input file | by method |\n|---|"
        + "---|" * (7 + bool(args.baseline))
        + "\n"
        + "\n".join(rows)
    )
    print(text)


if __name__ == "__main__":
    main()
