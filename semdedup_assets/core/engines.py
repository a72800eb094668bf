"""Engines: where the heavy per-partition units of work run.

- `local`: in this process, one unit after another (the default, and the demo's).
- `ray`: on a Ray cluster, a local instance or the one at `ray_address`. Shards stream
  through a pool of embedding actors: one per GPU (`num_gpus=1`, so Ray pins each
  actor's `CUDA_VISIBLE_DEVICES`) or, without GPUs, CPU actors that split the cores.
  Each actor loads the encoder once. The buckets of the pairwise rule are Ray tasks,
  one GPU each where the cluster has GPUs.

Both engines call the same core functions (`core.embed.embed_shard`,
`core.dedup.dedup_bucket`), which write their files atomically wherever they run, so
both give the same bytes. A worker that dies (killed, out of memory, node lost) is
retried `ray_retries` times; then the run fails naming the shard or bucket. Nothing
here imports Dagster; `ray` is imported only by the Ray engine.
"""

from __future__ import annotations

import os
import socket
from abc import ABC, abstractmethod
from collections import Counter, deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from semdedup_assets.core import storage as st
from semdedup_assets.core.config import Settings, visible_cuda_devices
from semdedup_assets.core.shards import ShardFile

R = TypeVar("R")
Log = Callable[[str], None]
REACHABLE_TIMEOUT_S = 5.0


class EngineError(RuntimeError):
    """The engine cannot run a unit of work; the message names the shard, bucket or address."""

    def __init__(self, message: str, shard: str | None = None) -> None:
        super().__init__(message)
        self.shard = shard


@dataclass(frozen=True)
class Worker:
    """Where a unit of work ran: node address, process and visible GPUs."""

    node: str
    pid: int
    devices: str = ""  # CUDA_VISIBLE_DEVICES; "" when unset

    def __str__(self) -> str:
        return f"{self.node} pid {self.pid}" + (f" CUDA_VISIBLE_DEVICES={self.devices}" if self.devices else "")


def current_worker() -> Worker:
    """This process as a Worker (Ray sets CUDA_VISIBLE_DEVICES for actors and tasks that hold GPUs)."""
    node = socket.gethostname()
    try:
        import ray

        if ray.is_initialized():
            node = ray.util.get_node_ip_address()
    except ImportError:
        pass
    return Worker(node=node, pid=os.getpid(), devices=visible_cuda_devices())


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
    def embed_shards(self, settings: Settings, shards: Sequence[ShardFile], log: Log | None = None) -> Iterator[Done]:
        """Embed every shard (`core.embed.embed_shard`), yielding Done(key, EmbedShardResult, worker)."""

    @abstractmethod
    def dedup_buckets(self, settings: Settings, buckets: Sequence[str], k: int,
                      assignment_files: Sequence[st.UPath]) -> Iterator[Done]:
        """Deduplicate every bucket (`core.dedup.dedup_bucket`), yielding Done(bucket, DedupBucketResult, worker)."""

    def close(self) -> None:
        """Release what the engine holds."""

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class LocalEngine(Engine):
    """Today's in-process path: one unit after another, the encoder loaded once per process."""

    name = "local"

    def embed_shards(self, settings: Settings, shards: Sequence[ShardFile], log: Log | None = None) -> Iterator[Done]:
        from semdedup_assets.core.embed import embed_shard

        worker = current_worker()
        for shard in shards:
            yield Done(shard.key, embed_shard(settings, shard.key, shard, log=log), worker)

    def dedup_buckets(self, settings: Settings, buckets: Sequence[str], k: int,
                      assignment_files: Sequence[st.UPath]) -> Iterator[Done]:
        from semdedup_assets.core.dedup import dedup_bucket

        worker = current_worker()
        for bucket in buckets:
            yield Done(bucket, dedup_bucket(settings, bucket, k, assignment_files), worker)


def engine_for(settings: Settings) -> Engine:
    """The engine the settings ask for (the Ray engine connects, or starts Ray, at once)."""
    return RayEngine(settings) if settings.engine == "ray" else LocalEngine()


# --- Ray ----------------------------------------------------------------------------------


def host_port(address: str) -> tuple[str, int]:
    """(host, port) of a Ray address (`HOST:PORT`, `ray://HOST:PORT`); a ValueError names a malformed one."""
    text = address.split("://", 1)[-1].rstrip("/")
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise EngineError(f"--ray-address {address!r} is not HOST:PORT, ray://HOST:PORT or auto")
    return host.strip("[]"), int(port)


def resolve_ray_address(address: str | None) -> str | None:
    """The address to connect to (None: start a local instance), checked to be reachable at once.

    `ray.init` on an address where nothing listens retries for minutes; a plain TCP connect
    answers in milliseconds, so a wrong address fails before any work starts.
    """
    if not address:
        return None
    resolved = address
    if address.strip() == "auto":
        from ray._private.services import canonicalize_bootstrap_address

        resolved = canonicalize_bootstrap_address("auto")
        if not resolved:
            raise EngineError("--ray-address auto: no running Ray cluster found on this machine (no RAY_ADDRESS, "
                              "no `ray start`)")
    host, port = host_port(resolved)
    try:
        socket.create_connection((host, port), timeout=REACHABLE_TIMEOUT_S).close()
    except OSError as err:
        raise EngineError(f"cannot reach the Ray cluster at {address!r} ({host}:{port}): {err}") from None
    return resolved


def import_ray() -> Any:
    """The ray module, or an EngineError saying how to install it."""
    try:
        import ray
    except ImportError:
        raise EngineError("--engine ray needs Ray: pip install 'semdedup-assets[ray]' (ray[default])") from None
    return ray


def ray_init_options(address: str | None) -> dict[str, Any]:
    """`ray.init` options: quiet drivers; a local instance keeps its sockets on the loopback, no dashboard."""
    options: dict[str, Any] = {"log_to_driver": False, "configure_logging": False}
    if address is None:
        options.update(include_dashboard=False, _node_ip_address="127.0.0.1")
    return options


def connect_ray(settings: Settings) -> bool:
    """Connect to the settings' Ray cluster, or start a local instance; False when Ray was already connected."""
    ray = import_ray()

    if ray.is_initialized():
        return False
    address = resolve_ray_address(settings.ray_address)
    ray.init(address=address, **ray_init_options(address))
    return True


@contextmanager
def ray_session(settings: Settings) -> Iterator[None]:
    """Hold one Ray connection (or local instance) for a block, e.g. every stage of `semdedup run`.

    Does nothing for engine=local. An unreachable address raises EngineError before the block runs.
    """
    owns = settings.engine == "ray" and connect_ray(settings)
    try:
        yield
    finally:
        if owns:
            import ray

            ray.shutdown()


# Ray reports a dead worker (killed, out of memory, node lost) with these; anything else
# is the unit's own error and is raised as it is.
def _worker_died_errors() -> tuple[type[BaseException], ...]:
    from ray import exceptions as rex

    return (rex.RayActorError, rex.WorkerCrashedError, rex.OutOfMemoryError, rex.NodeDiedError, rex.ObjectLostError)


class ShardEmbedder:
    """A Ray actor: loads the encoder once, then embeds the shards it is given, one at a time."""

    def __init__(self, settings: Settings, threads: int) -> None:
        from semdedup_assets.core.encoders import encoder_for

        if threads:
            import torch

            torch.set_num_threads(threads)
        self.settings = settings
        self.encoder = None if settings.modality == "embedding" else encoder_for(settings)

    def embed(self, shard: ShardFile) -> tuple[Any, Worker]:
        """Embed one shard; returns its EmbedShardResult and this worker."""
        from semdedup_assets.core.embed import embed_shard

        return embed_shard(self.settings, shard.key, shard, encoder=self.encoder), current_worker()


def _dedup_task(settings: Settings, bucket: str, k: int, assignment_files: Sequence[st.UPath],
                threads: int) -> tuple[Any, Worker]:
    from semdedup_assets.core.dedup import dedup_bucket

    if threads:
        import torch

        torch.set_num_threads(threads)

    return dedup_bucket(settings, bucket, k, assignment_files), current_worker()


def remove_temporaries(path: st.UPath) -> None:
    """Drop the temporary siblings a killed writer of `path` left behind (the file itself is untouched)."""
    if st.is_local(path) and path.parent.exists():
        for tmp in path.parent.glob(f".{path.name}.*.tmp"):
            tmp.unlink(missing_ok=True)


@dataclass(frozen=True)
class ActorPlan:
    """How many embedding actors, and the Ray resources and torch threads of each."""

    actors: int
    options: dict[str, float]
    threads: int


def plan_actors(settings: Settings, n_units: int, node_cpus: Sequence[float], gpus: float) -> ActorPlan:
    """One actor per GPU; without GPUs, `ray_actors` (default: one per CPU) actors splitting the cores.

    Never more actors than units, or than fit on the nodes (an actor that fits nowhere would wait forever).
    """
    if gpus >= 1:
        n = min(settings.ray_actors or int(gpus), int(gpus))
        return ActorPlan(max(1, min(n, n_units)), {"num_gpus": 1, "num_cpus": 0}, 0)
    total = int(sum(node_cpus)) or 1
    n = settings.ray_actors or total
    each = max(1, total // n)
    fits = sum(int(c) // each for c in node_cpus) or 1
    return ActorPlan(max(1, min(n, n_units, fits)), {"num_cpus": each}, each)


class RayEngine(Engine):
    """The per-partition work on Ray: an actor pool for embedding, tasks for the pairwise buckets."""

    name = "ray"

    def __init__(self, settings: Settings) -> None:
        self._owns_connection = connect_ray(settings)

    def close(self) -> None:
        if self._owns_connection:
            import ray

            ray.shutdown()
            self._owns_connection = False

    @staticmethod
    def _resources() -> tuple[list[float], float]:
        import ray

        nodes = [n for n in ray.nodes() if n.get("Alive")]
        return [n["Resources"].get("CPU", 0.0) for n in nodes], float(ray.cluster_resources().get("GPU", 0.0))

    def embed_shards(self, settings: Settings, shards: Sequence[ShardFile], log: Log | None = None) -> Iterator[Done]:
        import ray

        if not shards:
            return
        storage = settings.storage_root()
        node_cpus, gpus = self._resources()
        plan = plan_actors(settings, len(shards), node_cpus, gpus)
        actor_class = ray.remote(ShardEmbedder).options(max_restarts=0, max_task_retries=0, **plan.options)
        if log is not None:
            log(f"ray: {plan.actors} embedding actor(s), each {plan.options}")
        actors = [actor_class.remote(settings, plan.threads) for _ in range(plan.actors)]
        pending, attempts = deque(shards), Counter()
        inflight: dict[Any, tuple[int, ShardFile]] = {}

        def submit(i: int) -> None:
            if pending:
                shard = pending.popleft()
                inflight[actors[i].embed.remote(shard)] = (i, shard)

        def outputs(key: str) -> list[st.UPath]:
            return [storage.shard_file(st.EMBEDDINGS, key), storage.shard_file(st.REJECTED, key)]

        try:
            for i in range(len(actors)):
                submit(i)
            while inflight:
                (ref,), _ = ray.wait(list(inflight), num_returns=1)
                i, shard = inflight.pop(ref)
                try:
                    result, worker = _get(ref)
                except _worker_died_errors() as err:
                    attempts[shard.key] += 1
                    for path in outputs(shard.key):
                        remove_temporaries(path)
                    if attempts[shard.key] > settings.ray_retries:
                        raise EngineError(f"shard {shard.key!r}: its Ray worker died {attempts[shard.key]} time(s); "
                                          f"the {settings.ray_retries} retries are exhausted: "
                                          f"{_first_line(err)}", shard=shard.key) from None
                    if log is not None:
                        log(f"shard {shard.key!r}: its Ray worker died ({_first_line(err)}); retry "
                            f"{attempts[shard.key]} of {settings.ray_retries} on a new actor")
                    ray.kill(actors[i])
                    actors[i] = actor_class.remote(settings, plan.threads)
                    pending.appendleft(shard)
                    submit(i)
                    continue
                yield Done(shard.key, result, worker)
                submit(i)
        finally:
            for actor in actors:
                ray.kill(actor)

    def dedup_buckets(self, settings: Settings, buckets: Sequence[str], k: int,
                      assignment_files: Sequence[st.UPath]) -> Iterator[Done]:
        import ray

        if not buckets:
            return
        storage = settings.storage_root()
        node_cpus, gpus = self._resources()
        # Without GPUs a bucket task takes a whole node's cores, as the local engine takes the
        # machine's: a float32 GEMM's last bit can depend on the thread count for some tile shapes,
        # and with the same count per bucket the bucket files equal the local engine's byte for byte.
        threads = 0 if gpus >= 1 else max(1, int(min(node_cpus, default=1)))
        resources = {"num_gpus": 1, "num_cpus": 0} if gpus >= 1 else {"num_cpus": threads}
        # Ray itself re-runs a task whose worker died, up to ray_retries times; the unit's own
        # errors are not retried (they would fail again).
        task = ray.remote(_dedup_task).options(max_retries=settings.ray_retries, retry_exceptions=False, **resources)
        files = ray.put(list(assignment_files))
        refs = {task.remote(settings, bucket, k, files, threads): bucket for bucket in buckets}
        try:
            while refs:
                (ref,), _ = ray.wait(list(refs), num_returns=1)
                bucket = refs.pop(ref)
                try:
                    result, worker = _get(ref)
                except _worker_died_errors() as err:
                    raise EngineError(f"bucket {bucket}: its Ray worker died and the {settings.ray_retries} "
                                      f"retries are exhausted: {_first_line(err)}") from None
                finally:
                    remove_temporaries(storage.bucket_file(bucket))
                yield Done(bucket, result, worker)
        finally:
            for ref in refs:
                ray.cancel(ref, force=True)


def _get(ref: Any) -> Any:
    """ray.get, raising a unit's own error (e.g. a strict-mode EmbedError) as the core raised it."""
    import ray
    from ray.exceptions import RayTaskError

    try:
        return ray.get(ref)
    except RayTaskError as err:
        if isinstance(err.cause, Exception) and not isinstance(err.cause, RayTaskError):
            raise err.cause from None
        raise


def _first_line(err: BaseException) -> str:
    lines = [line for line in str(err).splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__
