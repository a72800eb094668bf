"""Plain-Python core of SemDeDup: one package per pipeline stage (io, ingest, embed, cluster, dedup, select, run, checks),
no Dagster imports. config.py (Settings) and settings_store.py serve every stage; plots.py draws
the metadata images."""
