"""Fault injection on real `semdedup run` processes: kills, signals, concurrent runs, a full disk.

Every kill is placed by waiting for a stage's own log line (or Dagster's step start), never
by timing, and the test checks that it landed inside that stage (its run still STARTED, and
for `gpu`-pool steps the pool slot still claimed). The re-run must then give byte-identical
keep-lists, bucket files and `items` as an uninterrupted run.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import dagster as dg
import pyarrow as pa
import pytest

from semdedup_assets.core.config import Settings
from semdedup_assets.core.io.catalog import query
from semdedup_assets.core.io.storage import Storage
from semdedup_assets.core.select.prune import compute_pruning, parse_pruning
from semdedup_assets_tests.fixtures import write_embedding_shards

REPO = Path(__file__).resolve().parents[1]
RUN_ARGS = [
    "--modality",
    "embedding",
    "--clusters",
    "24",
    "--buckets",
    "4",
    "--iterations",
    "60",
    "--eps",
    "0.001,0.01,0.1",
]
# The kill inside the prune stage: every method, as the pruned_* assets (a sixth run).
PRUNE = "prototypes:keep-fraction=0.5;d4:eps=0.01,keep-fraction=0.5;dbp:eps=0.01,keep-fraction=0.4"
RERUN_TIMEOUT_S = 120  # before the fix a re-run after a kill in a gpu step waited for ever


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "DAGSTER_HOME" and not k.startswith("SEMDEDUP_")}
    env.update(PYTHONUNBUFFERED="1", PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]), **extra)
    return env


class Child:
    """A `semdedup` subprocess whose merged output is read line by line as it comes."""

    def __init__(self, *args: str, env: dict[str, str] | None = None) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "semdedup_assets.cli", *args],
            env=env or _env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
        )
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            with self._cond:
                self.lines.append(line)
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def wait_for(self, pattern: str, timeout: float = 120) -> str:
        """Block until a line matches `pattern`; fail with the output so far when the process ends first."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        seen = 0
        with self._cond:
            while True:
                for line in self.lines[seen:]:
                    if rx.search(line):
                        return line
                seen = len(self.lines)
                if self.proc.poll() is not None and not self._reader.is_alive():
                    raise AssertionError(
                        f"process ended (rc {self.proc.returncode}) before {pattern!r}:\n{self.output[-4000:]}"
                    )
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"no line matching {pattern!r} in {timeout} s:\n{self.output[-4000:]}")
                self._cond.wait(min(left, 0.5))

    def signal(self, signo: int) -> None:
        self.proc.send_signal(signo)

    def wait(self, timeout: float = RERUN_TIMEOUT_S) -> int:
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            self._reader.join(5)
            raise AssertionError(f"still running after {timeout} s:\n{self.output[-4000:]}") from None
        self._reader.join(5)
        return rc


def run_cli(input_dir: Path, storage: Path, *extra: str, env: dict[str, str] | None = None) -> Child:
    # -v: Dagster's own step lines on the console, which the kill points wait for.
    return Child("run", "-v", "--input", str(input_dir), "--storage", str(storage), *RUN_ARGS, *extra, env=env)


def snapshot(storage: Path) -> dict[str, object]:
    """What must be byte-identical: keep-lists, bucket files and the `items` view."""
    files = {
        str(p.relative_to(storage)): p.read_bytes()
        for stage in ("keep_lists", "semantic_duplicates")
        for p in sorted((storage / stage).glob("*.parquet"))
    }
    _, items = query(Storage(str(storage)), "SELECT * FROM items ORDER BY id")
    return {"files": files, "items": items}


def remove_leftovers(storage: Path) -> None:
    """A SIGKILL can leave unpublished temporary files: `verify` reports them and `--repair` deletes them."""
    leftovers = sorted(storage.rglob(".*.tmp"))
    verify = Child("verify", "--repair", "--storage", str(storage))
    assert verify.wait() == 0, verify.output
    assert all(f"BAD {p}: temporary file" in verify.output for p in leftovers), verify.output
    assert not list(storage.rglob(".*.tmp"))


def instance_of(storage: Path) -> dg.DagsterInstance:
    return dg.DagsterInstance.from_config(str(storage / "dagster_home"))


def stage_runs(instance: dg.DagsterInstance, label: str) -> list[dg.DagsterRun]:
    return list(instance.get_runs(filters=dg.RunsFilter(tags={"semdedup/stage": label})))


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """Six bring-your-own shards, and the results of one uninterrupted run on them."""
    root = tmp_path_factory.mktemp("faults")
    write_embedding_shards(root / "input", n_shards=6, per_shard=2000, d=32)
    child = run_cli(root / "input", root / "reference")
    assert child.wait() == 0, child.output
    return {"input": root / "input", "reference": snapshot(root / "reference")}


# (stage label, a line printed inside the stage, pool step holding the `gpu` slot there or None)
KILL_POINTS = [
    ("ingest + embed", r"embedded shard 'part-00'", "embeddings"),
    ("centroids", r"training k=24 on a sample", "centroids"),
    ("cluster_assignments", r'Started execution of step "cluster_assignments"', None),
    ("semantic_duplicates", r"\[1/4\] bucket 000", "semantic_duplicates"),
    ("keep_lists", r'Started execution of step "keep_lists"', None),
    ("pruned", r"d4:eps=0.01,keep-fraction=0.5: .* re-clustering them", None),
]


def pruned_files(storage: Path) -> dict[str, bytes]:
    return {str(p.relative_to(storage)): p.read_bytes() for p in sorted((storage / "pruned").rglob("*.parquet"))}


@pytest.mark.parametrize("label,line,gpu_step", KILL_POINTS, ids=[k[0].split()[0] for k in KILL_POINTS])
def test_sigkill_inside_each_stage_then_rerun_is_byte_identical(
    data, tmp_path: Path, label: str, line: str, gpu_step: str | None
) -> None:
    """Regression for defects 1 and 2: a kill in a gpu step left its slot claimed (the re-run hung)
    and its run STARTED for ever."""
    storage = tmp_path / "storage"
    extra = ["--prune", PRUNE] if label == "pruned" else []
    child = run_cli(data["input"], storage, *extra)
    child.wait_for(line)
    child.signal(signal.SIGKILL)
    child.wait()

    instance = instance_of(storage)
    [killed] = stage_runs(instance, label)
    assert killed.status == dg.DagsterRunStatus.STARTED  # the kill landed inside the stage
    if gpu_step is not None:
        claimed = instance.event_log_storage.get_concurrency_info("gpu").claimed_slots
        assert [(s.run_id, s.step_key) for s in claimed] == [(killed.run_id, gpu_step)]

    rerun = run_cli(data["input"], storage, *extra)
    assert rerun.wait() == 0, rerun.output
    assert f"run {killed.run_id}" in rerun.output and "is gone" in rerun.output
    if extra:  # the re-run's selections equal a fresh computation from the same stored results
        after = pruned_files(storage)
        assert len([p for p in after if p.endswith("kept.parquet")]) == 3
        settings = Settings(
            storage=str(storage),
            modality="embedding",
            clusters=24,
            buckets=4,
            kmeans_iterations=60,
            eps=(0.001, 0.01, 0.1),
        )
        for selection in PRUNE.split(";"):
            compute_pruning(settings, parse_pruning(selection, settings.eps))
        assert pruned_files(storage) == after
    instance = instance_of(storage)
    assert instance.get_run_by_id(killed.run_id).status == dg.DagsterRunStatus.FAILURE
    assert not instance.get_runs(filters=dg.RunsFilter(statuses=[dg.DagsterRunStatus.STARTED]))
    assert not instance.event_log_storage.get_concurrency_info("gpu").claimed_slots
    assert snapshot(storage) == data["reference"]
    remove_leftovers(storage)


def _own_runs(instance: dg.DagsterInstance, pid: int) -> list[dg.DagsterRun]:
    return list(instance.get_runs(filters=dg.RunsFilter(tags={"semdedup/pid": str(pid)})))


def test_signals_stop_runs_waiting_for_a_pool_slot_and_a_dead_holder_is_released(data, tmp_path: Path) -> None:
    """Regression: SIGTERM did not stop a run whose step waited for a `gpu` slot (Dagster defers it).

    A holder run is frozen (SIGSTOP) inside `semantic_duplicates`, holding the slot. Runs started
    after it wait, and say at INFO which run holds the slot and for how long; SIGTERM and SIGINT
    each stop one of them promptly. Then the holder is killed while a third run waits: that run
    notices the holder is gone, frees the slot and completes.
    """
    storage = tmp_path / "storage"
    holder = run_cli(data["input"], storage)
    holder.wait_for(r"\[1/4\] bucket 000")
    holder.signal(signal.SIGSTOP)  # alive, holding the gpu slot
    try:
        for signo in (signal.SIGTERM, signal.SIGINT):
            waiter = run_cli(data["input"], storage)
            line = waiter.wait_for(r"waits for a slot of pool 'gpu'", timeout=90)
            assert re.search(r"held by run [0-9a-f-]+ \(step semantic_duplicates, STARTED\) for \d+ s", line), line
            waiter.signal(signo)
            start = time.monotonic()
            assert waiter.wait(timeout=30) == 128 + signo, waiter.output
            assert time.monotonic() - start < 10
            instance = instance_of(storage)
            [stopped] = _own_runs(instance, waiter.proc.pid)
            assert stopped.status == dg.DagsterRunStatus.CANCELED
            pool = instance.event_log_storage.get_concurrency_info("gpu")
            assert stopped.run_id not in {p.run_id for p in pool.pending_steps} | {c.run_id for c in pool.claimed_slots}
        last = run_cli(data["input"], storage)
        last.wait_for(r"waits for a slot of pool 'gpu'", timeout=90)
        holder.signal(signal.SIGKILL)
    finally:
        holder.signal(signal.SIGCONT)
    holder.wait()
    assert last.wait() == 0, last.output
    assert "is gone" in last.output
    remove_leftovers(storage)
    assert snapshot(storage) == data["reference"]


def test_sigterm_inside_a_step_cancels_the_run_and_publishes_nothing_partial(data, tmp_path: Path) -> None:
    storage = tmp_path / "storage"
    child = run_cli(data["input"], storage)
    child.wait_for(r"\[1/4\] bucket 000")
    child.signal(signal.SIGTERM)
    assert child.wait(timeout=30) == 128 + signal.SIGTERM
    instance = instance_of(storage)
    [run] = stage_runs(instance, "semantic_duplicates")
    assert run.status == dg.DagsterRunStatus.CANCELED
    assert not instance.event_log_storage.get_concurrency_info("gpu").claimed_slots
    assert not list(storage.rglob(".*.tmp"))
    assert not (storage / "keep_lists").exists()


def test_two_concurrent_runs_on_one_storage(data, tmp_path: Path) -> None:
    storage = tmp_path / "storage"
    first, second = run_cli(data["input"], storage), run_cli(data["input"], storage)
    assert first.wait() == 0, first.output
    assert second.wait() == 0, second.output
    assert snapshot(storage) == data["reference"]


def test_dagster_yaml_appears_whole_and_is_never_overwritten(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Regression: two runs starting together on a fresh home failed one of them inside Dagster
    (`NOT NULL constraint failed: concurrency_limits.concurrency_key`, at a later stage). One command
    read dagster.yaml while the other was writing it, so its instance had no default pool limit, and
    its first step deleted the pool's limit row. The file now appears whole or not at all."""
    from semdedup_assets import instance as inst

    home = tmp_path / "home"
    seen: list[str] = []
    real_link = os.link

    def link(src: str, dst: str) -> None:  # the moment the file appears under its name
        seen.append(Path(src).read_text())
        real_link(src, dst)

    monkeypatch.setattr(inst.os, "link", link)
    inst.ensure_instance_config(str(home))
    whole = inst.instance_yaml(max(1, inst.visible_gpus()))
    assert seen == [whole] and (home / "dagster.yaml").read_text() == whole
    assert [p.name for p in home.iterdir()] == ["dagster.yaml"]  # no temporary file left
    # A user's edit stays, and a second command racing on the link keeps the first file.
    (home / "dagster.yaml").write_text("# mine\n")
    inst.ensure_instance_config(str(home))
    monkeypatch.setattr(inst.os.path, "exists", lambda path: False)  # as if the other command linked just now
    inst.ensure_instance_config(str(home))
    monkeypatch.undo()
    assert (home / "dagster.yaml").read_text() == "# mine\n"
    assert sorted(p.name for p in home.iterdir()) == ["dagster.yaml"]
    # The instance a command opens has the pool's default limit.
    assert dg.DagsterInstance.from_config(str(home)).global_op_concurrency_default_limit is None  # the user's file
    (home / "dagster.yaml").unlink()
    inst.ensure_instance_config(str(home))
    assert dg.DagsterInstance.from_config(str(home)).global_op_concurrency_default_limit == max(1, inst.visible_gpus())


def _can_mount_tmpfs(path: Path) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    return (
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(path)], capture_output=True).returncode
        == 0
    )


def test_full_disk_on_a_real_tmpfs(data, tmp_path: Path) -> None:
    """ENOSPC from a real, small file system: a clear error, no partial file, and a re-run after space is freed."""
    storage = tmp_path / "storage"
    if not _can_mount_tmpfs(storage):
        pytest.skip("cannot mount a tmpfs here (needs root); the patched-writer test covers ENOSPC")
    try:
        subprocess.run(["mount", "-o", "remount,size=2500k", str(storage)], check=True)
        env = _env(DAGSTER_HOME=str(tmp_path / "home"))
        child = run_cli(data["input"], storage, env=env)
        assert child.wait() != 0
        assert "No space left on device" in child.output
        assert re.search(rf"cannot write {re.escape(str(storage))}/\S+\.parquet", child.output), child.output[-3000:]
        assert not list(storage.rglob(".*.tmp"))
        verify = Child("verify", "--storage", str(storage), env=env)
        assert verify.wait() == 0, verify.output  # every published file is whole
        subprocess.run(["mount", "-o", "remount,size=64m", str(storage)], check=True)
        rerun = run_cli(data["input"], storage, env=env)
        assert rerun.wait() == 0, rerun.output
        files = snapshot(storage)
        assert files == data["reference"]
    finally:
        subprocess.run(["umount", "-l", str(storage)], check=False)


# ---- damaged stage files and a full disk, in-process (fast) ---------------------------------------

from semdedup_assets.core.checks.verify import repair, verify_storage  # noqa: E402
from semdedup_assets.core.io import storage as st  # noqa: E402
from semdedup_assets.definitions import build_definitions  # noqa: E402
from semdedup_assets.pipeline import PipelineError, run_pipeline  # noqa: E402


def _settings(tmp_path: Path) -> Settings:
    return Settings(
        storage=str(tmp_path / "storage"),
        input=str(tmp_path / "input"),
        modality="embedding",
        clusters=6,
        buckets=3,
        eps=(0.001, 0.01, 0.1),
    )


def _truncate(path: st.UPath) -> None:
    data = Path(str(path)).read_bytes()
    Path(str(path)).write_bytes(data[: len(data) // 2])


def _warnings(instance: dg.DagsterInstance) -> list[str]:
    return [e.message for r in instance.get_runs() for e in instance.all_logs(r.run_id) if e.level == 30]


# One file per stage; the embeddings cache and an old assignments file are reuse paths (a WARNING
# names the file), the others are recomputed by every run anyway.
DAMAGED = {
    "raw": lambda s: s.shard_file(st.RAW, "part-01"),
    "embeddings": lambda s: s.shard_file(st.EMBEDDINGS, "part-01"),
    "centroids": lambda s: s.centroids_file,
    "cluster_assignments": lambda s: s.shard_file(st.CLUSTER_ASSIGNMENTS, "part-02"),
    "semantic_duplicates": lambda s: s.bucket_file("001"),
    "keep_lists": lambda s: s.keep_list_file(0.01),
}


def test_truncated_file_in_every_stage_is_found_by_verify_and_healed_by_a_rerun(
    tmp_path: Path, instance: dg.DagsterInstance
) -> None:
    """Regression for defect 3: a truncated embeddings file failed every re-run with
    'ArrowInvalid: Parquet magic bytes not found in footer', naming no file."""
    write_embedding_shards(tmp_path / "input", n_shards=3, per_shard=60, d=8)
    settings = _settings(tmp_path)
    run_pipeline(settings, instance, log=lambda m: None)
    storage = settings.storage_root()
    before = snapshot(Path(settings.storage))
    damaged = {stage: path_of(storage) for stage, path_of in DAMAGED.items()}
    for path in damaged.values():
        _truncate(path)

    problems = verify_storage(storage, settings)
    assert {p.path for p in problems} == set(damaged.values()) and all("damaged" in p.reason for p in problems)

    run_pipeline(settings, instance, log=lambda m: None)  # no repair: the run heals what it reuses
    assert snapshot(Path(settings.storage)) == before
    assert verify_storage(storage, settings) == []
    warnings = _warnings(instance)
    for stage in ("embeddings", "cluster_assignments"):
        assert any(f"{damaged[stage]} is damaged and is recomputed" in w for w in warnings), warnings


def test_downstream_read_of_a_damaged_file_names_it(tmp_path: Path, instance: dg.DagsterInstance) -> None:
    write_embedding_shards(tmp_path / "input", n_shards=2, per_shard=40, d=8)
    settings = _settings(tmp_path)
    run_pipeline(settings, instance, log=lambda m: None)
    storage = settings.storage_root()
    defs = build_definitions(settings)
    for job, path in (
        ("assign_job", storage.shard_file(st.EMBEDDINGS, "part-00")),
        ("keep_lists_job", storage.bucket_file("002")),
        ("dedup_job", storage.centroids_file),
    ):
        good = Path(str(path)).read_bytes()
        _truncate(path)
        kwargs = (
            {"partition_key": "part-00"}
            if job == "assign_job"
            else {"partition_key": "000"}
            if job == "dedup_job"
            else {}
        )
        run = defs.resolve_job_def(job).execute_in_process(instance=instance, raise_on_error=False, **kwargs)
        assert not run.success
        from semdedup_assets.pipeline import failure_message

        assert f"cannot read {path}" in failure_message(run), failure_message(run)
        Path(str(path)).write_bytes(good)


def test_verify_checks_consistency_with_upstream_and_repair_deletes(
    tmp_path: Path, instance: dg.DagsterInstance
) -> None:
    import pyarrow.parquet as pq

    write_embedding_shards(tmp_path / "input", n_shards=3, per_shard=60, d=8)
    settings = _settings(tmp_path)
    run_pipeline(settings, instance, log=lambda m: None)
    storage = settings.storage_root()
    assert verify_storage(storage, settings) == []
    emb = storage.shard_file(st.EMBEDDINGS, "part-00")
    table = pq.read_table(str(emb))
    pq.write_table(table.slice(0, 50).replace_schema_metadata(table.schema.metadata), str(emb))  # rows lost
    assignments = storage.shard_file(st.CLUSTER_ASSIGNMENTS, "part-02")
    table = pq.read_table(str(assignments))
    pq.write_table(table.set_column(0, "id", pa.array([f"x{i}" for i in range(table.num_rows)])), str(assignments))
    bucket = storage.bucket_file("000")
    pq.write_table(pq.read_table(str(bucket)).slice(1), str(bucket))  # an item lost
    keep = storage.keep_list_file(0.1)
    pq.write_table(pq.read_table(str(keep)).slice(3), str(keep))
    tmp = Path(str(storage.stage_dir(st.KEEP_LISTS))) / ".eps=0.1.parquet.0123.tmp"
    tmp.write_bytes(b"half")

    problems = {str(p.path): p.reason for p in verify_storage(storage, settings)}
    assert set(problems) == {str(emb), str(assignments), str(bucket), str(tmp)}
    assert "rows, but its raw file has 60" in problems[str(emb)]
    assert "ids differ" in problems[str(assignments)]
    assert "the assignments put" in problems[str(bucket)]
    # The keep-lists are judged only against a whole set of buckets: once the bucket is fixed, they are caught.
    assert len(repair(verify_storage(storage, settings))) == 4
    run_pipeline(settings, instance, log=lambda m: None)
    assert verify_storage(storage, settings) == []
    pq.write_table(pq.read_table(str(keep)).slice(3), str(keep))
    [problem] = verify_storage(storage, settings)
    assert problem.path == keep and "the buckets keep" in problem.reason


def test_cli_verify_exit_status_and_repair(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    from semdedup_assets.cli import main

    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "home"))
    write_embedding_shards(tmp_path / "input", n_shards=2, per_shard=40, d=8)
    storage = str(tmp_path / "storage")
    assert (
        main(
            [
                "run",
                "--input",
                str(tmp_path / "input"),
                "--storage",
                storage,
                "--modality",
                "embedding",
                "--clusters",
                "3",
                "--buckets",
                "2",
            ]
        )
        == 0
    )
    assert main(["verify", "--storage", storage]) == 0
    emb = Storage(storage).shard_file(st.EMBEDDINGS, "part-01")
    _truncate(emb)
    capsys.readouterr()
    assert main(["verify", "--storage", storage]) == 1
    assert f"BAD {emb}: damaged" in capsys.readouterr().out
    assert main(["verify", "--repair", "--storage", storage]) == 0
    assert not Path(str(emb)).exists()
    assert (
        main(
            [
                "run",
                "--input",
                str(tmp_path / "input"),
                "--storage",
                storage,
                "--modality",
                "embedding",
                "--clusters",
                "3",
                "--buckets",
                "2",
            ]
        )
        == 0
    )
    assert main(["verify", "--storage", storage]) == 0


def test_full_disk_patched_writer(
    tmp_path: Path, instance: dg.DagsterInstance, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ENOSPC while writing a bucket: a clear error naming the file, no partial file, and a clean re-run."""
    import errno

    import pyarrow.parquet as pq

    write_embedding_shards(tmp_path / "input", n_shards=2, per_shard=60, d=8)
    settings = _settings(tmp_path)
    run_pipeline(settings, instance, log=lambda m: None)
    before = snapshot(Path(settings.storage))
    for p in Path(settings.storage, "semantic_duplicates").glob("*.parquet"):
        p.unlink()
    real = pq.write_table

    def full_disk(table, where, *args, **kwargs):
        if "semantic_duplicates" in str(where):
            with open(where, "wb") as f:
                f.write(b"PAR1 half a file")  # the bytes that fitted
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(table, where, *args, **kwargs)

    real_streamed = pq.ParquetWriter.write_table

    def full_disk_streamed(self, table, *args, **kwargs):  # bucket files are streamed, cluster group by group
        if "semantic_duplicates" in str(self.where):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_streamed(self, table, *args, **kwargs)

    monkeypatch.setattr(pq, "write_table", full_disk)
    monkeypatch.setattr(pq.ParquetWriter, "write_table", full_disk_streamed)
    with pytest.raises(PipelineError) as err:
        run_pipeline(settings, instance, log=lambda m: None)
    bucket = settings.storage_root().bucket_file("000")
    assert f"cannot write {bucket}: No space left on device" in str(err.value)
    assert not list(Path(settings.storage).rglob("*.tmp")) and not Path(str(bucket)).exists()
    monkeypatch.setattr(pq, "write_table", real)
    monkeypatch.setattr(pq.ParquetWriter, "write_table", real_streamed)
    run_pipeline(settings, instance, log=lambda m: None)
    assert snapshot(Path(settings.storage)) == before


def test_recover_stale_runs_marks_dead_runs_failed_and_frees_their_slots(instance: dg.DagsterInstance) -> None:
    """In-process: a STARTED run of a dead pid holding a slot, a live one, and a foreign host's."""
    from semdedup_assets import run_guard

    dead = subprocess.Popen(["true"])
    dead.wait()
    runs = {}
    for name, tags in {
        "dead": {**run_guard.process_tags(), run_guard.PID_TAG: str(dead.pid)},
        "alive": run_guard.process_tags(),
        "elsewhere": {**run_guard.process_tags(), run_guard.HOST_TAG: "another-host"},
    }.items():
        runs[name] = instance.create_run_for_job(
            dg.GraphDefinition(name=f"g_{name}").to_job(), tags=tags, status=dg.DagsterRunStatus.STARTED
        )
    storage = instance.event_log_storage
    storage.set_concurrency_slots("gpu", 1)
    assert storage.claim_concurrency_slot("gpu", runs["dead"].run_id, "semantic_duplicates").is_claimed
    storage.claim_concurrency_slot("gpu", runs["alive"].run_id, "embeddings")  # waits

    lines: list[str] = []
    run_guard.report_waiting_steps(instance, {runs["alive"].run_id}, lines.append)
    assert f"step embeddings of run {runs['alive'].run_id} waits for a slot of pool 'gpu'" in lines[0]
    assert f"held by run {runs['dead'].run_id} (step semantic_duplicates, STARTED) for" in lines[0]
    [event] = [e for e in instance.all_logs(runs["alive"].run_id) if "waits for a slot" in e.message]
    assert event.level == 20 and event.step_key == "embeddings"  # INFO, in the waiting run's own log

    assert run_guard.recover_stale_runs(instance, lines.append) == [runs["dead"].run_id]
    assert f"pid {dead.pid}" in lines[-1] and "is gone" in lines[-1]
    status = {k: instance.get_run_by_id(r.run_id).status for k, r in runs.items()}
    assert status == {
        "dead": dg.DagsterRunStatus.FAILURE,
        "alive": dg.DagsterRunStatus.STARTED,
        "elsewhere": dg.DagsterRunStatus.STARTED,
    }
    assert not [s for s in storage.get_concurrency_info("gpu").claimed_slots if s.run_id == runs["dead"].run_id]
    assert storage.claim_concurrency_slot("gpu", runs["alive"].run_id, "embeddings").is_claimed
