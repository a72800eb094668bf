"""Running the whole asset graph through Dagster, stage by stage, on a persistent instance.

A run covers one partitioning, so the graph runs as five runs: per-shard ingest and
embedding (every shard in one range run), centroids, per-shard assignment, per-bucket
pairwise (every bucket in one range run), and keep-lists. Each is an ordinary Dagster
run in the instance, so it shows in the UI's run history.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import dagster as dg

from semdedup_assets import progress
from semdedup_assets.core.checks.layout import remove_shard_files
from semdedup_assets.core.checks.lineage import results_fingerprint
from semdedup_assets.core.checks.verify import derived_outputs_exist, remove_stale_prunings
from semdedup_assets.core.cluster.assign import bucket_keys, touched_buckets
from semdedup_assets.core.config import Settings
from semdedup_assets.core.embed.encoders.base import missing_model_folder
from semdedup_assets.core.io import storage as st
from semdedup_assets.core.io.catalog import refresh_catalog
from semdedup_assets.core.io.shards import SHARD_SUFFIXES, Discovery, discover, members, regrouped_shards
from semdedup_assets.core.messages import printable
from semdedup_assets.core.run.engines import EngineError
from semdedup_assets.core.run.ray_engine import ray_session
from semdedup_assets.core.select.decontaminate import ReferenceError, check_run_reference
from semdedup_assets.core.select.export import DEDUPLICATED, remove_exported_shard, stale_exports
from semdedup_assets.core.settings_store import save_settings
from semdedup_assets.graph import build_graph

# Defined beside the instance, whose set-up raises it too (instance.py must not import this module).
from semdedup_assets.instance import PipelineError
from semdedup_assets.names import DEFAULT_NAMES, GraphNames, record_graph, recorded_graph
from semdedup_assets.run_guard import RunGuard, process_tags
from semdedup_assets.ui import ui_command

RANGE_START = "dagster/asset_partition_range_start"
RANGE_END = "dagster/asset_partition_range_end"

# (label, job name, partitioning) in execution order.
STAGES: list[tuple[str, str, str | None]] = [
    ("ingest + embed", "ingest_job", "shards"),
    ("centroids", "centroids_job", None),
    ("cluster_assignments", "assign_job", "shards"),
    ("semantic_duplicates", "dedup_job", "buckets"),
    ("keep_lists", "keep_lists_job", None),
]
# Run after the keep-lists only when the `prune` knob names pruning selections.
PRUNE_STAGE = ("pruned", "prune_job", None)


def console_run_config(verbose: bool) -> dict:
    """Run config of an in-process run: the console logger shows warnings only, unless `verbose`
    (Dagster's DEBUG stream, failure tracebacks included). A failure's cause is printed by the caller
    (failure_message); the warnings that show are `semdedup: warning: ...` lines. Every event still goes to
    the instance, so the UI has them all."""
    return {
        "loggers": {
            "console": {
                "config": {"log_level": "DEBUG" if verbose else "WARNING", "tracebacks": verbose, "plain": not verbose}
            }
        }
    }


@dataclass
class PipelineResult:
    """What a pipeline execution did."""

    shards: list[str]
    run_ids: dict[str, str] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)


def failure_message(result: dg.ExecuteInProcessResult) -> str:
    """The user-facing reason a run failed: step errors and failed blocking checks."""
    reasons = []
    for event in result.all_events:
        if event.is_step_failure:
            err = event.step_failure_data.error
            desc = getattr(event.step_failure_data.user_failure_data, "description", None)
            message = desc or (err.message.strip() if err else "unknown error")
            cause = err.cause if err else None
            while cause is not None and not desc:
                message = cause.message.strip()
                cause = cause.cause
            reasons.append(f"{event.step_key}: {message}")
        elif event.event_type_value == "ASSET_CHECK_EVALUATION":
            data = event.event_specific_data
            if not data.passed:
                reasons.append(
                    f"check {data.asset_key.to_user_string()}.{data.check_name} failed: {data.description or ''}"
                )
    return "\n".join(dict.fromkeys(reasons)) or "the run failed"


def check_run_locations(settings: Settings) -> Discovery:
    """Every refusal about the input and storage locations, made before anything is written.

    The CLI calls it before it opens the Dagster instance (which creates `<storage>/dagster_home`),
    so a refused run leaves no file behind, also not inside the input. Returns the input's shards.
    """
    if not settings.input:
        raise PipelineError("no input location given")
    # A missing bucket or refused credentials are named, nothing published.
    st.check_store(settings.input, "input")
    st.check_store(settings.storage, "storage")
    if (overlap := st.overlap_error(settings.input, settings.storage)) is not None:
        raise PipelineError(overlap)  # the next run would read the storage as input
    if (problem := st.folder_problem(settings.storage, "--storage")) is not None:
        raise PipelineError(problem)
    if settings.modality != "embedding" and (problem := missing_model_folder(settings.model)) is not None:
        raise PipelineError(problem)  # before the storage is made, not as a hub error from the embed stage
    found = discover(settings.input, settings.files_per_shard)
    if not found.shards:
        raise PipelineError(f"no shard files ({', '.join(SHARD_SUFFIXES)}) under {printable(settings.input)}")
    return found


def storage_names(settings: Settings, names: GraphNames | None = None) -> GraphNames:
    """The graph names to work on a storage with: the given ones, else those the storage recorded
    (a `SemDedup` component's prefixed graph), else the plain ones."""
    return names if names is not None else recorded_graph(settings.storage_root()).names


def run_pipeline(
    settings: Settings,
    instance: dg.DagsterInstance,
    log=print,
    verbose: bool = False,
    stop_on_signals: bool = False,
    names: GraphNames | None = None,
) -> PipelineResult:
    """Register every shard under settings.input and materialize the whole graph.

    Dagster's console log shows only with `verbose`. Runs of killed processes are marked
    failed and their pool slots freed first; with `stop_on_signals` (the CLI), SIGTERM/SIGINT
    cancel the run and exit (see run_guard.RunGuard). With engine=ray, one Ray connection (or
    local instance) serves every stage; an unreachable `ray_address` fails here, before
    anything is written. `names`: the graph's names (a `SemDedup` component's, or the plain ones;
    default: those the storage recorded).

    The settings are committed to the storage (`semdedup.json`) only when every stage
    succeeded: a failed run leaves those of the last good run, which the commands that read
    the storage (export, status, sensors) go on using; the stages themselves take the new
    settings from the graph's resource. Then the pruning selections that the new results no
    longer match (core/checks/lineage.py) are removed, and exports that no longer match are named.
    """
    with RunGuard(instance, log, stop_on_signals=stop_on_signals):
        return _run_pipeline(settings, instance, log, verbose, storage_names(settings, names))


def _run_pipeline(
    settings: Settings,
    instance: dg.DagsterInstance,
    log=print,
    verbose: bool = False,
    names: GraphNames = DEFAULT_NAMES,
) -> PipelineResult:
    if not settings.input:
        raise PipelineError("no input location given")
    defs = build_graph(settings, names)  # no side effects: the stores are checked next, before anything is written
    bucket_def = defs.resolve_assets_def(names.key("semantic_duplicates")).partitions_def
    buckets = bucket_def.get_partition_keys()
    try:
        with ray_session(settings):
            found = check_run_locations(settings)
            if (note := found.skipped_note(settings.input)) is not None:
                log(f"[semdedup] {note}")
            shards = [s.key for s in found.shards]
            if settings.reference:  # before anything is recorded: a bad reference leaves the storage as it was
                try:
                    check_run_reference(settings, found.files[0])
                except ReferenceError as err:
                    raise PipelineError(f"--reference: {err}") from None
            known = instance.get_dynamic_partitions(names.partitions)
            stray = sorted(set(known) - set(shards))
            regrouped = regrouped_shards(stray, {f.key for f in found.files}, settings.files_per_shard)
            if regrouped:  # their files are in other shards now: withdrawn, never left to hold an id twice
                log(
                    f"[semdedup] {len(regrouped)} shard(s) regrouped by --files-per-shard {settings.files_per_shard} "
                    f"(a file added, removed or renamed inside the input, e.g. {regrouped[:3]}): their results are "
                    "withdrawn and their files ingested in their new shards"
                )
                withdraw_shards(settings, instance, regrouped, names)
                for key in regrouped:
                    remove_exported_shard(settings.storage_root(), key)
                known = instance.get_dynamic_partitions(names.partitions)
                stray = [k for k in stray if k not in regrouped]
            if stray:  # checked before registering anything: a refused run leaves no trace
                raise PipelineError(
                    f"the storage already holds {len(stray)} shard(s) that are not under {settings.input} "
                    f"(e.g. {stray[:3]}): use another --storage, or `semdedup forget SHARD` first"
                )
            # Before the instance records anything: which graph and instance every later command must use.
            record_graph(settings.storage_root(), names, instance.root_directory)
            new = [k for k in shards if k not in set(known)]
            if new:
                instance.add_dynamic_partitions(names.partitions, new)
            registered = instance.get_dynamic_partitions(names.partitions)
            result = PipelineResult(shards=shards)
            for label, job_name, partitioning in STAGES + ([PRUNE_STAGE] if settings.prune else []):
                tags: dict[str, str] = {"semdedup/stage": label}
                if partitioning == "shards":
                    # A range over the registered keys in registration order: every shard in one run.
                    tags.update({RANGE_START: registered[0], RANGE_END: registered[-1]})
                elif partitioning == "buckets":
                    tags.update({RANGE_START: buckets[0], RANGE_END: buckets[-1]})
                log(f"[semdedup] {label} ...")
                try:
                    run_id = execute_job(
                        defs, instance, names.definition(job_name), tags, settings.storage, verbose=verbose
                    )
                except PipelineError as err:
                    if job_name == "ingest_job":
                        withdraw_shards(settings, instance, new, names)
                    raise PipelineError(f"{label}: {err}") from None
                result.run_ids[label] = run_id
                result.seconds[label] = _run_seconds(instance, run_id)
            save_settings(settings)  # every stage succeeded: these are now the storage's settings
            storage = settings.storage_root()
            if derived_outputs_exist(storage):
                fingerprint = results_fingerprint(storage)
                removed = remove_stale_prunings(storage, fingerprint)
                if removed:
                    refresh_catalog(storage)
                    log(
                        f"[semdedup] removed {len(removed)} pruning selection(s) made from earlier results: "
                        f"{', '.join(removed)}"
                    )
                for label in stale_exports(storage, settings.eps, fingerprint):
                    log(
                        f"[semdedup] warning: deduplicated/{label} was exported from earlier results: "
                        f"`semdedup export --select {label}` writes it again (status and verify flag it until then)"
                    )
            return result
    except EngineError as err:
        raise PipelineError(str(err)) from None


def withdraw_shards(
    settings: Settings, instance: dg.DagsterInstance, shards: list[str], names: GraphNames = DEFAULT_NAMES
) -> list[str]:
    """Undo the registration of shards whose ingest failed: their partitions and every per-shard file.

    Only the shards that the failed run registered are withdrawn; shards registered before
    it keep their partitions and results, so the retry after fixing the input starts clean.
    """
    storage = settings.storage_root()
    registered = set(instance.get_dynamic_partitions(names.partitions))
    removed: list[str] = []
    for shard in shards:
        if shard in registered:
            instance.delete_dynamic_partition(names.partitions, shard)
        removed += remove_shard_files(storage, shard)
    return removed


@dataclass
class ForgetResult:
    """What `forget_shard` removed and re-ran."""

    removed: list[str]
    buckets: list[str]
    run_ids: list[str] = field(default_factory=list)
    keep_lists: bool = False  # the keep-lists were rewritten


def forget_shard(
    settings: Settings,
    instance: dg.DagsterInstance,
    shard: str,
    log=print,
    verbose: bool = False,
    stop_on_signals: bool = False,
    names: GraphNames | None = None,
) -> ForgetResult:
    """Remove a shard's results and partition, then re-run the buckets it touched and the keep-lists.

    An unsafe key (`..`, absolute, control characters) never becomes a path: when such a
    key was registered as a partition (through the UI or GraphQL) only the partition is
    deleted, and otherwise it is refused. `names`: the graph's (default: those the storage
    recorded, so a `SemDedup` component's storage is forgotten from in its own partitions).
    """
    with RunGuard(instance, log, stop_on_signals=stop_on_signals):
        return _forget_shard(settings, instance, shard, log, verbose, storage_names(settings, names))


def _forget_shard(
    settings: Settings,
    instance: dg.DagsterInstance,
    shard: str,
    log=print,
    verbose: bool = False,
    names: GraphNames = DEFAULT_NAMES,
) -> ForgetResult:
    storage = settings.storage_root()
    partitions = names.partitions
    try:
        st.validate_shard_key(shard)
    except st.UnsafeKeyError as err:
        if shard not in instance.get_dynamic_partitions(partitions):
            raise PipelineError(str(err)) from None
        instance.delete_dynamic_partition(partitions, shard)
        log(f"[semdedup] {err}; deleted its partition, touched no file")
        return ForgetResult([], [])
    registered = set(instance.get_dynamic_partitions(partitions))
    on_disk = {storage.shard_of(st.RAW, p) for p in storage.stage_files(st.RAW)}
    if on_disk and not registered & on_disk:
        # Re-running the stages here would find no shard: the instance is not the one this storage's runs used.
        raise PipelineError(
            f"the Dagster instance at {instance.root_directory} has none of the {len(on_disk)} shard(s) "
            f"of {storage.root} registered in its partitions {partitions!r}: run with the "
            "DAGSTER_HOME of the runs that made this storage"
        )
    assignments = storage.shard_file(st.CLUSTER_ASSIGNMENTS, shard)
    buckets: set[str] = set()
    if assignments.exists() and storage.centroids_file.exists():
        k = st.parquet_num_rows(storage.centroids_file)
        old = st.usable(assignments, lambda p: st.read_table(p, columns=["cluster"]), log)
        # A damaged assignments file cannot say which buckets held the shard: re-run them all.
        buckets = (
            touched_buckets(old.column("cluster").to_numpy(), k, settings.bucket_partitions)
            if old is not None
            else set(bucket_keys(settings.bucket_partitions))
        )
    removed = remove_shard_files(storage, shard)
    removed += [str(storage.stage_dir(DEDUPLICATED) / p) for p in remove_exported_shard(storage, shard)]
    known = shard in registered
    if known:
        instance.delete_dynamic_partition(partitions, shard)
    if not removed and not known:
        raise PipelineError(f"no shard {shard!r} in {storage.root}{group_hint(settings, shard)}")
    result = ForgetResult(removed, sorted(buckets))
    if not instance.get_dynamic_partitions(partitions):
        # Nothing left: the dataset-wide results describe no data any more.
        for stage in (st.SEMANTIC_DUPLICATES, st.KEEP_LISTS):
            result.removed += [str(p) for p in storage.stage_files(stage) if st.remove(p)]
    else:
        defs = build_graph(settings, names)
        tags = {"semdedup/forget": shard}
        rerun = [b for b in result.buckets if storage.bucket_file(b).exists()]
        # The keep-lists list the shard's ids: rewrite them whenever they exist, or drop them
        # when they cannot be rewritten (bucket results missing), never leave them stale.
        keep_files = storage.stage_files(st.KEEP_LISTS)
        rewrite = bool(keep_files) and all(
            storage.bucket_file(b).exists() for b in bucket_keys(settings.bucket_partitions)
        )
        log(
            f"[semdedup] re-running {len(rerun)} bucket(s) without shard {shard!r}"
            + (", then the keep-lists" if rewrite else "")
        )
        with progress.task("forget: re-run", len(rerun) + rewrite, unit="runs", outer=True) as bar:
            for bucket in rerun:
                result.run_ids.append(
                    execute_job(
                        defs,
                        instance,
                        names.definition("dedup_job"),
                        tags,
                        settings.storage,
                        partition_key=bucket,
                        verbose=verbose,
                    )
                )
                bar.update(1, f"bucket {bucket}")
            if rewrite:
                result.run_ids.append(
                    execute_job(
                        defs, instance, names.definition("keep_lists_job"), tags, settings.storage, verbose=verbose
                    )
                )
                result.keep_lists = True
                bar.update(1, "keep-lists")
        if keep_files and not rewrite:
            result.removed += [str(p) for p in keep_files if st.remove(p)]
    refresh_catalog(storage)
    return result


def group_hint(settings: Settings, key: str) -> str:
    """With --files-per-shard > 1, where an input file's key `key` lives: ': file ... is in shard ...' ('' if not)."""
    if settings.files_per_shard == 1 or not settings.input:
        return ""
    try:
        shards = discover(settings.input, settings.files_per_shard).shards
    except (OSError, ValueError):
        return ""
    group = next((s.key for s in shards if key in {f.key for f in members(s)}), None)
    return (
        ""
        if group is None
        else (
            f": file {key!r} is in shard {group!r} (--files-per-shard "
            f"{settings.files_per_shard}); forget {group!r}, or remove the file from the "
            "input and run again"
        )
    )


def execute_job(
    defs: dg.Definitions,
    instance: dg.DagsterInstance,
    job_name: str,
    tags: dict[str, str],
    storage: str,
    partition_key: str | None = None,
    verbose: bool = False,
) -> str:
    """Run one job of `defs` in this process (one partition where `partition_key` is given); its run id.

    Raises PipelineError with the failed step's message and where to see the full trace (`-v`, or the
    run in the UI on `storage`'s run history).
    """
    # The pid and host let a later process tell that this run's process is gone (run_guard).
    run = defs.resolve_job_def(job_name).execute_in_process(
        run_config=console_run_config(verbose),
        instance=instance,
        tags={**tags, **process_tags()},
        partition_key=partition_key,
        raise_on_error=False,
    )
    if not run.success:
        raise PipelineError(
            f"{failure_message(run)}\n(full trace: run again with -v, or open run {run.run_id} "
            f"of {job_name} in the UI: {ui_command(storage, instance.root_directory)})"
        )
    return run.run_id


def _run_seconds(instance: dg.DagsterInstance, run_id: str) -> float:
    record = instance.get_run_record_by_id(run_id)
    if record is None or record.start_time is None or record.end_time is None:
        return 0.0
    return round(record.end_time - record.start_time, 2)
