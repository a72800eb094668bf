"""Modality -> encoder-factory registry, in the spirit of open_clip's `create_model` factory."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any, TypeVar

from .base import Encoder

__all__ = ["EncoderFactory", "available_modalities", "create_encoder", "register_encoder"]

EncoderFactory = Callable[..., Encoder]
F = TypeVar("F", bound=Callable[..., Any])

# Factories registered so far (filled by @register_encoder as modules are imported).
_FACTORIES: dict[str, Callable[..., Any]] = {}

# Built-in modalities whose module is imported only on first use, so that asking for
# "text" never pulls in e.g. open_clip. Later encoders add a line here (and decorate
# their factory with @register_encoder) to become available without an eager import.
_BUILTIN_MODULES: dict[str, str] = {
    "text": "semdedup_assets.core.embed.encoders.text",
    "image": "semdedup_assets.core.embed.encoders.clip",
    "clip_text": "semdedup_assets.core.embed.encoders.clip",
    "model2vec": "semdedup_assets.core.embed.encoders.static",
}


def _key(modality: str) -> str:
    """Normalise a modality name so "Text" and " text " mean the same thing."""
    if not isinstance(modality, str) or not modality.strip():
        raise ValueError(f"modality must be a non-empty string, got {modality!r}")
    return modality.strip().lower()


def _origin(factory: Callable[..., Any]) -> tuple[str | None, str | None]:
    """Identify a factory by where it was defined, which survives module reloads."""
    return getattr(factory, "__module__", None), getattr(factory, "__qualname__", None)


def register_encoder(modality: str, *, overwrite: bool = False) -> Callable[[F], F]:
    """Decorator registering `factory(model=..., **options) -> Encoder` under `modality`."""
    key = _key(modality)

    def decorator(factory: F) -> F:
        existing = _FACTORIES.get(key)
        # Re-registering the same factory (or its re-import after a module reload) is
        # harmless; a different factory silently replacing another is almost always a bug.
        if existing is not None and not overwrite and _origin(existing) != _origin(factory):
            raise ValueError(
                f"an encoder is already registered for modality {key!r} ({existing!r}); "
                "pass overwrite=True to replace it"
            )
        _FACTORIES[key] = factory
        return factory

    return decorator


def available_modalities() -> list[str]:
    """Sorted names of all modalities that `create_encoder` accepts."""
    return sorted(set(_FACTORIES) | set(_BUILTIN_MODULES))


def create_encoder(modality: str, model: str | None = None, **options: Any) -> Encoder:
    """Build the encoder registered for `modality`, passing `model` and `options` to its factory."""
    key = _key(modality)
    if key not in _FACTORIES and key in _BUILTIN_MODULES:
        # Importing the module runs its @register_encoder decorator.
        importlib.import_module(_BUILTIN_MODULES[key])
    factory = _FACTORIES.get(key)
    if factory is None:
        raise ValueError(
            f"unknown modality {modality!r}; registered modalities: {', '.join(available_modalities()) or '(none)'}"
        )
    encoder = factory(model=model, **options)
    if not isinstance(encoder, Encoder):
        raise TypeError(
            f"factory for modality {key!r} returned {type(encoder).__name__}, "
            "which does not implement the Encoder protocol"
        )
    return encoder
