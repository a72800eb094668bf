"""Engines: where the heavy per-partition units of work run. This module is the contract (Engine,
Done, Worker, EngineError); the engines are core.run.local_engine and core.run.ray_engine.

- `local`: in this process, one unit after another (the default, and the demo's).
- `ray`: on a Ray cluster, a local instance or the one at `ray_address`. Shards stream
  through a pool of embedding actors: one per GPU (`num_gpus=1`, so Ray pins each
  actor's `CUDA_VISIBLE_DEVICES`) or, without GPUs, CPU actors that split the cores.
  Each actor loads the encoder once. k-means training is one task on a GPU worker
  where the cluster has a GPU, else it stays in the driver (the run's process). The
  shards' assignments and the buckets of the pairwise rule are Ray tasks, one GPU each
  where the cluster has GPUs; the keep-lists are one CPU task. Ingest stays in the driver.

Both engines call the same core functions (`core.embed.shard.embed_shard`,
`core.cluster.centroids.train_centroids`, `core.cluster.assign.assign_shard`, `core.dedup.buckets.dedup_bucket`,
`core.dedup.keep.build_keep_lists`),
which read their inputs from storage by path and write their files atomically wherever
they run, so both give the same bytes. A worker that dies (killed, out of memory, node
lost) is retried `ray_retries` times; then the run fails naming the shard or bucket.
Nothing here imports Dagster; `ray` is imported only by the Ray engine.
"""

from __future__ import annotations

import os
import socket
import sys
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from semdedup_assets.core.config import Settings, visible_cuda_devices
from semdedup_assets.core.io import storage as st
from semdedup_assets.core.io.shards import Shard

R = TypeVar("R")
Log = Callable[[str], None]
CENTROIDS = "centroids"  # the unit key of k-means training (one for the dataset)
KEEP_LISTS = "keep_lists"  # the unit key of the keep-lists (one for the dataset)


class EngineError(RuntimeError):
    """The engine cannot run a unit of work; the message names the shard, bucket or address."""

    def __init__(self, message: str, shard: str | None = None) -> None:
        super().__init__(message)
        self.shard = shard


DRIVER, RAY_WORKER = "driver", "ray worker"


@dataclass(frozen=True)
class Worker:
    """Where a unit of work ran: node address, process, visible GPUs, Ray node id and role."""

    node: str
    pid: int
    devices: str = ""  # CUDA_VISIBLE_DEVICES; "" when unset
    node_id: str = ""  # the Ray node's id; "" outside Ray
    role: str = DRIVER  # DRIVER (the run's own process) or RAY_WORKER (a Ray task or actor)
    # A Ray unit's own cost in its worker process (None in the driver, whose stage figures cover it):
    # the peak RSS since the unit began (VmHWM reset, core/run/meter.py) and torch's CUDA peak, in MiB.
    peak_rss_mib: float | None = None
    gpu_peak_mib: float | None = None

    def __str__(self) -> str:
        return (
            f"{self.node}"
            + (f" node {self.node_id[:12]}" if self.node_id else "")
            + f" pid {self.pid}"
            + (f" CUDA_VISIBLE_DEVICES={self.devices}" if self.devices else "")
        )


def current_worker(role: str = DRIVER) -> Worker:
    """This process as a Worker (Ray sets CUDA_VISIBLE_DEVICES for actors and tasks that hold GPUs).

    `role`: RAY_WORKER when called from a Ray task or actor, DRIVER from the run's own process.
    """
    node, node_id = socket.gethostname(), ""
    # Only where Ray is already loaded: a process that never imported it (the local engine) cannot be
    # connected, and importing it to find that out costs every step ~1-2 s.
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        node, node_id = ray.util.get_node_ip_address(), ray.get_runtime_context().get_node_id()
    return Worker(node=node, pid=os.getpid(), devices=visible_cuda_devices(), node_id=node_id, role=role)


@dataclass
class Done(Generic[R]):
    """One finished unit: its shard or bucket key, the core function's result and where it ran."""

    unit: str
    result: R
    worker: Worker


class Engine(ABC):
    """Runs the per-shard and per-bucket units; yields each as it finishes (any order)."""

    name: str

    @abstractmethod
    def stage_shards(self, settings: Settings, shards: Sequence[Shard]) -> Iterator[Done]:
        """Validate every shard and stage its raw index (`core.ingest.stage.stage_shard`), yielding Done(key, StagedShard,
        worker); the caller publishes the batch (`core.ingest.stage.publish_shards`)."""

    @abstractmethod
    def embed_shards(self, settings: Settings, shards: Sequence[Shard], log: Log | None = None) -> Iterator[Done]:
        """Embed every shard (`core.embed.shard.embed_shard`), yielding Done(key, EmbedShardResult, worker)."""

    @abstractmethod
    def train_centroids(
        self,
        settings: Settings,
        embedding_files: Mapping[str, st.UPath],
        log: Log | None = None,
        warn: Log | None = None,
    ) -> Done:
        """Train and write the centroids (`core.cluster.centroids.train_centroids`): Done("centroids", CentroidsResult, worker)."""

    @abstractmethod
    def assign_shards(self, settings: Settings, keys: Sequence[str]) -> Iterator[Done]:
        """Assign every shard to the centroids file's clusters (`core.cluster.assign.assign_shard`), yielding
        Done(key, AssignShardResult, worker)."""

    @abstractmethod
    def dedup_buckets(
        self, settings: Settings, buckets: Sequence[str], k: int, assignment_files: Sequence[st.UPath]
    ) -> Iterator[Done]:
        """Deduplicate every bucket (`core.dedup.buckets.dedup_bucket`), yielding Done(bucket, DedupBucketResult, worker)."""

    @abstractmethod
    def build_keep_lists(self, settings: Settings, bucket_files: Sequence[st.UPath], log: Log | None = None) -> Done:
        """Write the keep-lists from the bucket files (`core.dedup.keep.build_keep_lists`): Done("keep_lists", KeepListsResult,
        worker)."""

    def close(self) -> None:  # noqa: B027  a no-op by default: an engine holding nothing need not override it
        """Release what the engine holds."""

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
