"""Issue 34, findings 5-13: no command crashes or speaks unclearly on a user's mistake.

Every user error is one `semdedup: error: ...` line on stderr, never a Python traceback; a refused
run writes nothing; names are escaped; warnings come as `semdedup: warning: ...`. Tiny embedding
data throughout (the `semdedup` subprocesses cost seconds each: only what needs a real terminal,
stdout pipe or warning stream runs as one).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from semdedup_assets.cli import build_parser, main
from semdedup_assets.component import SemDedup
from semdedup_assets.core.config import Settings, parse_keep_by
from semdedup_assets_tests.fixtures import write_embedding_shards


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "DAGSTER_HOME"}


def _cli(*args: str, cwd: Path | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "semdedup_assets.cli", *args],
        env=_env(),
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _one_error_line(err: str) -> str:
    """The stderr of a refused command: one `semdedup: error: ...` line (argparse's usage lines aside), no traceback."""
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith(("usage:", " "))]
    assert len(lines) == 1 and lines[0].startswith("semdedup") and ": error: " in lines[0], err
    return lines[0]


def _commands() -> list[str]:
    """Every subcommand, as `semdedup --help` lists them."""
    return list(next(a for a in build_parser()._actions if a.dest == "command").choices)


def _write_one(folder: Path, ids: list[str], vectors: np.ndarray, name: str = "part-00.parquet") -> None:
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(
        pa.table({"id": ids, "embedding": pa.array(list(vectors.astype(np.float32)), type=pa.list_(pa.float32()))}),
        folder / name,
    )


def _tree(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) if folder.exists() else []


# --- the acceptance matrix: every command, with a file as storage, a missing folder and a closed pipe ---------


def _matrix(tmp_path: Path) -> dict[str, tuple[list[str], list[str]]]:
    """Per command: (argv with a regular file where a folder belongs, argv naming a missing folder)."""
    afile, missing, emb = tmp_path / "afile", tmp_path / "no" / "such", tmp_path / "emb"
    f, m = str(afile), str(missing)
    return {
        "run": (
            ["run", "--input", str(emb), "--storage", f, "--modality", "embedding"],
            ["run", "--input", m, "--storage", str(tmp_path / "st"), "--modality", "embedding"],
        ),
        "demo": (["demo", "--storage", f], ["demo", "--storage", str(afile / "st")]),
        "sql": (["sql", "SELECT 1", "--storage", f], ["sql", "SELECT 1", "--storage", m]),
        "groups": (["groups", "--storage", f], ["groups", "--eps", "0.01", "--storage", m]),
        "forget": (["forget", "part-00", "--storage", f], ["forget", "part-00", "--storage", m]),
        "status": (["status", "--storage", f], ["status", "--storage", m]),
        "export": (["export", "--storage", f], ["export", "--storage", m]),
        "verify": (["verify", "--storage", f], ["verify", "--storage", m]),
        "sweep": (
            ["sweep", "--input", str(emb), "--storage", f, "--clusters", "2", "--modality", "embedding"],
            ["sweep", "--input", m, "--storage", str(tmp_path / "sw"), "--clusters", "2", "--modality", "embedding"],
        ),
        "compare": (["compare", f, f], ["compare", m, m]),
        "distill": (["distill", "--out", f], ["distill", "--from", m, "--out", str(tmp_path / "model")]),
    }


def test_every_command_gives_one_line_for_a_file_as_storage_and_a_missing_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Acceptance: no command prints a traceback for a user error (findings 5 and 9 for every command).

    In-process (`main` is the console script: an exception escaping it is the traceback), each
    refusal is one line, exit status 1 or 2, and nothing is created: no storage, no dagster_home.
    """
    monkeypatch.delenv("DAGSTER_HOME", raising=False)
    write_embedding_shards(tmp_path / "emb", n_shards=1, per_shard=4, d=4)
    (tmp_path / "afile").write_text("not a storage\n")
    matrix = _matrix(tmp_path)
    assert sorted(matrix) == sorted(_commands())  # a new command joins this test
    before = _tree(tmp_path)
    for _command, cases in matrix.items():
        for argv in cases:
            code = main(argv)
            out, err = capsys.readouterr()
            assert code in (1, 2), (argv, code, out, err)
            _one_error_line(err)
            assert _tree(tmp_path) == before, (argv, sorted(set(_tree(tmp_path)) - set(before)))
    assert "DAGSTER_HOME" not in os.environ  # no refused command got as far as an instance


def test_every_command_exits_quietly_on_a_closed_pipe(tmp_path: Path) -> None:
    """Finding 10: `semdedup status | head -1` and the like end without a BrokenPipeError traceback."""
    storage = tmp_path / "storage"
    storage.mkdir()
    runs = [[command, "--help"] for command in _commands()] + [
        ["--help"],
        ["status", "--storage", str(storage)],
        ["verify", "--storage", str(storage)],
        ["sql", "SELECT * FROM range(20000)", "--storage", str(storage)],
        ["run", "--input", str(tmp_path / "nowhere"), "--storage", str(tmp_path / "st")],  # its first line
    ]
    for argv in runs:
        proc = subprocess.Popen(
            [sys.executable, "-m", "semdedup_assets.cli", *argv],
            env=_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        proc.stdout.close()  # the reader is gone before the command writes its first byte
        err = proc.stderr.read()
        proc.wait(timeout=120)
        assert "Traceback" not in err and "BrokenPipeError" not in err, (argv, err)
    assert not (tmp_path / "st").exists()


# --- one test per finding ----------------------------------------------------------------------------------


def test_run_with_a_file_as_storage_is_one_line(tmp_path: Path) -> None:
    """Finding 5, as the issue ran it: a subprocess, the regular file `afile` as --storage."""
    write_embedding_shards(tmp_path / "emb", n_shards=1, per_shard=4, d=4)
    (tmp_path / "afile").write_text("")
    proc = _cli("run", "--input", "emb", "--storage", "afile", "--modality", "embedding", cwd=tmp_path)
    assert proc.returncode == 1
    assert _one_error_line(proc.stderr) == f"semdedup: error: --storage {tmp_path / 'afile'} is a file, not a folder"


def test_keep_by_direction_is_checked_where_settings_are_made(tmp_path: Path, capsys, monkeypatch) -> None:
    """Finding 6: `quality:up` names a bad direction, in Settings, in a component's definitions and on the CLI."""
    with pytest.raises(ValueError, match="keep_by direction must be asc or desc, got 'up' in 'quality:up'"):
        Settings(keep_by="quality:up")
    assert parse_keep_by("a:b:asc") == (("a:b", False),)  # a name holding `:` is written with its direction
    component = SemDedup(
        prefix="dedup_c4", input="data/c4", storage=".storage/dedup_c4", settings={"keep_by": "quality:up"}
    )
    with pytest.raises(ValueError, match="direction must be asc or desc"):  # what `dg check defs` loads
        component.definitions(tmp_path)
    monkeypatch.delenv("DAGSTER_HOME", raising=False)
    write_embedding_shards(tmp_path / "emb", n_shards=1, per_shard=4, d=4)
    code = main(
        [
            "run",
            "--input",
            str(tmp_path / "emb"),
            "--storage",
            str(tmp_path / "st"),
            "--modality",
            "embedding",
            "--keep-by",
            "quality:up",
        ]
    )
    line = _one_error_line(capsys.readouterr().err)
    assert code == 2 and "direction must be asc or desc" in line and not (tmp_path / "st").exists()


def test_names_with_control_characters_are_escaped(tmp_path: Path, capsys, monkeypatch) -> None:
    """Finding 7: a shard `bad\\nname.parquet` is refused in one line that shows the name escaped."""
    from semdedup_assets.core.messages import printable  # the one helper every message uses (new with the fix)

    assert printable("bad\nname\t\x1b[31m\u2028.parquet") == "bad\\nname\\t\\x1b[31m\\u2028.parquet"
    assert printable(Path("plain/name é.parquet")) == "plain/name é.parquet"
    monkeypatch.delenv("DAGSTER_HOME", raising=False)
    _write_one(tmp_path / "in", ["a", "b"], np.eye(2, 4), name="bad\nname.parquet")
    code = main(["run", "--input", str(tmp_path / "in"), "--storage", str(tmp_path / "st"), "--modality", "embedding"])
    line = _one_error_line(capsys.readouterr().err)
    assert code == 1 and f"input file {tmp_path}/in/bad\\nname.parquet: unsafe shard key" in line
    # Broken links and skipped files name their paths the same way.
    (tmp_path / "in" / "bad\nname.parquet").unlink()
    (tmp_path / "in" / "gone\r.parquet").symlink_to(tmp_path / "nowhere.parquet")
    code = main(["run", "--input", str(tmp_path / "in"), "--storage", str(tmp_path / "st"), "--modality", "embedding"])
    line = _one_error_line(capsys.readouterr().err)
    assert code == 1 and "broken symbolic link under the input" in line and "gone\\r.parquet" in line
    assert not (tmp_path / "st").exists()  # finding 9 as well


def test_refused_runs_write_nothing(tmp_path: Path, capsys, monkeypatch) -> None:
    """Finding 9: a storage inside the input, a missing input, a broken link: no dagster_home, no file at all."""
    monkeypatch.delenv("DAGSTER_HOME", raising=False)
    write_embedding_shards(tmp_path / "emb", n_shards=1, per_shard=4, d=4)
    before = _tree(tmp_path)
    cases = [
        (["--input", str(tmp_path / "emb"), "--storage", str(tmp_path / "emb" / "st")], "inside --input"),
        (["--input", str(tmp_path / "missing"), "--storage", str(tmp_path / "st")], "does not exist"),
    ]
    for args, message in cases:
        assert main(["run", *args, "--modality", "embedding"]) == 1
        assert message in _one_error_line(capsys.readouterr().err)
        assert _tree(tmp_path) == before, sorted(set(_tree(tmp_path)) - set(before))
    (tmp_path / "emb" / "part-09.parquet").symlink_to(tmp_path / "gone.parquet")
    before = _tree(tmp_path)
    assert (
        main(["run", "--input", str(tmp_path / "emb"), "--storage", str(tmp_path / "st"), "--modality", "embedding"])
        == 1
    )
    assert "broken symbolic link" in _one_error_line(capsys.readouterr().err)
    assert _tree(tmp_path) == before and "DAGSTER_HOME" not in os.environ


def test_compare_plot_folder_is_made_or_refused_before_the_work(tmp_path: Path) -> None:
    """Finding 8 (and 12 on the way: a 1-item dataset draws its plots without a matplotlib warning)."""
    _write_one(tmp_path / "one", ["only"], np.eye(1, 4))
    run = _cli(
        "run",
        "--input",
        "one",
        "--storage",
        "st",
        "--modality",
        "embedding",
        "--buckets",
        "2",
        "--eps",
        "0.01,0.1",
        cwd=tmp_path,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert "Warning" not in run.stderr and "log-scaled" not in run.stderr, run.stderr  # finding 12
    proc = _cli("compare", "st", "st", "--plot", "cmp/out.png", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "cmp" / "out.png").stat().st_size > 0
    (tmp_path / "afile").write_text("")
    proc = _cli("compare", "st", "st", "--plot", "afile/out.png", cwd=tmp_path)
    assert proc.returncode == 1 and proc.stdout == ""  # refused before the tables: nothing printed
    assert "--plot's folder" in _one_error_line(proc.stderr)


def test_clusters_beyond_the_items_warn_plainly_and_the_summary_says_the_k_used(tmp_path: Path) -> None:
    """Finding 11: the warning is `semdedup: warning: ...`, and `clusters:` is status's k (empty clusters too)."""
    rng = np.random.default_rng(0)
    distinct = rng.normal(size=(6, 4))
    vectors = np.repeat(distinct / np.linalg.norm(distinct, axis=1, keepdims=True), 3, axis=0)  # 18 items, 6 points
    _write_one(tmp_path / "in", [f"x{i:02d}" for i in range(18)], vectors)
    proc = _cli(
        "run",
        "--input",
        "in",
        "--storage",
        "st",
        "--modality",
        "embedding",
        "--clusters",
        "50",
        "--buckets",
        "2",
        "--eps",
        "0.01,0.1",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (
        "semdedup: warning: --clusters 50 is more than the 18 items: using k=18 (one cluster per item)"
        in proc.stderr.splitlines()
    ), proc.stderr
    assert " - WARNING - " not in proc.stderr  # not Dagster's timestamped format
    [clusters] = [line for line in proc.stdout.splitlines() if line.startswith("clusters: ")]
    status = json.loads(_cli("status", "--json", "--storage", "st", cwd=tmp_path).stdout)
    k = status["centroids"]["k"]
    assert k == 18 and clusters.split()[1] == str(k), (clusters, k)


def test_a_sweep_root_holds_only_its_last_sweep(tmp_path: Path) -> None:
    """Finding 13: a second sweep (other seeds) retires the first one's sub-storages; compare labels alike."""
    write_embedding_shards(tmp_path / "emb", n_shards=1, per_shard=12, d=4)
    common = ("--input", "emb", "--storage", "sw", "--modality", "embedding", "--buckets", "2", "--eps", "0.01,0.1")
    first = _cli("sweep", *common, "--clusters", "2", "--seed", "0", cwd=tmp_path)
    assert first.returncode == 0, first.stdout + first.stderr
    assert (tmp_path / "sw" / "k=2" / "seed=0" / "semdedup.json").exists()
    second = _cli("sweep", *common, "--clusters", "3", cwd=tmp_path)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "removed 1 sub-storage(s) of the previous sweep" in second.stdout and "k=2/seed=0" in second.stdout
    assert sorted(p.name for p in (tmp_path / "sw").iterdir()) == ["compare.png", "k=3", "sweep.json"]
    manifest = json.loads((tmp_path / "sw" / "sweep.json").read_text())
    assert [c["storage"] for c in manifest["configurations"]] == [str(tmp_path / "sw" / "k=3")]
    assert manifest["complete"] is True
    # A sweep root and a relative path to one of its storages: labels below one folder, storages absolute.
    proc = _cli("compare", "sw", "sw/k=3", "--plot", "cmp.png", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    configurations = proc.stdout.split("items:")[0].splitlines()[1:]
    assert configurations == [
        f"  k=3: {tmp_path}/sw/k=3 (clusters=3, model=None, seed=0, keep=hard, keep_by=None, "
        "probes=1, modality=embedding)",
        f"  k=3 (2): {tmp_path}/sw/k=3 (clusters=3, model=None, seed=0, keep=hard, "
        "keep_by=None, probes=1, modality=embedding)",
    ], proc.stdout
    assert Settings(keep_by="").keep_by is None and Settings(keep_by=" ").keep_by is None  # one "none", not ''
