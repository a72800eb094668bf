"""Plain-Python core of SemDeDup: one module per step, no Dagster imports."""
