"""`--files-per-shard N`: a shard is N consecutive input files in key order (docs/files-per-shard.md).

Small and fast: a dozen files of 20 bring-your-own vectors, with planted duplicates across
files so that groups really change which items meet.
"""

from __future__ import annotations

import shutil
import signal
from pathlib import Path

import dagster as dg
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from semdedup_assets.cli import main
from semdedup_assets.core.config import Settings
from semdedup_assets.core.io import storage as st
from semdedup_assets.core.io.catalog import query
from semdedup_assets.core.io.shards import discover
from semdedup_assets.core.io.storage import UnsafeKeyError
from semdedup_assets.core.select.export import export_shards, parse_selection, tidy_exports
from semdedup_assets.core.settings_store import load_settings
from semdedup_assets.definitions import build_definitions
from semdedup_assets.partitions import SHARDS_PARTITIONS_NAME
from semdedup_assets.pipeline import PipelineError, forget_shard, run_pipeline
from semdedup_assets.status import collect_status
from semdedup_assets_tests.fixtures import make_planted
from semdedup_assets_tests.test_faults import Child, instance_of, remove_leftovers, snapshot, stage_runs

PER_FILE, DIM = 20, 8
RUN = dict(modality="embedding", clusters=6, buckets=3, eps=(0.001, 0.01, 0.1))


def write_files(folder: Path, names: list[str], seed: int = 0) -> None:
    """One Parquet file of PER_FILE planted vectors per name, without an id column (ids are `<file>:<row>`).

    The vectors of a name depend only on the name, so a file means the same items whatever else is there.
    """
    folder.mkdir(parents=True, exist_ok=True)
    base = make_planted(40 * PER_FILE, DIM, dup_every=3, seed=seed)
    for name in names:
        start = (sum(map(ord, name)) * 7) % (len(base) - PER_FILE)
        part = base[start : start + PER_FILE]
        pq.write_table(
            pa.table(
                {
                    "embedding": pa.array(list(part), type=pa.list_(pa.float32())),
                    "score": np.arange(PER_FILE, dtype=np.float64),
                }
            ),
            folder / f"{name}.parquet",
        )


NAMES = [f"{i:05d}" for i in range(7)]


def run(tmp_path: Path, storage: str, files_per_shard: int, instance: dg.DagsterInstance, **extra) -> Settings:
    settings = Settings(
        storage=str(tmp_path / storage), input=str(tmp_path / "input"), files_per_shard=files_per_shard, **RUN, **extra
    )
    run_pipeline(settings, instance, log=lambda m: None)
    return settings


def keep_lists(settings: Settings) -> dict[str, bytes]:
    root = Path(settings.storage) / st.KEEP_LISTS
    return {p.name: p.read_bytes() for p in sorted(root.glob("*.parquet"))}


def items(settings: Settings) -> list[tuple]:
    return query(settings.storage_root(), "SELECT id, shard, cluster, max_sim, duplicate_of FROM items ORDER BY id")[1]


def partitions(instance: dg.DagsterInstance) -> list[str]:
    return sorted(instance.get_dynamic_partitions(SHARDS_PARTITIONS_NAME))


def raw_members(settings: Settings) -> dict[str, list[str]]:
    """Each raw index file's input files (its `shard` column, in order)."""
    storage = settings.storage_root()
    return {
        storage.shard_of(st.RAW, p): list(
            dict.fromkeys(st.read_table(p, columns=["shard"]).column("shard").to_pylist())
        )
        for p in storage.stage_files(st.RAW)
    }


def test_grouping_rule_consecutive_runs_in_key_order(tmp_path: Path) -> None:
    write_files(tmp_path / "input", NAMES)
    shards = discover(tmp_path / "input", 3).shards
    assert [s.key for s in shards] == ["00000+3", "00003+3", "00006+3"]
    assert [[f.key for f in s.files] for s in shards] == [NAMES[0:3], NAMES[3:6], NAMES[6:7]]
    assert [s.key for s in discover(tmp_path / "input", 1).shards] == NAMES  # 1: the files themselves
    # A group holds one kind: a .jsonl among Parquet files is refused, naming both files.
    (tmp_path / "input" / "00001b.jsonl").write_text('{"embedding": [1.0, 0.0]}\n')
    with pytest.raises(ValueError, match=r"00000\.parquet \(parquet\) and .*00001b\.jsonl \(jsonl\)"):
        discover(tmp_path / "input", 3)


def test_append_insert_delete_rename(tmp_path: Path) -> None:
    """Append: full groups keep membership and fingerprint, the partial last group fills (same key, new
    fingerprint) and new groups follow. Insert, delete, rename inside: that group and every later one change."""
    inp = tmp_path / "input"
    write_files(inp, NAMES)
    before = {s.key: s.fingerprint() for s in discover(inp, 3).shards}
    write_files(inp, ["00007", "00008", "00009"])  # append
    after = {s.key: s.fingerprint() for s in discover(inp, 3).shards}
    assert list(after) == ["00000+3", "00003+3", "00006+3", "00009+3"]
    assert after["00000+3"] == before["00000+3"] and after["00003+3"] == before["00003+3"]
    assert after["00006+3"] != before["00006+3"]  # the partial group grew: re-ingested under its key

    write_files(inp, ["00004a"])  # insert inside group 00003+3
    inserted = {s.key: [f.key for f in s.files] for s in discover(inp, 3).shards}
    assert inserted == {
        "00000+3": NAMES[0:3],
        "00003+3": ["00003", "00004", "00004a"],
        "00005+3": ["00005", "00006", "00007"],
        "00008+3": ["00008", "00009"],
    }
    (inp / "00004a.parquet").unlink()  # delete it again: back to the grouping before
    assert {s.key: s.fingerprint() for s in discover(inp, 3).shards} == after
    (inp / "00004.parquet").rename(inp / "00004r.parquet")  # rename inside a group: its fingerprint changes
    renamed = {s.key: s.fingerprint() for s in discover(inp, 3).shards}
    assert renamed["00000+3"] == after["00000+3"] and renamed["00003+3"] != after["00003+3"]


def test_hostile_file_name_inside_a_group_is_refused_naming_the_file(tmp_path: Path) -> None:
    inp = tmp_path / "input"
    write_files(inp, NAMES[:3])
    (inp / "00001\x07x.parquet").write_bytes((inp / "00001.parquet").read_bytes())  # sorts inside group 00000+4
    # The name shows escaped in the message (control characters never reach the terminal raw).
    with pytest.raises(UnsafeKeyError, match=r"input file .*00001\\x07x\.parquet: unsafe shard key"):
        discover(inp, 4)


def test_keep_lists_byte_identical_whatever_files_per_shard(tmp_path: Path) -> None:
    write_files(tmp_path / "input", NAMES)
    with dg.instance_for_test() as one, dg.instance_for_test() as grouped:
        a = run(tmp_path, "one", 1, one, keep_by="score:desc")
        b = run(tmp_path, "grouped", 3, grouped, keep_by="score:desc")
        assert partitions(grouped) == ["00000+3", "00003+3", "00006+3"]
        assert keep_lists(a) and keep_lists(a) == keep_lists(b)
        assert items(a) == items(b)
        assert items(a)[0][0] == "00000:0"  # default ids name the file, grouped or not
        assert raw_members(b)["00003+3"] == NAMES[3:6]
        # export writes every input file again, in its own relative path, with the same bytes
        for s in (a, b):
            sel = parse_selection("eps=0.01", s.eps)
            export_shards(s.storage_root(), s.input, sel, configured_eps=s.eps, files_per_shard=s.files_per_shard)
            tidy_exports(s.storage_root(), s.input, sel, s.eps, s.files_per_shard)
        out = {
            s.storage: {
                p.name: p.read_bytes() for p in (Path(s.storage) / "deduplicated" / "eps=0.01").glob("*.parquet")
            }
            for s in (a, b)
        }
        assert sorted(out[a.storage]) == [f"{n}.parquet" for n in NAMES]
        assert out[a.storage] == out[b.storage]


def test_status_and_verify_understand_groups(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_files(tmp_path / "input", NAMES)
    with dg.instance_for_test() as inst:
        s = run(tmp_path, "grouped", 3, inst)
    assert main(["verify", "--storage", s.storage]) == 0
    status = collect_status(load_settings(s.storage), None)
    assert status["shards"]["ingested"] == 3 and status["input_missing"] == []
    write_files(tmp_path / "input", ["00004"], seed=1)  # edit one member of group 00003+3
    capsys.readouterr()
    assert main(["verify", "--storage", s.storage]) == 1
    out = capsys.readouterr()
    assert "00003+3" in out.out + out.err and "changed: " in out.out + out.err and "00004.parquet" in out.out + out.err


def test_run_after_insert_and_delete_equals_a_fresh_run_and_leaves_nothing_stale(tmp_path: Path) -> None:
    """`semdedup run` after a file is inserted into (then deleted from) the input: the shifted groups are
    withdrawn and ingested anew; keep-lists and items equal a fresh run's, and no file of an old group stays."""
    inp = tmp_path / "input"
    write_files(inp, NAMES)
    with dg.instance_for_test() as inst, dg.instance_for_test() as fresh_inst:
        s = run(tmp_path, "grouped", 3, inst)
        write_files(inp, ["00001a"])  # inside the first group: every group shifts
        run_pipeline(s, inst, log=lambda m: None)
        assert partitions(inst) == ["00000+3", "00002+3", "00005+3"]
        assert raw_members(s) == {
            "00000+3": ["00000", "00001", "00001a"],
            "00002+3": ["00002", "00003", "00004"],
            "00005+3": ["00005", "00006"],
        }
        for stage in (st.RAW, st.EMBEDDINGS, st.CLUSTER_ASSIGNMENTS):
            assert sorted(s.storage_root().shard_of(stage, p) for p in s.storage_root().stage_files(stage)) in (
                [],
                partitions(inst),
            ), stage
        fresh = run(tmp_path, "fresh", 3, fresh_inst)
        assert keep_lists(s) == keep_lists(fresh) and items(s) == items(fresh)

        (inp / "00003.parquet").unlink()  # a file vanishes from the middle group
        run_pipeline(s, inst, log=lambda m: None)
        assert raw_members(s)["00002+3"] == ["00002", "00004", "00005"]
        assert not [row for row in items(s) if row[1] == "00003"]
        shutil.rmtree(fresh.storage)
        with dg.instance_for_test() as again:
            fresh = run(tmp_path, "fresh", 3, again)
        assert keep_lists(s) == keep_lists(fresh) and items(s) == items(fresh)


def test_forget_a_grouped_shard(tmp_path: Path) -> None:
    write_files(tmp_path / "input", NAMES)
    with dg.instance_for_test() as inst:
        s = run(tmp_path, "grouped", 3, inst)
        with pytest.raises(PipelineError, match=r"file '00004' is in shard '00003\+3' \(--files-per-shard 3\)"):
            forget_shard(s, inst, "00004", log=lambda m: None)
        result = forget_shard(s, inst, "00003+3", log=lambda m: None)
        assert partitions(inst) == ["00000+3", "00006+3"]
        assert not any(
            "00003+3" in p
            for p in [
                str(x)
                for stage in (st.RAW, st.EMBEDDINGS, st.CLUSTER_ASSIGNMENTS)
                for x in s.storage_root().stage_files(stage)
            ]
        )
        assert result.buckets and result.keep_lists
        left = {row[1] for row in items(s)}
        assert left == {"00000", "00001", "00002", "00006"}  # the group's three files are gone, the others stay
        kept = {
            i
            for p in (Path(s.storage) / st.KEEP_LISTS).glob("*.parquet")
            if "shard" in pq.read_schema(p).names
            for i in pq.read_table(p, columns=["shard"]).column("shard").to_pylist()
        }
        assert kept
        assert kept <= left


@pytest.mark.subprocess
def test_sigkill_mid_stage_with_grouping_then_rerun_gives_the_same_bytes(tmp_path: Path) -> None:
    write_files(tmp_path / "input", NAMES)
    args = [
        "--input",
        str(tmp_path / "input"),
        "--files-per-shard",
        "3",
        "--modality",
        "embedding",
        "--clusters",
        "6",
        "--buckets",
        "3",
        "--eps",
        "0.001,0.01,0.1",
    ]
    reference = Child("run", "-v", "--storage", str(tmp_path / "reference"), *args)
    assert reference.wait() == 0, reference.output
    child = Child("run", "-v", "--storage", str(tmp_path / "killed"), *args)
    child.wait_for(r"embedded shard '00000\+3'")
    child.signal(signal.SIGKILL)
    child.wait()
    [killed] = stage_runs(instance_of(tmp_path / "killed"), "ingest + embed")
    assert killed.status == dg.DagsterRunStatus.STARTED  # the kill landed inside the stage
    rerun = Child("run", "-v", "--storage", str(tmp_path / "killed"), *args)
    assert rerun.wait() == 0, rerun.output
    assert snapshot(tmp_path / "killed") == snapshot(tmp_path / "reference")
    remove_leftovers(tmp_path / "killed")


def test_shard_sensor_understands_groups(tmp_path: Path) -> None:
    """Append: only the partial last group (changed) and the new group run. Insert: the shifted groups'
    old partitions are deleted (each stage's next run removes their files) and their new ones run."""
    inp = tmp_path / "input"
    write_files(inp, NAMES)
    with dg.instance_for_test() as inst:
        s = run(tmp_path, "grouped", 3, inst)
        defs = build_definitions(s)
        cursor = _tick(defs, inst, None).cursor
        write_files(inp, ["00007", "00008", "00009"])  # append
        tick = _tick(defs, inst, cursor)
        assert [r.partition_key for r in tick.run_requests] == ["00009+3", "00006+3"]  # new, then changed
        assert [r.partition_keys for r in tick.dynamic_partitions_requests] == [["00009+3"]]
        inst.add_dynamic_partitions(SHARDS_PARTITIONS_NAME, ["00009+3"])
        write_files(inp, ["00004a"])  # insert inside group 00003+3
        tick = _tick(defs, inst, tick.cursor)
        deleted = [
            r.partition_keys
            for r in tick.dynamic_partitions_requests
            if isinstance(r, dg.DeleteDynamicPartitionsRequest)
        ]
        assert deleted == [["00006+3", "00009+3"]]
        assert sorted(r.partition_key for r in tick.run_requests) == ["00003+3", "00005+3", "00008+3"]


def _tick(defs: dg.Definitions, instance: dg.DagsterInstance, cursor: str | None):
    ctx = dg.build_sensor_context(instance=instance, instance_ref=instance.get_ref(), definitions=defs, cursor=cursor)
    return defs.resolve_sensor_def("shard_sensor").evaluate_tick(ctx)


def test_ingest_opens_each_input_file_once_and_records_what_separate_reads_give(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One open per input file in ingest (issue 32: it was five): the index, the fingerprint and the content
    digest come from the same bytes, and equal what `fingerprint()` and `content_digest()` compute apart."""
    from semdedup_assets.core.ingest import stage as ingest_stage
    from semdedup_assets.core.io import shards as shard_io

    inp = tmp_path / "in"
    write_files(inp, NAMES)
    settings = Settings(input=str(inp), storage=str(tmp_path / "storage"), files_per_shard=3, **RUN)
    opened: list[str] = []
    real_open, real_read_table = open, pq.read_table

    def counting_open(file: object, *args: object, **kwargs: object) -> object:
        if str(file).startswith(str(inp)):
            opened.append(Path(str(file)).name)
        return real_open(file, *args, **kwargs)  # type: ignore[call-overload]

    def no_dataset_scan(source: object, *args: object, **kwargs: object) -> pa.Table:
        assert not str(source).startswith(str(inp)), f"input file {source} read through a dataset scan"
        return real_read_table(source, *args, **kwargs)

    monkeypatch.setattr(shard_io, "open", counting_open, raising=False)
    monkeypatch.setattr(pq, "read_table", no_dataset_scan)
    groups = discover(inp, 3).shards
    staged = [ingest_stage.stage_shard(settings, g) for g in groups]
    assert sorted(opened) == [f"{n}.parquet" for n in NAMES], opened  # each file once
    ingest_stage.discard_staged(settings, [g.key for g in groups], staged)
    monkeypatch.undo()
    for group, s in zip(groups, staged):
        assert s.fingerprint == group.fingerprint()
    read = ingest_stage.read_members(groups[0], settings, ())
    assert (read.fingerprint, read.digest) == (groups[0].fingerprint(), groups[0].content_digest())
    single = discover(inp, 1).shards[0]
    read = ingest_stage.read_members(single, settings, ())
    assert (read.fingerprint, read.digest) == (single.fingerprint(), single.content_digest())
