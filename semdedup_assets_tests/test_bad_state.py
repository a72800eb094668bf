"""Bad input and bad state, clear and early (issue 20): a bad --reference, bad vectors, damaged stage
files, `status` on a wrong or changing storage, short failure output, several SQL statements."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import dagster as dg
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from semdedup_assets.cli import build_parser, main
from semdedup_assets.core.config import Settings
from semdedup_assets.core.io.catalog import VIEW_NAMES
from semdedup_assets.core.io.shards import ShardError, discover_shards, read_shard
from semdedup_assets.core.settings_store import load_settings, save_settings
from semdedup_assets.status import collect_status
from semdedup_assets.ui import ui_command
from semdedup_assets_tests.fixtures import write_embeddings_and_reference

REPO = Path(__file__).resolve().parents[1]
ARGS = ["--modality", "embedding", "--clusters", "4", "--buckets", "2", "--iterations", "20", "--eps", "0.01,0.1"]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "DAGSTER_HOME" and not k.startswith("SEMDEDUP_")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    return env


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "semdedup_assets.cli", *args], env=_env(), capture_output=True, text=True, timeout=600
    )


def _vectors(path: Path, x: np.ndarray, prefix: str = "r") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(
        pa.table(
            {
                "id": [f"{prefix}{i}" for i in range(len(x))],
                "embedding": pa.array(list(x.astype(np.float32)), type=pa.list_(pa.float32())),
            }
        ),
        path,
    )


@pytest.fixture(scope="module")
def ran(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A complete storage of a run with a --reference (a copy of one input shard: its items are flagged)."""
    ran = write_embeddings_and_reference(tmp_path_factory.mktemp("badstate"), per_shard=100, d=8)
    proc = _cli(
        "run", "--input", str(ran["input"]), "--storage", str(ran["storage"]), *ARGS, "--reference", str(ran["ref"])
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return ran


def _run(ran: dict[str, Path], capsys, monkeypatch, *extra: str) -> tuple[int, str, str]:
    monkeypatch.setenv("DAGSTER_HOME", str(ran["storage"] / "dagster_home"))
    capsys.readouterr()
    code = main(["run", "--input", str(ran["input"]), "--storage", str(ran["storage"]), *ARGS, *extra])
    out = capsys.readouterr()
    return code, out.out, out.err


def _command(capsys, *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


# -- point 9: a bad --reference is refused before any stage runs ----------------------------------------


def test_bad_reference_is_refused_before_any_stage(ran, tmp_path: Path, capsys, monkeypatch) -> None:
    recorded = (ran["storage"] / "semdedup.json").read_bytes()
    nan = np.ones((3, 8)), np.ones((3, 4))
    nan[0][1, 2] = np.nan
    _vectors(tmp_path / "nan" / "a.parquet", nan[0])
    _vectors(tmp_path / "dim" / "a.parquet", nan[1])
    _vectors(tmp_path / "zero" / "a.parquet", np.vstack([np.ones((2, 8)), np.zeros((1, 8))]))
    cases = {
        tmp_path / "missing": "does not exist|not found|no such",
        tmp_path / "nan": r"shard 'a', row 1: 'embedding' has a non-finite value",
        tmp_path / "dim": "dimension 4 but the dataset's embeddings have dimension 8",
        tmp_path / "zero": r"shard 'a', row 2: 'embedding' is a zero vector",
    }
    for location, reason in cases.items():
        code, out, err = _run(ran, capsys, monkeypatch, "--reference", str(location))
        assert code == 1, (location, out, err)
        assert "--reference" in err and re.search(reason, err, re.I), (location, err)
        assert "ingest + embed" not in out, out  # no stage ran
        assert (ran["storage"] / "semdedup.json").read_bytes() == recorded  # nothing recorded either


# -- point 4: export never applies the results of another reference ---------------------------------------


def test_export_refuses_contamination_of_another_reference(ran, tmp_path: Path, capsys) -> None:
    storage = str(ran["storage"])
    code, _out, err = _command(capsys, "export", "--storage", storage, "--select", "eps=0.1")
    assert code == 0, err
    flagged = ran["storage"] / "contaminated" / "contaminated.parquet"
    assert pq.read_table(flagged).num_rows >= 100
    settings_file = ran["storage"] / "semdedup.json"
    recorded = settings_file.read_bytes()
    try:
        # What a run whose new --reference failed in its last stage leaves: settings naming the new one.
        save_settings(dataclasses.replace(load_settings(storage), reference=str(tmp_path / "other")))
        code, _out, err = _command(capsys, "export", "--storage", storage, "--select", "eps=0.1")
        assert code == 1 and f"computed against the reference {ran['ref']}" in err and str(tmp_path / "other") in err, (
            err
        )
        save_settings(dataclasses.replace(load_settings(storage), reference=None))  # a run without --reference
        code, _out, err = _command(capsys, "export", "--storage", storage, "--select", "eps=0.1")
        assert code == 1 and "settings name (none)" in err, err
    finally:
        settings_file.write_bytes(recorded)


# -- point 7: vectors that cannot be normalised are refused at ingest, naming shard and row ----------------


@pytest.mark.parametrize(
    "value,row,reason",
    [
        (0.0, 42, "is a zero vector (zero norm)"),
        (1e-41, 0, "is subnormal"),
        (np.inf, 7, "has a non-finite value (NaN or inf)"),
    ],
)
def test_bad_vectors_are_refused_at_ingest(tmp_path: Path, value: float, row: int, reason: str) -> None:
    x = np.random.default_rng(0).normal(size=(50, 8))
    if value == 1e-41:
        x[:] = value  # every vector subnormal: the first bad row is 0
    else:
        x[row] = value
    _vectors(tmp_path / "in" / "part-07.parquet", x)
    [shard] = discover_shards(str(tmp_path / "in"))
    with pytest.raises(ShardError, match=rf"shard 'part-07', row {row}: 'embedding' {re.escape(reason)}"):
        read_shard(shard, "embedding", "embedding")


# -- point 10: a damaged contaminated.parquet is verified, and takes down neither sql nor export -----------


def test_damaged_contaminated_file_is_named_everywhere(ran, capsys) -> None:
    storage = str(ran["storage"])
    path = ran["storage"] / "contaminated" / "contaminated.parquet"
    whole = path.read_bytes()
    try:
        path.write_bytes(whole[: len(whole) // 2])
        code, out, err = _command(capsys, "verify", "--storage", storage)
        assert code == 1 and f"BAD {path}: damaged" in out, out + err
        code, out, err = _command(capsys, "sql", "SELECT count(*) AS n FROM eps_curve", "--storage", storage)
        assert code == 0 and "view contaminated is unavailable" in err, out + err
        code, out, err = _command(capsys, "sql", "SELECT * FROM contaminated", "--storage", storage)
        assert code == 1 and "view contaminated is unavailable" in err and "semdedup verify" in err, err
        code, out, err = _command(capsys, "export", "--storage", storage)
        assert code == 1 and "\nsemdedup: error:" in err and str(path) in err and "Traceback" not in err, err
    finally:
        path.write_bytes(whole)
    code, out, err = _command(capsys, "verify", "--storage", storage)
    assert code == 0, out + err


# -- point 14: status is honest about what it cannot call complete ------------------------------------------


def test_status_on_a_mistyped_storage_is_an_error(tmp_path: Path, capsys) -> None:
    code, _out, err = _command(capsys, "status", "--storage", str(tmp_path / "no-such-storage"))
    assert code == 1 and "no storage at" in err and str(tmp_path / "no-such-storage") in err
    assert not (tmp_path / "no-such-storage").exists()


def test_status_reports_contamination_exports_gone_inputs_and_running_runs(ran, capsys, monkeypatch) -> None:
    monkeypatch.delenv("DAGSTER_HOME", raising=False)
    storage = str(ran["storage"])
    assert _command(capsys, "export", "--storage", storage, "--select", "eps=0.1")[0] == 0
    code, out, _ = _command(capsys, "status", "--storage", storage, "--json")
    js = json.loads(out)
    assert code == 0 and js["state"] == "complete", js
    assert js["contamination"]["flagged"] >= 100 and js["contamination"]["computed_against"] == str(ran["ref"])
    assert [e["selection"] for e in js["exports"]] == ["eps=0.1"] and js["exports"][0]["shards"] == 3
    text = _command(capsys, "status", "--storage", storage)[1]
    assert "contamination:" in text and "flagged against" in text and "export:     deduplicated/eps=0.1" in text
    # A registered shard whose input file is gone: not complete, and named.
    moved = ran["root"] / "part-02.parquet.away"
    (ran["input"] / "part-02.parquet").rename(moved)
    try:
        js = json.loads(_command(capsys, "status", "--storage", storage, "--json")[1])
        assert js["state"] == "partial" and js["input_missing"] == ["part-02"], js["state"]
        assert "input gone: 1 shard(s)" in _command(capsys, "status", "--storage", storage)[1]
    finally:
        moved.rename(ran["input"] / "part-02.parquet")
    # A run still STARTED (going on now, or its process died): not complete.
    with dg.DagsterInstance.from_config(str(ran["storage"] / "dagster_home")) as instance:
        run = instance.add_run(
            dg.DagsterRun(job_name="dedup_job", run_id="feedface" * 4, status=dg.DagsterRunStatus.STARTED)
        )
        try:
            js = json.loads(_command(capsys, "status", "--storage", storage, "--json")[1])
            assert js["state"] == "running", js["state"]
        finally:
            instance.delete_run(run.run_id)


def test_status_json_lists_every_missing_bucket(tmp_path: Path) -> None:
    settings = Settings(storage=str(tmp_path), buckets=25)
    report = collect_status(settings, None)
    assert len(report["buckets"]["missing"]) == 25


# -- point 15: a failed run's terminal output is the cause in two lines, not a traceback ---------------------


def test_failed_run_prints_the_cause_not_a_traceback(tmp_path: Path) -> None:
    x = np.random.default_rng(0).normal(size=(20, 8))
    _vectors(tmp_path / "input" / "part-00.parquet", x, prefix="a")
    x[5] = np.nan
    _vectors(tmp_path / "input" / "part-01.parquet", x, prefix="b")
    proc = _cli("run", "--input", str(tmp_path / "input"), "--storage", str(tmp_path / "storage"), *ARGS)
    assert proc.returncode == 1
    out = proc.stdout + proc.stderr
    assert "Traceback" not in out and "dagster._core" not in out, out
    after = proc.stderr.split("semdedup: error:", 1)
    assert len(after) == 2, out
    error = ("semdedup: error:" + after[1]).strip().splitlines()
    assert len(error) <= 2, error
    assert "shard 'part-01', row 5" in error[0] and "non-finite" in error[0], error
    assert "-v" in error[-1] and re.search(r"run [0-9a-f-]{36}", error[-1]), error
    # The UI hint fits this install: a checkout's `make ui`, on this storage's run history.
    storage = str(tmp_path / "storage")
    assert error[-1].endswith(f"in the UI: {ui_command(storage, os.path.join(storage, 'dagster_home'))})"), error
    assert "make ui DEMO_STORAGE=" in error[-1], error
    noise = [line for line in proc.stderr.splitlines() if " - ERROR - " in line]
    assert not noise, noise
    # -v still shows Dagster's own failure events with the whole trace.
    verbose = _cli("run", "-v", "--input", str(tmp_path / "input"), "--storage", str(tmp_path / "storage"), *ARGS)
    assert verbose.returncode == 1 and "STEP_FAILURE" in verbose.stdout + verbose.stderr


# -- point 16: several SQL statements, and the views in --help ----------------------------------------------


def test_sql_prints_every_statement_and_help_lists_every_view(tmp_path: Path, capsys) -> None:
    (tmp_path / "s").mkdir()
    code, out, err = _command(capsys, "sql", "SELECT 1 AS a; SELECT 2 AS b", "--storage", str(tmp_path / "s"))
    assert code == 0, err
    assert "> SELECT 1 AS a;" in out and "> SELECT 2 AS b" in out
    assert re.search(r"^a\n-\n1$", out, re.M) and re.search(r"^b\n-\n2$", out, re.M), out
    with pytest.raises(SystemExit):
        build_parser().parse_args(["sql", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    for view in VIEW_NAMES:
        assert view in help_text, view
    assert "rejected" in help_text and "contaminated" in help_text
