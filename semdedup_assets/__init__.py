"""SemDeDup (semantic deduplication, Abbas et al. 2023) as a Dagster asset graph."""

__version__ = "0.1.0"
