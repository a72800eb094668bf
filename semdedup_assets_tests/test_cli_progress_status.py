"""The command line as users see it: progress on a TTY and on a pipe, a quiet terminal by
default (Dagster's DEBUG stream only with -v), rounded metadata, and `semdedup status`.

Real `semdedup` subprocesses on small bring-your-own-embedding shards (no text model).
"""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import dagster as dg
import pytest

from semdedup_assets.cli import main
from semdedup_assets_tests.fixtures import write_embedding_shards

BUCKETS = "4"
# A periodic line off a TTY: count, percentage, elapsed<remaining (the ETA) and the rate.
PIPE_LINE = r"\[semdedup\] {label}: {n}/{total} {unit} \(\d+%\) \[\d\d:\d\d<(\d\d:\d\d|\?), +(\?{unit}/s|[\d.]+{unit}/s|[\d.]+s/{unit})\]"


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "DAGSTER_HOME" and not k.startswith("SEMDEDUP_")}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1])
    env.update(extra)
    return env


def _args(command: str, tmp: Path, *extra: str) -> list[str]:
    args = [sys.executable, "-m", "semdedup_assets.cli", command]
    if command == "run":
        args += ["--input", str(tmp / "input"), "--modality", "embedding", "--buckets", BUCKETS]
    return [*args, "--storage", str(tmp / "storage"), *extra]


def _cli(command: str, tmp: Path, *extra: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(_args(command, tmp, *extra), env=_env(**env), capture_output=True, text=True, timeout=600)


def _status(tmp: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> tuple[str, dict]:
    """`semdedup status` in text and JSON (in process: the same code path as the console script)."""
    monkeypatch.delenv("DAGSTER_HOME", raising=False)
    capsys.readouterr()
    assert main(["status", "--storage", str(tmp / "storage")]) == 0
    text = capsys.readouterr().out
    assert main(["status", "--storage", str(tmp / "storage"), "--json"]) == 0
    return text, json.loads(capsys.readouterr().out)


@pytest.fixture(scope="module")
def done(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess]:
    """A complete storage, from a `semdedup run` whose output went to pipes."""
    tmp = tmp_path_factory.mktemp("complete")
    write_embedding_shards(tmp / "input", n_shards=3, per_shard=100)
    # Interval 0: a line for every item, so the test sees the intermediate counts too.
    proc = _cli("run", tmp, SEMDEDUP_PROGRESS_INTERVAL="0")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return tmp, proc


def test_progress_on_a_pipe_is_one_line_per_update(done) -> None:
    _, proc = done
    out = proc.stderr
    assert "\r" not in out and "\x1b" not in out  # no bar redraws in a CI log
    for label, unit, total in (
        ("ingest", "shards", 3),
        ("embed", "shards", 3),
        ("assign", "shards", 3),
        ("pairwise", "buckets", 4),
        ("keep-lists", "buckets", 4),
    ):
        for n in range(total + 1):
            assert re.search(PIPE_LINE.format(label=label, n=n, total=total, unit=unit), out), (label, n, out)
    # The note names the last item done.
    assert re.search(r"embed: 3/3 shards .*  embedded shard 'part-02': 100 rows", out)
    # Stage lines and the summary stay on stdout.
    assert "[semdedup] ingest + embed ..." in proc.stdout and "items: 300" in proc.stdout


def test_quiet_by_default_but_the_instance_has_every_event(done) -> None:
    tmp, proc = done
    assert " - dagster - " not in proc.stdout + proc.stderr
    assert "RUN_START" not in proc.stdout + proc.stderr and "STEP_START" not in proc.stdout + proc.stderr
    with dg.DagsterInstance.from_config(str(tmp / "storage" / "dagster_home")) as instance:
        runs = instance.get_run_records()
        assert len(runs) == 5
        for record in runs:
            events = instance.all_logs(record.dagster_run.run_id)
            kinds = {e.dagster_event.event_type_value for e in events if e.is_dagster_event}
            assert {
                dg.DagsterEventType.RUN_START.value,
                "STEP_START",
                dg.DagsterEventType.RUN_SUCCESS.value,
                "ASSET_MATERIALIZATION",
            } <= kinds
        # The progress lines of the assets are still in the event log for the UI.
        messages = [e.user_message for e in instance.all_logs(runs[-1].dagster_run.run_id)]
        assert any("[3/3] embedded shard 'part-02'" in m for m in messages)


@pytest.fixture(scope="module")
def verbose(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess]:
    """A `semdedup run -v` on two small shards (its storage then serves the forget test)."""
    tmp = tmp_path_factory.mktemp("verbose")
    write_embedding_shards(tmp / "input", n_shards=2, per_shard=50)
    proc = _cli("run", tmp, "--buckets", "2", "-v")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return tmp, proc


def test_verbose_restores_dagsters_debug_stream(verbose) -> None:
    _, proc = verbose
    debug = [line for line in proc.stderr.splitlines() if " - dagster - DEBUG - " in line]
    assert len(debug) > 20 and sum(" - RUN_START - " in line for line in debug) == 5
    assert any(" - STEP_START - " in line for line in debug)
    assert "[semdedup] embed: 2/2 shards" in proc.stderr  # our own progress too


def test_metadata_tables_are_rounded(done) -> None:
    tmp, _ = done
    with dg.DagsterInstance.from_config(str(tmp / "storage" / "dagster_home")) as instance:
        keep = instance.get_latest_materialization_event(dg.AssetKey("keep_lists")).asset_materialization.metadata
        fractions = [r.data["kept_fraction"] for r in keep["eps_curve"].value.records]
        assert any(f != round(f, 3) for f in fractions)  # the data has fractions that need the rounding
        assert all(f == round(f, 4) for f in fractions), fractions
        assert keep["seconds"].value == round(keep["seconds"].value, 2)
        # Each shard's own figures are on its own partition's event, rounded.
        records = instance.fetch_materializations(dg.AssetKey("embeddings"), limit=100).records
        assert sorted(r.partition_key for r in records) == ["part-00", "part-01", "part-02"]
        for record in records:
            meta = record.asset_materialization.metadata
            assert meta["seconds"].value == round(meta["seconds"].value, 2) and meta["rows"].value == 100


def _read_pty(fd: int, proc: subprocess.Popen, timeout: float = 300) -> str:
    chunks, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.5)
        if ready:
            try:
                data = os.read(fd, 65536)
            except OSError:  # EIO: the child closed its end
                break
            if not data:
                break
            chunks.append(data)
        elif proc.poll() is not None:
            break
    return b"".join(chunks).decode("utf-8", "replace")


def test_progress_bars_on_a_tty(tmp_path: Path) -> None:
    write_embedding_shards(tmp_path / "input", n_shards=3, per_shard=60)
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))
    proc = subprocess.Popen(
        _args("run", tmp_path), env=_env(TERM="xterm"), stdin=slave, stdout=slave, stderr=slave, close_fds=True
    )
    os.close(slave)
    try:
        out = _read_pty(master, proc)
        assert proc.wait(timeout=60) == 0, out
    finally:
        os.close(master)
    # tqdm redraws one line with carriage returns: a bar, the count, the rate and the ETA.
    assert "\r" in out
    for label, unit, total in (("embed", "shards", 3), ("assign", "shards", 3), ("pairwise", "buckets", 4)):
        assert re.search(
            rf"{label}: 100%\|[█#]+\| {total}/{total} \[\d\d:\d\d<\d\d:\d\d, +[\d.]+({unit}/s|s/{unit})", out
        ), (label, out)
    assert re.search(r"embed:\s+\d+%\|.*\| [0-2]/3 \[\d\d:\d\d<[^,]+, ", out)  # intermediate states drawn
    assert "[semdedup] embed: " not in out  # no CI-style lines on a terminal
    assert " - dagster - " not in out and "items: 180" in out


def test_status_fresh(tmp_path: Path, capsys, monkeypatch) -> None:
    (tmp_path / "storage").mkdir()  # an empty folder is fresh; a missing one is an error (test_bad_state.py)
    text, js = _status(tmp_path, capsys, monkeypatch)
    assert js["state"] == "fresh" and "(fresh)" in text
    assert js["shards"]["registered"] == 0 and js["runs"]["total"] == 0 and js["dagster_home"] is None
    assert not list((tmp_path / "storage").iterdir())  # status writes nothing


def test_status_partial_names_the_failed_run_and_missing_work(tmp_path: Path, capsys, monkeypatch) -> None:
    write_embedding_shards(tmp_path / "input", n_shards=2, per_shard=50)
    (tmp_path / "input" / "part-09.parquet").write_bytes(b"not parquet")
    proc = _cli("run", tmp_path)
    assert proc.returncode == 1
    text, js = _status(tmp_path, capsys, monkeypatch)
    # The failed ingest withdrew the shards it registered; the failed run is still named.
    assert js["shards"]["registered"] == 0 and [r["job"] for r in js["runs"]["failed"]] == ["ingest_job"]
    # Shards registered (as the shard sensor does) but not processed yet are named as missing work.
    with dg.DagsterInstance.from_config(str(tmp_path / "storage" / "dagster_home")) as instance:
        instance.add_dynamic_partitions("shards", ["part-00", "part-01", "part-09"])
    text, js = _status(tmp_path, capsys, monkeypatch)
    assert js["state"] == "partial" and "(partial)" in text
    assert js["shards"]["registered"] == 3 and js["shards"]["embedded"] == 0
    assert js["shards"]["not_embedded"] == ["part-00", "part-01", "part-09"]
    assert [r["job"] for r in js["runs"]["failed"]] == ["ingest_job"]
    assert js["centroids"] == {"present": False} and js["buckets"]["done"] == 0
    assert "failed (no later success of the same job):" in text and "FAILURE" in text
    assert "not embedded yet: part-00, part-01, part-09" in text and "centroids:  not trained yet" in text
    # A run whose process died stays "started" in the instance: status calls it out.
    with dg.DagsterInstance.from_config(str(tmp_path / "storage" / "dagster_home")) as instance:
        instance.add_run(
            dg.DagsterRun(
                job_name="dedup_job",
                run_id="deadbeef" * 4,
                status=dg.DagsterRunStatus.STARTED,
                tags={"dagster/partition": "003"},
            )
        )
    text, js = _status(tmp_path, capsys, monkeypatch)
    assert [(r["job"], r["partition"]) for r in js["runs"]["unfinished"]] == [("dedup_job", "003")]
    assert "unfinished (stale unless a run is going on now):" in text and "STARTED" in text and "(deadbeef)" in text


def test_status_complete(done, capsys, monkeypatch) -> None:
    tmp, _ = done
    text, js = _status(tmp, capsys, monkeypatch)
    assert js["state"] == "complete" and "(complete)" in text
    assert js["input"] == str(tmp / "input") and js["settings"]["modality"] == "embedding"
    assert {k: js["shards"][k] for k in ("registered", "embedded", "assigned")} == {
        "registered": 3,
        "embedded": 3,
        "assigned": 3,
    }
    c = js["centroids"]
    assert c["k"] == 17 and c["items"] == 300 and c["sample_rows"] == 300 and 0 <= c["age_seconds"] < 3600
    assert js["buckets"] == {"total": 4, "done": 4, "missing": []}
    assert len(js["keep_lists"]["present_eps"]) == 9 == len(js["keep_lists"]["eps_curve"])
    assert all(r["kept"] + r["removed"] == 300 for r in js["keep_lists"]["eps_curve"])
    assert [r["status"] for r in js["runs"]["recent"]] == ["SUCCESS"] * 5 and not js["runs"]["failed"]
    assert all(
        js["disk_bytes"][s] > 0
        for s in ("raw", "embeddings", "centroids", "cluster_assignments", "semantic_duplicates", "keep_lists")
    )
    assert "buckets:    4/4 done" in text and "kept_fraction" in text and "k=17, trained" in text
    assert "on a sample of 300 of 300 items" in text and "disk:       raw " in text


def test_forget_shows_progress_over_its_reruns(verbose, capsys, monkeypatch) -> None:
    tmp_path, _ = verbose
    proc = _cli("forget", tmp_path, "part-01")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    runs = int(re.search(r"re-running (\d+) bucket", proc.stdout).group(1)) + 1
    assert re.search(
        PIPE_LINE.format(label="forget: re-run", n=runs, total=runs, unit="runs") + "  keep-lists", proc.stderr
    ), proc.stderr
    assert "pairwise:" not in proc.stderr  # the re-runs' own loops stay under the outer bar
    _, js = _status(tmp_path, capsys, monkeypatch)
    assert js["shards"]["registered"] == 1 and js["state"] == "complete"


def test_a_command_leaves_no_reporter_behind_and_a_closed_stream_never_fails_the_work() -> None:
    import io

    from semdedup_assets import progress

    stream = io.StringIO()
    with progress.reporting(progress.Reporter(stream, interval=0, tty=False)):
        outer = progress.task("forget: re-run", 2, unit="runs", outer=True)
        inner = progress.task("pairwise", 1, unit="buckets")  # silent under the outer task
        inner.update(1, "bucket 000")
        outer.update(1, "bucket 000")
        left_open = progress.task("embed", 3, unit="shards")  # silent too, and closed with the command
    assert progress.reporter() is None and left_open.closed and outer.closed
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2 and all(line.startswith("[semdedup] forget: re-run: ") for line in lines), lines
    # In-process callers (tests calling cli.main under capsys) may close the stream the reporter holds.
    closed = io.StringIO()
    with progress.reporting(progress.Reporter(closed, interval=0, tty=False)):
        bar = progress.task("embed", 2, unit="shards")
        closed.close()
        bar.update(1, "embedded shard 'part-00'")  # no ValueError
        assert bar.closed


def test_status_of_an_object_store_storage_without_an_instance(tmp_path: Path) -> None:
    import pyarrow as pa

    from semdedup_assets.core.config import Settings
    from semdedup_assets.core.io import storage as st
    from semdedup_assets.status import collect_status, format_status

    settings = Settings(storage=f"memory://status-test/{tmp_path.name}")
    storage = settings.storage_root()
    st.atomic_write_table(pa.table({"id": ["a"]}), storage.shard_file(st.RAW, "part-00"))
    st.atomic_write_table(pa.table({"cluster": [0, 1]}), storage.centroids_file)  # no mtime in memory://
    report = collect_status(settings, None)
    assert report["state"] == "partial" and report["dagster_home"] is None
    assert report["shards"]["not_embedded"] == ["part-00"] and report["centroids"]["k"] == 2
    text = format_status(report)
    assert "not embedded yet: part-00" in text and "k=2, trained (age unknown)" in text
    assert "missing: 000, 001, 002, 003, 004, 005, 006, 007, 008, 009, ...)" in text
    json.dumps(report)  # JSON-able as it is
