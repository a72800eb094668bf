"""Issue 34, findings 1-4: nothing lost, nothing stale, whatever the order of commands.

1. every command understands the storage of a prefixed `SemDedup` component graph (two in one project);
2. a relative --reference is resolved once, to absolute, before anything records it;
3. exports and pruning selections record what they were made from: flagged when stale (status, verify, the run),
   a stale pruning selection left out of the `pruned` view and removed by the next run;
4. a failed run leaves the settings of the last good one.

Tiny bring-your-own-embedding shards, a few clusters: seconds each.
"""

from __future__ import annotations

import json
from pathlib import Path

import dagster as dg
import pyarrow.parquet as pq
import pytest

from semdedup_assets.cli import main
from semdedup_assets.component import SemDedup
from semdedup_assets.instance import ensure_instance_config
from semdedup_assets_tests.fixtures import write_embedding_shards, write_embeddings_and_reference

RUN = ["--modality", "embedding", "--buckets", "2"]


def _command(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


def _status(capsys: pytest.CaptureFixture, storage: Path) -> dict:
    code, out, err = _command(capsys, "status", "--json", "--storage", str(storage))
    assert code == 0, err
    return json.loads(out)


def _last_row(out: str) -> list[str]:
    """The cells of the last row of a `semdedup sql` table."""
    return [cell.strip() for cell in out.strip().splitlines()[-1].split("|")]


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


# -- finding 1: forget, status, verify and export on a component's storage ----------------------------------


def test_commands_work_on_the_storage_of_a_component_beside_another(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """`forget part-00` on `.storage/dedup_c4` wiped the other shard's results (it looked in the plain `shards`
    partitions, found none left and deleted every bucket and keep-list), and status said 0 registered, 0 runs."""
    project = tmp_path / "userproj"
    write_embedding_shards(project / "data" / "c4", n_shards=2, per_shard=40, d=8, dup_every=5)
    write_embedding_shards(project / "data" / "laion", n_shards=2, per_shard=30, d=8, dup_every=4, seed=1)
    knobs = {"modality": "embedding", "clusters": 3, "eps": [0.05, 0.1], "settings": {"buckets": 2}}
    components = [
        SemDedup(prefix=name, input=f"data/{data}", storage=f".storage/{name}", **knobs)
        for name, data in (("dedup_c4", "c4"), ("dedup_laion", "laion"))
    ]
    defs = dg.Definitions.merge(*(c.definitions(project) for c in components))
    home = tmp_path / "project_home"  # the project's instance (`dg dev` / `dg launch`), shared by both graphs
    ensure_instance_config(str(home))
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    with dg.DagsterInstance.get() as instance:
        for c in components:  # each component's own pipeline job, as `dg launch --job <prefix>_pipeline_job`
            assert defs.resolve_job_def(f"{c.prefix}_pipeline_job").execute_in_process(instance=instance).success
    c4, laion = project / ".storage" / "dedup_c4", project / ".storage" / "dedup_laion"
    laion_buckets = {p.name: p.read_bytes() for p in (laion / "semantic_duplicates").glob("*.parquet")}
    monkeypatch.delenv("DAGSTER_HOME")  # the storage knows its instance: the commands need no DAGSTER_HOME

    s = _status(capsys, c4)
    assert s["shards"]["registered"] == 2 and s["runs"]["total"] > 0, s
    assert s["graph"] == "dedup_c4" and s["state"] == "complete", s
    assert all(r["job"].startswith("dedup_c4_") for r in s["runs"]["recent"])  # not the other component's runs

    code, out, err = _command(capsys, "forget", "part-00", "--storage", str(c4))
    assert code == 0, err
    assert "re-ran" in out
    code, out, err = _command(capsys, "sql", "SELECT count(*), count(DISTINCT shard) FROM items", "--storage", str(c4))
    assert code == 0 and _last_row(out) == ["40", "1"], (out, err)  # part-01's 40 items are all there
    assert sorted(p.name for p in (c4 / "keep_lists").glob("eps=*.parquet")) == ["eps=0.05.parquet", "eps=0.1.parquet"]
    s = _status(capsys, c4)
    assert s["shards"]["registered"] == 1 and s["buckets"]["done"] == 2 and s["state"] == "complete", s
    code, out, err = _command(capsys, "verify", "--storage", str(c4))
    assert code == 0, out + err
    code, out, err = _command(capsys, "export", "--select", "eps=0.1", "--storage", str(c4))
    assert code == 0, err
    assert sorted(p.name for p in (c4 / "deduplicated" / "eps=0.1").glob("*.parquet")) == ["part-01.parquet"]

    # The other component's results and partitions are untouched.
    assert {p.name: p.read_bytes() for p in (laion / "semantic_duplicates").glob("*.parquet")} == laion_buckets
    with dg.DagsterInstance.from_config(str(home)) as instance:
        assert instance.get_dynamic_partitions("dedup_c4_shards") == ["part-01"]
        assert instance.get_dynamic_partitions("dedup_laion_shards") == ["part-00", "part-01"]
    assert _status(capsys, laion)["shards"]["registered"] == 2


# -- finding 2: a relative --reference --------------------------------------------------------------------


def test_a_relative_reference_is_resolved_once_and_exports_work(
    tmp_path: Path, home: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """`run --reference data/ref` (relative) found the leaks, then every export failed: the stages recorded
    `data/ref`, semdedup.json the absolute path."""
    write_embeddings_and_reference(tmp_path, per_shard=30, d=8)
    monkeypatch.chdir(tmp_path)
    code, _, err = _command(
        capsys,
        "run",
        "--input",
        "input",
        "--storage",
        "storage",
        "--reference",
        "ref",
        "--clusters",
        "3",
        "--eps",
        "0.05,0.1",
        *RUN,
    )
    assert code == 0, err
    code, _out, err = _command(capsys, "export", "--select", "eps=0.1", "--storage", "storage")
    assert code == 0, err
    # The reference is part-00 itself: all of its items are contaminated, so none is exported.
    assert pq.read_table(tmp_path / "storage" / "deduplicated" / "eps=0.1" / "part-00.parquet").num_rows == 0
    s = _status(capsys, tmp_path / "storage")
    assert s["contamination"]["current"] and s["contamination"]["computed_against"] == str(tmp_path / "ref"), s
    assert json.loads((tmp_path / "storage" / "semdedup.json").read_text())["reference"] == str(tmp_path / "ref")


# -- finding 3: exports and pruning selections made from other results ------------------------------------


def test_exports_made_from_other_results_are_flagged_until_written_again(
    tmp_path: Path, home: Path, capsys: pytest.CaptureFixture
) -> None:
    """`run --clusters 10`, `export --select eps=...`, `run --clusters 20`: the folder kept the k = 10 rows while
    status said (complete) and verify exited 0; other selection folders stayed stale too."""
    write_embedding_shards(tmp_path / "input", n_shards=2, per_shard=40, d=8, dup_every=5)
    storage = tmp_path / "storage"
    run = ["run", "--input", str(tmp_path / "input"), "--storage", str(storage), "--eps", "0.05,0.1", *RUN]
    assert _command(capsys, *run, "--clusters", "3")[0] == 0
    for select in ("eps=0.1", "keep-fraction=0.5"):
        assert _command(capsys, "export", "--select", select, "--storage", str(storage))[0] == 0
    assert _command(capsys, "verify", "--storage", str(storage))[0] == 0

    # forget changes the results under the exports: flagged by status and verify, not silently current.
    assert _command(capsys, "forget", "part-01", "--storage", str(storage))[0] == 0
    code, out, err = _command(capsys, "verify", "--storage", str(storage))
    assert code == 1 and f"STALE {storage / 'deduplicated' / 'eps=0.1'}: stale export" in out, out + err
    s = _status(capsys, storage)
    assert s["state"] == "partial" and {Path(o["path"]).name for o in s["stale_outputs"]} == {
        "eps=0.1",
        "keep-fraction=0.5",
    }, s
    assert all(e["stale"] for e in s["exports"])
    code, out, err = _command(capsys, "status", "--storage", str(storage))
    assert "deduplicated/eps=0.1: " in out and "STALE" in out
    assert _command(capsys, "export", "--select", "eps=0.1", "--storage", str(storage))[0] == 0  # written again
    assert {Path(o["path"]).name for o in _status(capsys, storage)["stale_outputs"]} == {"keep-fraction=0.5"}

    # A run with other settings: it names the exports of the earlier results; they stay flagged until written again.
    code, out, err = _command(capsys, *run, "--clusters", "5")
    assert code == 0, err
    for label in ("eps=0.1", "keep-fraction=0.5"):
        assert f"warning: deduplicated/{label} was exported from earlier results" in out, out
    s = _status(capsys, storage)
    assert s["state"] == "partial" and len(s["stale_outputs"]) == 2, s
    assert _command(capsys, "verify", "--storage", str(storage))[0] == 1
    for select in ("eps=0.1", "keep-fraction=0.5"):
        assert _command(capsys, "export", "--select", select, "--storage", str(storage))[0] == 0
    s = _status(capsys, storage)
    assert s["state"] == "complete" and s["stale_outputs"] == [] and not any(e["stale"] for e in s["exports"]), s
    assert _command(capsys, "verify", "--storage", str(storage))[0] == 0

    # The same settings again: the same bytes, so the exports stay current.
    code, out, err = _command(capsys, *run, "--clusters", "5")
    assert code == 0 and "exported from earlier results" not in out, out
    assert _status(capsys, storage)["stale_outputs"] == []


def test_a_pruning_selection_of_earlier_results_is_never_served(
    tmp_path: Path, home: Path, capsys: pytest.CaptureFixture
) -> None:
    """`run --clusters 12 --prune prototypes:...`, then `run --clusters 7`: the `pruned` view still served the
    k = 12 selection (cluster ids up to 11)."""
    write_embedding_shards(tmp_path / "input", n_shards=2, per_shard=40, d=8, dup_every=5)
    storage = tmp_path / "storage"
    run = ["run", "--input", str(tmp_path / "input"), "--storage", str(storage), "--eps", "0.05,0.1", *RUN]
    sql = ["sql", "SELECT count(*), coalesce(max(cluster), -1) FROM pruned", "--storage", str(storage)]
    assert _command(capsys, *run, "--clusters", "6", "--prune", "prototypes:keep-fraction=0.3")[0] == 0
    code, out, _ = _command(capsys, *sql)
    assert _last_row(out) == ["24", "5"], out  # ceil(0.3 * 80) items, clusters of k = 6

    # The results change under the selection (a bucket re-run by forget): the view leaves it out at once.
    assert _command(capsys, "forget", "part-01", "--storage", str(storage))[0] == 0
    assert _last_row(_command(capsys, *sql)[1]) == ["0", "-1"]
    code, out, _err = _command(capsys, "verify", "--storage", str(storage))
    assert code == 1 and "stale pruning selection" in out, out


def test_a_run_without_prune_drops_the_selection_of_the_earlier_run(
    tmp_path: Path, home: Path, capsys: pytest.CaptureFixture
) -> None:
    write_embedding_shards(tmp_path / "input", n_shards=2, per_shard=40, d=8, dup_every=5)
    storage = tmp_path / "storage"
    run = ["run", "--input", str(tmp_path / "input"), "--storage", str(storage), "--eps", "0.05,0.1", *RUN]
    sql = ["sql", "SELECT count(*), coalesce(max(cluster), -1) FROM pruned", "--storage", str(storage)]
    assert _command(capsys, *run, "--clusters", "6", "--prune", "prototypes:keep-fraction=0.3")[0] == 0
    assert _last_row(_command(capsys, *sql)[1]) == ["24", "5"]
    code, out, err = _command(capsys, *run, "--clusters", "3")
    assert code == 0, err
    assert "removed 1 pruning selection(s) made from earlier results: pruned/prototypes:keep-fraction=0.3" in out
    assert _last_row(_command(capsys, *sql)[1]) == ["0", "-1"]
    assert not (storage / "pruned" / "prototypes:keep-fraction=0.3").exists()
    assert _status(capsys, storage)["stale_outputs"] == []


# -- finding 4: a failed run keeps the settings of the last good one --------------------------------------


def test_a_failed_run_keeps_the_settings_of_the_last_good_one(
    tmp_path: Path, home: Path, capsys: pytest.CaptureFixture
) -> None:
    """`run --eps 0.2,0.3 --clusters 5 --keep-by nosuch` failed at ingest but wrote its settings: export
    --select eps=0.05 was refused, a plain export used eps=0.2 on the old max_sim, status showed clusters=5."""
    write_embedding_shards(tmp_path / "input", n_shards=2, per_shard=40, d=8, dup_every=5)
    storage = tmp_path / "storage"
    run = ["run", "--input", str(tmp_path / "input"), "--storage", str(storage), *RUN]
    assert _command(capsys, *run, "--eps", "0.05,0.1", "--clusters", "3")[0] == 0
    recorded = (storage / "semdedup.json").read_bytes()
    code, _, err = _command(capsys, *run, "--eps", "0.2,0.3", "--clusters", "5", "--keep-by", "nosuch")
    assert code == 1 and "nosuch" in err, err
    assert (storage / "semdedup.json").read_bytes() == recorded
    s = _status(capsys, storage)
    assert s["settings"]["clusters"] == 3 and s["settings"]["keep_by"] is None and s["settings"]["eps"] == [0.05, 0.1]
    code, _out, err = _command(capsys, "export", "--select", "eps=0.05", "--storage", str(storage))
    assert code == 0, err
    assert _command(capsys, "export", "--storage", str(storage))[0] == 0  # the default: the smallest eps, 0.05
    assert sorted(p.name for p in (storage / "deduplicated").iterdir()) == ["eps=0.05"]
