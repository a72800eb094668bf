"""Resources: the pipeline settings as a Dagster resource, derived from `Settings`.

The resource's fields are generated from `core.config.Settings` (names, types and
defaults), so every knob is defined once; the launchpad shows them all and
`settings()` turns the resource back into the plain `Settings` the core functions take.
"""

from __future__ import annotations

import typing
from typing import Any, Literal

import dagster as dg

from semdedup_assets.core.config import Settings, default_of, field_types, knobs
from semdedup_assets.core.encoders import Encoder, encoder_for
from semdedup_assets.core.storage import Storage


def _resource_type(tp: Any) -> Any:
    """Dagster config types for a Settings type: Literals become str (Settings validates), tuples lists."""
    if typing.get_origin(tp) is Literal:
        return str
    if typing.get_origin(tp) is tuple:
        return list[typing.get_args(tp)[0]]
    return tp


def _resource_fields() -> dict[str, Any]:
    annotations: dict[str, Any] = {}
    namespace: dict[str, Any] = {}
    types = field_types()
    for f in knobs():
        annotations[f.name] = _resource_type(types[f.name])
        default = default_of(f)
        if f.name == "storage":
            continue  # required: a resource always names its storage root
        namespace[f.name] = list(default) if isinstance(default, tuple) else default
    namespace["__annotations__"] = annotations
    return namespace


class _SemDedupConfigBase(dg.ConfigurableResource):
    """Methods of the settings resource; its fields come from Settings."""

    @classmethod
    def from_settings(cls, settings: Settings) -> "SemDedupConfig":
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


# Every knob of the pipeline (see the README's configuration table), generated from Settings.
SemDedupConfig = type("SemDedupConfig", (_SemDedupConfigBase,),
                      {"__module__": __name__, "__doc__": "Every knob of the pipeline, derived from Settings.",
                       **_resource_fields()})

__all__ = ["SemDedupConfig"]
