"""Loading and saving the settings: defaults, the storage's `semdedup.json`, `SEMDEDUP_*` variables.

The model itself (`Settings`, its knobs and their types) is core/config.py and does no
I/O; this module reads the environment and the stored run's settings, and records a
run's settings in the storage root (atomically, see core/io/storage.py).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from typing import Any

from semdedup_assets.core.config import DEFAULT_STORAGE, ENV_PREFIX, Settings, coerce, knobs
from semdedup_assets.core.io.storage import Storage, atomic_write_bytes, check_store, to_upath


def environment_overrides(environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The knobs set by `SEMDEDUP_<NAME>` environment variables."""
    environ = os.environ if environ is None else environ
    return {f.name: environ[ENV_PREFIX + f.name.upper()] for f in knobs() if ENV_PREFIX + f.name.upper() in environ}


def storage_location(storage: str | None = None) -> str:
    """The storage root: the given one, else $SEMDEDUP_STORAGE, else the default."""
    return storage or os.environ.get(ENV_PREFIX + "STORAGE") or DEFAULT_STORAGE


def stored_settings(storage: str) -> dict[str, Any]:
    """The raw values recorded by the last `semdedup run` on this storage ({} if none)."""
    settings_file = Storage(storage).settings_file
    if not settings_file.exists():
        return {}
    try:
        return dict(json.loads(settings_file.read_text()))
    except (ValueError, OSError) as err:
        raise ValueError(f"cannot read the stored settings {settings_file}: {err}") from None


def _build(values: dict[str, Any]) -> Settings:
    unknown = set(values) - {f.name for f in dataclasses.fields(Settings)}
    if unknown:
        raise ValueError(f"unknown settings: {sorted(unknown)}")
    return Settings(**{k: coerce(k, v) for k, v in values.items()})


def load_settings(storage: str | None = None, *, use_stored: bool = True, **overrides: Any) -> Settings:
    """Defaults, then (if `use_stored`) `<storage>/semdedup.json`, then SEMDEDUP_* env vars, then overrides.

    `semdedup run` passes `use_stored=False`: the command line (and the environment) is the
    whole truth for a new run; everything else works on what the storage already holds.
    """
    storage = storage_location(storage)
    check_store(storage, "storage")  # refused credentials raise here, naming the bucket, not in exists()
    values: dict[str, Any] = stored_settings(storage) if use_stored else {}
    values.update(environment_overrides())
    values.update({k: v for k, v in overrides.items() if v is not None})
    values["storage"] = storage
    # Resolved once, here, before any command records or compares a path: a relative --reference
    # recorded by the stages as given and in semdedup.json as absolute failed every later export.
    return local_paths_absolute(_build(values))


PATH_KNOBS = ("storage", "input", "reference")  # locations: local paths are made absolute, URLs kept as given


def absolute_location(location: str) -> str:
    """A local path made absolute (from the current directory, `~` expanded); an fsspec URL as given."""
    if "://" in location and not location.startswith("file://"):
        return location
    return str(to_upath(location))


def local_paths_absolute(settings: Settings) -> Settings:
    """The settings with every local path knob absolute (URLs unchanged)."""
    return settings.replace(**{k: absolute_location(getattr(settings, k)) for k in PATH_KNOBS if getattr(settings, k)})


def changed_settings(settings: Settings) -> dict[str, tuple[Any, Any]]:
    """Knobs whose value differs from the run stored in the same storage: {name: (stored, now)}."""
    raw = stored_settings(settings.storage)
    if not raw:
        return {}
    try:
        stored = _build({**raw, "storage": settings.storage})
    except ValueError:
        return {}  # an older or hand-edited file: nothing sensible to compare
    now, before = _absolute(settings).to_dict(), _absolute(stored).to_dict()
    return {k: (before[k], now[k]) for k in now if k != "extra" and before[k] != now[k]}


def _absolute(settings: Settings) -> Settings:
    """The settings with local paths made absolute (URLs unchanged)."""
    return settings.replace(
        storage=str(to_upath(settings.storage)),
        input=str(to_upath(settings.input)) if settings.input else None,
        reference=str(to_upath(settings.reference)) if settings.reference else None,
    )


def save_settings(settings: Settings) -> None:
    """Record the settings in the storage root, with local paths made absolute."""
    atomic_write_bytes(_absolute(settings).to_json().encode(), settings.storage_root().settings_file)
