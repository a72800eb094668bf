"""SemDeDup (semantic deduplication, Abbas et al. 2023) as a Dagster asset graph, and as a library.

`from semdedup_assets import SemDeDup`: the method from Python, without Dagster (semdedup_assets.library).
`semdedup_assets.SemDedup`: the Dagster component. Both are imported on first use.
"""

from typing import Any

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    # `semdedup_assets.SemDedup`, the Component (dg's registry and defs.yaml `type:` name it so).
    # Imported on first use: `semdedup_assets.core` stays free of Dagster.
    if name in ("SemDeDup", "SemDeDupResult"):  # the library: no Dagster
        from semdedup_assets import library

        return getattr(library, name)
    if name == "SemDedup":
        from semdedup_assets.component import SemDedup

        return SemDedup
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), "SemDedup", "SemDeDup", "SemDeDupResult"])
