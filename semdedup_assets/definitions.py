"""The one Definitions object of the code location (`dg` finds it through pyproject's [tool.dg];
workspace.yaml loads the same object for `dagster dev -w workspace.yaml`).

`defs` is loaded lazily (`@dg.definitions`): the settings, which may come from the
environment and the storage's `semdedup.json`, are read when Dagster loads the code
location, never at import time. It is one `SemDedup` component (component.py) with no
key prefix, the same component users put in their own projects.
"""

from __future__ import annotations

import dagster as dg

from semdedup_assets.component import SemDedup
from semdedup_assets.core.settings_store import load_settings
from semdedup_assets.graph import build_definitions

__all__ = ["build_definitions", "defs", "load_definitions"]


def load_definitions() -> dg.Definitions:
    """The code location's definitions, for the settings of the storage it points at."""
    return SemDedup.from_settings(load_settings()).definitions()


defs = dg.definitions(load_definitions)
