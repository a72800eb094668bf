"""Shared wiring for the assets: partition keys of a run, per-shard metadata, timing."""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

import dagster as dg

from semdedup_assets import progress
from semdedup_assets.core.checks.layout import prune_shard_stages
from semdedup_assets.core.cluster.centroids import MissingCentroidsError
from semdedup_assets.core.embed.shard import EmbedError
from semdedup_assets.core.ingest.stage import DuplicateIdsError
from semdedup_assets.core.io.shards import ShardError
from semdedup_assets.core.io.storage import StageFileError, Storage, UnsafeKeyError, validate_shard_key
from semdedup_assets.core.run.engines import EngineError, Worker
from semdedup_assets.core.run.meter import resource_metadata, stage_meter
from semdedup_assets.names import GraphNames
from semdedup_assets.resources import SemDedupConfig


def shard_backfill_policy(backfill_batch: int) -> dg.BackfillPolicy:
    """Per-shard assets take many partitions per run, so a backfill of thousands of shards
    starts tens of processes, not thousands (Settings.backfill_batch per run)."""
    return dg.BackfillPolicy.multi_run(max_partitions_per_run=backfill_batch)


@contextmanager
def beta_parameters() -> Iterator[None]:
    """Around an `@dg.asset(backfill_policy=...)`: the parameter is beta, and users need not see
    the notice each time the code location loads (filtered here, not for the whole process)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", dg.BetaWarning)
        yield


def settings_resource(
    context: dg.AssetExecutionContext | dg.AssetCheckExecutionContext, names: GraphNames
) -> SemDedupConfig:
    """The graph's settings resource (under its own key: a component's graph has its own)."""
    return getattr(context.resources, names.resource)


# Ready for k8s_job_executor: each GPU step asks for one GPU.
GPU_OP_TAGS = {"dagster-k8s/config": {"container_config": {"resources": {"limits": {"nvidia.com/gpu": "1"}}}}}

# Follow upstream changes, but never past a failed blocking check (eager alone ignores them).
EAGER = dg.AutomationCondition.eager() & dg.AutomationCondition.all_deps_blocking_checks_passed()


class ProgressLog:
    """Per-item progress lines, at most one per interval plus the first and the last.

    Every log line is an event row in the instance's storage (~8 ms each on SQLite), so a
    range run over thousands of shards logs at an interval (Settings.progress_interval).
    The terminal of `semdedup` (if any) gets a bar named `label` counting `unit` (see
    semdedup_assets.progress).
    """

    def __init__(
        self, log: dg.DagsterLogManager, total: int, interval: float, label: str = "progress", unit: str = "shards"
    ) -> None:
        self.log, self.total, self.interval = log, total, interval
        self.done = 0
        self._last: float | None = None
        self.bar = progress.task(label, total, unit)

    def step(self, message: str) -> None:
        """Count one item done; log `message` with the count when it is due."""
        self.done += 1
        self.bar.update(1, message)
        now = time.monotonic()
        if self._last is None or self.done == self.total or now - self._last >= self.interval:
            self.log.info(f"[{self.done}/{self.total}] {message}")
            self._last = now


# The core's errors about the data: their messages name the shard, row or file.
CORE_ERRORS = (
    ShardError,
    DuplicateIdsError,
    EmbedError,
    MissingCentroidsError,
    StageFileError,
    UnsafeKeyError,
    EngineError,
)


@contextmanager
def core_failures() -> Iterator[None]:
    """Turn a core error about the data into a dg.Failure with its message and where it happened."""
    try:
        yield
    except CORE_ERRORS as err:
        where = {k: v for k in ("shard", "row", "reason") if (v := getattr(err, k, None)) is not None}
        raise dg.Failure(description=str(err), metadata=where) from None


def run_partition_keys(context: dg.AssetExecutionContext) -> list[str]:
    """The shard keys this run covers (one, or a range from a backfill), sorted; unsafe keys are refused."""
    return sorted(validate_shard_key(k) for k in context.partition_keys)


@contextmanager
def timed() -> Iterator[dict[str, float]]:
    """Measure a block's wall time into the yielded dict's 'seconds'."""
    out: dict[str, float] = {}
    start = time.perf_counter()
    try:
        yield out
    finally:
        out["seconds"] = round(time.perf_counter() - start, 2)


# The metadata entry that holds a stage's row count, in order of preference.
ROW_ENTRIES = ("run_rows", "rows", "items")


def metered(fn: Callable[..., dg.MaterializeResult]) -> Callable[..., dg.MaterializeResult]:
    """Wrap an asset's body: its result carries `resources/*` metadata (peak RSS, GPU memory, rows, seconds).

    The figures are this process's; a Ray engine's units add their workers' (`worker_resources`).
    """

    def wrapper(*args: object, **kwargs: object) -> dg.MaterializeResult:
        with stage_meter() as figures:
            result = fn(*args, **kwargs)
        meta = dict(result.metadata or {})
        rows = next((v for k in ROW_ENTRIES if isinstance(v := meta.get(k), int)), 0)
        return result._replace(metadata={**meta, **resource_metadata(figures, rows)})

    # What functools.wraps copies (Dagster reads the parameters and resource types through __wrapped__).
    for name in ("__module__", "__name__", "__qualname__", "__doc__", "__annotations__"):
        setattr(wrapper, name, getattr(fn, name))
    wrapper.__wrapped__ = fn  # type: ignore[attr-defined]
    return wrapper


def worker_resources(workers: Iterable[Worker]) -> dict[str, object]:
    """`resources/worker_*` metadata: the largest Ray unit's peak RSS (and GPU memory) in its worker, and how
    many worker processes ran units; empty when every unit ran in this process (its own figures cover them)."""
    measured = [w for w in workers if w.peak_rss_mib is not None]
    if not measured:
        return {}
    out: dict[str, object] = {
        "resources/worker_peak_rss_mib": max(float(w.peak_rss_mib or 0) for w in measured),
        "resources/workers": len({(w.node, w.pid) for w in measured}),
    }
    gpu = [w.gpu_peak_mib for w in measured if w.gpu_peak_mib is not None]
    if gpu:
        out["resources/worker_gpu_peak_mib"] = max(gpu)
    return out


def rounded(name: str, value: object) -> object:
    """A metadata figure as people read it: seconds to 2 places, other fractions to 4."""
    if isinstance(value, float):
        return round(value, 2 if "seconds" in name else 4)
    return value


def table_metadata(rows: list[dict[str, object]]) -> dg.TableMetadataValue:
    """A metadata table of rows (string or number columns), figures rounded."""
    rows = [{k: rounded(k, v) for k, v in r.items()} for r in rows]
    columns = (
        [
            dg.TableColumn(
                name,
                "string" if isinstance(rows[0][name], str) else ("int" if isinstance(rows[0][name], int) else "float"),
            )
            for name in rows[0]
        ]
        if rows
        else []
    )
    return dg.MetadataValue.table(
        records=[dg.TableRecord(r) for r in rows],
        schema=dg.TableSchema(columns=columns),
    )


@contextmanager
def partition_keys_read_once(instance: dg.DagsterInstance) -> Iterator[None]:
    """Inside the block, the instance answers dynamic-partition look-ups from a memo of its first answers.

    `add_asset_metadata(partition_key=...)` checks that the key is targeted by reading the
    range's end keys and every dynamic partition key from the instance, on each call: O(P) rows
    per shard, O(P^2) per run (at 1,000 shards 45 s of a 181 s `semdedup run`, a third of it in
    SQLite connections). No partition is added or removed while a step records its metadata,
    so the first answers stay right; the instance's own methods are back after the block.
    """
    names = ("get_dynamic_partitions", "has_dynamic_partition")
    patched = []
    for name in names:
        original = getattr(instance, name, None)
        if original is None:  # another Dagster: no memo, the same answers
            continue
        memo: dict[tuple, object] = {}

        def cached(*args: object, _original: Callable = original, _memo: dict = memo, **kwargs: object) -> object:
            key = (args, tuple(sorted(kwargs.items())))
            if key not in _memo:
                _memo[key] = _original(*args, **kwargs)
            return _memo[key]

        try:
            setattr(instance, name, cached)  # an instance attribute shadows the method
        except AttributeError:
            continue
        patched.append(name)
    try:
        yield
    finally:
        for name in patched:
            delattr(instance, name)


def add_partition_metadata(context: dg.AssetExecutionContext, rows: dict[str, dict[str, object]]) -> None:
    """Each partition's own metadata on its own event of a range run (`add_asset_metadata`), the targeted
    partition keys read once for all of them (partition_keys_read_once)."""
    with partition_keys_read_once(context.instance):
        for key, row in rows.items():
            context.add_asset_metadata(row, partition_key=key)


def run_metadata(
    context: dg.AssetExecutionContext, per_shard: list[dict[str, object]], extra: dict[str, object]
) -> dict[str, object]:
    """Metadata for a per-shard asset: each partition's own figures, plus the run's totals.

    Dagster copies a range run's metadata onto every partition's materialization event, so
    each shard's row goes in as partition-scoped metadata (`add_asset_metadata`), which
    takes precedence on that partition's event: one event per partition, as before. Run
    totals of a figure that also exists per shard are kept as `run_<name>`.
    """
    per_key = {k for row in per_shard for k in row}
    add_partition_metadata(
        context, {str(row["shard"]): {k: rounded(k, v) for k, v in row.items() if k != "shard"} for row in per_shard}
    )
    meta: dict[str, object] = {(f"run_{k}" if k in per_key else k): rounded(k, v) for k, v in extra.items()}
    meta["shards_in_run"] = len(per_shard)
    return meta


def remove_unregistered(context: dg.AssetExecutionContext, names: GraphNames, storage: Storage, *stages: str) -> None:
    """Delete this stage's files of shards that are no longer registered (see core/checks/layout.py)."""
    removed = prune_shard_stages(storage, stages, context.instance.get_dynamic_partitions(names.partitions))
    if removed:
        context.log.info(f"removed {len(removed)} file(s) of shards that are no longer registered: {removed[:5]}")
