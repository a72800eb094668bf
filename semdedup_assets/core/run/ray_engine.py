"""The Ray engine: the units on a Ray cluster (a local instance or the one at `ray_address`).

Shards stream through a pool of embedding actors (one per GPU, or CPU actors that split the cores);
k-means is one task on a GPU worker where there is one; assignments and dedup buckets are tasks;
the keep-lists are one CPU task; ingest's staging are tasks. `ray` is imported only inside the
functions here, so importing this module costs nothing. The contract is core.run.engines.
"""

from __future__ import annotations

import socket
from collections import Counter, deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any

from semdedup_assets.core.config import Settings
from semdedup_assets.core.io import storage as st
from semdedup_assets.core.io.shards import Shard
from semdedup_assets.core.run.engines import (
    CENTROIDS,
    KEEP_LISTS,
    RAY_WORKER,
    Done,
    Engine,
    EngineError,
    Log,
    R,
    Worker,
    current_worker,
)
from semdedup_assets.core.run.local_engine import LocalEngine  # k-means stays in the driver without a GPU
from semdedup_assets.core.run.meter import stage_meter

REACHABLE_TIMEOUT_S = 5.0


def host_port(address: str) -> tuple[str, int]:
    """(host, port) of a Ray address (`HOST:PORT`, `ray://HOST:PORT`); a ValueError names a malformed one."""
    text = address.split("://", 1)[-1].rstrip("/")
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise EngineError(f"--ray-address {address!r} is not HOST:PORT, ray://HOST:PORT or auto")
    return host.strip("[]"), int(port)


def resolve_ray_address(address: str | None) -> str | None:
    """The address to connect to (None: let Ray decide, see `starts_local_instance`), checked to be reachable at once.

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
            raise EngineError(
                "--ray-address auto: no running Ray cluster found on this machine (no RAY_ADDRESS, no `ray start`)"
            )
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


def starts_local_instance() -> bool:
    """Whether `ray.init()` with no address starts a new local instance (Ray's own look-up).

    With no address Ray connects to the cluster in RAY_ADDRESS, which Ray sets for every job's
    driver (a Dagster run under dagster-ray's RayRunLauncher is one), or to the latest
    `ray start` on this machine; only without either does it start an instance of its own.
    """
    from ray._private.services import canonicalize_bootstrap_address

    try:
        return canonicalize_bootstrap_address(None) is None
    except Exception:  # a malformed RAY_ADDRESS: ray.init will say so itself
        return False


def ray_init_options(address: str | None) -> dict[str, Any]:
    """`ray.init` options: quiet drivers; a new local instance keeps its sockets on the loopback, no dashboard.

    Not for an existing cluster found without an address (inside a Ray job): there the driver's
    node address is the node's own, and 127.0.0.1 would match no raylet of a real cluster.
    """
    options: dict[str, Any] = {"log_to_driver": False, "configure_logging": False}
    if address is None and starts_local_instance():
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


RAYON_THREADS_ENV = "RAYON_NUM_THREADS"  # the size of the tokenizers' (Rust, rayon) thread pool


class LazyEncoder:
    """The settings' encoder, loaded at its first use: an actor whose shards are all cached loads no model."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._encoder: Any = None

    def loaded(self) -> Any:
        """The encoder, loading it now if this is its first use."""
        if self._encoder is None:
            from semdedup_assets.core.embed.encoders import encoder_for

            self._encoder = encoder_for(self._settings)
        return self._encoder

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):  # not the encoder's (e.g. looked up while unpickling)
            raise AttributeError(name)
        return getattr(self.loaded(), name)


def in_ray_worker(work: Callable[[], R]) -> tuple[R, Worker]:
    """Run one unit in a Ray task or actor: its result, and this worker with the unit's peak RSS (and GPU memory).

    The driver's stage figures do not see a worker's memory; these let the stage's metadata
    show the largest unit's peak, so a user sees which stage and unit limit a node.
    """
    with stage_meter() as figures:
        result = work()
    gpu = figures.get("gpu_peak_mib")
    return result, replace(
        current_worker(RAY_WORKER),
        peak_rss_mib=float(figures["peak_rss_mib"]),
        gpu_peak_mib=None if gpu is None else float(gpu),
    )


class ShardEmbedder:
    """A Ray actor: loads the encoder once (at its first shard that is not cached), then embeds the shards it is
    given, one at a time."""

    def __init__(self, settings: Settings, threads: int) -> None:
        if threads:
            import torch

            torch.set_num_threads(threads)  # the tokenizers' pool is sized by the actor's runtime_env (plan_actors)
        self.settings = settings
        self.encoder = None if settings.modality == "embedding" else LazyEncoder(settings)

    def embed(self, shard: Shard) -> tuple[Any, Worker]:
        """Embed one shard; returns its EmbedShardResult and this worker."""
        from semdedup_assets.core.embed.shard import embed_shard

        return in_ray_worker(lambda: embed_shard(self.settings, shard.key, shard, encoder=self.encoder))


def _dedup_task(
    settings: Settings, bucket: str, k: int, assignment_files: Sequence[st.UPath], threads: int
) -> tuple[Any, Worker]:
    from semdedup_assets.core.dedup.buckets import dedup_bucket

    if threads:
        import torch

        torch.set_num_threads(threads)

    return in_ray_worker(lambda: dedup_bucket(settings, bucket, k, assignment_files))


def _stage_task(settings: Settings, shard: Shard) -> tuple[Any, Worker]:
    """One shard's ingest in a Ray worker: the input read by path, its raw index staged in storage."""
    from semdedup_assets.core.ingest.stage import stage_shard

    return in_ray_worker(lambda: stage_shard(settings, shard))


def _assign_task(settings: Settings, key: str) -> tuple[Any, Worker]:
    """One shard's assignment in a Ray worker: the centroids file and the shard's embeddings read by path."""
    from semdedup_assets.core.cluster.assign import assign_shard
    from semdedup_assets.core.cluster.centroids import load_centroids

    def work() -> Any:
        centroids = load_centroids(settings.storage_root())
        return assign_shard(settings, key, centroids, len(centroids))

    return in_ray_worker(work)


def _keep_lists_task(settings: Settings, bucket_files: Sequence[st.UPath]) -> tuple[tuple[Any, list[str]], Worker]:
    """The keep-lists in a Ray worker: the bucket files streamed from storage, the files written there."""
    from semdedup_assets.core.dedup.keep import build_keep_lists

    logs: list[str] = []
    return in_ray_worker(lambda: (build_keep_lists(settings, bucket_files, log=logs.append), logs))


@dataclass
class CentroidsRun:
    """What the k-means task hands back: the result, and the log lines and warnings the driver repeats."""

    result: Any  # CentroidsResult
    logs: list[str]
    warned: list[str]  # told to `warn` (k differs from --clusters)
    warnings: list[str]  # Python warnings (the sample capped by the memory budget)


def _centroids_task(
    settings: Settings, embedding_files: Mapping[str, st.UPath], threads: int
) -> tuple[CentroidsRun, Worker]:
    """k-means training on a GPU worker (faiss-gpu where importable there, else faiss' CPU math)."""
    import warnings

    import faiss

    from semdedup_assets.core.cluster.centroids import train_centroids

    if threads:  # the node's cores, as the local engine's faiss uses the machine's
        faiss.omp_set_num_threads(threads)
    logs: list[str] = []
    warned: list[str] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result, worker = in_ray_worker(
            lambda: train_centroids(settings, embedding_files, log=logs.append, warn=warned.append)
        )
    return CentroidsRun(result, logs, warned, [str(w.message) for w in caught]), worker


def remove_temporaries(path: st.UPath) -> None:
    """Drop the temporary siblings a killed writer of `path` left behind (the file itself is untouched).

    Local storage only: on S3 a unit's writer buffers in memory and writes the object whole, so a
    killed worker leaves nothing there (and a listing per unit would cost a request each).
    """
    if st.is_local(path):
        st.remove_temporaries([path])


@dataclass(frozen=True)
class ActorPlan:
    """How many embedding actors, and the Ray resources and torch threads of each."""

    actors: int
    options: dict[str, Any]  # ray.remote options: resources, and the runtime_env of CPU actors
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
    # The Rust tokenizers run their own thread pool, one thread per core of the node unless told otherwise:
    # C actors on C cores would each start C threads. Ray starts each actor's process with this environment,
    # so the pool (made at the first batch) holds to the actor's share; token ids do not depend on it.
    options = {"num_cpus": each, "runtime_env": {"env_vars": {RAYON_THREADS_ENV: str(each)}}}
    return ActorPlan(max(1, min(n, n_units, fits)), options, each)


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

    def embed_shards(self, settings: Settings, shards: Sequence[Shard], log: Log | None = None) -> Iterator[Done]:
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
        inflight: dict[Any, tuple[int, Shard]] = {}

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
                        raise worker_died_error(
                            "shard", shard.key, attempts[shard.key], settings.ray_retries, err
                        ) from None
                    if log is not None:
                        log(
                            f"shard {shard.key!r}: its Ray worker died ({_first_line(err)}); retry "
                            f"{attempts[shard.key]} of {settings.ray_retries} on a new actor"
                        )
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

    def train_centroids(
        self,
        settings: Settings,
        embedding_files: Mapping[str, st.UPath],
        log: Log | None = None,
        warn: Log | None = None,
    ) -> Done:
        import warnings

        import ray

        node_cpus, gpus = self._resources()
        if gpus < 1:  # no GPU to gain: k-means stays in the driver, as with the local engine
            if log is not None:
                log("ray: no GPU in the cluster, k-means trains in the driver")
            return LocalEngine().train_centroids(settings, embedding_files, log=log, warn=warn)
        task = ray.remote(_centroids_task).options(
            max_retries=settings.ray_retries, retry_exceptions=False, num_gpus=1, num_cpus=0
        )
        storage = settings.storage_root()
        threads = max(1, int(min(node_cpus, default=1)))
        if log is not None:
            log("ray: k-means trains in one task on a GPU worker")
        (done,) = self._run_tasks(
            settings,
            task,
            [(CENTROIDS, (settings, dict(embedding_files), threads))],
            kind="k-means",
            outputs=lambda _: [storage.centroids_file],
        )
        run: CentroidsRun = done.result
        for line in run.logs if log is not None else []:
            log(f"{line} (on {done.worker})")
        for message in run.warned if warn is not None else []:
            warn(message)
        for message in run.warnings:
            warnings.warn(message, stacklevel=2)
        return Done(CENTROIDS, run.result, done.worker)

    def stage_shards(self, settings: Settings, shards: Sequence[Shard]) -> Iterator[Done]:
        import ray

        if not shards:
            return
        # O(shard) each, one CPU per task: a node reads and validates as many shards at once as it has cores. The
        # staged files stay after a task (the run's process publishes or discards the whole batch).
        task = ray.remote(_stage_task).options(max_retries=settings.ray_retries, retry_exceptions=False, num_cpus=1)
        yield from self._run_tasks(
            settings, task, [(shard.key, (settings, shard)) for shard in shards], kind="shard", outputs=lambda key: []
        )

    def assign_shards(self, settings: Settings, keys: Sequence[str]) -> Iterator[Done]:
        import ray

        if not keys:
            return
        storage = settings.storage_root()
        _, gpus = self._resources()
        # O(shard + k*d) each: one CPU (or one GPU) per task, so a node runs as many shards as it has cores.
        resources = {"num_gpus": 1, "num_cpus": 0} if gpus >= 1 else {"num_cpus": 1}
        task = ray.remote(_assign_task).options(max_retries=settings.ray_retries, retry_exceptions=False, **resources)
        yield from self._run_tasks(
            settings,
            task,
            [(key, (settings, key)) for key in keys],
            kind="shard",
            outputs=lambda key: [storage.shard_file(st.CLUSTER_ASSIGNMENTS, key)],
        )

    def dedup_buckets(
        self, settings: Settings, buckets: Sequence[str], k: int, assignment_files: Sequence[st.UPath]
    ) -> Iterator[Done]:
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
        task = ray.remote(_dedup_task).options(max_retries=settings.ray_retries, retry_exceptions=False, **resources)
        files = ray.put(list(assignment_files))
        yield from self._run_tasks(
            settings,
            task,
            [(bucket, (settings, bucket, k, files, threads)) for bucket in buckets],
            kind="bucket",
            outputs=lambda bucket: [storage.bucket_file(bucket)],
        )

    def build_keep_lists(self, settings: Settings, bucket_files: Sequence[st.UPath], log: Log | None = None) -> Done:
        import ray

        storage = settings.storage_root()
        # A streaming merge of the bucket files: one CPU, on whichever node Ray picks.
        task = ray.remote(_keep_lists_task).options(
            max_retries=settings.ray_retries, retry_exceptions=False, num_cpus=1
        )
        outputs = [storage.keep_list_file(e) for e in settings.eps] + [storage.eps_curve_file]
        outputs += [storage.groups_file(e) for e in settings.eps]
        (done,) = self._run_tasks(
            settings, task, [(KEEP_LISTS, (settings, list(bucket_files)))], kind="keep-lists", outputs=lambda _: outputs
        )
        result, logs = done.result
        for line in logs if log is not None else []:
            log(line)
        return Done(KEEP_LISTS, result, done.worker)

    @staticmethod
    def _run_tasks(
        settings: Settings,
        task: Any,
        units: Sequence[tuple[str, tuple]],
        kind: str,
        outputs: Callable[[str], list[st.UPath]],
    ) -> Iterator[Done]:
        """Submit one Ray task per unit, yield each as it finishes; a unit past its retries fails naming it.

        Ray itself re-runs a task whose worker died, up to `ray_retries` times (`max_retries`);
        the unit's own errors are not retried (they would fail again). A killed writer's
        temporary files are removed, so no partial output remains.
        """
        import ray

        refs = {task.remote(*args): unit for unit, args in units}
        try:
            while refs:
                (ref,), _ = ray.wait(list(refs), num_returns=1)
                unit = refs.pop(ref)
                try:
                    result, worker = _get(ref)
                except _worker_died_errors() as err:
                    raise worker_died_error(kind, unit, settings.ray_retries + 1, settings.ray_retries, err) from None
                finally:
                    for path in outputs(unit):
                        remove_temporaries(path)
                yield Done(unit, result, worker)
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


def worker_died_error(kind: str, unit: str, deaths: int, retries: int, err: BaseException) -> EngineError:
    """The error of a unit whose Ray worker died past its retries, naming the shard, bucket or k-means."""
    name = f"{kind} {unit!r}" if kind in ("shard", "bucket") else kind
    return EngineError(
        f"{name}: its Ray worker died {deaths} time(s); the {retries} retries are exhausted: {_first_line(err)}",
        shard=unit if kind == "shard" else None,
    )


def _first_line(err: BaseException) -> str:
    lines = [line for line in str(err).splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__
