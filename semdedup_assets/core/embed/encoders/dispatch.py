"""Settings -> encoder: which registered factory a run's modality and `--model` string pick.

Kept apart from the registry so that the registry knows no encoder module (the static
encoder registers itself there, and the dispatch asks it whether a model is static).
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

from .base import Encoder
from .registry import create_encoder
from .static import wants_static

if TYPE_CHECKING:
    from semdedup_assets.core.config import Settings

__all__ = ["OPEN_CLIP_PREFIX", "encoder_for"]

# Text through CLIP's text tower: --model open_clip:ARCH (or open_clip:local-dir:PATH).
OPEN_CLIP_PREFIX = "open_clip:"


def encoder_for(settings: Settings) -> Encoder:
    """The encoder for the settings' modality and model, loaded once per process."""
    return _cached_encoder(
        settings.modality,
        settings.model,
        settings.pretrained,
        settings.pooling,
        settings.max_length,
        settings.batch_size,
        settings.num_workers,
        settings.device,
    )


# Keyed on the encoder's own knobs, so settings that differ elsewhere share one loaded model.
@functools.lru_cache(maxsize=4)
def _cached_encoder(
    modality: str,
    model: str | None,
    pretrained: str | None,
    pooling: str,
    max_length: int,
    batch_size: int,
    num_workers: int,
    device: str,
) -> Encoder:
    options: dict[str, object] = {"device": device, "batch_size": batch_size}
    if modality == "text" and model and model.startswith(OPEN_CLIP_PREFIX):
        return create_encoder("clip_text", model[len(OPEN_CLIP_PREFIX) :], pretrained=pretrained, **options)
    if modality == "text" and wants_static(model):  # model2vec:X, static, or a folder holding a static model
        return create_encoder("model2vec", model, max_length=max_length, **options)
    if modality == "text":
        options.update(pooling=pooling, max_length=max_length)
    elif modality == "image":
        options.update(pretrained=pretrained, num_workers=num_workers)
    return create_encoder(modality, model, **options)
