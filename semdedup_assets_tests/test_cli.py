"""`semdedup run` end to end on real text, catalog queries, and bad input."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from semdedup_assets.cli import main
from semdedup_assets_tests.fixtures import write_text_shards

STAGE_DIRS = ("raw", "embeddings", "centroids", "cluster_assignments", "semantic_duplicates", "keep_lists")


def _cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "semdedup_assets.cli", *args], env=env, capture_output=True, text=True, timeout=600
    )


def parse_table(text: str, header_starts: str | None = None) -> tuple[list[str], list[list[str]]]:
    """A table printed by format_table (the first one, or the one whose header starts so): columns and cells."""
    lines = text.splitlines()
    at = 0 if header_starts is None else next(i for i, line in enumerate(lines) if line.startswith(header_starts))
    columns = [c.strip() for c in lines[at].split(" | ")]
    assert set(lines[at + 1]) <= {"-", "+"}, lines[at + 1]  # the separator line
    rows = []
    for line in lines[at + 2 :]:
        cells = [c.strip() for c in line.split(" | ")]
        if len(cells) != len(columns):
            break
        rows.append(cells)
    return columns, rows


@pytest.mark.slow
def test_run_end_to_end_then_query_every_view(tmp_path: Path) -> None:
    write_text_shards(tmp_path / "input", n_shards=2)
    env = {k: v for k, v in os.environ.items() if k != "DAGSTER_HOME"}
    storage = tmp_path / "storage"
    proc = _cli(
        "run",
        "--input",
        str(tmp_path / "input"),
        "--storage",
        str(storage),
        "--clusters",
        "3",
        "--eps",
        "0.01,0.05,0.1",
        "--buckets",
        "2",
        env=env,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert "items: 21" in lines and "clusters: 3" in lines
    # The printed eps table: one row per eps, kept + removed = items, the fraction rounded to 4 places.
    columns, printed = parse_table(proc.stdout, header_starts="eps ")
    assert columns == ["eps", "kept", "removed", "kept_fraction"]
    assert [float(r[0]) for r in printed] == [0.01, 0.05, 0.1]
    kept_printed = {float(r[0]): int(r[1]) for r in printed}
    for _eps, kept, removed, fraction in printed:
        assert int(kept) + int(removed) == 21 and float(fraction) == round(int(kept) / 21, 4)
    assert kept_printed[0.01] >= kept_printed[0.05] >= kept_printed[0.1]
    # Runs were recorded in the default DAGSTER_HOME inside the storage.
    assert (storage / "dagster_home").is_dir()

    def sql(q: str) -> list[list[str]]:
        out = _cli("sql", q, "--storage", str(storage), env=env)
        assert out.returncode == 0, out.stdout + out.stderr
        return parse_table(out.stdout)[1]

    assert sql("SELECT count(*) AS n FROM items") == [["21"]]
    assert sql("SELECT DISTINCT len(embedding) AS d FROM embeddings") == [["384"]]
    assert sql("SELECT count(*) AS k, sum(size) AS total FROM centroids") == [["3", "21"]]
    curve = sql("SELECT eps, kept, removed, kept_fraction FROM eps_curve ORDER BY eps")
    assert {float(r[0]): int(r[1]) for r in curve} == kept_printed
    # The planted near-copies (cosine 0.97-0.998 under MiniLM) are duplicates of their originals at
    # eps=0.05; "Honeybees"/"Honey bees" (0.944) only at eps=0.1.
    removed = {
        r[0] for r in sql("SELECT id || '~' || duplicate_of AS pair FROM items WHERE max_sim > 1 - 0.05 ORDER BY id")
    }
    for i in ("00", "01", "04", "09"):
        assert f"copy-{i}~base-{i}" in removed or f"base-{i}~copy-{i}" in removed
    assert not any("-13" in p or "base-02" in p for p in removed)
    removed = {
        r[0] for r in sql("SELECT id || '~' || duplicate_of AS pair FROM items WHERE max_sim > 1 - 0.1 ORDER BY id")
    }
    assert "copy-13~base-13" in removed or "base-13~copy-13" in removed
    # The keep-list rule in SQL matches the eps curve, and the printed count.
    assert sql("SELECT count(*) AS kept FROM items WHERE max_sim <= 1 - 0.05") == [[str(kept_printed[0.05])]]


def _bad_run(tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch, *extra: str) -> str:
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "home"))
    storage = tmp_path / "storage"
    code = main(["run", "--input", str(tmp_path / "input"), "--storage", str(storage), *extra])
    err = capsys.readouterr().err
    assert code != 0
    for stage in STAGE_DIRS:  # no partial output: nothing published for any stage
        files = [p for p in (storage / stage).rglob("*") if p.is_file()] if (storage / stage).exists() else []
        assert not files, (stage, files)
    return err


def _write(tmp_path: Path, name: str, rows: list[dict] | None = None, raw: bytes | None = None) -> None:
    folder = tmp_path / "input"
    (folder / name).parent.mkdir(parents=True, exist_ok=True)
    if raw is not None:
        (folder / name).write_bytes(raw)
    elif name.endswith(".parquet"):
        pq.write_table(
            pa.Table.from_pylist(rows)
            if rows
            else pa.table({"id": pa.array([], pa.string()), "text": pa.array([], pa.string())}),
            folder / name,
        )
    else:
        data = "".join(json.dumps(r) + "\n" for r in rows).encode()
        (folder / name).write_bytes(gzip.compress(data) if name.endswith(".gz") else data)


GOOD = [{"id": f"g{i}", "text": f"A perfectly fine sentence number {i}."} for i in range(5)]


def test_missing_payload_column(tmp_path: Path, capsys, monkeypatch) -> None:
    _write(tmp_path, "good.parquet", GOOD)
    _write(tmp_path, "bad.parquet", [{"id": "x1", "body": "no text column here"}])
    err = _bad_run(tmp_path, capsys, monkeypatch)
    assert "shard 'bad'" in err and "missing payload column 'text'" in err and "body" in err


def test_empty_shard(tmp_path: Path, capsys, monkeypatch) -> None:
    _write(tmp_path, "good.parquet", GOOD)
    _write(tmp_path, "empty.parquet", [])
    err = _bad_run(tmp_path, capsys, monkeypatch)
    assert "shard 'empty'" in err and "empty" in err


def test_empty_jsonl_shard(tmp_path: Path, capsys, monkeypatch) -> None:
    _write(tmp_path, "good.jsonl", GOOD)
    _write(tmp_path, "nothing.jsonl", raw=b"\n")
    err = _bad_run(tmp_path, capsys, monkeypatch)
    assert "shard 'nothing'" in err and "empty" in err


def test_duplicate_ids_across_shards(tmp_path: Path, capsys, monkeypatch) -> None:
    _write(tmp_path, "a.parquet", GOOD)
    _write(tmp_path, "sub/b.jsonl.gz", [{"id": "z0", "text": "other"}, {"id": "g3", "text": "a repeat of an id"}])
    err = _bad_run(tmp_path, capsys, monkeypatch)
    assert "id 'g3'" in err and "shard 'a' row 3" in err and "shard 'sub/b' row 1" in err


def test_duplicate_ids_within_a_shard(tmp_path: Path, capsys, monkeypatch) -> None:
    _write(tmp_path, "a.jsonl", [*GOOD, {"id": "g1", "text": "again"}])
    err = _bad_run(tmp_path, capsys, monkeypatch)
    assert "shard 'a', row 5" in err and "'g1'" in err


def test_none_text(tmp_path: Path, capsys, monkeypatch) -> None:
    _write(tmp_path, "good.parquet", GOOD)
    _write(tmp_path, "nulls.jsonl", [{"id": "n0", "text": "fine"}, {"id": "n1", "text": None}])
    err = _bad_run(tmp_path, capsys, monkeypatch)
    assert "shard 'nulls', row 1" in err and "null" in err


def test_non_utf8_text_in_jsonl(tmp_path: Path, capsys, monkeypatch) -> None:
    _write(tmp_path, "good.parquet", GOOD)
    _write(tmp_path, "latin1.jsonl", raw=b'{"id": "l0", "text": "fine"}\n{"id": "l1", "text": "caf\xe9"}\n')
    err = _bad_run(tmp_path, capsys, monkeypatch)
    assert "shard 'latin1', row 1" in err and "UTF-8" in err


def test_non_utf8_text_in_parquet_binary_column(tmp_path: Path, capsys, monkeypatch) -> None:
    _write(tmp_path, "good.parquet", GOOD)
    folder = tmp_path / "input"
    pq.write_table(
        pa.table({"id": ["b0", "b1", "b2"], "text": pa.array([b"ok", b"fine", b"\xff\xfe bad"], pa.binary())}),
        folder / "binary.parquet",
    )
    err = _bad_run(tmp_path, capsys, monkeypatch)
    assert "shard 'binary', row 2" in err and "UTF-8" in err


def test_non_str_text(tmp_path: Path, capsys, monkeypatch) -> None:
    _write(tmp_path, "nums.parquet", [{"id": "n0", "text": 1}, {"id": "n1", "text": 2}])
    err = _bad_run(tmp_path, capsys, monkeypatch)
    assert "shard 'nums'" in err and "must be text" in err


def test_corrupt_parquet(tmp_path: Path, capsys, monkeypatch) -> None:
    _write(tmp_path, "good.parquet", GOOD)
    pq.write_table(pa.Table.from_pylist(GOOD), tmp_path / "whole.parquet")
    _write(tmp_path, "broken.parquet", raw=(tmp_path / "whole.parquet").read_bytes()[:-40])
    (tmp_path / "whole.parquet").unlink()
    err = _bad_run(tmp_path, capsys, monkeypatch)
    assert "shard 'broken'" in err and "corrupt" in err


def test_bad_json_line(tmp_path: Path, capsys, monkeypatch) -> None:
    _write(tmp_path, "j.jsonl", raw=b'{"id": "a", "text": "x"}\n{"id": "b", "text": \n')
    err = _bad_run(tmp_path, capsys, monkeypatch)
    assert "shard 'j', row 1" in err and "invalid JSON on line 2" in err


def test_bad_settings_exit_2(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "home"))
    _write(tmp_path, "good.parquet", GOOD)
    code = main(["run", "--input", str(tmp_path / "input"), "--storage", str(tmp_path / "s"), "--eps", "0.5,1.5"])
    assert code == 2 and "eps" in capsys.readouterr().err


def test_help_lists_every_command(capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for cmd in ("run", "demo", "sql", "forget"):
        assert cmd in out
