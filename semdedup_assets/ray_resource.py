"""The Ray cluster of `--engine ray` as a Dagster resource, through dagster-ray.

The assets that scale out (`embeddings`, `semantic_duplicates`) take a `ray` resource
typed as dagster-ray's `RayResource`, so a deployment may bind any of its backends
(e.g. `dagster_ray.kuberay.KubeRayCluster`, which creates a RayCluster for each run and
connects to it); the engine then runs on whatever cluster that resource connected to.

The default binding, `SemDedupRay`, connects lazily: the engine and the address are
knobs of the `semdedup` settings resource (so the launchpad, sensors and backfills set
them like any other knob), and only a step whose settings say `engine: ray` connects:
to `ray_address`, or without one to the cluster of the Ray job it runs in (a run under
dagster-ray's RayRunLauncher) or else a new local instance. An unreachable address fails
that step at once, naming the address, before anything is written.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Generator
from contextlib import contextmanager
from typing import Any

import dagster as dg
from dagster_ray import RayResource
from pydantic import PrivateAttr

from semdedup_assets.core.config import Settings
from semdedup_assets.core.run.engines import Engine
from semdedup_assets.core.run.local_engine import LocalEngine
from semdedup_assets.core.run.ray_engine import (
    RayEngine,
    host_port,
    import_ray,
    ray_init_options,
    resolve_ray_address,
    starts_local_instance,
)


class SemDedupRay(RayResource):
    """dagster-ray's RayResource, connected on demand to the cluster the run's settings name."""

    _address: str | None = PrivateAttr(default=None)  # None: Ray's choice (the Ray job's cluster, or a new instance)
    _local: bool = PrivateAttr(default=False)  # this step started its own instance (ray.shutdown ends it)
    _init_context: Any = PrivateAttr(default=None)

    @property
    def host(self) -> str:
        return host_port(self._address)[0] if self._address else "127.0.0.1"

    @property
    def name(self) -> str:
        if self._address:
            return f"Ray cluster at {self._address}"
        return "local Ray instance" if self._local else "Ray cluster of this Ray job"

    @property
    def created(self) -> bool:  # an existing cluster or a local instance: nothing to create
        return True

    @property
    def ready(self) -> bool:
        return True

    @property
    def ray_address(self) -> str | None:  # type: ignore[override]
        return self._address

    @contextmanager
    def yield_for_execution(self, context: dg.InitResourceContext) -> Generator[SemDedupRay, None, None]:
        self._init_context = context
        try:
            yield self  # no connection yet: `connect_for` makes one if a step asks for engine=ray
        finally:
            if self.connected:
                self.cleanup(context, None)

    def connect_for(self, settings: Settings) -> None:
        """Connect to `settings.ray_address` (checked to be reachable first), or start a local instance."""
        ray = import_ray()

        if ray.is_initialized():  # `semdedup run` holds one connection for all its stages
            return
        self._address = resolve_ray_address(settings.ray_address)
        self._local = self._address is None and starts_local_instance()
        self._connect(self._init_context)

    def on_connect(self, context: Any) -> None:
        """Log where this step's driver is, from Ray's runtime context (dagster-ray's says "via Ray Client")."""
        import ray

        runtime = ray.get_runtime_context()
        context.log.info(
            f"connected to the Ray cluster at {runtime.gcs_address}"
            + (" (a new local instance)" if self._local else "")
            + f": Ray job {runtime.get_job_id()}, driver pid {os.getpid()} on node {runtime.get_node_id()}"
        )

    def on_cleanup(self, context: Any, *, deleted: bool) -> None:
        """What disconnecting did (dagster-ray's message says "Deleted" for any cluster it disconnects from)."""
        context.log.info(f"disconnected from the {self.name}" + (" (stopped)" if self._local else " (left running)"))

    def connect(self, context: Any) -> Any:
        """ray.init with dagster-ray's init options and injected environment on top of ours."""
        import ray

        options = {**ray_init_options(self._address), **self.ray_init_options}
        env_vars = self.get_env_vars_to_inject()
        if env_vars:
            options.setdefault("runtime_env", {}).setdefault("env_vars", {}).update(env_vars)
        self._context = ray.init(address=self._address, **options)
        return self._context


def engine_for_step(settings: Settings, ray_resource: RayResource, log: Callable[[str], None] | None = None) -> Engine:
    """The engine of one step: local, or Ray on the cluster the `ray` resource connects to."""
    if settings.engine != "ray":
        return LocalEngine()
    if isinstance(ray_resource, SemDedupRay):
        ray_resource.connect_for(settings)
    engine = RayEngine(settings)
    if log is not None:
        import ray

        log(f"engine ray: {len(ray.nodes())} node(s), resources {ray.cluster_resources()}")
    return engine
