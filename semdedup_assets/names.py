"""The names one asset graph takes in a Dagster deployment: asset keys, partitions, resources, pool, jobs.

This project's own code location uses the plain names (`raw_shards`, the `shards`
partitions, the `semdedup` and `ray` resources, the `gpu` pool, `ingest_job`, ...).
A `SemDedup` component (semdedup_assets/component.py) puts its graph under its own
names, so that two of them (two datasets) in one code location share no asset key,
dynamic partitions set, resource key, pool, job, sensor or schedule.

A storage records the names of the graph that runs into it, and the Dagster instance
that graph records its partitions and runs in (`record_graph`, `<storage>/graph.json`), so
that every command on the storage (`status`, `forget`, `run`, ...) works on that graph's
partitions, jobs and runs, whichever component made it.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from functools import cached_property

import dagster as dg

from semdedup_assets.core.io.storage import Storage, UPath, atomic_write_bytes
from semdedup_assets.partitions import SHARDS_PARTITIONS_NAME, shard_partitions

GRAPH_FILE = "graph.json"


@dataclass(frozen=True)
class GraphNames:
    """Every Dagster-side name of one graph. `GraphNames()` is the project's own (unprefixed) graph."""

    prefix: tuple[str, ...] = ()
    partitions: str = SHARDS_PARTITIONS_NAME
    resource: str = "semdedup"
    ray_resource: str = "ray"
    pool: str = "gpu"

    @classmethod
    def for_component(cls, name: str, pool: str | None = None) -> GraphNames:
        """The names of a component's graph: keys under `name/`, everything else prefixed `name_`."""
        return cls(
            prefix=(name,),
            partitions=f"{name}_shards",
            resource=f"semdedup_{name}",
            ray_resource=f"ray_{name}",
            pool=pool or f"{name}_gpu",
        )

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


@dataclass(frozen=True)
class StorageGraph:
    """What a storage records about the graph that runs into it: its names, and its instance's home.

    `dagster_home` is None for the storage's own `<storage>/dagster_home` (recorded relative,
    so a moved or copied storage never reaches back into the instance of its old place).
    """

    names: GraphNames = DEFAULT_NAMES
    dagster_home: str | None = None


def graph_file(storage: Storage) -> UPath:
    """`<storage>/graph.json`."""
    return storage.root / GRAPH_FILE


def record_graph(storage: Storage, names: GraphNames, dagster_home: str | None) -> None:
    """Record the graph's names and its instance's home in the storage (before the graph records anything)."""
    own = str(storage.root / "dagster_home") if storage.local else None
    home = os.path.abspath(dagster_home) if dagster_home and "://" not in dagster_home else dagster_home
    record = StorageGraph(names, None if home == own else home)
    value = {
        "names": {**dataclasses.asdict(record.names), "prefix": list(record.names.prefix)},
        "dagster_home": record.dagster_home,
    }
    path = graph_file(storage)
    data = json.dumps(value, indent=2, sort_keys=True).encode()
    if not path.exists() or path.read_bytes() != data:
        atomic_write_bytes(data, path)


def recorded_graph(storage: Storage) -> StorageGraph:
    """The graph recorded in a storage (the plain names and its own instance when none is recorded).

    Raises ValueError naming the file when it cannot be read.
    """
    path = graph_file(storage)
    if not path.exists():
        return StorageGraph()
    try:
        value = json.loads(path.read_text())
        names = dict(value["names"])
        names["prefix"] = tuple(names["prefix"])
        return StorageGraph(GraphNames(**names), value.get("dagster_home"))
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f"cannot read the graph record {path}: {err}") from None
