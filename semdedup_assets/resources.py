"""Resources: the pipeline settings, and a per-process cache of loaded encoders."""

from __future__ import annotations

import dagster as dg

from semdedup_assets.core.config import Settings
from semdedup_assets.core.encoders import Encoder, encoder_for
from semdedup_assets.core.storage import Storage


class SemDedupConfig(dg.ConfigurableResource):
    """Every knob of the pipeline (see the README's configuration table)."""

    storage: str
    input: str | None = None
    modality: str = "text"
    column: str | None = None
    id_column: str = "id"
    model: str | None = None
    pretrained: str | None = None
    num_workers: int = 2
    strict: bool = False
    pooling: str = "mean"
    max_length: int = 256
    batch_size: int = 64
    device: str = "auto"
    clusters: int | None = None
    kmeans_iterations: int = 20
    max_points_per_centroid: int = 256
    seed: int = 0
    eps: list[float] = list(Settings.eps)
    keep: str = "hard"
    buckets: int = 16
    block_size: int = 1024
    embedding_dtype: str = "float32"
    precision: str = "fp32"

    @classmethod
    def from_settings(cls, settings: Settings) -> "SemDedupConfig":
        """The resource for a Settings object."""
        fields = {k: getattr(settings, k) for k in cls.model_fields}
        fields["eps"] = list(settings.eps)
        return cls(**fields)

    def settings(self) -> Settings:
        """The plain Settings the core functions take."""
        values = {k: getattr(self, k) for k in type(self).model_fields}
        values["eps"] = tuple(values["eps"])
        return Settings(**values)

    def storage_root(self) -> Storage:
        """The storage root."""
        return Storage(self.storage)

    def encoder(self) -> Encoder:
        """The encoder for the configured modality, loaded once per process."""
        return encoder_for(self.settings())

