"""The run loop: the core's units of work sequenced over an engine, in the asset graph's order, without Dagster.

One place says what a whole run is: ingest (validate and publish the raw index), embed every
shard, train the centroids, assign every shard, deduplicate every bucket, write the keep-lists.
Each step calls the engine (`core.run.local_engine`: in this process, or `core.run.ray_engine`: on Ray), and the engine calls the
same core functions the Dagster assets call, so a run through here writes the graph's files,
byte for byte. The library (`semdedup_assets.library.SemDeDup`) and the tests use it; the Dagster
assets call the same engine methods one stage (one asset) at a time.

It reads the shards under `settings.input` and writes under `settings.storage`, nowhere else.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any

from semdedup_assets.core.checks.layout import prune_keep_lists
from semdedup_assets.core.cluster.assign import AssignShardResult, bucket_keys
from semdedup_assets.core.cluster.centroids import CentroidsResult, load_centroids
from semdedup_assets.core.config import Settings
from semdedup_assets.core.dedup.buckets import DedupBucketResult
from semdedup_assets.core.dedup.keep import KeepListsResult
from semdedup_assets.core.embed.shard import EmbedShardResult
from semdedup_assets.core.ingest.stage import IngestResult, StagedShard, discard_staged, publish_shards
from semdedup_assets.core.io import recent
from semdedup_assets.core.io import storage as st
from semdedup_assets.core.io.shards import Shard, discover_shards
from semdedup_assets.core.run.engines import Engine, Worker
from semdedup_assets.core.run.local_engine import LocalEngine

Log = Callable[[str], None]
# The steps of a run, in order (what `on_step` is called with).
STEPS = ("ingest", "embed", "centroids", "assign", "dedup", "keep_lists")


class StrayShardsError(ValueError):
    """The storage holds results of shards that are not in the input (another dataset's storage)."""


@dataclass
class RunUnitsResult:
    """Every unit's result of one run, stage by stage (plain values: they cross process boundaries)."""

    shards: list[str]
    ingest: IngestResult
    embedded: list[EmbedShardResult] = field(default_factory=list)
    centroids: CentroidsResult | None = None
    assigned: list[AssignShardResult] = field(default_factory=list)
    deduplicated: list[DedupBucketResult] = field(default_factory=list)
    keep: KeepListsResult | None = None

    def all(self) -> list[Any]:
        """Every result in run order (ingest first, keep-lists last)."""
        return [self.ingest, *self.embedded, self.centroids, *self.assigned, *self.deduplicated, self.keep]


def engine_for(settings: Settings) -> Engine:
    """The engine the settings ask for (the Ray engine connects, or starts Ray, at once)."""
    if settings.engine != "ray":
        return LocalEngine()
    from semdedup_assets.core.run.ray_engine import RayEngine  # a local run does not load the Ray engine

    return RayEngine(settings)


def ingest_shards(
    settings: Settings, shards: Sequence[Shard], log: Log | None = None, engine: Engine | None = None
) -> IngestResult:
    """Validate every shard, then publish `raw/<key>.parquet` for all of them together.

    The engine stages the shards (`core.ingest.stage.stage_shard`: here, or as Ray tasks with
    `--engine ray`); this process then checks the batch and publishes it (`publish_shards`).
    Raises ShardError (naming the shard and row) or DuplicateIdsError; then nothing is published.
    `log` receives one line per validated shard. It lives here, not in core.ingest, because it
    drives an engine: the engines call core.ingest, so core.ingest must not call them.
    """
    start = time.perf_counter()
    staged: dict[str, StagedShard] = {}
    workers: dict[str, Worker] = {}
    try:
        for d in (engine or LocalEngine()).stage_shards(settings, shards):
            staged[d.unit], workers[d.unit] = d.result, d.worker
            if log is not None:
                log(
                    f"validated shard {d.unit!r}: {d.result.rows} rows"
                    + (f" on {d.worker}" if engine is not None and engine.name != "local" else "")
                )
    except BaseException:
        discard_staged(settings, [s.key for s in shards], list(staged.values()))
        raise
    return publish_shards(settings, [staged[s.key] for s in shards], time.perf_counter() - start, workers)


def stray_shards(settings: Settings, shards: Sequence[Shard]) -> list[str]:
    """Shards whose raw index is in the storage but that are not among `shards` (sorted)."""
    storage = settings.storage_root()
    keys = {s.key for s in shards}
    return sorted(k for k in (storage.shard_of(st.RAW, p) for p in storage.stage_files(st.RAW)) if k not in keys)


def run_units(
    settings: Settings,
    engine: Engine | None = None,
    shards: Sequence[Shard] | None = None,
    log: Log | None = None,
    on_step: Callable[[str, int], None] | None = None,
    on_unit: Callable[[str, str], None] | None = None,
) -> RunUnitsResult:
    """Run the whole method on `settings.input` into `settings.storage` as the core's units, stage after stage.

    `engine`: where the units run (default: the settings' engine, closed at the end; a given engine stays open).
    `shards`: the input's shards (default: discovered under `settings.input`). Results of shards not in the
    input are refused (StrayShardsError, before anything is written), as `semdedup run` refuses them.
    `on_step(step, units)` is called as each step of STEPS starts with its number of units, and
    `on_unit(step, key)` as each unit finishes: progress for a caller. `log` gets the core's own lines.
    """
    if shards is None:
        if not settings.input:
            raise ValueError("no input location given")
        shards = discover_shards(settings.input, settings.files_per_shard)
    shards = list(shards)
    if not shards:
        raise ValueError(f"no shard files under {settings.input}")
    if stray := stray_shards(settings, shards):
        raise StrayShardsError(
            f"the storage {settings.storage} already holds {len(stray)} shard(s) that are not in "
            f"this input (e.g. {stray[:3]}): use another storage"
        )
    storage = settings.storage_root()
    keys = [s.key for s in shards]
    buckets = bucket_keys(settings.bucket_partitions)
    step = on_step or (lambda name, units: None)
    unit = on_unit or (lambda name, key: None)
    with ExitStack() as stack:
        # The embeddings each shard's embed step writes stay in memory for the centroids' sample (a quarter of the
        # memory budget at most; see core.io.recent): the same values, without reading the files back.
        stack.enter_context(recent.holding(settings.memory_budget_bytes // 4))
        if engine is None:  # one Ray connection (or local instance) for every step, as `semdedup run`
            if settings.engine == "ray":
                from semdedup_assets.core.run.ray_engine import ray_session

                stack.enter_context(ray_session(settings))
            engine = stack.enter_context(engine_for(settings))
        step("ingest", len(shards))
        out = RunUnitsResult(keys, ingest_shards(settings, shards, log=log, engine=engine))
        for s in shards:
            unit("ingest", s.key)
        step("embed", len(shards))
        for d in engine.embed_shards(settings, shards, log=log):
            out.embedded.append(d.result)
            unit("embed", d.unit)
        step("centroids", 1)
        embeddings = {k: storage.shard_file(st.EMBEDDINGS, k) for k in keys}
        out.centroids = engine.train_centroids(settings, embeddings, log=log, warn=log).result
        unit("centroids", "centroids")
        k = len(load_centroids(storage))
        step("assign", len(keys))
        for d in engine.assign_shards(settings, keys):
            out.assigned.append(d.result)
            unit("assign", d.unit)
        step("dedup", len(buckets))
        assignments = [storage.shard_file(st.CLUSTER_ASSIGNMENTS, key) for key in keys]
        for d in engine.dedup_buckets(settings, buckets, k, assignments):
            out.deduplicated.append(d.result)
            unit("dedup", d.unit)
        step("keep_lists", 1)
        out.keep = engine.build_keep_lists(settings, [storage.bucket_file(b) for b in buckets], log=log).result
        prune_keep_lists(storage, settings.eps)  # as the keep_lists asset: no keep-list of an eps no longer configured
        unit("keep_lists", "keep_lists")
        return out


__all__ = ["STEPS", "RunUnitsResult", "StrayShardsError", "run_units", "stray_shards"]
