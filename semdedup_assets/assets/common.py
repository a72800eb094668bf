"""Shared wiring for the assets: partition keys of a run, per-shard metadata, timing."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

import warnings

import dagster as dg

from semdedup_assets.core.centroids import MissingCentroidsError
from semdedup_assets.core.config import Settings
from semdedup_assets.core.embed import EmbedError
from semdedup_assets.core.engines import EngineError
from semdedup_assets.core.ingest import DuplicateIdsError
from semdedup_assets.core.shards import ShardError

# backfill_policy is a beta parameter; users need not see the notice on every import.
warnings.filterwarnings("ignore", category=dg.BetaWarning)


def shard_backfill_policy(settings: Settings) -> dg.BackfillPolicy:
    """Per-shard assets take many partitions per run, so a backfill of thousands of shards
    starts tens of processes, not thousands (Settings.backfill_batch per run)."""
    return dg.BackfillPolicy.multi_run(max_partitions_per_run=settings.backfill_batch)

# Ready for k8s_job_executor: each GPU step asks for one GPU.
GPU_OP_TAGS = {"dagster-k8s/config": {"container_config": {"resources": {"limits": {"nvidia.com/gpu": "1"}}}}}
GPU_POOL = "gpu"

# Follow upstream changes, but never past a failed blocking check (eager alone ignores them).
EAGER = dg.AutomationCondition.eager() & dg.AutomationCondition.all_deps_blocking_checks_passed()


PER_SHARD_TABLE_ROWS = 20


class ProgressLog:
    """Per-item progress lines, at most one per interval plus the first and the last.

    Every log line is an event row in the instance's storage (~8 ms each on SQLite), so a
    range run over thousands of shards logs at an interval (Settings.progress_interval).
    """

    def __init__(self, log: dg.DagsterLogManager, total: int, interval: float) -> None:
        self.log, self.total, self.interval = log, total, interval
        self.done = 0
        self._last: float | None = None

    def step(self, message: str) -> None:
        """Count one item done; log `message` with the count when it is due."""
        self.done += 1
        now = time.monotonic()
        if self._last is None or self.done == self.total or now - self._last >= self.interval:
            self.log.info(f"[{self.done}/{self.total}] {message}")
            self._last = now


# The core's errors about the data: their messages name the shard, row or file.
CORE_ERRORS = (ShardError, DuplicateIdsError, EmbedError, MissingCentroidsError, EngineError)


@contextmanager
def core_failures() -> Iterator[None]:
    """Turn a core error about the data into a dg.Failure with its message and where it happened."""
    try:
        yield
    except CORE_ERRORS as err:
        where = {k: v for k in ("shard", "row", "reason") if (v := getattr(err, k, None)) is not None}
        raise dg.Failure(description=str(err), metadata=where) from None


def run_partition_keys(context: dg.AssetExecutionContext) -> list[str]:
    """The partition keys this run covers (one, or a range from a backfill), sorted."""
    return sorted(context.partition_keys)


@contextmanager
def timed() -> Iterator[dict[str, float]]:
    """Measure a block's wall time into the yielded dict's 'seconds'."""
    out: dict[str, float] = {}
    start = time.perf_counter()
    try:
        yield out
    finally:
        out["seconds"] = round(time.perf_counter() - start, 3)


def shard_table_metadata(rows: list[dict[str, object]]) -> dg.TableMetadataValue:
    """A per-shard summary table (for runs that cover several shards)."""
    columns = [dg.TableColumn(name, "string" if isinstance(rows[0][name], str) else "float") for name in rows[0]] if rows else []
    return dg.MetadataValue.table(
        records=[dg.TableRecord(r) for r in rows],
        schema=dg.TableSchema(columns=columns),
    )


def run_metadata(per_shard: list[dict[str, object]], extra: dict[str, object]) -> dict[str, object]:
    """Metadata for a per-shard asset: totals, plus a table when the run covers several shards."""
    meta: dict[str, object] = dict(extra)
    meta["shards_in_run"] = len(per_shard)
    if len(per_shard) == 1:
        for k, v in per_shard[0].items():
            meta.setdefault(k, v)
    elif per_shard:
        # Dagster copies a range run's metadata onto every partition's event: keep it small.
        meta["per_shard"] = shard_table_metadata(per_shard[:PER_SHARD_TABLE_ROWS])
        if len(per_shard) > PER_SHARD_TABLE_ROWS:
            meta["per_shard_note"] = f"first {PER_SHARD_TABLE_ROWS} of {len(per_shard)} shards"
    return meta
