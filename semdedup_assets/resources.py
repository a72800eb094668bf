"""Resources: the pipeline settings as a Dagster resource, `SemDedupConfig`.

Its fields are declared here, one per knob of `core.config.Settings` (types as Dagster
config takes them: a Literal becomes str, which Settings validates; a tuple a list),
with the defaults taken from Settings, so the launchpad shows every knob and type
checkers see them. `settings()` turns the resource back into the plain `Settings` the
core functions take. test_settings_model.py fails when a knob is missing here, extra,
or typed or defaulted differently.
"""

from __future__ import annotations

import typing
from typing import Any, Literal

import dagster as dg

from semdedup_assets.core.config import Settings, default_of, knobs
from semdedup_assets.core.embed.encoders import Encoder, encoder_for
from semdedup_assets.core.io.storage import Storage


def resource_type(tp: Any) -> Any:
    """The Dagster config type of a Settings type: Literals become str (Settings validates), tuples lists."""
    if typing.get_origin(tp) is Literal:
        return str
    if typing.get_origin(tp) is tuple:
        return list[typing.get_args(tp)[0]]
    return tp


def _default(name: str) -> Any:
    """A knob's default as the resource holds it (a tuple as a list)."""
    value = default_of(next(f for f in knobs() if f.name == name))
    return list(value) if isinstance(value, tuple) else value


class SemDedupConfig(dg.ConfigurableResource):
    """Every knob of the pipeline (docs/configuration.md lists them), as in Settings."""

    storage: str  # required: a resource always names its storage root
    input: str | None = _default("input")
    files_per_shard: int = _default("files_per_shard")
    modality: str = _default("modality")
    column: str | None = _default("column")
    id_column: str = _default("id_column")
    model: str | None = _default("model")
    pretrained: str | None = _default("pretrained")
    num_workers: int = _default("num_workers")
    strict: bool = _default("strict")
    pooling: str = _default("pooling")
    max_length: int = _default("max_length")
    batch_size: int = _default("batch_size")
    device: str = _default("device")
    clusters: int | None = _default("clusters")
    kmeans_iterations: int = _default("kmeans_iterations")
    max_points_per_centroid: int = _default("max_points_per_centroid")
    seed: int = _default("seed")
    eps: list[float] = _default("eps")
    keep: str = _default("keep")
    keep_by: str | None = _default("keep_by")
    probes: int = _default("probes")
    buckets: int | None = _default("buckets")
    block_size: int = _default("block_size")
    memory_budget: str | None = _default("memory_budget")
    exact_copies: bool = _default("exact_copies")
    embedding_dtype: str = _default("embedding_dtype")
    precision: str = _default("precision")
    reference: str | None = _default("reference")
    compare_with: str | None = _default("compare_with")
    select: str | None = _default("select")
    prune: str | None = _default("prune")
    engine: str = _default("engine")
    ray_address: str | None = _default("ray_address")
    ray_actors: int = _default("ray_actors")
    ray_retries: int = _default("ray_retries")
    sensors: bool = _default("sensors")
    sensor_interval: int = _default("sensor_interval")
    retrain_cron: str = _default("retrain_cron")
    backfill_batch: int = _default("backfill_batch")
    progress_interval: float = _default("progress_interval")
    catalog: str = _default("catalog")

    @classmethod
    def from_settings(cls, settings: Settings) -> SemDedupConfig:
        """The resource for a Settings object."""
        values = {f.name: getattr(settings, f.name) for f in knobs()}
        return cls(**{k: list(v) if isinstance(v, tuple) else v for k, v in values.items()})

    def settings(self) -> Settings:
        """The plain Settings the core functions take."""
        values = {f.name: getattr(self, f.name) for f in knobs()}
        values["eps"] = tuple(values["eps"])
        return Settings(**values)

    def storage_root(self) -> Storage:
        """The storage root."""
        return self.settings().storage_root()

    def encoder(self) -> Encoder:
        """The encoder for the configured modality, loaded once per process."""
        return encoder_for(self.settings())


__all__ = ["SemDedupConfig"]
