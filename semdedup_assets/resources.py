"""Resources: the pipeline settings, and a per-process cache of loaded encoders."""

from __future__ import annotations

import functools

import dagster as dg

from semdedup_assets.core.config import Settings
from semdedup_assets.core.encoders import Encoder, create_encoder
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
        return _cached_encoder(self.modality, self.model, self.pretrained, self.pooling, self.max_length,
                               self.batch_size, self.num_workers, self.device)


# Text through CLIP's text tower: --model open_clip:ARCH (or open_clip:local-dir:PATH).
OPEN_CLIP_PREFIX = "open_clip:"


@functools.lru_cache(maxsize=4)
def _cached_encoder(modality: str, model: str | None, pretrained: str | None, pooling: str, max_length: int,
                    batch_size: int, num_workers: int, device: str) -> Encoder:
    options: dict[str, object] = {"device": device, "batch_size": batch_size}
    if modality == "text" and model and model.startswith(OPEN_CLIP_PREFIX):
        return create_encoder("clip_text", model[len(OPEN_CLIP_PREFIX):], pretrained=pretrained, **options)
    if modality == "text":
        options.update(pooling=pooling, max_length=max_length)
    elif modality == "image":
        options.update(pretrained=pretrained, num_workers=num_workers)
    return create_encoder(modality, model, **options)
