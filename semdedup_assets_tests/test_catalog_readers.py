"""Fault suite, concurrent readers: real DuckDB client processes on catalog.duckdb during real runs.

A client holding the file read-only, one holding it read-write, and one reconnecting
every 20 ms must never fail or block a `semdedup run` (nor `semdedup sql`), must never get
an error themselves, and must always find a whole catalog: every view, old or new.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import duckdb
import pytest

from semdedup_assets.core.io.catalog import VIEW_NAMES
from semdedup_assets_tests.fixtures import write_embeddings_and_reference
from semdedup_assets_tests.test_faults import Child, _env

ARGS = ["--modality", "embedding", "--clusters", "4", "--buckets", "2", "--iterations", "20", "--eps", "0.01,0.1"]
VIEWS_SQL = "SELECT view_name FROM duckdb_views() WHERE NOT internal ORDER BY view_name"

# Holds the catalog (read-only or read-write) until a line arrives on stdin, then reads every view.
HOLDER = f"""
import duckdb, json, sys
con = duckdb.connect(sys.argv[1], read_only=sys.argv[2] == "ro")
names = [r[0] for r in con.execute({VIEWS_SQL!r}).fetchall()]
print("holding", json.dumps(names), flush=True)
sys.stdin.readline()
counts = {{n: con.execute(f"SELECT count(*) FROM {{n}}").fetchall()[0][0] for n in names}}
print("done", json.dumps(counts), flush=True)
"""

# Connects read-only every 20 ms until the stop file exists; reports connects, errors and the view sets seen.
RECONNECTER = f"""
import duckdb, json, os, sys, time
path, stop = sys.argv[1], sys.argv[2]
connects, errors, seen = 0, [], set()
print("looping", flush=True)
while not os.path.exists(stop):
    try:
        con = duckdb.connect(path, read_only=True)
        try:
            names = [r[0] for r in con.execute({VIEWS_SQL!r}).fetchall()]
            con.execute("SELECT count(*) FROM eps_curve").fetchall()
            flagged = con.execute("SELECT count(*) FROM contaminated").fetchall()[0][0]
            seen.add((",".join(names), flagged))
        finally:
            con.close()
    except duckdb.Error as err:
        errors.append(str(err))
    connects += 1
    time.sleep(0.02)
print("result", json.dumps({{"connects": connects, "errors": errors[:5], "n_errors": len(errors),
                            "view_sets": sorted(seen)}}), flush=True)
"""


def _client(script: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", script, *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        bufsize=1,
    )


def _expect(proc: subprocess.Popen, word: str) -> str:
    line = proc.stdout.readline()
    assert line.startswith(word), line + proc.stdout.read()
    return line[len(word) :].strip()


def _finish(proc: subprocess.Popen, word: str) -> str:
    """Release a client, then its final line (`word ...`); it must exit 0."""
    out, _ = proc.communicate("\n", timeout=60)
    assert proc.returncode == 0, out
    return next(line for line in out.splitlines() if line.startswith(word))[len(word) :].strip()


def _run(input_dir: Path, storage: Path, *extra: str) -> Child:
    return Child("run", "--input", str(input_dir), "--storage", str(storage), *ARGS, *extra)


@pytest.fixture(scope="module")
def first_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A storage after one run (its catalog exists for clients to hold), and a reference set."""
    paths = write_embeddings_and_reference(tmp_path_factory.mktemp("readers"), per_shard=200, d=16)
    child = _run(paths["input"], paths["storage"])
    assert child.wait() == 0, child.output
    return paths


def test_read_only_holder_and_reconnecting_client_never_break_a_run(first_run) -> None:
    storage, catalog = first_run["storage"], first_run["storage"] / "catalog.duckdb"
    stop = first_run["root"] / "stop"
    holder = _client(HOLDER, str(catalog), "ro")
    before = json.loads(_expect(holder, "holding"))
    assert sorted(before) == sorted(VIEW_NAMES)
    loop = _client(RECONNECTER, str(catalog), str(stop))
    _expect(loop, "looping")
    try:
        # The reference switches the `contaminated` view from its placeholder to the new file.
        run = _run(first_run["input"], storage, "--reference", str(first_run["ref"]))
        rc = run.wait()
    finally:
        stop.touch()
        held = json.loads(_finish(holder, "done"))
        report = json.loads(_finish(loop, "result"))
    assert rc == 0, run.output
    assert report["n_errors"] == 0, report
    assert report["connects"] >= 10, report
    con = duckdb.connect(str(catalog), read_only=True)
    try:
        flagged = con.execute("SELECT count(*) FROM contaminated").fetchall()[0][0]
    finally:
        con.close()
    assert flagged >= 200
    # The held (old) catalog still reads, and its views see the current files.
    assert held["items"] == 600 and held["contaminated"] == flagged, held
    # Never half a catalog: every view each time, and the old (nothing flagged) or the new one.
    assert {names for names, _ in report["view_sets"]} == {",".join(sorted(VIEW_NAMES))}, report
    assert {n for _, n in report["view_sets"]} <= {0, flagged}, report


def test_read_write_holder_never_blocks_a_run_or_semdedup_sql(first_run) -> None:
    storage, catalog = first_run["storage"], first_run["storage"] / "catalog.duckdb"
    holder = _client(HOLDER, str(catalog), "rw")
    _expect(holder, "holding")
    try:
        sql = subprocess.run(
            [
                sys.executable,
                "-m",
                "semdedup_assets.cli",
                "sql",
                "SELECT count(*) AS n FROM items",
                "--storage",
                str(storage),
            ],
            env=_env(),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert sql.returncode == 0 and "600" in sql.stdout, sql.stdout + sql.stderr
        run = _run(first_run["input"], storage)  # no reference: `contaminated` goes back to its placeholder
        rc = run.wait()
    finally:
        _finish(holder, "done")
    assert rc == 0, run.output
    con = duckdb.connect(str(catalog), read_only=True)
    try:
        names = [r[0] for r in con.execute(VIEWS_SQL).fetchall()]
        assert sorted(names) == sorted(VIEW_NAMES)
        assert con.execute("SELECT count(*) FROM contaminated").fetchall()[0][0] == 0
    finally:
        con.close()
