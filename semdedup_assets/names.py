"""The names one asset graph takes in a Dagster deployment: asset keys, partitions, resources, pool, jobs.

This project's own code location uses the plain names (`raw_shards`, the `shards`
partitions, the `semdedup` and `ray` resources, the `gpu` pool, `ingest_job`, ...).
A `SemDedup` component (semdedup_assets/component.py) puts its graph under its own
names, so that two of them (two datasets) in one code location share no asset key,
dynamic partitions set, resource key, pool, job, sensor or schedule.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import dagster as dg

from semdedup_assets.partitions import SHARDS_PARTITIONS_NAME, shard_partitions


@dataclass(frozen=True)
class GraphNames:
    """Every Dagster-side name of one graph. `GraphNames()` is the project's own (unprefixed) graph."""

    prefix: tuple[str, ...] = ()
    partitions: str = SHARDS_PARTITIONS_NAME
    resource: str = "semdedup"
    ray_resource: str = "ray"
    pool: str = "gpu"

    @classmethod
    def for_component(cls, name: str, pool: str | None = None) -> "GraphNames":
        """The names of a component's graph: keys under `name/`, everything else prefixed `name_`."""
        return cls(prefix=(name,), partitions=f"{name}_shards", resource=f"semdedup_{name}",
                   ray_resource=f"ray_{name}", pool=pool or f"{name}_gpu")

    def key(self, name: str) -> dg.AssetKey:
        """The asset key of one of the graph's assets (`keep_lists` -> `dedup_c4/keep_lists`)."""
        return dg.AssetKey([*self.prefix, name])

    def definition(self, name: str) -> str:
        """A job, sensor or schedule name, unique per graph (`ingest_job` -> `dedup_c4_ingest_job`)."""
        return "_".join([*self.prefix, name])

    @cached_property
    def shard_partitions(self) -> dg.DynamicPartitionsDefinition:
        """The dynamic partitions of this graph's shards (one object per name, as Dagster compares them)."""
        if self.partitions == SHARDS_PARTITIONS_NAME:
            return shard_partitions
        return dg.DynamicPartitionsDefinition(name=self.partitions)


DEFAULT_NAMES = GraphNames()
